//! `just bench`: figures for a real cluster on loopback, printed as one JSON line (no pass/fail).
//!
//! A manager and 5 peers run as separate `stormd` processes. Measured from this process with
//! the library client: distributing ../shared/data/details-1996.csv (48,534 records), then 1,000
//! random queries one at a time (p50/p99), then a windowed `verify` of every record. The query
//! run is repeated with span export on, to an OTLP receiver in this process, for the ratio.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use stormdht::client::{Client, verify};
use stormdht::record::{self, Dataset};
use stormdht::wire::{ClientRequest, ReplyBody};
use support::otlp::OtlpReceiver;
use support::{Cluster, shared_data};

const PEERS: usize = 5;
const QUERIES: usize = 1_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

async fn run(dataset: &Dataset, file: &str, env: &[(&'static str, String)]) -> Value {
    let cluster = Cluster::start_with(PEERS, env);
    cluster.ctl_json(&["setup"]);
    let mut client = Client::connect(&cluster.manager.addr.to_string(), Duration::from_secs(120))
        .await
        .expect("client");

    let started = Instant::now();
    let reply = client
        .call(
            ClientRequest::Distribute {
                path: Some(file.to_string()),
            },
            None,
        )
        .await;
    let wall = started.elapsed().as_secs_f64();
    let Ok(ReplyBody::Distribute(d)) = reply else {
        panic!("distribute failed: {reply:?}")
    };
    assert_eq!(
        d.stored,
        dataset.rows.len() as u64,
        "not every record was stored"
    );
    let manager_secs = d.elapsed_micros as f64 / 1e6;

    // Seeded random keys: the same 1,000 queries on every run.
    let mut seed = 0x5eed_cafe_f00d_u64;
    let mut latencies = Vec::with_capacity(QUERIES);
    let mut hops = 0usize;
    for _ in 0..QUERIES {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let key = dataset.rows[(seed % dataset.rows.len() as u64) as usize].key;
        let t = Instant::now();
        let reply = client
            .call(ClientRequest::Query { key, via: None }, None)
            .await;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        match reply {
            Ok(ReplyBody::Query(q)) if q.found => hops += q.path.len(),
            other => panic!("query {key} failed: {other:?}"),
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));

    let v = verify(&mut client, file, dataset, 64).await;
    assert!(v.ok(), "verify failed: {v:?}");
    let rss: Vec<u64> = cluster
        .peers
        .iter()
        .filter_map(|p| rss_kib(p.pid()))
        .collect();

    json!({
        "distribute_ms": round(manager_secs * 1e3, 1),
        "distribute_wall_ms": round(wall * 1e3, 1),
        "records_per_s": round(d.stored as f64 / manager_secs, 0),
        "batches": d.batches,
        "query_p50_ms": round(percentile(&latencies, 0.50), 3),
        "query_p99_ms": round(percentile(&latencies, 0.99), 3),
        "mean_hops": round(hops as f64 / QUERIES as f64, 2),
        "verify_queries_per_s": round(v.keys as f64 / (v.elapsed_ms / 1e3), 0),
        "peer_rss_mib_max": round(rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0, 1),
    })
}

fn main() {
    // `cargo bench` passes --bench; other arguments are ignored.
    let path = shared_data("details-1996.csv");
    let file = path.to_str().expect("utf-8 path").to_string();
    let dataset = record::load_path(&path).expect("details-1996.csv (../shared/data)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let off = rt.block_on(run(&dataset, &file, &[]));
    let receiver = OtlpReceiver::start();
    let export = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone())];
    let on = rt.block_on(run(&dataset, &file, &export));
    let spans = receiver.spans().len();

    let ratio = |k: &str| {
        round(
            on[k].as_f64().unwrap_or(f64::NAN) / off[k].as_f64().unwrap_or(f64::NAN),
            2,
        )
    };
    let line = json!({
        "bench": "cluster",
        "file": "details-1996.csv",
        "records": dataset.rows.len(),
        "peers": PEERS,
        "queries": QUERIES,
        "export_off": off,
        "export_on": on,
        "export_on_over_off": { "query_p50": ratio("query_p50_ms"), "query_p99": ratio("query_p99_ms") },
        "spans_received": spans,
    });
    println!("{line}");
}
