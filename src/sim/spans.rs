//! Spans of the real driver under the simulation: each datagram's span records what that
//! datagram did, also when several arrive in one receive burst.

use super::{Faults, Sim};
use crate::telemetry::TARGET;
use crate::wire::{ClientRequest, Placement, ReplyBody, Routing};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// A finished span: its name and every field recorded on it.
#[derive(Debug, Clone, Default)]
struct Captured {
    name: String,
    fields: BTreeMap<String, String>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Keeps every span of the project's target, and hands it over when it closes.
#[derive(Clone, Default)]
struct Capture {
    closed: Arc<Mutex<Vec<Captured>>>,
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != TARGET {
            return;
        }
        let mut c = Captured {
            name: attrs.metadata().name().into(),
            ..Captured::default()
        };
        attrs.record(&mut Fields(&mut c.fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(c);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(c) = span.extensions_mut().get_mut::<Captured>()
        {
            values.record(&mut Fields(&mut c.fields));
        }
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(c) = span.extensions_mut().remove::<Captured>()
            && let Ok(mut closed) = self.closed.lock()
        {
            closed.push(c);
        }
    }
}

#[test]
fn a_query_and_a_status_in_one_burst_each_end_on_their_own_span() {
    let capture = Capture::default();
    let subscriber = Registry::default().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        let mut sim = Sim::new(40, Faults::none(), Placement::Consistent);
        for i in 0..3 {
            sim.add_peer(&format!("peer-{i}"));
        }
        assert!(sim.run_until(Duration::from_secs(10), |s| s.registered() == 3));
        sim.request(ClientRequest::Setup).expect("setup");
        let key = crate::record::RecordKey::Event(5_570_068);

        // Both requests wait at the manager's socket and are read in one burst.
        let manager = sim.manager_addr;
        sim.net.hold(manager);
        let query = sim.request_in_background(ClientRequest::Query {
            key,
            via: None,
            routing: None,
        });
        let status = sim.request_in_background(ClientRequest::Status);
        sim.advance(Duration::from_millis(5));
        sim.net.release(manager);
        assert!(sim.run_until(Duration::from_secs(10), |_| {
            query.borrow().is_some() && status.borrow().is_some()
        }));
        assert!(matches!(*query.borrow(), Some(Ok(ReplyBody::Query(_)))));
        assert!(matches!(*status.borrow(), Some(Ok(ReplyBody::Status(_)))));
        // Let the spans the driver still holds close with the simulation.
        drop(sim);
    });

    let closed = capture.closed.lock().unwrap().clone();
    let by_command = |command: &str| -> Vec<Captured> {
        closed
            .iter()
            .filter(|c| {
                c.name == "manager" && c.fields.get("command").map(String::as_str) == Some(command)
            })
            .cloned()
            .collect()
    };
    let queries = by_command("query");
    let statuses = by_command("status");
    assert_eq!(queries.len(), 1, "{closed:#?}");
    assert_eq!(statuses.len(), 1, "{closed:#?}");
    let (q, s) = (&queries[0], &statuses[0]);
    // The query's span ended on the query's own outcome ...
    assert!(q.fields.contains_key("entry.peer.id"), "{q:?}");
    assert_eq!(
        q.fields.get("found").map(String::as_str),
        Some("false"),
        "{q:?}"
    );
    // ... and the status's span took nothing of the query's.
    for field in ["entry.peer.id", "found", "path", "network.peer.address"] {
        assert!(
            !s.fields.contains_key(field),
            "status span has {field}: {s:?}"
        );
    }
    // Each hop of the walk had its own span.
    assert!(closed.iter().any(|c| c.name == "find_event"), "{closed:#?}");
}

/// A ring view too large for one datagram travels in fragments. The peer's `ring_update`
/// span is opened for the whole view once it is put together, with the view's fields;
/// before, no span was opened for a fragment, so the setup of a large cluster showed no
/// ring update at all.
#[test]
fn a_view_put_together_from_fragments_has_its_ring_update_span() {
    let capture = Capture::default();
    let subscriber = Registry::default().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        // 32 tokens a peer: 8 members' view is about 2,800 bytes, two 2,000-byte datagrams.
        let mut sim = Sim::with_datagrams(
            42,
            Faults::none(),
            Placement::Consistent,
            2,
            Routing::Walk,
            32,
            2_000,
        );
        for i in 0..8 {
            sim.add_peer(&format!("peer-{i}"));
        }
        assert!(sim.run_until(Duration::from_secs(10), |s| s.registered() == 8));
        sim.request(ClientRequest::Setup).expect("setup");
        sim.settle();
        let view = sim.manager().ring().cloned().expect("a ring");
        assert!(
            crate::wire::cbor_len(&view) > 2_000,
            "the view fits a datagram"
        );
        assert!(sim.peers.iter().all(|p| p.peer().ring() == Some(&view)));
        drop(sim);
    });

    let closed = capture.closed.lock().unwrap().clone();
    // Setup sends each member the whole view (nobody held one before): in fragments.
    for i in 0..8 {
        let name = format!("peer-{i}");
        let updates: Vec<&Captured> = closed
            .iter()
            .filter(|c| {
                c.name == "ring_update"
                    && c.fields.get("peer.name") == Some(&name)
                    && c.fields.get("members").map(String::as_str) == Some("8")
                    && !c.fields.contains_key("delta.base")
            })
            .collect();
        assert!(
            updates.iter().all(|c| c.fields.contains_key("epoch")),
            "{updates:#?}"
        );
        assert!(
            !updates.is_empty(),
            "{name}: no ring_update span for the whole view: {closed:#?}"
        );
    }
}
