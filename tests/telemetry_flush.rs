//! The two exporter pitfalls: spans buffered at exit are lost unless the provider is shut down
//! explicitly, and a flush from a single-threaded runtime can hang. `Telemetry::shutdown`
//! must deliver buffered spans from a current-thread runtime, promptly.

mod support;

use std::time::{Duration, Instant};
use stormdht::config::TelemetryConfig;
use support::otlp::OtlpReceiver;

#[test]
fn shutdown_flushes_buffered_spans_from_a_current_thread_runtime() {
    let receiver = OtlpReceiver::start();
    let cfg = TelemetryConfig {
        otlp_endpoint: receiver.endpoint.clone(),
        service_name: "flush-test".into(),
        jaeger_ui: String::new(),
        log: "warn".into(),
    };
    // Nothing leaves before shutdown: the batch delay is far longer than the test.
    // SAFETY of set_var: this test binary has one test and sets it before any thread reads it.
    unsafe { std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "600000") };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let telemetry = stormdht::telemetry::init(
            &cfg,
            "unused",
            "flush-instance",
            stormdht::telemetry::Spans::Always,
        )
        .expect("telemetry");
        for i in 0..3 {
            let span = tracing::info_span!(target: stormdht::telemetry::TARGET, "buffered", i);
            drop(span);
        }
        assert!(
            receiver.spans().is_empty(),
            "nothing should be exported before shutdown"
        );
        telemetry.shutdown().await;
    });
    let elapsed = started.elapsed();
    let spans = receiver.wait_for(Duration::from_secs(5), |s| s.len() >= 3);
    assert_eq!(
        spans.iter().filter(|s| s.name == "buffered").count(),
        3,
        "{spans:#?}"
    );
    assert!(
        spans
            .iter()
            .all(|s| s.service == "flush-test" && s.instance == "flush-instance")
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "shutdown took {elapsed:?}"
    );
}
