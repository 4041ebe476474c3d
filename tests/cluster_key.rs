//! A cluster with a key hears only its own members: real `stormd` processes on loopback, a
//! stranger's datagrams of every message kind (unsealed, and sealed with another key) change
//! nothing, get no answer, and are counted in `status`.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
use stormdht::auth::{Keyring, wall_clock_ms};
use stormdht::record::RecordKey;
use stormdht::wire::{
    Body, ClientRequest, Envelope, ExitReason, FindEvent, Member, PackedRow, Placement, Rejoin,
    RingView, StoreBatch, WireRow,
};
use support::{Cluster, peer_names, records_total, shared_data};

const KEY: &str = "4f1c0e5b7a2d9e3f6b8c1a0d5e7f9b2c-test-cluster-key";

/// One envelope of every kind a member could send, forged by a stranger.
fn forged_bodies(victim: SocketAddr) -> Vec<Body> {
    let member = Member {
        id: 666,
        name: "intruder".into(),
        addr: victim,
        token: 42,
        leaving: false,
        vnodes: Vec::new(),
    };
    vec![
        Body::Request(ClientRequest::Teardown),
        Body::Request(ClientRequest::Leave {
            name: "peer-0".into(),
        }),
        Body::Request(ClientRequest::Setup),
        Body::Register {
            name: "intruder".into(),
            rejoin: None,
        },
        Body::Register {
            name: "peer-0".into(),
            rejoin: Some(Rejoin {
                id: 1,
                ring: RingView {
                    epoch: 1_000_000,
                    settled: true,
                    placement: Placement::Consistent,
                    table_size: 0,
                    replication: 1,
                    settled_epoch: 0,
                    members: vec![member.clone()],
                },
                digest: None,
            }),
        },
        Body::Heartbeat {
            epoch: 1,
            id: Some(1),
            beat: Some(1),
        },
        Body::HeartbeatAck {
            known: false,
            id: None,
            beat: Some(1),
        },
        Body::Ping { nonce: 1 },
        Body::Progress {
            to: 1,
            done: 1,
            total: 2,
        },
        Body::PingReq {
            nonce: 2,
            target: "127.0.0.1:9".parse().expect("an address"),
        },
        Body::LeaveRequest,
        Body::Exit {
            reason: ExitReason::TearDown,
        },
        Body::Ring(RingView {
            epoch: 1_000_000,
            settled: true,
            placement: Placement::Consistent,
            table_size: 0,
            replication: 1,
            settled_epoch: 0,
            members: vec![member],
        }),
        Body::Store(StoreBatch {
            epoch: 1_000_000,
            columns: vec!["event_id".into()],
            rows: vec![WireRow(RecordKey::Event(1), PackedRow::pack(&["1"]))],
        }),
        Body::Find(FindEvent {
            query: 1,
            key: RecordKey::Event(1),
            path: Vec::new(),
            hops: Vec::new(),
            routing: stormdht::wire::Routing::Fingers,
            reply_to: None,
        }),
        Body::Lookup(FindEvent {
            query: 2,
            key: RecordKey::Event(1),
            path: Vec::new(),
            hops: Vec::new(),
            routing: stormdht::wire::Routing::Walk,
            reply_to: None,
        }),
        Body::Lookups(vec![FindEvent {
            query: 3,
            key: RecordKey::Event(1),
            path: Vec::new(),
            hops: Vec::new(),
            routing: stormdht::wire::Routing::Walk,
            reply_to: None,
        }]),
        Body::Probe { probe: 1 },
        Body::Registered { id: 1 },
    ]
}

#[test]
fn strangers_change_nothing_and_are_counted() {
    let file = shared_data("details-1950.csv");
    let cluster = Cluster::start_with(3, &[("STORM_CLUSTER_KEY", KEY.to_string())]);
    cluster.ctl_json(&["setup"]);
    let d = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    assert_eq!(d["stored"], 223, "{d}");
    let before = cluster.wait_settled();

    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let wrong_key = Keyring::new(&["a-key-that-is-not-the-clusters"]).unwrap();
    let targets: Vec<SocketAddr> = std::iter::once(cluster.manager.addr)
        .chain(cluster.peers.iter().map(|p| p.addr))
        .collect();
    let mut sent_to_manager = 0u64;
    for &target in &targets {
        for (seq, body) in forged_bodies(target).into_iter().enumerate() {
            let plain = Envelope::new(7, seq as u64 + 1, None, body)
                .encode()
                .unwrap();
            let sealed = wrong_key.seal(&plain, wall_clock_ms());
            for bytes in [&plain, &sealed] {
                stranger.send_to(bytes, target).unwrap();
                if target == cluster.manager.addr {
                    sent_to_manager += 1;
                }
            }
        }
    }
    // No answer leaks: not an ack, not a rejection.
    let mut buf = [0u8; 2048];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "a stranger got an answer"
    );

    // Nothing changed: same ring, same records, nobody left, nobody joined.
    let after = cluster.wait_settled();
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert_eq!(records_total(&after), 223, "{after}");
    assert_eq!(
        peer_names(&after),
        ["peer-0", "peer-1", "peer-2"],
        "{after}"
    );
    assert!(
        after["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "up")
    );
    // Every forged datagram was counted where it arrived.
    assert_eq!(
        after["manager"]["unauthenticated"].as_u64(),
        Some(sent_to_manager),
        "{after}"
    );
    for p in after["peers"].as_array().unwrap() {
        assert!(p["unauthenticated"].as_u64() >= Some(22), "{p}");
    }
    // The cluster still answers its own.
    let q = cluster.ctl_json(&["query", "10096222"]);
    assert_eq!(q["found"], true, "{q}");

    // stormctl without the key is not heard either, and says what to check.
    let out = support::ctl_at(
        &cluster.manager.addr.to_string(),
        &["--timeout", "1", "status"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("STORMCTL_KEY"), "{err}");
}

#[test]
fn a_rotated_keyring_keeps_old_members_talking() {
    let old = "old-key-0123456789abcdef".to_string();
    let new = "new-key-fedcba9876543210".to_string();
    // The manager already sends with the new key and still accepts the old one ...
    let mut cluster = Cluster::start_with(0, &[("STORM_CLUSTER_KEY", format!("{new},{old}"))]);
    // ... a peer not yet rotated sends with the old key only and hears the new one.
    let mut env = cluster.peer_env("peer-old");
    env.retain(|(k, _)| *k != "STORM_CLUSTER_KEY");
    env.push(("STORM_CLUSTER_KEY", format!("{old},{new}")));
    cluster.peers.push(support::Daemon::start("peer-old", &env));
    cluster.wait_for_peers(1);
    let setup = cluster.ctl_json(&["setup"]);
    assert_eq!(setup["peers"][0]["state"], "up", "{setup}");
}
