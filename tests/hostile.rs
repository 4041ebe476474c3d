//! Bad traffic: a million random and hostile datagrams at a manager and a peer (real `stormd`
//! processes on loopback). No crash, memory bounded (the RSS is printed before and after),
//! every stored record intact, and the cluster answers queries all along.

mod support;

use rand::{Rng, SeedableRng};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use stormdht::auth::{Keyring, wall_clock_ms};
use stormdht::record::RecordKey;
use stormdht::wire::{
    Body, ClientRequest, Envelope, ExitReason, FindEvent, FindResult, PackedRow, PeerReport,
    Placement, RejectReason, RingView, StoreBatch, WireRow,
};
use support::{Cluster, peer_names, records_total, shared_data};

const DATAGRAMS: u64 = 1_000_000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Garbage of every shape a decoder can meet, by kind.
fn garbage(rng: &mut rand::rngs::SmallRng, n: u64) -> Vec<u8> {
    match n % 8 {
        // Random bytes; every hundredth of any size up to the UDP limit.
        0..=2 => {
            let len = if n.is_multiple_of(100) {
                rng.random_range(0..=65_507)
            } else {
                rng.random_range(0..600)
            };
            (0..len).map(|_| rng.random()).collect()
        }
        // Valid CBOR that is not an envelope.
        3 => {
            let mut v = Vec::new();
            let value = serde_json::json!({"v": stormdht::wire::PROTOCOL_VERSION, "from": n, "seq": "x", "body": [1, 2, {"a": null}]});
            ciborium::ser::into_writer(&value, &mut v).unwrap_or_default();
            v
        }
        // Deep nesting: arrays of arrays.
        4 => vec![0x81; rng.random_range(100..4_000)],
        // Huge declared lengths: a byte string, a text, an array and a map claiming 2^63.
        5 => {
            let major = [0x5b, 0x7b, 0x9b, 0xbb][(n / 8 % 4) as usize];
            let mut v = vec![0xa5, 0x61, b'v', 0x01, 0x64, b'b', b'o', b'd', b'y', major];
            v.extend_from_slice(&(1u64 << 63).to_be_bytes());
            v
        }
        // Truncated envelopes.
        6 => {
            let env = Envelope::new(n, 1, None, Body::Probe { probe: n })
                .encode()
                .unwrap_or_default();
            let cut = rng.random_range(0..env.len().max(1));
            env[..cut].to_vec()
        }
        // An envelope of a protocol version this build does not speak.
        _ => {
            let mut v = Vec::new();
            let value = serde_json::json!({"v": 77, "from": n, "seq": 0, "body": "LeaveRequest"});
            ciborium::ser::into_writer(&value, &mut v).unwrap_or_default();
            v
        }
    }
}

/// A well-formed envelope of every kind a member could send, as a stranger forges it.
fn forged(n: u64) -> Vec<u8> {
    let body = match n % 24 {
        0 => Body::Request(ClientRequest::Teardown),
        1 => Body::Request(ClientRequest::Leave {
            name: "peer-0".into(),
        }),
        2 => Body::Request(ClientRequest::Status),
        3 => Body::Register {
            name: format!("intruder-{n}"),
            rejoin: None,
        },
        4 => Body::LeaveRequest,
        5 => Body::Exit {
            reason: ExitReason::TearDown,
        },
        6 => Body::Ring(RingView {
            epoch: n,
            settled: true,
            placement: Placement::Modulo,
            table_size: 0,
            replication: 2,
            settled_epoch: 0,
            members: Vec::new(),
        }),
        7 => Body::Store(StoreBatch {
            epoch: n,
            columns: vec!["event_id".into()],
            rows: vec![WireRow(
                RecordKey::Event(n),
                PackedRow::pack(&[n.to_string()]),
            )],
        }),
        8 => Body::Find(FindEvent {
            query: n,
            key: RecordKey::Event(n),
            path: Vec::new(),
            hops: Vec::new(),
            routing: stormdht::wire::Routing::Fingers,
            // A stranger's find may not aim answers at a third party.
            reply_to: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9))),
        }),
        9 => Body::Probe { probe: n },
        10 => Body::Registered { id: 1 },
        11 => Body::Ack {
            seq: n,
            new_rows: Some(3),
        },
        12 => Body::Reject {
            seq: n,
            reason: RejectReason::NotRegistered,
        },
        13 => Body::Found(FindResult {
            query: n,
            key: RecordKey::Event(n),
            found: true,
            records: Vec::new(),
            path: vec![1],
            truncated: false,
            hops: Vec::new(),
            unreached: false,
        }),
        14 => Body::Report {
            probe: n,
            report: PeerReport {
                records: 1,
                keys: 1,
                epoch: 1,
                handing_over: 0,
                ..Default::default()
            },
        },
        15 => Body::Heartbeat {
            epoch: n,
            id: Some(n as u32),
            beat: Some(n),
        },
        16 => Body::HeartbeatAck {
            known: false,
            id: None,
            beat: n.is_multiple_of(2).then_some(n),
        },
        17 => Body::Ping { nonce: n },
        18 => Body::Pong { nonce: n },
        19 => Body::PingReq {
            nonce: n,
            target: SocketAddr::from(([127, 0, 0, 1], 9)),
        },
        20 => Body::Progress {
            to: n,
            done: n,
            total: n,
        },
        21 => Body::Answers(vec![FindResult {
            query: n,
            key: RecordKey::Event(n),
            found: false,
            records: Vec::new(),
            path: vec![1],
            truncated: false,
            hops: Vec::new(),
            unreached: false,
        }]),
        // A stranger's multi-get is a client's read: answered to the stranger, nothing changes.
        22 => Body::Lookups(
            (0..3)
                .map(|i| FindEvent {
                    query: n + i,
                    key: RecordKey::Event(n + i),
                    path: Vec::new(),
                    hops: Vec::new(),
                    routing: stormdht::wire::Routing::Walk,
                    reply_to: None,
                })
                .collect(),
        ),
        _ => Body::RebalanceDone {
            epoch: n,
            handed_over: 5,
        },
    };
    Envelope::new(0xbad0_0000 + n, n + 1, None, body)
        .encode()
        .unwrap_or_default()
}

/// Floods the cluster's manager and first peer with `datagram(n)` for n below `DATAGRAMS`,
/// asking a query every 100 ms all along; checks nothing changed. Returns the final status.
fn flood(
    cluster: &Cluster,
    label: &str,
    mut datagram: impl FnMut(u64) -> Vec<u8>,
) -> serde_json::Value {
    let file = shared_data("details-1950.csv");
    let before = cluster.wait_settled();
    assert_eq!(records_total(&before), 223);
    let pids = [cluster.manager.pid(), cluster.peers[0].pid()];
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();

    let flooding = Arc::new(AtomicBool::new(true));
    let (manager, ctl_env) = (cluster.manager.addr.to_string(), cluster.ctl_env.clone());
    let asker = {
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            let (mut asked, mut found) = (0, 0);
            while flooding.load(Ordering::Relaxed) {
                let args = ["--json", "--timeout", "10", "query", "10096222"];
                let out = support::ctl_at_with(&manager, &args, &ctl_env);
                asked += 1;
                if out.status.success() && support::parse_json(&out)["found"] == true {
                    found += 1;
                } else {
                    println!(
                        "hostile: query {asked} failed: {} {}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (asked, found)
        })
    };

    let targets: [SocketAddr; 2] = [cluster.manager.addr, cluster.peers[0].addr];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    let mut bytes_sent = 0u64;
    for n in 0..DATAGRAMS {
        let bytes = datagram(n);
        bytes_sent += bytes.len() as u64;
        // A full socket buffer on the receiving side drops datagrams, as a real flood would.
        let _ = sock.send_to(&bytes, targets[(n % 2) as usize]);
    }
    let secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    flooding.store(false, Ordering::Relaxed);
    let (asked, found) = asker.join().expect("the query thread");
    let rss_after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    println!(
        "hostile: FIGURE {label}: {DATAGRAMS} datagrams ({:.0} MB) in {secs:.1} s; RSS KiB manager {} -> {}, peer {} -> {}; queries during the flood: {found} of {asked} found",
        bytes_sent as f64 / 1e6,
        rss_before[0],
        rss_after[0],
        rss_before[1],
        rss_after[1]
    );
    assert!(asked >= 3, "too few queries ran during the flood");
    assert_eq!(found, asked, "a query went unanswered during the flood");
    for (b, a) in rss_before.iter().zip(&rss_after) {
        assert!(*a < b + 64 * 1024, "memory grew from {b} KiB to {a} KiB");
    }
    let after = cluster.wait_settled();
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(records_total(&after), 223, "{after}");
    assert_eq!(
        peer_names(&after),
        ["peer-0", "peer-1", "peer-2"],
        "{after}"
    );
    let v = cluster.verify(&file);
    assert_eq!(v["found"], v["keys"], "{v}");
    after
}

fn distributed_cluster(extra: &[(&'static str, String)]) -> Cluster {
    let file = shared_data("details-1950.csv");
    let cluster = Cluster::start_with(3, extra);
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    cluster
}

#[test]
fn a_million_garbage_datagrams_change_nothing() {
    let cluster = distributed_cluster(&[]);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed_0bad);
    let after = flood(&cluster, "garbage at an unkeyed cluster", |n| {
        garbage(&mut rng, n)
    });
    assert!(
        after["manager"]["bad_datagrams"].as_u64() > Some(100_000),
        "{after}"
    );
}

/// With a key, the same garbage and well-formed envelopes of every message kind (unsealed, or
/// sealed with another key) are all dropped before decoding, and counted.
#[test]
fn a_million_forged_datagrams_at_a_keyed_cluster_change_nothing() {
    let cluster = distributed_cluster(&[(
        "STORM_CLUSTER_KEY",
        "flood-test-key-0123456789abcdef".into(),
    )]);
    let wrong = Keyring::new(&["not-the-cluster-key-at-all"]).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed_f00d);
    let after = flood(
        &cluster,
        "garbage and forged envelopes at a keyed cluster",
        |n| match n % 4 {
            0 => garbage(&mut rng, n / 4),
            1 => wrong.seal(&forged(n / 4), wall_clock_ms()),
            _ => forged(n / 4),
        },
    );
    assert!(
        after["manager"]["unauthenticated"].as_u64() > Some(100_000),
        "{after}"
    );
}
