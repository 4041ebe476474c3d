//! Property tests, bounded so the suite stays fast: any bytes into the decoder, and any
//! sequence of well-formed messages from any sender into the manager and a peer. Nothing may
//! panic, and the invariants the protocol relies on must hold after every step.

use proptest::prelude::*;
use std::net::SocketAddr;
use std::time::Duration;
use stormdht::link::RetryPolicy;
use stormdht::machine::Machine;
use stormdht::manager::{Manager, ManagerConfig};
use stormdht::peer::{Peer, PeerConfig};
use stormdht::record::RecordKey;
use stormdht::wire::{
    Body, ClientRequest, Envelope, ExitReason, FindEvent, FindResult, Member, PackedRow,
    PeerReport, Placement, RejectReason, Rejoin, RingDelta, RingView, StoreBatch, WireRow,
};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_to_an_envelope_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Envelope::decode(&bytes);
        let _ = Envelope::decode_header(&bytes);
    }

    #[test]
    fn a_valid_envelope_with_changed_bytes_never_panics(
        body in body(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = Envelope::new(9, 3, None, body).encode().unwrap();
        let mut changed = bytes.clone();
        for (at, value) in edits {
            let i = at.index(changed.len());
            changed[i] = value;
        }
        let _ = Envelope::decode(&changed);
        let _ = Envelope::decode(&bytes[..cut.index(bytes.len())]);
    }
}

fn key() -> impl Strategy<Value = RecordKey> {
    prop_oneof![
        (0u64..50).prop_map(RecordKey::Event),
        (0u64..5).prop_map(RecordKey::Fallback),
    ]
}

fn member() -> impl Strategy<Value = Member> {
    (1u32..6, any::<u64>(), any::<bool>()).prop_map(|(id, token, leaving)| Member {
        id,
        name: format!("p{id}"),
        addr: addr(6000 + id as u16),
        token,
        leaving,
        vnodes: Vec::new(),
    })
}

fn ring() -> impl Strategy<Value = RingView> {
    (
        0u64..8,
        any::<bool>(),
        prop::sample::select(vec![
            Placement::Consistent,
            Placement::Modulo,
            Placement::Course,
        ]),
        0u64..100,
        1u32..4,
        prop::collection::vec(member(), 0..5),
    )
        .prop_map(
            |(epoch, settled, placement, table_size, replication, mut members)| {
                members.sort_by_key(|m| (m.token, m.id));
                members.dedup_by_key(|m| m.id);
                RingView {
                    epoch,
                    settled,
                    placement,
                    table_size,
                    replication,
                    settled_epoch: 0,
                    members,
                }
            },
        )
}

fn request() -> impl Strategy<Value = ClientRequest> {
    prop_oneof![
        Just(ClientRequest::Setup),
        Just(ClientRequest::Status),
        Just(ClientRequest::Teardown),
        Just(ClientRequest::Repair),
        Just(ClientRequest::Distribute { path: None }),
        (key(), prop::option::of("p[0-5]")).prop_map(|(key, via)| ClientRequest::Query {
            key,
            via,
            routing: None
        }),
        "p[0-5]".prop_map(|name| ClientRequest::Leave { name }),
    ]
}

/// Any message kind, with small values so that they collide with each other and with state.
fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (0u64..30, prop::option::of(0u32..10))
            .prop_map(|(seq, new_rows)| Body::Ack { seq, new_rows }),
        prop::collection::vec(0u64..30, 0..4).prop_map(|seqs| Body::Acks { seqs }),
        (0u64..30).prop_map(|seq| Body::Reject {
            seq,
            reason: RejectReason::NotRegistered
        }),
        request().prop_map(Body::Request),
        "p[0-5]|".prop_map(|name| Body::Register { name, rejoin: None }),
        (0u32..6, ring()).prop_map(|(id, ring)| Body::Register {
            name: format!("p{id}"),
            rejoin: Some(Rejoin {
                id,
                ring,
                digest: None
            })
        }),
        // A rejoin naming its view (by a digest that may be wrong) instead of carrying it.
        (0u32..6, ring(), any::<bool>()).prop_map(|(id, ring, right)| {
            let mut rejoin = Rejoin::naming(id, &ring);
            if !right {
                rejoin.digest = rejoin.digest.map(|d| d ^ 1);
            }
            Body::Register {
                name: format!("p{id}"),
                rejoin: Some(rejoin),
            }
        }),
        (0u64..8).prop_map(|epoch| Body::ViewWanted { epoch }),
        ring().prop_map(Body::HeldView),
        (ring(), ring()).prop_map(|(a, b)| Body::RingDelta(RingDelta::between(&a, &b))),
        (
            (0u64..8),
            proptest::option::of(0u32..8),
            proptest::option::of(0u64..8)
        )
            .prop_map(|(epoch, id, beat)| Body::Heartbeat { epoch, id, beat }),
        (
            any::<bool>(),
            proptest::option::of(0u32..8),
            proptest::option::of(0u64..8)
        )
            .prop_map(|(known, id, beat)| Body::HeartbeatAck { known, id, beat }),
        (0u64..8).prop_map(|nonce| Body::Ping { nonce }),
        (0u64..8).prop_map(|nonce| Body::Pong { nonce }),
        (0u64..8, 0u64..100).prop_map(|(to, done)| Body::Progress {
            to,
            done,
            total: 100
        }),
        (0u64..8, 0u16..4).prop_map(|(nonce, p)| Body::PingReq {
            nonce,
            target: addr(6000 + p)
        }),
        (0u32..6).prop_map(|id| Body::Registered { id }),
        ring().prop_map(Body::Ring),
        (0u64..8, 0u64..100)
            .prop_map(|(epoch, handed_over)| Body::RebalanceDone { epoch, handed_over }),
        Just(Body::LeaveRequest),
        Just(Body::Exit {
            reason: ExitReason::TearDown
        }),
        (0u64..5).prop_map(|probe| Body::Probe { probe }),
        (
            0u64..5,
            0u64..100,
            0u64..8,
            prop::collection::vec((any::<u64>(), 0u64..50, any::<u64>()), 0..4),
            0usize..5,
        )
            .prop_map(|(probe, records, epoch, ranges, digests)| Body::Report {
                probe,
                report: PeerReport {
                    records,
                    keys: records,
                    epoch,
                    handing_over: 0,
                    ranges: ranges.iter().map(|&(arc, n, _)| (arc, n)).collect(),
                    // Sometimes as many digests as ranges, sometimes not (an older peer,
                    // or a broken one).
                    digests: ranges.iter().map(|r| r.2).take(digests).collect(),
                    ..Default::default()
                },
            }),
        (0u64..8, prop::collection::vec(any::<u64>(), 0..3))
            .prop_map(|(epoch, arcs)| Body::Resync { epoch, arcs }),
        (0u64..8, prop::collection::vec(key(), 0..6)).prop_map(|(epoch, keys)| Body::Store(
            StoreBatch {
                epoch,
                columns: vec!["event_id".into(), "state".into()],
                rows: keys
                    .into_iter()
                    .map(|k| WireRow(k, PackedRow::pack(&[k.to_string(), "X".into()])))
                    .collect(),
            }
        )),
        (0u64..5, key(), prop::collection::vec(1u32..6, 0..4)).prop_map(|(query, key, path)| {
            Body::Find(FindEvent {
                query,
                key,
                path,
                hops: Vec::new(),
                routing: stormdht::wire::Routing::Fingers,
                reply_to: None,
            })
        }),
        (0u64..5, key()).prop_map(|(query, key)| {
            Body::Lookup(FindEvent {
                query,
                key,
                path: Vec::new(),
                hops: Vec::new(),
                routing: stormdht::wire::Routing::Walk,
                reply_to: None,
            })
        }),
        prop::collection::vec((0u64..5, key()), 0..6).prop_map(|lookups| {
            Body::Lookups(
                lookups
                    .into_iter()
                    .map(|(query, key)| FindEvent {
                        query,
                        key,
                        path: Vec::new(),
                        hops: Vec::new(),
                        routing: stormdht::wire::Routing::Fingers,
                        reply_to: None,
                    })
                    .collect(),
            )
        }),
        (0u64..5, key(), any::<bool>()).prop_map(|(query, key, found)| Body::Found(FindResult {
            query,
            key,
            found,
            records: Vec::new(),
            path: vec![1],
            truncated: false,
            hops: Vec::new(),
            unreached: false,
        })),
    ]
}

/// One step: a datagram from one of a few senders (client, peers, a stranger), or time passing.
#[derive(Debug, Clone)]
enum Step {
    Datagram {
        sender: u16,
        incarnation: u64,
        seq: u64,
        body: Body,
    },
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u16..7, 0u64..4, 0u64..40, body()).prop_map(|(sender, incarnation, seq, body)| {
            Step::Datagram { sender, incarnation, seq, body }
        }),
        1 => (1u64..3_000).prop_map(Step::Wait),
    ]
}

fn sender_addr(sender: u16) -> SocketAddr {
    match sender {
        0 => addr(4000),     // a client
        6 => addr(9999),     // a stranger
        n => addr(6000 + n), // the peers' addresses
    }
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
        attempts: Some(3),
    }
}

/// Feeds the steps; after each, drains what the machine sends and checks `invariant`.
fn run<M: Machine>(machine: &mut M, steps: &[Step], mut invariant: impl FnMut(&M)) {
    let mut now = Duration::ZERO;
    for s in steps {
        match s {
            Step::Datagram {
                sender,
                incarnation,
                seq,
                body,
            } => {
                let env = Envelope::new(
                    incarnation + u64::from(*sender) * 10,
                    *seq,
                    None,
                    body.clone(),
                );
                let _ = machine.handle(now, sender_addr(*sender), env, None);
            }
            Step::Wait(ms) => {
                now += Duration::from_millis(*ms);
                let _ = machine.handle_timeout(now);
            }
        }
        while let Some(t) = machine.poll_transmit() {
            assert!(
                Envelope::decode(&t.bytes).is_ok(),
                "the machine sent an undecodable datagram"
            );
        }
        invariant(machine);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_manager_survives_any_message_sequence(steps in prop::collection::vec(step(), 1..60)) {
        let cfg = ManagerConfig {
            vnodes: 1,
            balance_by_data: true,
            routing: stormdht::wire::Routing::default(),
            retry: retry(),
            max_datagram: 4_000,
            window: 2,
            placement: Placement::Consistent,
            query_timeout: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(200),
            default_data: None,
            replication: 2,
            detection: Default::default(),
            clock_origin_us: 0,
            // Often enough that the steps' time passes it: audits among any messages.
            repair_interval: Some(Duration::from_millis(300)),
        };
        let mut m = Manager::new(cfg, 1);
        let mut last_epoch = 0;
        run(&mut m, &steps, |m| {
            if let Some(r) = m.ring() {
                // Epochs never go back; ids in the ring are unique; tokens are in order.
                assert!(r.epoch >= last_epoch, "epoch went back");
                last_epoch = r.epoch;
                let mut ids: Vec<_> = r.members.iter().map(|m| m.id).collect();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), r.members.len(), "a member twice in the ring");
                assert!(r.members.windows(2).all(|w| w[0].token <= w[1].token));
                // Every member of the ring is a registered peer.
                assert!(r.members.iter().all(|mb| m.registry().get(mb.id).is_some()));
            }
        });
    }

    #[test]
    fn a_peer_survives_any_message_sequence(steps in prop::collection::vec(step(), 1..60)) {
        let cfg = PeerConfig {
            name: "p1".into(),
            manager: addr(5000),
            retry: retry(),
            max_datagram: 4_000,
            window: 2,
            heartbeat: Duration::from_millis(250),
            clock_origin_us: 0,
        };
        let mut p = Peer::new(cfg, 77, Duration::ZERO);
        let mut last_epoch = 0;
        run(&mut p, &steps, |p| {
            // A peer may drop its ring (declared dead, or given a new id), but a view it
            // holds is never older than one it held before.
            if let Some(epoch) = p.ring().map(|r| r.epoch) {
                assert!(epoch >= last_epoch, "an older ring view replaced a newer one");
                last_epoch = epoch;
            }
            // The row count the peer reports is the rows it holds.
            let held: u64 = p.store().iter().map(|(_, rows)| rows.count() as u64).sum();
            assert_eq!(held, p.store().row_count());
        });
    }
}
