//! Every query is one trace: stormctl's root span, the manager's span, then one span per peer
//! hop, each the child of the hop before, exported over OTLP to a receiver the test runs.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::otlp::{OtlpReceiver, SpanRecord};
use support::*;

fn traced_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        // Spans leave only when a process flushes at exit (teardown, SIGTERM): the test then
        // proves that nothing buffered is lost.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_string()),
    ]
}

fn ctl_traced(cluster: &Cluster, endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(STORMCTL)
        .arg("--manager")
        .arg(cluster.manager.addr.to_string())
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .output()
        .expect("stormctl")
}

/// Finds a key and an entry peer such that the owner is at least `hops` hops from the entry.
fn far_query(cluster: &Cluster, keys: &[&str], peers: &[String], hops: usize) -> (String, String) {
    for key in keys {
        let q = cluster.ctl_json(&["query", key]);
        let owner = q["path"]
            .as_array()
            .and_then(|p| p.last())
            .and_then(|v| v.as_u64())
            .unwrap();
        for via in peers {
            let q = cluster.ctl_json(&["query", key, "--via", via]);
            if q["found"] == true && q["path"].as_array().map_or(0, Vec::len) > hops {
                assert_eq!(
                    q["path"].as_array().unwrap().last().unwrap().as_u64(),
                    Some(owner)
                );
                return (key.to_string(), via.clone());
            }
        }
    }
    panic!("no key found {hops} hops away");
}

/// The spans of one trace.
fn trace_of(spans: &[SpanRecord], trace_id: &str) -> Vec<SpanRecord> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

/// The trace's root: stormctl's span.
fn root_of(trace: &[SpanRecord]) -> &SpanRecord {
    trace
        .iter()
        .find(|s| s.service == "stormctl")
        .unwrap_or_else(|| panic!("no stormctl span: {trace:#?}"))
}

fn hop_spans(spans: &[SpanRecord]) -> Vec<SpanRecord> {
    let mut hops: Vec<SpanRecord> = spans
        .iter()
        .filter(|s| s.name == "find_event")
        .cloned()
        .collect();
    hops.sort_by_key(|s| {
        s.attr("hop")
            .and_then(|h| h.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    hops
}

/// Teardown, then SIGTERM to the manager: every process exits 0, flushing what it buffered.
fn teardown_and_flush(cluster: &mut Cluster) {
    cluster.ctl_json(&["teardown"]);
    for p in cluster.peers.iter_mut() {
        assert_eq!(
            p.wait(Duration::from_secs(10)).and_then(|s| s.code()),
            Some(0)
        );
    }
    assert_eq!(cluster.manager.stop("TERM"), Some(0));
}

#[test]
fn a_query_is_one_trace_with_one_span_per_hop() {
    let receiver = OtlpReceiver::start();
    let env = traced_env(&receiver.endpoint);
    let mut cluster = Cluster::start_with(6, &env);
    let file = shared_data("details-1950.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let names: Vec<String> = cluster.peers.iter().map(|p| p.name.clone()).collect();
    let (key, via) = far_query(
        &cluster,
        &["10096222", "10120412", "10104927", "9991519", "10104929"],
        &names,
        3,
    );

    let out = ctl_traced(
        &cluster,
        &receiver.endpoint,
        &[
            "--json",
            "--jaeger-ui",
            "http://localhost:16686",
            "query",
            &key,
            "--via",
            &via,
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let found = parse_json(&out);
    let trace_id = found["trace_id"]
        .as_str()
        .expect("stormctl reports the trace id")
        .to_string();
    assert_eq!(
        found["trace_url"],
        format!("http://localhost:16686/trace/{trace_id}")
    );
    let path: Vec<u64> = found["path"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert!(
        path.len() >= 4,
        "owner should be 3+ hops from the entry: {path:?}"
    );

    let out = ctl_traced(
        &cluster,
        &receiver.endpoint,
        &["--json", "query", "1", "--via", &via],
    );
    assert_eq!(out.status.code(), Some(1));
    let missing = parse_json(&out);
    let missing_trace = missing["trace_id"].as_str().unwrap().to_string();
    let missing_path = missing["path"].as_array().unwrap().len();

    // The same query through the manager, as in the original design: its span sits between
    // stormctl's and the first hop's.
    let out = ctl_traced(
        &cluster,
        &receiver.endpoint,
        &["--json", "--through-manager", "query", &key, "--via", &via],
    );
    assert_eq!(out.status.code(), Some(0));
    let relayed = parse_json(&out);
    let relayed_trace = relayed["trace_id"].as_str().unwrap().to_string();
    let relayed_path = relayed["path"].as_array().unwrap().len();

    teardown_and_flush(&mut cluster);

    let spans = receiver.wait_for(Duration::from_secs(10), |all| {
        let n = |t: &str| all.iter().filter(|s| s.trace_id == t).count();
        n(&trace_id) > path.len()
            && n(&missing_trace) > missing_path
            && n(&relayed_trace) >= relayed_path + 2
    });
    let trace = trace_of(&spans, &trace_id);

    // stormctl's root, then the hops: the query went straight to the entry peer.
    let root = root_of(&trace);
    assert!(
        root.parent_span_id.is_empty() || root.parent_span_id == "0000000000000000",
        "{root:?}"
    );
    assert_eq!(root.attr("event.id"), Some(key.as_str()));
    assert!(
        trace.iter().all(|s| s.service != "stormd-manager"),
        "the manager is not on a direct query's path: {trace:#?}"
    );

    let hops = hop_spans(&trace);
    for s in std::iter::once(root).chain(&hops) {
        println!(
            "{} {} [{}] {} parent={}",
            s.trace_id, s.span_id, s.service, s.name, s.parent_span_id
        );
    }
    assert_eq!(hops.len(), path.len(), "one span per hop: {hops:#?}");
    let mut parent = root.span_id.clone();
    let mut instances = BTreeSet::new();
    for (i, (hop, peer)) in hops.iter().zip(&path).enumerate() {
        assert_eq!(hop.service, "stormd-peer");
        assert_eq!(
            hop.parent_span_id, parent,
            "hop {i} is not the child of the hop before"
        );
        assert_eq!(hop.attr("hop"), Some(i.to_string().as_str()));
        assert_eq!(hop.attr("peer.id"), Some(peer.to_string().as_str()));
        assert_eq!(hop.attr("event.id"), Some(key.as_str()));
        assert!(
            hop.attr("peer.name")
                .is_some_and(|n| names.iter().any(|x| x == n)),
            "{hop:?}"
        );
        assert_eq!(hop.attr("network.transport"), Some("udp"));
        assert!(
            hop.attr("network.peer.address")
                .is_some_and(|a| a.starts_with("127.")),
            "{hop:?}"
        );
        assert!(hop.attr("network.peer.port").is_some(), "{hop:?}");
        let last = i + 1 == hops.len();
        assert_eq!(
            hop.attr("found"),
            Some(if last { "true" } else { "false" }),
            "{hop:?}"
        );
        instances.insert(hop.instance.clone());
        parent = hop.span_id.clone();
    }
    assert_eq!(
        instances.len(),
        hops.len(),
        "each hop reports its own service.instance.id"
    );

    // Through the manager: stormctl → manager → hop 0 → … in one trace.
    let relayed = trace_of(&spans, &relayed_trace);
    let root = root_of(&relayed);
    let manager = relayed
        .iter()
        .find(|s| s.service == "stormd-manager")
        .unwrap_or_else(|| panic!("no manager span: {relayed:#?}"));
    assert_eq!(manager.parent_span_id, root.span_id);
    assert_eq!(manager.attr("event.id"), Some(key.as_str()));
    let hops = hop_spans(&relayed);
    assert_eq!(hops.len(), relayed_path, "{hops:#?}");
    assert_eq!(hops[0].parent_span_id, manager.span_id);

    // The absent id: the last hop says not found.
    let missing = trace_of(&spans, &missing_trace);
    let hops = hop_spans(&missing);
    assert_eq!(hops.len(), missing_path);
    assert_eq!(hops.last().and_then(|h| h.attr("found")), Some("false"));

    // Distribute left spans too: one per stored batch, under the manager's distribute span.
    let distribute = spans
        .iter()
        .find(|s| s.name == "manager distribute")
        .expect("a distribute span");
    let batches = spans
        .iter()
        .filter(|s| s.name == "store_batch" && s.trace_id == distribute.trace_id)
        .count();
    assert!(batches >= 1);
}

#[test]
fn queries_work_when_the_collector_is_down() {
    // A port with nothing behind it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{closed}");
    let env = vec![
        ("STORM_TELEMETRY__OTLP_ENDPOINT", endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let mut cluster = Cluster::start_with(3, &env);
    let file = shared_data("details-1950.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    for key in ["10096222", "10120412"] {
        let started = std::time::Instant::now();
        let out = ctl_traced(&cluster, &endpoint, &["--json", "query", key]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(parse_json(&out)["found"], true);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    cluster.ctl_json(&["teardown"]);
    for p in cluster.peers.iter_mut() {
        assert_eq!(
            p.wait(Duration::from_secs(15)).and_then(|s| s.code()),
            Some(0)
        );
    }
    // The failed export is a warning in the log, not a failure.
    let warned = cluster.peers.iter_mut().any(|p| {
        p.drain_stderr()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("export"))
    });
    assert!(
        warned,
        "no export warning logged: {:?}",
        cluster.peers[0].stderr_lines
    );
}

/// A collector that accepts connections and never answers (a hung Jaeger) holds no exit for
/// long: the flush at exit gives up after a bounded time, logs why, and the process ends.
#[test]
fn a_hung_collector_does_not_hold_an_exit() {
    // Accepted by the kernel (backlog), never read: every export waits for its timeout.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hung.local_addr().unwrap());
    let mut cluster = Cluster::start_with(2, &traced_env(&endpoint));
    let file = shared_data("details-1950.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    cluster.ctl_json(&["query", "10096222"]);
    let t = cluster.ctl_json(&["teardown"]);
    assert_eq!(t["confirmed"], 2, "{t}");
    let told = std::time::Instant::now();
    for p in cluster.peers.iter_mut() {
        // The exporter's own timeout is 3 s; the flush limit is 0.8 s.
        let status = p.wait(Duration::from_millis(2_800));
        let log = p.drain_stderr().join("\n");
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{} still running {:?} after the teardown:\n{log}",
            p.name,
            told.elapsed()
        );
        assert!(log.contains("could not flush traces"), "{log}");
    }
    drop(hung);
}

/// A peer that exports nothing builds no spans, and its hop is missing from the trace; but
/// the context travels through it, so the query is still one trace and the next exporting
/// hop hangs under the last one that exported.
#[test]
fn a_peer_that_exports_nothing_leaves_a_gap_not_a_broken_trace() {
    let receiver = OtlpReceiver::start();
    let mut cluster = Cluster::start_with(3, &traced_env(&receiver.endpoint));
    let silent_env: Vec<(&'static str, String)> = cluster
        .peer_env("silent")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("OTEL_"))
        .collect();
    cluster.peers.push(Daemon::start("silent", &silent_env));
    cluster.wait_for_peers(4);
    let file = shared_data("details-1950.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let status = cluster.status();
    let silent_id = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "silent")
        .and_then(|p| p["id"].as_u64())
        .expect("the silent peer is in the ring");

    // A key and an entry whose walk passes through the silent peer, neither first nor last.
    let names: Vec<String> = cluster.peers.iter().map(|p| p.name.clone()).collect();
    let keys: Vec<String> = stormdht::record::load_path(&file)
        .expect("the file")
        .rows
        .iter()
        .take(20)
        .map(|r| r.key.to_string())
        .collect();
    let (key, via, path) = keys
        .iter()
        .flat_map(|k| names.iter().map(move |v| (k, v)))
        .find_map(|(key, via)| {
            let q = parse_json(&cluster.ctl(&["--json", "query", key, "--via", via]));
            let path: Vec<u64> = q["path"]
                .as_array()?
                .iter()
                .filter_map(|v| v.as_u64())
                .collect();
            let at = path.iter().position(|&id| id == silent_id)?;
            (q["found"] == true && at > 0 && at + 1 < path.len())
                .then(|| (key.to_string(), via.clone(), path))
        })
        .expect("a walk through the silent peer");
    let out = ctl_traced(
        &cluster,
        &receiver.endpoint,
        &["--json", "query", &key, "--via", &via],
    );
    assert_eq!(out.status.code(), Some(0));
    let found = parse_json(&out);
    let trace_id = found["trace_id"].as_str().expect("a trace id").to_string();
    let traced_path: Vec<u64> = found["path"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(traced_path, path, "the same walk as before");

    cluster.ctl_json(&["teardown"]);
    for p in cluster.peers.iter_mut() {
        assert_eq!(
            p.wait(Duration::from_secs(10)).and_then(|s| s.code()),
            Some(0)
        );
    }
    let spans = receiver.wait_for(Duration::from_secs(10), |all| {
        all.iter().filter(|s| s.trace_id == trace_id).count() >= path.len()
    });
    assert!(
        spans.iter().all(|s| s.attr("peer.name") != Some("silent")),
        "the silent peer exported a span"
    );
    let trace = trace_of(&spans, &trace_id);
    let root = root_of(&trace);
    let hops = hop_spans(&trace);
    let exporting: Vec<u64> = path.iter().copied().filter(|&id| id != silent_id).collect();
    assert_eq!(
        hops.len(),
        exporting.len(),
        "one span per exporting hop: {hops:#?}"
    );
    let mut parent = root.span_id.clone();
    for (hop, id) in hops.iter().zip(&exporting) {
        assert_eq!(hop.attr("peer.id"), Some(id.to_string().as_str()));
        assert_eq!(
            hop.parent_span_id, parent,
            "the hop after the gap hangs under the last exporting one: {hops:#?}"
        );
        parent = hop.span_id.clone();
    }
}

/// A join after setup reaches the members as ring deltas and the joiner as whole views: each
/// peer's `ring_update` spans say which (a delta names its base epoch). Every record is found
/// after the join, through the views the deltas made.
#[test]
fn members_get_ring_changes_as_deltas_and_a_joiner_whole_views() {
    let receiver = OtlpReceiver::start();
    let env = traced_env(&receiver.endpoint);
    let mut cluster = Cluster::start_with(4, &env);
    let file = shared_data("details-1950.csv");
    let setup = cluster.ctl_json(&["setup"]);
    let setup_epoch = setup["epoch"].as_u64().expect("an epoch");
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    cluster.add_peer("late");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = cluster.status();
        let members = s["peers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["token"].is_string()).count());
        if members == 5 && s["settled"] == true {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the joiner is not in a settled ring: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let epoch = status["epoch"].as_u64().expect("an epoch");
    assert!(epoch >= setup_epoch + 2, "{setup_epoch} → {epoch}");
    let verified = cluster.verify(&file);
    assert_eq!(verified["found"], verified["keys"], "{verified}");
    teardown_and_flush(&mut cluster);
    let updates_of = |spans: &[SpanRecord], peer: &str| -> Vec<SpanRecord> {
        let mut updates: Vec<SpanRecord> = spans
            .iter()
            .filter(|s| s.name == "ring_update" && s.attr("peer.name") == Some(peer))
            .cloned()
            .collect();
        updates.sort_by_key(|s| s.attr("epoch").and_then(|e| e.parse::<u64>().ok()));
        updates
    };
    let spans = receiver.wait_for(Duration::from_secs(10), |all| {
        (0..4).all(|i| updates_of(all, &format!("peer-{i}")).len() >= 3)
            && !updates_of(all, "late").is_empty()
    });
    for i in 0..4 {
        let name = format!("peer-{i}");
        let updates = updates_of(&spans, &name);
        // Setup's view whole; the join's two (unsettled, settled) as deltas from the one before.
        let first = updates.first().expect("a ring update");
        assert_eq!(first.attr("delta.base"), None, "{name}: {first:?}");
        assert!(first.attr("members").is_some(), "{name}: {first:?}");
        let later: Vec<&SpanRecord> = (updates.iter())
            .filter(|s| s.attr("epoch").and_then(|e| e.parse::<u64>().ok()) > Some(setup_epoch))
            .collect();
        assert!(later.len() >= 2, "{name}: {updates:#?}");
        for s in later {
            let epoch: u64 = s.attr("epoch").and_then(|e| e.parse().ok()).unwrap_or(0);
            let base = epoch.saturating_sub(1).to_string();
            assert_eq!(s.attr("delta.base"), Some(base.as_str()), "{name}: {s:?}");
        }
    }
    // The joiner held no view: it was sent the first one whole.
    let late = updates_of(&spans, "late");
    assert_eq!(late[0].attr("delta.base"), None, "{late:#?}");
    assert_eq!(late[0].attr("members"), Some("5"), "{late:#?}");
}

/// A ring view larger than a datagram (8 members × 64 tokens, 4,096-byte datagrams) reaches
/// each peer in fragments; each peer still exports a `ring_update` span for it, with the
/// view's fields, in the trace of the setup that published it.
#[test]
fn a_view_that_came_in_fragments_has_its_ring_update_span_in_the_setup_trace() {
    let receiver = OtlpReceiver::start();
    let mut env = traced_env(&receiver.endpoint);
    env.push(("STORM_VNODES", "64".to_string()));
    env.push(("STORM_MAX_DATAGRAM", "4096".to_string()));
    let mut cluster = Cluster::start_with(8, &env);
    let out = ctl_traced(&cluster, &receiver.endpoint, &["--json", "setup"]);
    assert!(out.status.success(), "{out:?}");
    let status = cluster.status();
    let fragmented = status["manager"]["fragmented"].as_u64().unwrap_or(0);
    assert!(
        fragmented >= 8,
        "the views did not go in fragments: {status}"
    );
    teardown_and_flush(&mut cluster);
    let whole_updates = |spans: &[SpanRecord], peer: &str| -> Vec<SpanRecord> {
        spans
            .iter()
            .filter(|s| {
                s.name == "ring_update"
                    && s.attr("peer.name") == Some(peer)
                    && s.attr("members") == Some("8")
                    && s.attr("delta.base").is_none()
            })
            .cloned()
            .collect()
    };
    let spans = receiver.wait_for(Duration::from_secs(10), |all| {
        (0..8).all(|i| !whole_updates(all, &format!("peer-{i}")).is_empty())
    });
    let setup_trace = spans
        .iter()
        .find(|s| s.name == "stormctl setup")
        .map(|s| s.trace_id.clone())
        .unwrap_or_else(|| panic!("no stormctl setup span: {spans:#?}"));
    for i in 0..8 {
        let name = format!("peer-{i}");
        let updates = whole_updates(&spans, &name);
        assert!(
            !updates.is_empty(),
            "{name}: no ring_update span: {spans:#?}"
        );
        assert!(
            updates.iter().any(|u| u.trace_id == setup_trace),
            "{name}: no ring_update in the setup's trace {setup_trace}: {updates:#?}"
        );
    }
}
