//! `just bench`: figures for real clusters on loopback, one JSON object per line and scenario
//! (no pass/fail). Each scenario measures its own floors in the same run, right before it, so
//! the ratios hold on a noisy machine:
//! - `parse_ms`: the project's CSV reader on the same file, no network (best of 3);
//! - `one_way_us`: half the median round trip of a bare UDP ping-pong between this process and
//!   a child process (this binary again, as an echo), 2,000 round trips.
//!
//! Scenarios: n = 5, 64 and 256 `stormd` peer processes (and a manager) on details-1996
//! (48,534 records, replication 2, 16 tokens per peer), each with the walk and with fingers
//! (`STORM_BENCH_SCENARIOS=n5,n64,n256` and `STORM_BENCH_ROUTINGS=walk,fingers` pick a subset).
//! Per scenario: distribute time, 1,000 sampled queries one at a time (p50/p99, mean hops), a
//! windowed verify of every record, memory above idle per stored byte, shares (max/mean of
//! owned rows) after setup and after one join and one leave, and the fraction of records each
//! of those moved. n = 5 with the walk also kills a peer (SIGKILL) and times the repair.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use stormdht::client::{Client, verify};
use stormdht::record::{self, Dataset};
use stormdht::wire::{ClientRequest, ReplyBody, Routing};
use support::{Cluster, shared_data, wait_replicated};

const QUERIES: usize = 1_000;
const REPLICATION: u64 = 2;
/// Tokens per peer: shares stay even through the join and the leave.
const VNODES: u32 = 16;
const ECHO_ENV: &str = "STORM_BENCH_ECHO";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// RSS of the manager and every peer, KiB.
fn cluster_rss_kib(cluster: &Cluster) -> u64 {
    rss_kib(cluster.manager.pid()) + cluster.peers.iter().map(|p| rss_kib(p.pid())).sum::<u64>()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The echo side of the UDP floor: bind, print the port, echo until stdin closes.
fn echo_server() {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("echo socket");
    println!("{}", sock.local_addr().expect("echo address").port());
    let _ = std::io::stdout().flush();
    sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let stdin_closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stdin_closed.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let mut buf = [0u8; 2048];
    while !stdin_closed.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

/// Half the median round trip of a ~100-byte datagram to another process, in µs.
fn one_way_floor_us() -> f64 {
    let mut child = Command::new(std::env::current_exe().expect("this bench binary"))
        .env(ECHO_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the echo process");
    let mut port = String::new();
    BufReader::new(child.stdout.take().expect("echo stdout"))
        .read_line(&mut port)
        .expect("echo port");
    let target = format!("127.0.0.1:{}", port.trim());
    let sock = UdpSocket::bind("127.0.0.1:0").expect("ping socket");
    sock.set_read_timeout(Some(Duration::from_millis(500))).ok();
    let payload = [7u8; 100];
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::with_capacity(2_000);
    for _ in 0..2_100 {
        let t = Instant::now();
        if sock.send_to(&payload, &target).is_ok() && sock.recv_from(&mut buf).is_ok() {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(child.stdin.take()); // the echo ends when its stdin closes
    let _ = child.wait();
    let mut rtts = rtts.split_off(rtts.len().min(100)); // warm-up
    rtts.sort_by(|a, b| a.total_cmp(b));
    percentile(&rtts, 0.5) / 2.0
}

fn parse_floor_ms(path: &Path) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let d = record::load_path(path).expect("parse");
            std::hint::black_box(d.rows.len());
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Owned rows per live peer, from `status --json`.
fn owned(status: &Value) -> Vec<(String, u64)> {
    status["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["state"] == "up")
                .filter_map(|p| Some((p["name"].as_str()?.to_string(), p["owned"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn records_of(status: &Value, name: &str) -> u64 {
    status["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .and_then(|p| p["records"].as_u64())
        .unwrap_or(0)
}

fn max_over_mean(owned: &[(String, u64)]) -> f64 {
    let mean = owned.iter().map(|(_, n)| *n).sum::<u64>() as f64 / owned.len().max(1) as f64;
    owned.iter().map(|(_, n)| *n).max().unwrap_or(0) as f64 / mean
}

/// A settled status in which every live peer reported its counts.
fn settled_status(cluster: &Cluster, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = cluster.status();
        let counted = s["peers"].as_array().is_some_and(|a| {
            a.iter()
                .filter(|p| p["state"] == "up")
                .all(|p| p["owned"].as_u64().is_some())
        });
        if s["settled"] == Value::Bool(true) && counted {
            return s;
        }
        assert!(Instant::now() < deadline, "not settled: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Scenario<'a> {
    name: String,
    peers: usize,
    routing: Routing,
    dataset: &'a Dataset,
    path: &'a Path,
    churn: bool,
    kill: bool,
}

async fn run(sc: &Scenario<'_>) -> Value {
    let file = sc.path.to_str().expect("utf-8 path").to_string();
    let raw_bytes = std::fs::metadata(sc.path).map(|m| m.len()).unwrap_or(1);
    let records = sc.dataset.rows.len() as u64;
    let parse_ms = parse_floor_ms(sc.path);
    let one_way_us = one_way_floor_us();
    let env = vec![
        ("STORM_ROUTING", sc.routing.to_string()),
        ("STORM_VNODES", VNODES.to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let started = Instant::now();
    let mut cluster = Cluster::start_with(sc.peers, &env);
    cluster.ctl_json(&["setup"]);
    let up_s = started.elapsed().as_secs_f64();
    let idle_kib = cluster_rss_kib(&cluster);
    let mut client = Client::connect(&cluster.manager.addr.to_string(), Duration::from_secs(600))
        .await
        .expect("client");

    let reply = client
        .call(
            ClientRequest::Distribute {
                path: Some(file.clone()),
            },
            None,
        )
        .await;
    let Ok(ReplyBody::Distribute(d)) = reply else {
        panic!("distribute failed: {reply:?}")
    };
    assert_eq!(d.stored, records, "not every record was stored");
    let distribute_ms = d.elapsed_micros as f64 / 1e3;
    let status = settled_status(&cluster, Duration::from_secs(120));
    let shares = owned(&status);
    let loaded_kib = cluster_rss_kib(&cluster);
    let manager_kib = rss_kib(cluster.manager.pid());

    // Seeded random keys: the same 1,000 queries on every run.
    let mut seed = 0x5eed_cafe_f00d_u64;
    let mut latencies = Vec::with_capacity(QUERIES);
    let mut hops = 0usize;
    for _ in 0..QUERIES {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let key = sc.dataset.rows[(seed % records) as usize].key;
        let t = Instant::now();
        let req = ClientRequest::Query {
            key,
            via: None,
            routing: Some(sc.routing),
        };
        let reply = client.call(req, None).await;
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
        match reply {
            Ok(ReplyBody::Query(q)) if q.found => hops += q.path.len().saturating_sub(1),
            other => panic!("query {key} failed: {other:?}"),
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let v = verify(&mut client, &file, sc.dataset, 64).await;
    assert!(v.ok(), "verify failed: {v:?}");
    let verify_qps = v.keys as f64 / (v.elapsed_ms / 1e3);

    // One join, then one leave: the fraction of all copies each moved, and the shares after.
    let (mut moved_join, mut moved_leave, mut churned) = (f64::NAN, f64::NAN, f64::NAN);
    if sc.churn {
        cluster.add_peer("bench-joiner");
        cluster.wait_for_peers(sc.peers + 1);
        let s = settled_status(&cluster, Duration::from_secs(120));
        moved_join = records_of(&s, "bench-joiner") as f64 / (records * REPLICATION) as f64;
        let leaver = "peer-1";
        let held = records_of(&s, leaver);
        cluster.ctl_json(&["leave", leaver]);
        let _ = cluster.peer(leaver).wait(Duration::from_secs(60));
        let s = settled_status(&cluster, Duration::from_secs(120));
        moved_leave = held as f64 / (records * REPLICATION) as f64;
        churned = max_over_mean(&owned(&s));
    }

    let mut failure = json!(null);
    if sc.kill {
        wait_replicated(&cluster, records, Duration::from_secs(60));
        let victim = "peer-2";
        let killed = Instant::now();
        cluster.peer(victim).signal("KILL");
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
        failure = json!({
            "kill_to_ring_rebuilt_ms": round(rebuilt.as_secs_f64() * 1e3, 0),
            "kill_to_fully_replicated_ms": round(replicated.as_secs_f64() * 1e3, 0),
        });
    }

    let mean_hops = hops as f64 / QUERIES as f64;
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let rss_over_raw =
        (loaded_kib.saturating_sub(idle_kib) * 1024) as f64 / (raw_bytes * REPLICATION) as f64;
    json!({
        "scenario": sc.name,
        "peers": sc.peers,
        "processes": true,
        "routing": sc.routing.to_string(),
        "records": records,
        "replication": REPLICATION,
        "vnodes": VNODES,
        "distribute_ms": round(distribute_ms, 1),
        "parse_ms": round(parse_ms, 1),
        "distribute_over_parse": round(distribute_ms / parse_ms, 2),
        "records_per_s": round(records as f64 / (distribute_ms / 1e3), 0),
        "query_p50_us": round(p50, 0),
        "query_p99_us": round(p99, 0),
        "one_way_us": round(one_way_us, 1),
        "mean_hops": round(mean_hops, 2),
        "p50_over_floor": round(p50 / ((mean_hops + 2.0) * one_way_us), 2),
        "p99_over_p50": round(p99 / p50, 2),
        "verify_qps": round(verify_qps, 0),
        "max_over_mean": round(max_over_mean(&shares), 3),
        "max_over_mean_churn": round(churned, 3),
        "moved_join": round(moved_join, 4),
        "moved_leave": round(moved_leave, 4),
        "one_over_n": round(1.0 / sc.peers as f64, 4),
        "rss_over_raw": round(rss_over_raw, 2),
        "rss_mib_total": round(loaded_kib as f64 / 1024.0, 1),
        "rss_mib_idle": round(idle_kib as f64 / 1024.0, 1),
        "manager_rss_mib": round(manager_kib as f64 / 1024.0, 1),
        "startup_s": round(up_s, 1),
        "failure": failure,
    })
}

fn main() {
    if std::env::var_os(ECHO_ENV).is_some() {
        return echo_server();
    }
    // `cargo bench` passes --bench; other arguments are ignored.
    let path = shared_data("details-1996.csv");
    let dataset = record::load_path(&path).expect("details-1996.csv (../shared/data)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let list = |var: &str, default: &str| -> Vec<String> {
        std::env::var(var)
            .unwrap_or_else(|_| default.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let routings: Vec<Routing> = list("STORM_BENCH_ROUTINGS", "walk,fingers")
        .iter()
        .filter_map(|r| match r.as_str() {
            "walk" => Some(Routing::Walk),
            "fingers" => Some(Routing::Fingers),
            other => {
                eprintln!("bench: unknown routing {other:?} (walk, fingers)");
                None
            }
        })
        .collect();
    for scenario in list("STORM_BENCH_SCENARIOS", "n5,n64,n256") {
        let peers: usize = match scenario.trim_start_matches('n').parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("bench: unknown scenario {scenario:?} (n5, n64, n256, nN)");
                continue;
            }
        };
        for routing in &routings {
            eprintln!("bench: {scenario} with {routing} routing ({peers} peer processes)");
            let sc = Scenario {
                name: format!("{scenario}_{routing}"),
                peers,
                routing: *routing,
                dataset: &dataset,
                path: &path,
                churn: peers <= 64,
                kill: peers == 5 && *routing == Routing::Walk,
            };
            let figures = rt.block_on(run(&sc));
            println!("{figures}");
        }
    }
}
