//! `just bench`: figures for a real cluster on loopback, one JSON line per scenario (no
//! pass/fail).
//!
//! A manager and 5 peers run as separate `stormd` processes. Measured from this process with
//! the library client: distributing ../shared/data/details-1996.csv (48,534 records), then 1,000
//! random queries one at a time (p50/p99), then a windowed `verify` of every record; with one
//! copy of every record and with two (the default), and with two and span export on (to an
//! OTLP receiver in this process). Then one peer is killed (SIGKILL): the time until the ring
//! is rebuilt without it, and until every record has its two copies again.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use stormdht::client::{Client, verify};
use stormdht::record::{self, Dataset};
use stormdht::wire::{ClientRequest, ReplyBody};
use support::otlp::OtlpReceiver;
use support::{Cluster, shared_data, wait_replicated};

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

async fn run(dataset: &Dataset, file: &str, env: &[(&'static str, String)], kill: bool) -> Value {
    let mut cluster = Cluster::start_with(PEERS, env);
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
            .call(
                ClientRequest::Query {
                    key,
                    via: None,
                    routing: None,
                },
                None,
            )
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

    let mut failure = json!(null);
    if kill {
        let records = dataset.rows.len() as u64;
        wait_replicated(&cluster, records, Duration::from_secs(30));
        let victim = "peer-2";
        let killed = Instant::now();
        cluster.peer(victim).signal("KILL");
        // Rebuilt: the manager declared it dead and a settled ring without it is published.
        loop {
            let s = cluster.status();
            let dead = s["peers"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p["name"] == victim && p["state"] == "dead")
            });
            if dead && s["settled"] == Value::Bool(true) {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "no rebuild: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rebuilt = killed.elapsed();
        wait_replicated(&cluster, records, Duration::from_secs(60));
        let replicated = killed.elapsed();
        let v = verify(&mut client, file, dataset, 64).await;
        assert!(v.ok(), "verify after the kill failed: {v:?}");
        failure = json!({
            "killed": victim,
            "kill_to_ring_rebuilt_ms": round(rebuilt.as_secs_f64() * 1e3, 0),
            "kill_to_fully_replicated_ms": round(replicated.as_secs_f64() * 1e3, 0),
            "verified_after": v.found,
        });
    }

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
        "peer_rss_mib_sum": round(rss.iter().sum::<u64>() as f64 / 1024.0, 1),
        "failure": failure,
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

    let replication = |r: u32| vec![("STORM_REPLICATION", r.to_string())];
    let one = rt.block_on(run(&dataset, &file, &replication(1), false));
    let two = rt.block_on(run(&dataset, &file, &replication(2), true));
    let receiver = OtlpReceiver::start();
    let mut export = replication(2);
    export.push(("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()));
    let on = rt.block_on(run(&dataset, &file, &export, false));
    let spans = receiver.spans().len();

    let ratio = |a: &Value, b: &Value, k: &str| {
        round(
            a[k].as_f64().unwrap_or(f64::NAN) / b[k].as_f64().unwrap_or(f64::NAN),
            2,
        )
    };
    let common = json!({
        "file": "details-1996.csv",
        "records": dataset.rows.len(),
        "peers": PEERS,
        "queries": QUERIES,
    });
    for (scenario, figures) in [
        ("replication_1", &one),
        ("replication_2", &two),
        ("replication_2_export_on", &on),
    ] {
        println!(
            "{}",
            json!({ "scenario": scenario, "setup": common, "figures": figures })
        );
    }
    println!(
        "{}",
        json!({
            "scenario": "ratios",
            "replication_2_over_1": {
                "query_p50": ratio(&two, &one, "query_p50_ms"),
                "query_p99": ratio(&two, &one, "query_p99_ms"),
                "distribute": ratio(&two, &one, "distribute_ms"),
                "peer_rss_sum": ratio(&two, &one, "peer_rss_mib_sum"),
            },
            "export_on_over_off": {
                "query_p50": ratio(&on, &two, "query_p50_ms"),
                "query_p99": ratio(&on, &two, "query_p99_ms"),
            },
            "spans_received": spans,
        })
    );
}
