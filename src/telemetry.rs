//! Logs and traces: a `tracing` subscriber with two independently filtered layers, the log
//! lines (`RUST_LOG` or the `telemetry.log` key) and OpenTelemetry spans exported over OTLP/gRPC
//! by a batching exporter, so exporting never blocks the UDP path.
//!
//! A tracer provider is always installed. Spans are built where they can be seen: in every
//! process that exports them, and always in `stormctl` (its one root span gives a query its
//! trace id). A daemon that exports nothing builds no span at all, because a span per datagram
//! was a quarter of a peer's CPU per query; the trace context a datagram carries still travels
//! on unchanged, so a trace stays one trace across exporting and silent processes.
//! [`Telemetry::shutdown`] flushes what is buffered; dropping the provider would lose it.

use crate::config::TelemetryConfig;
use crate::wire::TraceContext;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use std::time::Duration;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// The tracing target of every span meant for export.
pub const TARGET: &str = "stormdht";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter '{filter}': {reason}")]
    Filter { filter: String, reason: String },
    #[error("could not build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Which processes build spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spans {
    /// Even when nothing is exported (a client: its trace id is printed and sent on).
    Always,
    /// Only when an OTLP endpoint is configured (a daemon: spans cost CPU on every datagram).
    WhenExported,
}

pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Where spans go, if anywhere.
    pub endpoint: Option<String>,
    pub service_name: String,
}

/// The OTLP endpoint: the project's key, else the standard variable, else none.
pub fn endpoint(cfg: &TelemetryConfig) -> Option<String> {
    let configured = cfg.otlp_endpoint.trim();
    if !configured.is_empty() {
        return Some(configured.to_string());
    }
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
}

/// Installs the global subscriber, tracer provider and propagator. Must run inside a tokio
/// runtime (the gRPC exporter needs one).
pub fn init(
    cfg: &TelemetryConfig,
    default_service: &str,
    instance_id: &str,
    spans: Spans,
) -> Result<Telemetry, TelemetryError> {
    let service_name = [
        cfg.service_name.trim().to_string(),
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_default(),
    ]
    .into_iter()
    .find(|s| !s.trim().is_empty())
    .unwrap_or_else(|| default_service.to_string());
    let resource = Resource::builder()
        .with_service_name(service_name.clone())
        .with_attribute(KeyValue::new(
            "service.instance.id",
            instance_id.to_string(),
        ))
        .build();
    let endpoint = endpoint(cfg);
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(url) = &endpoint {
        use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url.clone())
            .with_timeout(Duration::from_secs(3))
            .with_compression(opentelemetry_otlp::Compression::Gzip)
            .build();
        let exporter = match exporter {
            Ok(e) => e,
            // gzip support may be compiled out: plain is fine too.
            Err(_) => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .with_timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: url.clone(),
                    reason: e.to_string(),
                })?,
        };
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("stormdht");

    let log_filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| cfg.log.clone());
    let env_filter = EnvFilter::try_new(&log_filter).map_err(|e| TelemetryError::Filter {
        filter: log_filter.clone(),
        reason: e.to_string(),
    })?;
    let exported = spans == Spans::Always || endpoint.is_some();
    subscriber(env_filter, tracer, exported)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if let Some(url) = &endpoint {
        tracing::info!(endpoint = %url, service = %service_name, "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry {
        provider,
        endpoint,
        service_name,
    })
}

/// The subscriber `init` installs: log lines by `env_filter`, and spans of [`TARGET`] for the
/// tracer when they are `exported`.
fn subscriber(
    env_filter: EnvFilter,
    tracer: opentelemetry_sdk::trace::Tracer,
    exported: bool,
) -> impl tracing::Subscriber + Send + Sync {
    // Separate filters: a quiet log level must not switch off the spans that are exported.
    // The log lines leave out the spans meant for export (one per datagram): formatting their
    // fields for every datagram cost more than handling it, and the drivers log a datagram's
    // events after its span has closed, so no log line loses its context.
    let log_layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(env_filter.and(filter_fn(|meta| {
            !(meta.is_span() && meta.target() == TARGET)
        })));
    // Not exported, the span layer stays but lets nothing in. An absent (`None`) layer counts
    // as one that wants everything: every datagram then paid for a span that nobody read (its
    // allocation, its fields, its remote parent), about a tenth of a peer's time per query.
    let span_targets = if exported {
        Targets::new().with_target(TARGET, tracing::Level::INFO)
    } else {
        Targets::new()
    };
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(span_targets);
    tracing_subscriber::registry()
        .with(log_layer)
        .with(otel_layer)
}

impl Telemetry {
    /// Flushes buffered spans and stops the exporter. Runs on a blocking thread: flushing from
    /// a runtime worker can deadlock the exporter's own tasks.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let flush = tokio::task::spawn_blocking(move || {
            let flush = provider.force_flush();
            let stop = provider.shutdown_with_timeout(FLUSH_LIMIT);
            flush.and(stop)
        });
        // A collector that is missing (its name does not resolve) or dead (it accepts and never
        // answers) must not hold an exit: give up after FLUSH_LIMIT and leave the blocking
        // thread behind (the binaries shut their runtime down without waiting for it).
        let why = match tokio::time::timeout(FLUSH_LIMIT, flush).await {
            Ok(Ok(Ok(()))) => return,
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {FLUSH_LIMIT:?}; spans not yet sent are dropped"),
        };
        if let Some(endpoint) = &self.endpoint {
            tracing::warn!("could not flush traces to {endpoint}: {why}");
        }
    }
}

/// How long an exit waits for the trace exporter, at most.
pub const FLUSH_LIMIT: Duration = Duration::from_millis(800);

/// The W3C context of `span`, to put in an outgoing envelope.
pub fn context_of(span: &Span) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    let traceparent = carrier.remove("traceparent")?;
    let tracestate = carrier.remove("tracestate").filter(|s| !s.is_empty());
    Some(TraceContext {
        traceparent,
        tracestate,
    })
}

/// Makes the remote span in `trace` the parent of `span` (before it is entered).
pub fn set_remote_parent(span: &Span, trace: Option<&TraceContext>) {
    let Some(t) = trace.filter(|_| !span.is_disabled()) else {
        return;
    };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), t.traceparent.clone());
    if let Some(state) = &t.tracestate {
        carrier.insert("tracestate".to_string(), state.clone());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span`, as 32 hex digits.
pub fn trace_id_of(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_subscriber(exported: bool, f: impl FnOnce()) {
        let provider = SdkTracerProvider::builder().build();
        global::set_text_map_propagator(TraceContextPropagator::new());
        let sub = subscriber(EnvFilter::new("info"), provider.tracer("test"), exported);
        tracing::subscriber::with_default(sub, f);
    }

    #[test]
    fn spans_nobody_exports_are_not_built() {
        with_subscriber(false, || {
            let span = tracing::info_span!(target: TARGET, "find_event", hop = 1);
            assert!(
                span.is_disabled(),
                "a span was built with nothing to export it"
            );
            assert_eq!(context_of(&span), None);
            // Another target's span is the log layer's business, by its filter.
            let logged = tracing::info_span!(target: "elsewhere", "work");
            assert!(!logged.is_disabled());
        });
    }

    #[test]
    fn exported_spans_are_built_and_carry_a_context() {
        with_subscriber(true, || {
            let span = tracing::info_span!(target: TARGET, "find_event", hop = 1);
            assert!(!span.is_disabled());
            let cx = context_of(&span).expect("a sampled span has a context");
            assert!(cx.traceparent.starts_with("00-"), "{}", cx.traceparent);
            // A child made remote from that context joins its trace.
            let child = tracing::info_span!(target: TARGET, "find_event", hop = 2);
            set_remote_parent(&child, Some(&cx));
            assert_eq!(trace_id_of(&child), trace_id_of(&span));
        });
    }
}
