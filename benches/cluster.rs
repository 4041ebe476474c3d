//! `just bench` (= `cargo bench --bench cluster`): figures for real clusters on loopback, one
//! JSON object per line and scenario on stdout (no pass/fail; a one-line header per scenario
//! on stderr). Each scenario measures its own floors in the same run, right before it, so the
//! ratios hold on a noisy machine:
//! - `parse_ms`: the project's CSV reader on the same file, no network (best of 3);
//! - `one_way_us`: half the median round trip of a bare UDP ping-pong between this process and
//!   a child process (this binary re-executed as an echo), 2,000 round trips of 100 bytes.
//!
//! Scenarios (`STORM_BENCH_SCENARIOS`, comma-separated, default `n5,n5r1,n64,n256`): `nN` is a
//! manager and N `stormd` peer processes with replication 2 and 16 tokens per peer; `nNr1` the
//! same with one copy of every record. Each runs once per routing of `STORM_BENCH_ROUTINGS`
//! (default `walk,fingers`; passed to the daemons as `STORM_ROUTING`). When N peer processes
//! do not start or do not hold (at n = 256 on a small machine), the scenario runs again with
//! the library's in-process cluster (every node a task of this process on its own loopback
//! socket) and says so: `"processes": false`. `STORM_BENCH_IN_PROCESS=1` forces that.
//!
//! Per scenario, on details-1996 (48,534 records; `nN@RECORDS`: a generated file of that many):
//! distribute time; 1,000 seeded random queries one at a time, straight to the peers (p50/p99,
//! mean hops), entering round the ring and again at each key's owner, and 100 absent ids; a
//! windowed verify (256 in flight, at the owner, so multi-gets of up to 64 keys) of every record, or of a fixed sample when all
//! would take over four minutes (`verified`, `verify_all`), and the sample again round the ring
//! and through the manager; RSS above idle per stored byte (all processes, and the peers
//! alone), and the peers' private memory and PSS (the memory they hold together); shares (max/mean of owned rows) after setup, after one join and one leave, and after
//! three of each, and the fraction of records the first join and leave moved. n = 5 with the
//! walk and replication 2 also kills a peer (SIGKILL) and times the repair.

// The figures' json! object is longer than the default macro recursion allows.
#![recursion_limit = "256"]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/floor.rs"]
mod floor;
#[path = "support/nodes.rs"]
mod nodes;

use floor::percentile;
use nodes::Nodes;
use serde_json::{Value, json};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};
use stormdht::client::{BlockingClient, Client, verify};
use stormdht::config::Config;
use stormdht::record::{self, Dataset, RecordKey};
use stormdht::wire::{ClientRequest, ReplyBody, Routing};
use support::shared_data;

const QUERIES: usize = 1_000;
const ABSENT: usize = 100;
/// Tokens per peer: shares stay even through the join and the leave.
const VNODES: u32 = 16;
/// Verify every record when that is estimated to take at most this long, else a sample.
const VERIFY_BUDGET: Duration = Duration::from_secs(240);
const VERIFY_SAMPLE: usize = 2_000;
const VERIFY_WINDOW: usize = 256;
/// Memory is read at rest, this long after the work before it (setup; the distribute and
/// its replication): longer than the peers wait before giving freed memory back (250 ms),
/// and than the acknowledgements of the last batches and copies take, whose retransmission
/// buffers are freed with them. Read at once after the last copy was reported, the same
/// distribute measured 3.02 / 3.78 (PSS per stored byte at n = 256, walk / fingers) against
/// 2.92 / 2.93 a second later.
const AT_REST: Duration = Duration::from_secs(1);

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The same pseudo-random sequence on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
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

/// A count of a peer's in `status --json`: `records` (rows held, copies included), `owned`
/// or `replicas`.
fn count_of(status: &Value, name: &str, field: &str) -> u64 {
    status["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .and_then(|p| p[field].as_u64())
        .unwrap_or(0)
}

fn max_over_mean(owned: &[(String, u64)]) -> f64 {
    let mean = owned.iter().map(|(_, n)| *n).sum::<u64>() as f64 / owned.len().max(1) as f64;
    owned.iter().map(|(_, n)| *n).max().unwrap_or(0) as f64 / mean
}

/// Every live peer reports its counts, the ring is settled, no range is short of copies and
/// none is being copied, and the peers hold `records` distinct rows in `replication` copies.
fn wait_replicated(nodes: &Nodes, records: u64, replication: u64, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = nodes.status();
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let up = || peers.iter().filter(|p| p["state"] == "up");
        let owned: u64 = up().filter_map(|p| p["owned"].as_u64()).sum();
        let copies: u64 = up().filter_map(|p| p["records"].as_u64()).sum();
        let counted = up().all(|p| p["owned"].as_u64().is_some());
        if s["settled"] == Value::Bool(true)
            && counted
            && s["under_replicated_ranges"] == 0
            && s["repairing"] == 0
            && owned == records
            && copies == replication * records
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not settled and fully replicated after {limit:?}: settled {}, owned {owned}, \
             copies {copies}, under-replicated ranges {}, repairing {}",
            s["settled"],
            s["under_replicated_ranges"],
            s["repairing"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fixed sample of the dataset's rows (seeded), for a verify too long to run whole.
fn sample(dataset: &Dataset, n: usize) -> Dataset {
    let mut rng = XorShift(0x00dd_ba11_5eed);
    let mut picked: Vec<usize> = (0..n.min(dataset.rows.len()))
        .map(|_| (rng.next() % dataset.rows.len() as u64) as usize)
        .collect();
    picked.sort_unstable();
    picked.dedup();
    Dataset {
        format: dataset.format,
        columns: dataset.columns.clone(),
        rows: picked.iter().map(|&i| dataset.rows[i].clone()).collect(),
        rejected: Vec::new(),
        fallback_keys: dataset.fallback_keys,
    }
}

struct Scenario<'a> {
    name: String,
    peers: usize,
    replication: u64,
    routing: Routing,
    /// Peer processes, or the in-process cluster.
    processes: bool,
    dataset: &'a Dataset,
    path: &'a Path,
    kill: bool,
}

impl Scenario<'_> {
    /// Generous timeouts where many processes share two cores: a busy peer is not declared
    /// dead, a query that waits for a CPU is not given up.
    fn timeouts(&self) -> Vec<(&'static str, String)> {
        if self.peers <= 5 {
            return Vec::new(); // the defaults (the kill measures the default detection)
        }
        vec![
            ("STORM_PROBE_TIMEOUT_MS", "10000".to_string()),
            ("STORM_QUERY_TIMEOUT_MS", "30000".to_string()),
            ("STORM_FAILURE__SUSPECT_MS", "10000".to_string()),
            ("STORM_FAILURE__DEAD_MS", "30000".to_string()),
        ]
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("STORM_ROUTING", self.routing.to_string()),
            ("STORM_VNODES", VNODES.to_string()),
            ("STORM_REPLICATION", self.replication.to_string()),
            ("RUST_LOG", "warn".to_string()),
        ];
        env.extend(self.timeouts());
        env
    }

    /// The same settings for the in-process cluster.
    fn config(&self) -> Config {
        let mut cfg = Config {
            routing: self.routing,
            vnodes: VNODES,
            replication: self.replication as u32,
            ..Config::default()
        };
        if self.peers > 5 {
            cfg.probe_timeout_ms = 10_000;
            cfg.query_timeout_ms = 30_000;
            cfg.failure.suspect_ms = 10_000;
            cfg.failure.dead_ms = 30_000;
        }
        cfg
    }

    /// Generous limits for waits that grow with the number of peers.
    fn limit(&self) -> Duration {
        Duration::from_secs(60 + self.peers as u64)
    }
}

/// [`QUERIES`] seeded random keys of the scenario's file, one at a time: the latencies in µs,
/// sorted, the hops in all (peers on each path after the entry peer), and each query's
/// (latency, hops) in the order they ran. Every one must be
/// found. With an `echo`, the floor's round trips are timed between blocks of queries (as many
/// as queries, appended to `rtts`): on a machine whose load changes by the second, a floor
/// measured before the queries is not the floor they ran on. With `cpu`, the CPU the queries
/// took is added to it: this thread's around each call, and that of the processes `pids`
/// around each block of queries (not during the floor's round trips).
fn timed_queries(
    client: &mut BlockingClient,
    sc: &Scenario<'_>,
    mut echo: Option<(&floor::Echo, &mut Vec<f64>)>,
    mut cpu: Option<(&[u32], &mut floor::CpuTally)>,
) -> (Vec<f64>, usize, Vec<(f64, usize)>) {
    const BLOCK: usize = 50;
    let records = sc.dataset.rows.len() as u64;
    let mut rng = XorShift(0x5eed_cafe_f00d);
    let mut latencies = Vec::with_capacity(QUERIES);
    let mut each = Vec::with_capacity(QUERIES);
    let mut hops = 0usize;
    // The others' CPU when the current block of queries began.
    let mut block_started_ns = 0;
    let mut client_ns = 0;
    for i in 0..QUERIES {
        if i % BLOCK == 0 {
            if let Some((pids, tally)) = cpu.as_mut()
                && i > 0
            {
                let others = floor::processes_cpu_ns(pids).saturating_sub(block_started_ns);
                tally.add(std::mem::take(&mut client_ns), others, BLOCK as u64);
            }
            if let Some((echo, rtts)) = echo.as_mut() {
                rtts.extend(echo.round_trips(BLOCK));
            }
            if let Some((pids, _)) = cpu.as_ref() {
                block_started_ns = floor::processes_cpu_ns(pids);
            }
        }
        let key = sc.dataset.rows[(rng.next() % records) as usize].key;
        let cpu_before = floor::thread_cpu_ns();
        let t = Instant::now();
        let req = ClientRequest::Query {
            key,
            via: None,
            routing: Some(sc.routing),
        };
        let reply = client.call(req, None);
        let latency = t.elapsed().as_secs_f64() * 1e6;
        latencies.push(latency);
        client_ns += floor::thread_cpu_ns().saturating_sub(cpu_before);
        match reply {
            Ok(ReplyBody::Query(q)) if q.found => {
                let its_hops = q.path.len().saturating_sub(1);
                hops += its_hops;
                each.push((latency, its_hops));
            }
            other => panic!("query {key} failed: {other:?}"),
        }
    }
    if let Some((pids, tally)) = cpu.as_mut() {
        let others = floor::processes_cpu_ns(pids).saturating_sub(block_started_ns);
        let last_block = QUERIES - (QUERIES - 1) / BLOCK * BLOCK;
        tally.add(client_ns, others, last_block as u64);
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    (latencies, hops, each)
}

/// The median of each query's latency over its own floor, (its hops + 2) one-way trips. With
/// fingers a query makes 0, 1 or 2 hops, and the p50 latency is that of the median query (one
/// hop), while (mean hops + 2) counts a floor of 2.6 one-way trips: the p50 over the mean's
/// floor holds a one-hop query to a shorter floor than its own.
fn p50_over_own_floor(each: &[(f64, usize)], one_way: f64) -> f64 {
    let mut ratios: Vec<f64> = each
        .iter()
        .map(|&(latency, hops)| latency / ((hops as f64 + 2.0) * one_way))
        .collect();
    ratios.sort_by(|a, b| a.total_cmp(b));
    percentile(&ratios, 0.5)
}

async fn run(sc: &Scenario<'_>) -> Value {
    let scenario_started = Instant::now();
    let file = sc.path.to_str().expect("utf-8 path").to_string();
    let raw_bytes = std::fs::metadata(sc.path).map(|m| m.len()).unwrap_or(1);
    let records = sc.dataset.rows.len() as u64;
    let r = sc.replication;

    // The parse floor, right before the scenario (the UDP floor is timed among the queries).
    let parse_ms = floor::parse_ms(sc.path);

    let started = Instant::now();
    let mut nodes = if sc.processes {
        Nodes::processes(sc.peers, &sc.env())
    } else {
        Nodes::in_process(sc.peers, &sc.config()).await
    };
    nodes.wait_for_peers(sc.peers, sc.limit());
    nodes.ctl_json(&["setup"]);
    let up_s = started.elapsed().as_secs_f64();
    std::thread::sleep(AT_REST);
    let idle_kib = nodes.rss_kib();
    let manager_idle_kib = nodes.manager_rss_kib();
    let peers_private_idle_kib = nodes.peers_private_kib();
    let peers_pss_idle_kib = nodes.peers_pss_kib();
    let mut client = Client::connect(&nodes.manager(), Duration::from_secs(600))
        .await
        .expect("client");

    let t = Instant::now();
    let reply = client
        .call(
            ClientRequest::Distribute {
                path: Some(file.clone()),
            },
            None,
        )
        .await;
    let distribute_wall_ms = t.elapsed().as_secs_f64() * 1e3;
    let Ok(ReplyBody::Distribute(d)) = reply else {
        panic!("distribute failed: {reply:?}")
    };
    assert_eq!(d.stored, records, "not every record was stored");
    let distribute_ms = d.elapsed_micros as f64 / 1e3;
    let status = wait_replicated(&nodes, records, r, sc.limit());
    let shares = owned(&status);
    // What a status costs, and a repair (the manager's every minute): each peer reports every
    // range it holds with a digest of its rows. The repair must find every range the same.
    // Before the rest, not right before the queries: there, the queries' p99 / p50 unpinned
    // at n = 5 rose from 2.3–3.1 to 7–11, the slow ones among the first hundred (about 10 ms
    // after the burst of every peer hashing its rows); peers do not trim after a report, so
    // it is not their memory. The same rest follows the distribute.
    let t = Instant::now();
    let reply = client.call(ClientRequest::Status, None).await;
    let status_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(
        matches!(reply, Ok(ReplyBody::Status(_))),
        "status: {reply:?}"
    );
    let t = Instant::now();
    let reply = client.call(ClientRequest::Repair, None).await;
    let repair_ms = t.elapsed().as_secs_f64() * 1e3;
    let Ok(ReplyBody::Repair(repair)) = reply else {
        panic!("repair failed: {reply:?}")
    };
    assert_eq!(
        (repair.diverged_ranges, repair.unchecked_ranges),
        (0, 0),
        "a repair right after the distribute: {repair:?}"
    );
    std::thread::sleep(AT_REST);
    let loaded_kib = nodes.rss_kib();
    let manager_kib = nodes.manager_rss_kib();
    let peers_private_kib = nodes.peers_private_kib();
    let peers_pss_kib = nodes.peers_pss_kib();

    // Seeded random keys, one query at a time: the same 1,000 queries on every run, entering
    // at the next member round the ring, then the same keys entering at their owner (by the
    // client's view): no hop but the answer.
    // The floor's round trips are timed between blocks of the same queries. The queries go
    // through the blocking client (`stormctl query`'s), on this thread.
    let mut querier = nodes
        .manager()
        .parse()
        .map_err(|e| format!("{e}"))
        .and_then(|addr| {
            BlockingClient::connect(addr, Duration::from_secs(600)).map_err(|e| e.to_string())
        })
        .expect("blocking client");
    let echo = floor::Echo::start();
    let (mut ring_rtts, mut owner_rtts) = (Vec::new(), Vec::new());
    let (latencies, hops, _) = timed_queries(&mut querier, sc, Some((&echo, &mut ring_rtts)), None);
    querier.set_owner_entry(true);
    let (owner_latencies, owner_hops, _) =
        timed_queries(&mut querier, sc, Some((&echo, &mut owner_rtts)), None);
    querier.set_owner_entry(false);
    drop(echo);
    let one_way_us = floor::one_way_of(ring_rtts);
    let one_way_owner_us = floor::one_way_of(owner_rtts);
    // The same queries again with the client, the echo of the floor and every node pinned to
    // one CPU (processes only): the floor and the queries then pay the same wake-ups.
    let mut same_cpu = Value::Null;
    if let Some(pinned) = nodes.pids().as_deref().and_then(floor::Pinned::all) {
        // Started pinned: the echo runs on the same CPU.
        let echo = floor::Echo::start();
        let (mut ring_rtts, mut owner_rtts) = (Vec::new(), Vec::new());
        // Where the time goes: the CPU of a query (the client, the peers) against that of the
        // floor's round trip (pinger, echo), all on this one CPU.
        let pids = nodes.pids().unwrap_or_default();
        echo.take_cpu();
        let mut ring_cpu = floor::CpuTally::default();
        let (ring, ring_hops, ring_each) = timed_queries(
            &mut querier,
            sc,
            Some((&echo, &mut ring_rtts)),
            Some((&pids, &mut ring_cpu)),
        );
        let ring_echo_cpu = echo.take_cpu();
        // A bare loop through three processes, as many as a hop's path has (client, entry,
        // next): what the two-process floor leaves out.
        let relay = floor::Relay::start();
        let relay_one_way = {
            let mut loops = relay.loops(QUERIES);
            loops.sort_by(|a, b| a.total_cmp(b));
            percentile(&loops, 0.5) / 3.0
        };
        drop(relay);
        querier.set_owner_entry(true);
        let mut query_cpu = floor::CpuTally::default();
        let (owner, owner_hops, _) = timed_queries(
            &mut querier,
            sc,
            Some((&echo, &mut owner_rtts)),
            Some((&pids, &mut query_cpu)),
        );
        let echo_cpu = echo.take_cpu();
        querier.set_owner_entry(false);
        drop(echo);
        drop(pinned);
        let (ring_one_way, owner_one_way) =
            (floor::one_way_of(ring_rtts), floor::one_way_of(owner_rtts));
        let ratio = |lat: &[f64], hops: usize, one_way: f64| {
            let hops = hops as f64 / QUERIES as f64;
            round(percentile(lat, 0.5) / ((hops + 2.0) * one_way), 2)
        };
        same_cpu = json!({
            "one_way_us": round(ring_one_way, 1),
            "one_way_owner_entry_us": round(owner_one_way, 1),
            "query_p50_us": round(percentile(&ring, 0.5), 0),
            "query_p99_us": round(percentile(&ring, 0.99), 0),
            "p50_over_floor": ratio(&ring, ring_hops, ring_one_way),
            "p50_over_own_floor": round(p50_over_own_floor(&ring_each, ring_one_way), 2),
            "relay_one_way_us": round(relay_one_way, 1),
            "p50_over_relay_floor": ratio(&ring, ring_hops, relay_one_way),
            "query_p50_owner_entry_us": round(percentile(&owner, 0.5), 0),
            "p50_owner_entry_over_floor": ratio(&owner, owner_hops, owner_one_way),
        });
        // Pinned, latency is CPU: a query's CPU against the round trip's says how much of the
        // ratio is the work of the client and the nodes, and how much waiting. Round the ring
        // the floor is (hops + 2) one-way trips: the round trip's CPU × (hops + 2) / 2.
        let split = |query: &floor::CpuTally, echo: &floor::CpuTally, hops: usize| {
            let trips = (hops as f64 / QUERIES as f64 + 2.0) / 2.0;
            let ((client, nodes), (pinger, echo)) = (query.per_time_us()?, echo.per_time_us()?);
            Some(json!({
                "client": round(client, 1),
                "nodes": round(nodes, 1),
                "floor_pinger": round(pinger, 1),
                "floor_echo": round(echo, 1),
                "query_over_round_trip": round((client + nodes) / ((pinger + echo) * trips), 2),
            }))
        };
        if let Some(cpu) = split(&query_cpu, &echo_cpu, owner_hops) {
            same_cpu["owner_entry_cpu_us"] = cpu;
        }
        if let Some(cpu) = split(&ring_cpu, &ring_echo_cpu, ring_hops) {
            same_cpu["ring_cpu_us"] = cpu;
        }
    }
    // Ids above every event id of the file: each must be "not found".
    let top = sc
        .dataset
        .rows
        .iter()
        .map(|r| r.key.as_u64())
        .max()
        .unwrap_or(0);
    let mut absent_not_found = 0;
    for i in 0..ABSENT as u64 {
        let key = RecordKey::Event(top + 1 + i * 7_919);
        let req = ClientRequest::Query {
            key,
            via: None,
            routing: Some(sc.routing),
        };
        if let Ok(ReplyBody::Query(q)) = client.call(req, None).await
            && !q.found
        {
            absent_not_found += 1;
        }
    }

    // Verify as `stormctl verify` does (each query enters at its key's owner): a fixed
    // sample first; every record too when that should fit the budget. Then the sample again
    // entering at the next member round the ring, as single queries do.
    client.set_owner_entry(true);
    let part = sample(sc.dataset, VERIFY_SAMPLE);
    let v = verify(&mut client, &file, &part, VERIFY_WINDOW).await;
    assert!(v.ok(), "verify of the sample failed: {v:?}");
    let sample_qps = v.keys as f64 / (v.elapsed_ms / 1e3);
    let estimate = Duration::from_secs_f64(records as f64 / sample_qps);
    let v = if estimate <= VERIFY_BUDGET {
        let v = verify(&mut client, &file, sc.dataset, VERIFY_WINDOW).await;
        assert!(v.ok(), "verify failed: {v:?}");
        v
    } else {
        v
    };
    let verify_all = v.rows == records;
    let verify_qps = v.keys as f64 / (v.elapsed_ms / 1e3);
    // For comparison only (a long walk under load may time out: then null and the count of
    // errors): a smaller sample round the ring, then through the manager.
    let small = sample(sc.dataset, VERIFY_SAMPLE / 4);
    let qps_or_null = |v: &stormdht::client::VerifyReport| {
        if v.ok() {
            json!(round(v.keys as f64 / (v.elapsed_ms / 1e3), 0))
        } else {
            json!(null)
        }
    };
    client.set_owner_entry(false);
    let next = verify(&mut client, &file, &small, VERIFY_WINDOW).await;
    let verify_qps_next_entry = qps_or_null(&next);
    // And through the manager, as before queries went straight to the peers.
    client.set_direct(false);
    let relayed = verify(&mut client, &file, &small, VERIFY_WINDOW).await;
    let verify_qps_through_manager = qps_or_null(&relayed);
    let comparison_errors = next.errors + next.missing + relayed.errors + relayed.missing;
    client.set_direct(true);

    // Churn. `moved_join` / `moved_leave` count row copies that changed holder, as a
    // fraction of all copies (records × replication; with replication 1, of all records): for
    // a join, the copies the new peer holds once the ring is settled and fully replicated
    // again (every one came from another peer; the copies it displaced are dropped, not
    // moved); for a leave, the copies the leaver held just before (each is handed to, or
    // re-copied on, another peer). `moved_*_owned` count ownership instead: the rows the
    // joiner owns (their owner changed) and the rows the leaver owned, as a fraction of all
    // records. Consistent hashing's ideal is about 1/n (`one_over_n`) for each.
    let limit = sc.limit();
    nodes.add_peer("bench-joiner").await;
    nodes.wait_for_peers(sc.peers + 1, limit);
    let s = wait_replicated(&nodes, records, r, limit);
    let joiner = "bench-joiner";
    let moved_join = count_of(&s, joiner, "records") as f64 / (records * r) as f64;
    let moved_join_owned = count_of(&s, joiner, "owned") as f64 / records as f64;
    let leaver = "peer-1";
    let held = count_of(&s, leaver, "records");
    let held_owned = count_of(&s, leaver, "owned");
    nodes.leave(leaver, limit).await;
    let s = wait_replicated(&nodes, records, r, limit);
    let moved_leave = held as f64 / (records * r) as f64;
    let moved_leave_owned = held_owned as f64 / records as f64;
    let churned_once = max_over_mean(&owned(&s));
    // Two more joins and two more leaves: three of each in all.
    for i in 2..=3 {
        let joiner = format!("bench-joiner-{i}");
        nodes.add_peer(&joiner).await;
        nodes.wait_for_peers(sc.peers + i - 1, limit);
        wait_replicated(&nodes, records, r, limit);
    }
    for leaver in ["peer-3", "bench-joiner-2"] {
        nodes.leave(leaver, limit).await;
        wait_replicated(&nodes, records, r, limit);
    }
    let s = wait_replicated(&nodes, records, r, limit);
    let churned = max_over_mean(&owned(&s));
    let churn_peers = owned(&s).len();

    let mut failure = json!(null);
    if sc.kill {
        let victim = "peer-2";
        let killed = Instant::now();
        nodes.kill(victim);
        loop {
            let s = nodes.status();
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
        wait_replicated(&nodes, records, r, Duration::from_secs(60));
        let replicated = killed.elapsed();
        failure = json!({
            "killed": victim,
            "kill_to_ring_rebuilt_ms": round(rebuilt.as_secs_f64() * 1e3, 0),
            "kill_to_fully_replicated_ms": round(replicated.as_secs_f64() * 1e3, 0),
        });
    }

    let mean_hops = hops as f64 / QUERIES as f64;
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let rss_over_raw = (loaded_kib.saturating_sub(idle_kib) * 1024) as f64 / (raw_bytes * r) as f64;
    // The peers alone (the target's measure): every process less the manager.
    let peers_rss_over_raw = match (manager_idle_kib, manager_kib) {
        (Some(mi), Some(ml)) => {
            let peers_idle = idle_kib.saturating_sub(mi);
            let peers_loaded = loaded_kib.saturating_sub(ml);
            Some(round(
                (peers_loaded.saturating_sub(peers_idle) * 1024) as f64 / (raw_bytes * r) as f64,
                2,
            ))
        }
        _ => None,
    };
    // The same, private memory only: what storing rows costs, without the code pages that the
    // first distribute and repair fault in (one copy in memory, counted by every process).
    let peers_private_over_raw = match (peers_private_idle_kib, peers_private_kib) {
        (Some(idle), Some(loaded)) => Some(round(
            (loaded.saturating_sub(idle) * 1024) as f64 / (raw_bytes * r) as f64,
            2,
        )),
        _ => None,
    };
    // The memory the peers hold together (PSS: a shared page counts once across them).
    let peers_pss_over_raw = match (peers_pss_idle_kib, peers_pss_kib) {
        (Some(idle), Some(loaded)) => Some(round(
            (loaded.saturating_sub(idle) * 1024) as f64 / (raw_bytes * r) as f64,
            2,
        )),
        _ => None,
    };
    let owner_p50 = percentile(&owner_latencies, 0.50);
    let owner_mean_hops = owner_hops as f64 / QUERIES as f64;
    // Expected sampling noise of rows per peer: a peer's share of n is Poisson-like, so the
    // largest of n is about 1 + 3/sqrt(rows per peer) above the mean even with equal arcs.
    let rows_per_peer = (records as f64) / (sc.peers as f64);
    json!({
        "scenario": sc.name,
        "peers": sc.peers,
        "processes": nodes.is_processes(),
        "routing": sc.routing.to_string(),
        "records": records,
        "replication": r,
        "vnodes": VNODES,
        "distribute_ms": round(distribute_ms, 1),
        "distribute_wall_ms": round(distribute_wall_ms, 1),
        "parse_ms": round(parse_ms, 1),
        "distribute_over_parse": round(distribute_ms / parse_ms, 2),
        "records_per_s": round(records as f64 / (distribute_ms / 1e3), 0),
        "query_p50_us": round(p50, 0),
        "query_p99_us": round(p99, 0),
        "one_way_us": round(one_way_us, 1),
        "mean_hops": round(mean_hops, 2),
        "p50_over_floor": round(p50 / ((mean_hops + 2.0) * one_way_us), 2),
        "p99_over_p50": round(p99 / p50, 2),
        "absent_not_found": absent_not_found,
        "absent_queried": ABSENT,
        "query_p50_owner_entry_us": round(owner_p50, 0),
        "mean_hops_owner_entry": round(owner_mean_hops, 2),
        "one_way_owner_entry_us": round(one_way_owner_us, 1),
        "p50_owner_entry_over_floor": round(owner_p50 / ((owner_mean_hops + 2.0) * one_way_owner_us), 2),
        "same_cpu": same_cpu,
        "verify_qps": round(verify_qps, 0),
        "verify_qps_next_entry": verify_qps_next_entry,
        "verify_qps_through_manager": verify_qps_through_manager,
        "comparison_errors": comparison_errors,
        "verified": v.keys,
        "verify_all": verify_all,
        "max_over_mean": round(max_over_mean(&shares), 3),
        "max_over_mean_churn_1": round(churned_once, 3),
        "max_over_mean_churn": round(churned, 3),
        "churn_peers": churn_peers,
        "row_noise_3sigma": round(3.0 / rows_per_peer.sqrt(), 3),
        "moved_join": round(moved_join, 4),
        "moved_leave": round(moved_leave, 4),
        "moved_join_owned": round(moved_join_owned, 4),
        "moved_leave_owned": round(moved_leave_owned, 4),
        "one_over_n": round(1.0 / sc.peers as f64, 4),
        "rss_over_raw": round(rss_over_raw, 2),
        "peers_rss_over_raw": peers_rss_over_raw,
        "peers_private_over_raw": peers_private_over_raw,
        "peers_pss_over_raw": peers_pss_over_raw,
        "rss_mib_total": round(loaded_kib as f64 / 1024.0, 1),
        "rss_mib_idle": round(idle_kib as f64 / 1024.0, 1),
        "manager_rss_mib": manager_kib.map(|k| round(k as f64 / 1024.0, 1)),
        "status_ms": round(status_ms, 1),
        "repair_ms": round(repair_ms, 1),
        "repair_ranges": repair.checked_ranges,
        "startup_s": round(up_s, 1),
        "scenario_s": round(scenario_started.elapsed().as_secs_f64(), 1),
        "failure": failure,
    })
}

/// Runs one scenario on a runtime of its own, dropped after it (with every in-process node
/// task and socket, even when the scenario panics; peer processes are killed by their
/// handles' Drop). Err: the panic's message.
fn run_isolated(sc: &Scenario<'_>) -> Result<Value, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        // The client on one thread, as in stormctl, when the peers are processes: on a
        // multi-thread runtime every answer crossed from the worker that polls the socket to
        // the thread that waits for it. In-process peers need the workers.
        let rt = if sc.processes {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        }
        .expect("runtime");
        let figures = rt.block_on(run(sc));
        rt.shutdown_timeout(Duration::from_secs(5));
        figures
    }))
    .map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string());
        msg.chars().take(400).collect()
    })
}

/// A file of `records` records made from `source` (kept in target/bench-data between runs),
/// and its rows.
fn generated_file(source: &Path, records: u64) -> Result<(std::path::PathBuf, Dataset), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = dir.join(format!("generated-{records}.csv"));
    if !out.exists() {
        let tmp = out.with_extension("partial");
        let input =
            std::fs::File::open(source).map_err(|e| format!("{}: {e}", source.display()))?;
        let output = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        record::generate(input, output, records).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &out).map_err(|e| e.to_string())?;
    }
    let dataset = record::load_path(&out).map_err(|e| e.to_string())?;
    Ok((out, dataset))
}

fn main() {
    if std::env::var_os(floor::ECHO_ENV).is_some() {
        return floor::echo_server(None);
    }
    if let Some(to) = std::env::var(floor::FORWARD_ENV)
        .ok()
        .and_then(|to| to.parse().ok())
    {
        return floor::echo_server(Some(to));
    }
    // `cargo bench` passes --bench; arguments are ignored.
    let bench_started = Instant::now();
    let path = shared_data("details-1996.csv");
    let dataset = record::load_path(&path).expect("details-1996.csv (../shared/data)");
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
    let force_in_process = std::env::var("STORM_BENCH_IN_PROCESS").is_ok_and(|v| v == "1");
    for scenario in list("STORM_BENCH_SCENARIOS", "n5,n5r1,n64,n256,n64@1000000") {
        // nN or nNrR: N peers, R copies of every record (default 2); `@RECORDS`: a file of
        // that many records generated from details-1996 (`stormctl generate`), fingers only.
        let (shape, generated) = match scenario.split_once('@') {
            Some((shape, records)) => match records.parse::<u64>() {
                Ok(n) if n > 0 => (shape.to_string(), Some(n)),
                _ => {
                    eprintln!("bench: {scenario}: @RECORDS must be a positive count");
                    continue;
                }
            },
            None => (scenario.clone(), None),
        };
        let big;
        let (path, dataset) = match generated {
            None => (path.as_path(), &dataset),
            Some(n) => match generated_file(&path, n) {
                Ok(made) => {
                    big = made;
                    (big.0.as_path(), &big.1)
                }
                Err(e) => {
                    eprintln!("bench: {scenario}: {e}");
                    continue;
                }
            },
        };
        let (n, r) = shape
            .trim_start_matches('n')
            .split_once('r')
            .map_or((shape.trim_start_matches('n'), "2"), |(n, r)| (n, r));
        let (Ok(peers), Ok(replication)) = (n.parse::<usize>(), r.parse::<u64>()) else {
            eprintln!("bench: unknown scenario {scenario:?} (nN or nNrR, e.g. n5, n5r1, n64)");
            continue;
        };
        if peers < 2 || replication == 0 {
            eprintln!("bench: {scenario}: at least 2 peers (one leaves) and 1 copy");
            continue;
        }
        let routings: Vec<Routing> = if generated.is_some() {
            vec![Routing::Fingers]
        } else {
            routings.clone()
        };
        for routing in &routings {
            let mut sc = Scenario {
                name: format!("{scenario}_{routing}"),
                peers,
                replication,
                routing: *routing,
                processes: !force_in_process,
                dataset,
                path,
                kill: peers == 5 && replication >= 2 && *routing == Routing::Walk,
            };
            loop {
                let how = if sc.processes {
                    "peer processes"
                } else {
                    "in-process peers"
                };
                eprintln!(
                    "bench: {} ({peers} {how}, replication {replication}, {routing} routing)",
                    sc.name
                );
                match run_isolated(&sc) {
                    Ok(figures) => println!("{figures}"),
                    // The machine may not hold this many processes: the in-process cluster.
                    Err(e) if sc.processes && peers > 64 => {
                        eprintln!("bench: {} with processes failed ({e}); in process", sc.name);
                        sc.processes = false;
                        sc.kill = false;
                        continue;
                    }
                    Err(e) => println!(
                        "{}",
                        json!({
                            "scenario": sc.name,
                            "peers": peers,
                            "processes": sc.processes,
                            "routing": routing.to_string(),
                            "error": e,
                        })
                    ),
                }
                break;
            }
        }
    }
    eprintln!(
        "bench: done in {:.0} s",
        bench_started.elapsed().as_secs_f64()
    );
}
