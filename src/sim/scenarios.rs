//! The protocol scenarios: a whole cluster (the production drivers, over the simulated
//! network), seeded and replayable. Each ends by checking what the scenario claims.

use super::*;
use crate::machine::Machine;
use crate::record::{CsvFormat, RecordKey, Row};
use crate::ring::RingExt;
use crate::wire::PackedRow;
use crate::wire::{Body, PeerId, QueryOutcome, StatusReport};
use std::rc::Rc;

const COLUMNS: [&str; 4] = ["event_id", "state", "event_type", "location_index"];

/// `events` events; every tenth has three location rows under one key, like the
/// locations file, and two rows have fallback keys.
pub(super) fn dataset(events: u64) -> Dataset {
    let mut rows = Vec::new();
    let mut line = 1;
    for i in 0..events {
        let id = 5_000_000 + i * 7;
        let copies = if i % 10 == 0 { 3 } else { 1 };
        for c in 0..copies {
            line += 1;
            rows.push(Row {
                line,
                key: RecordKey::Event(id),
                values: PackedRow::pack(&[
                    id.to_string(),
                    format!("STATE{}", i % 50),
                    "Hail".into(),
                    c.to_string(),
                ]),
            });
        }
    }
    for f in 0..2u64 {
        line += 1;
        let values = vec![
            String::new(),
            format!("NOWHERE{f}"),
            "Fog".into(),
            "0".into(),
        ];
        rows.push(Row {
            line,
            key: crate::record::fallback_key(&values),
            values: PackedRow::pack(&values),
        });
    }
    Dataset {
        format: CsvFormat::Generic,
        columns: COLUMNS.iter().map(|c| c.to_string()).collect(),
        rows,
        rejected: Vec::new(),
        fallback_keys: 2,
    }
}

/// Rows in the default file: 600 events, every tenth with three rows, plus two without an id.
pub(super) fn default_rows(sim: &Sim) -> u64 {
    sim.file("default.csv").rows.len() as u64
}

pub(super) fn cluster(seed: u64, faults: Faults, peers: usize, placement: Placement) -> Sim {
    cluster_r(seed, faults, peers, placement, 2)
}

/// A cluster with `replication` copies of every record.
pub(super) fn cluster_r(
    seed: u64,
    faults: Faults,
    peers: usize,
    placement: Placement,
    replication: u32,
) -> Sim {
    populated(
        Sim::with_replication(seed, faults, placement, replication),
        peers,
    )
}

/// `peers` peers registered with `sim`, and the default file of 600 events.
pub(super) fn populated(mut sim: Sim, peers: usize) -> Sim {
    for i in 0..peers {
        sim.add_peer(&format!("peer-{i}"));
    }
    assert!(
        sim.run_until(Duration::from_secs(30), |s| s.registered() == peers),
        "peers did not register"
    );
    sim.add_file("default.csv", dataset(600));
    sim
}

pub(super) fn setup_and_distribute(sim: &mut Sim) -> crate::wire::DistributeReport {
    let setup = sim.request(ClientRequest::Setup).expect("setup");
    assert!(matches!(setup, ReplyBody::Setup(_)));
    match sim
        .request(ClientRequest::Distribute { path: None })
        .expect("distribute")
    {
        ReplyBody::Distribute(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

pub(super) fn query(sim: &mut Sim, key: RecordKey, via: Option<&str>) -> QueryOutcome {
    match sim.request(ClientRequest::Query {
        key,
        via: via.map(String::from),
        routing: None,
    }) {
        Ok(ReplyBody::Query(q)) => q,
        other => panic!("query {key}: {other:?}"),
    }
}

pub(super) fn status(sim: &mut Sim) -> StatusReport {
    match sim.request(ClientRequest::Status) {
        Ok(ReplyBody::Status(s)) => s,
        other => panic!("status: {other:?}"),
    }
}

/// Every row of the dataset is held by exactly `replication` live peers (or by every live
/// member, when fewer remain).
pub(super) fn assert_replicated(sim: &Sim) {
    let data = sim.file("default.csv");
    let r = sim.manager().ring().map_or(1, |r| {
        (r.replication as usize).min(r.members.iter().filter(|m| !m.leaving).count())
    });
    let copies = sim.copies();
    for row in &data.rows {
        let n = copies
            .get(&(row.key, row.values.values()))
            .copied()
            .unwrap_or(0);
        assert_eq!(
            n,
            r,
            "{} (line {}) held {n} times: {:?}",
            row.key,
            row.line,
            sim.holdings()
        );
    }
    assert_eq!(
        copies.len(),
        data.rows.len(),
        "rows held that are not in the file"
    );
}

/// Every row of the dataset is found, exactly, by a query, and held `replication` times.
pub(super) fn assert_all_found(sim: &mut Sim) {
    let data = sim.file("default.csv");
    let mut expected: BTreeMap<RecordKey, Vec<Vec<String>>> = BTreeMap::new();
    for r in &data.rows {
        expected.entry(r.key).or_default().push(r.values.values());
    }
    for (key, rows) in &expected {
        let q = query(sim, *key, None);
        assert!(q.found, "{key} not found; path {:?}", q.path);
        let mut got: Vec<Vec<String>> = q.records.iter().map(|r| r.values.values()).collect();
        got.sort();
        let mut want = rows.clone();
        want.sort();
        assert_eq!(got, want, "{key}");
        assert!(q.records.iter().all(|r| {
            r.columns
                .fields()
                .eq(data.columns.iter().map(String::as_str))
        }));
    }
    assert_replicated(sim);
}

#[test]
fn every_record_is_found_on_a_clean_network() {
    let mut sim = cluster(1, Faults::none(), 5, Placement::Consistent);
    let report = setup_and_distribute(&mut sim);
    let rows = sim.file("default.csv").rows.len() as u64;
    assert_eq!(
        (report.read, report.stored, report.new_rows),
        (rows, rows, rows)
    );
    assert_eq!(report.rejected, 0);
    assert!(
        report.batches > 5,
        "rows should be batched, not one per datagram: {}",
        report.batches
    );
    assert_all_found(&mut sim);
    // Each peer's share is what placement says, and the walk ends at the first holder of the
    // key it meets: the owner, unless the entry peer is a holder itself (one token each, so
    // from any other entry the walk meets the owner before the replica that follows it).
    let ring = sim.manager().ring().cloned().unwrap();
    let key = RecordKey::Event(5_000_007);
    let holders: Vec<PeerId> = crate::ring::Placer::new(&ring)
        .replicas(key, 2)
        .1
        .iter()
        .map(|m| m.id)
        .collect();
    let q = query(&mut sim, key, Some("peer-0"));
    let (last, before) = q.path.split_last().unwrap();
    assert!(holders.contains(last), "{:?} ends off {holders:?}", q.path);
    assert!(
        before.iter().all(|p| !holders.contains(p)),
        "{:?} passed a holder of {holders:?}",
        q.path
    );
    if q.path.len() > 1 {
        assert_eq!(*last, holders[0], "{:?} did not end at the owner", q.path);
    }
    assert!(q.path.len() <= 5);
    assert_eq!(q.path_names.len(), q.path.len());
}

#[test]
fn the_walk_goes_next_by_next_from_the_entry_peer() {
    // One copy, so that the walk must reach the owner itself.
    let mut sim = cluster_r(2, Faults::none(), 5, Placement::Consistent, 1);
    setup_and_distribute(&mut sim);
    let ring = sim.manager().ring().cloned().unwrap();
    let key = RecordKey::Event(5_000_014);
    let owner = ring.owner_of(key).unwrap().id;
    let entry = ring.next_of(owner).unwrap().clone();
    let q = query(&mut sim, key, Some(&entry.name));
    // Entering just after the owner is the longest walk: all the way round.
    assert_eq!(q.path.len(), 5);
    let mut at = entry.id;
    for id in &q.path {
        assert_eq!(*id, at);
        at = ring.next_of(at).unwrap().id;
    }
}

#[test]
fn an_absent_key_is_not_found_at_its_owner() {
    let mut sim = cluster(3, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let key = RecordKey::Event(42);
    let holders: Vec<u32> = {
        let m = sim.manager();
        let ring = m.ring().unwrap();
        ring.replicas(key, 2).iter().map(|m| m.id).collect()
    };
    for _ in 0..5 {
        let q = query(&mut sim, key, None);
        assert!(!q.found);
        assert!(q.records.is_empty());
        // The miss is final only where the owner and every replica have been asked.
        assert!(holders.contains(q.path.last().unwrap()), "{:?}", q.path);
        assert!(holders.iter().all(|h| q.path.contains(h)), "{:?}", q.path);
    }
}

#[test]
fn loss_duplication_and_reordering_lose_nothing_and_store_nothing_twice() {
    for seed in [11, 12, 13] {
        let faults = Faults {
            loss: 0.2,
            duplicate: 0.1,
            max_delay: Duration::from_millis(5),
        };
        let mut sim = cluster(seed, faults, 5, Placement::Consistent);
        let report = setup_and_distribute(&mut sim);
        assert_eq!(report.stored, default_rows(&sim), "seed {seed}");
        assert_eq!(
            report.new_rows,
            default_rows(&sim),
            "seed {seed}: an ack may be lost, never a row double-counted"
        );
        assert_all_found(&mut sim);
    }
}

#[test]
fn distributing_twice_stores_nothing_twice() {
    let mut sim = cluster(4, Faults::none(), 3, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let again = match sim.request(ClientRequest::Distribute { path: None }) {
        Ok(ReplyBody::Distribute(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((again.stored, again.new_rows), (default_rows(&sim), 0));
    assert_eq!(sim.live_rows(), 2 * default_rows(&sim));
    assert_replicated(&sim);
}

#[test]
fn a_leave_hands_over_to_the_successor_only() {
    let faults = Faults {
        loss: 0.05,
        duplicate: 0.05,
        max_delay: Duration::from_millis(2),
    };
    // One copy: the leaver's rows all go to its successor.
    let mut sim = cluster_r(5, faults, 5, Placement::Consistent, 1);
    setup_and_distribute(&mut sim);
    let before = sim.holdings();
    let ring = sim.manager().ring().cloned().unwrap();
    let leaver = ring.members[2].clone();
    let successor = ring.members[3].name.clone();
    let reply = sim
        .request(ClientRequest::Leave {
            name: leaver.name.clone(),
        })
        .expect("leave");
    let ReplyBody::Leave {
        id, handed_over, ..
    } = reply
    else {
        panic!("{reply:?}")
    };
    assert_eq!(id, leaver.id);
    assert_eq!(
        handed_over, before[&leaver.name],
        "the reply counts the rows handed over"
    );
    sim.settle();
    assert_eq!(
        sim.peer_named(&leaver.name).unwrap().exit().map(|e| e.0),
        Some(0)
    );
    let after = sim.holdings();
    for (name, rows) in &after {
        if *name == successor {
            assert_eq!(*rows, before[name] + before[&leaver.name]);
        } else {
            assert_eq!(*rows, before[name], "{name} gained or lost rows");
        }
    }
    let ring = sim.manager().ring().cloned().unwrap();
    assert_eq!(ring.members.len(), 4);
    assert!(ring.settled);
    assert_all_found(&mut sim);
}

#[test]
fn sigterm_is_a_graceful_leave() {
    let mut sim = cluster(6, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.terminate("peer-1");
    sim.settle();
    assert_eq!(
        sim.peer_named("peer-1").unwrap().exit().map(|e| e.0),
        Some(0)
    );
    assert_eq!(sim.manager().ring().unwrap().members.len(), 4);
    assert_all_found(&mut sim);
}

#[test]
fn queries_during_a_leave_still_find_everything() {
    let mut sim = cluster(7, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.terminate("peer-3");
    // No settle: the hand-off is under way while the queries run.
    assert_all_found(&mut sim);
}

#[test]
fn a_late_peer_joins_and_takes_part_of_one_arc() {
    let mut sim = cluster_r(8, Faults::none(), 5, Placement::Consistent, 1);
    setup_and_distribute(&mut sim);
    let before = sim.holdings();
    sim.add_peer("late");
    sim.run_until(Duration::from_secs(10), |s| s.registered() == 6);
    sim.settle();
    let after = sim.holdings();
    assert!(after["late"] > 0, "the joiner holds nothing: {after:?}");
    let donors: Vec<_> = before.iter().filter(|(n, r)| after[*n] != **r).collect();
    assert_eq!(
        donors.len(),
        1,
        "records moved from more than one peer: {before:?} → {after:?}"
    );
    let ring = sim.manager().ring().cloned().unwrap();
    assert_eq!(ring.members.len(), 6);
    assert!(ring.settled);
    assert_all_found(&mut sim);
}

#[test]
fn a_taken_name_is_refused_with_a_reason() {
    let mut sim = cluster(9, Faults::none(), 2, Placement::Consistent);
    let i = sim.add_peer("peer-0");
    sim.settle();
    let exit = sim.peers[i].exit().expect("the duplicate should exit");
    assert_eq!(exit.0, 1);
    assert!(exit.1.contains("taken"), "{}", exit.1);
    assert_eq!(sim.manager().peer_count(), 2);
}

#[test]
fn teardown_ends_every_peer_with_zero_and_the_manager_starts_over() {
    let mut sim = cluster(10, Faults::none(), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let reply = sim.request(ClientRequest::Teardown).expect("teardown");
    let ReplyBody::Teardown { peers, exited } = reply else {
        panic!("not a teardown reply: {reply:?}");
    };
    assert_eq!(peers, 4);
    assert!(exited.iter().all(|p| p.confirmed), "{exited:?}");
    sim.settle();
    assert!(sim.peers.iter().all(|p| p.exit().map(|e| e.0) == Some(0)));
    assert!(sim.manager().ring().is_none());
    // New peers, new ring, new data.
    for i in 0..3 {
        sim.add_peer(&format!("second-{i}"));
    }
    sim.run_until(Duration::from_secs(10), |s| s.manager().peer_count() == 3);
    setup_and_distribute(&mut sim);
    assert_all_found(&mut sim);
    let s = status(&mut sim);
    assert_eq!(s.peers.len(), 3);
    assert!(
        s.peers.iter().all(|p| p.id > 4),
        "ids are never reused: {:?}",
        s.peers
    );
}

#[test]
fn status_reports_every_peer_with_counts_and_shares() {
    let mut sim = cluster(14, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let s = status(&mut sim);
    assert_eq!(s.peers.len(), 5);
    assert_eq!(
        s.peers.iter().map(|p| p.records.unwrap()).sum::<u64>(),
        2 * default_rows(&sim)
    );
    // Each row once as owned, once as a replica; every range fully replicated.
    let owned: u64 = s.peers.iter().map(|p| p.owned.unwrap()).sum();
    let replicas: u64 = s.peers.iter().map(|p| p.replicas.unwrap()).sum();
    assert_eq!((owned, replicas), (default_rows(&sim), default_rows(&sim)));
    assert_eq!(s.replication, 2);
    assert_eq!((s.under_replicated_ranges, s.under_replicated_rows), (0, 0));
    assert!((s.peers.iter().map(|p| p.share).sum::<f64>() - 1.0).abs() < 1e-6);
    assert!(
        s.peers
            .iter()
            .all(|p| p.state == crate::wire::PeerState::Up)
    );
}

#[test]
fn modulo_and_course_placements_find_everything_too() {
    for placement in [Placement::Modulo, Placement::Course] {
        let mut sim = cluster(15, Faults::none(), 5, placement);
        setup_and_distribute(&mut sim);
        sim.settle();
        assert_all_found(&mut sim);
        sim.terminate("peer-2");
        sim.settle();
        assert_all_found(&mut sim);
    }
}

#[test]
fn commands_before_setup_get_clear_errors() {
    let mut sim = cluster(16, Faults::none(), 2, Placement::Consistent);
    let e = sim
        .request(ClientRequest::Distribute { path: None })
        .unwrap_err();
    assert!(e.contains("setup"), "{e}");
    let e = sim
        .request(ClientRequest::Query {
            key: RecordKey::Event(1),
            via: None,
            routing: None,
        })
        .unwrap_err();
    assert!(e.contains("setup"), "{e}");
    let e = sim
        .request(ClientRequest::Leave {
            name: "nobody".into(),
        })
        .unwrap_err();
    assert!(e.contains("nobody"), "{e}");
    sim.request(ClientRequest::Setup).unwrap();
    let e = sim
        .request(ClientRequest::Distribute {
            path: Some("missing.csv".into()),
        })
        .unwrap_err();
    assert!(e.contains("missing.csv"), "{e}");
}

#[test]
fn a_dead_neighbour_is_routed_around() {
    let mut sim = cluster(17, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let ring = sim.manager().ring().cloned().unwrap();
    // Kill (no hand-off) the member right after the entry; query a key owned further on.
    let entry = ring.members[0].clone();
    let dead = ring.members[1].name.clone();
    sim.crash(&dead);
    let owned_by_third = (0..600u64)
        .map(|i| RecordKey::Event(5_000_000 + i * 7))
        .find(|k| ring.owner_of(*k).unwrap().id == ring.members[2].id)
        .unwrap();
    let q = query(&mut sim, owned_by_third, Some(&entry.name));
    assert!(q.found);
    assert_eq!(q.path, vec![entry.id, ring.members[2].id]);
}

/// Joins and leaves overlapping, on a lossy, duplicating, reordering network, under both
/// consistent and modulo placement (where a change moves almost every row): every row is
/// still found exactly once.
#[test]
fn churn_on_a_bad_network_loses_and_duplicates_nothing() {
    for seed in 20..36 {
        for placement in [Placement::Consistent, Placement::Modulo] {
            let faults = Faults {
                loss: 0.1,
                duplicate: 0.1,
                max_delay: Duration::from_millis(5),
            };
            let mut sim = cluster(seed, faults, 5, placement);
            setup_and_distribute(&mut sim);
            sim.terminate("peer-1");
            sim.add_peer("joiner-a");
            sim.run_until(Duration::from_millis(30), |_| false);
            sim.terminate("peer-3");
            sim.add_peer("joiner-b");
            sim.settle();
            for gone in ["peer-1", "peer-3"] {
                let exit = sim.peer_named(gone).unwrap().exit();
                assert_eq!(
                    exit.map(|e| e.0),
                    Some(0),
                    "seed {seed} {placement:?}: {gone}"
                );
            }
            let ring = sim.manager().ring().cloned().unwrap();
            assert_eq!(ring.members.len(), 5, "seed {seed} {placement:?}");
            assert!(ring.settled);
            assert_all_found(&mut sim);
        }
    }
}

/// A message for the wrong role is refused before it is acknowledged, so the sender gets
/// the reason rather than an ack and then silence.
#[test]
fn a_message_for_another_role_is_rejected_not_acked() {
    let sim = cluster(30, Faults::none(), 1, Placement::Consistent);
    let now = sim.now();
    let status = Envelope::new(99, 1, None, Body::Request(ClientRequest::Status));
    let from = addr(4444);
    sim.peers[0].peer().handle(now, from, status, None);
    let out = sim.peers[0].peer().poll_transmit().expect("a reply");
    let reply = Envelope::decode(&out.bytes).unwrap();
    assert!(
        matches!(reply.body, Body::Reject { seq: 1, ref reason } if reason.to_string().contains("manager")),
        "{reply:?}"
    );
    assert!(
        sim.peers[0].peer().poll_transmit().is_none(),
        "nothing else, no ack"
    );
    let store = Envelope::new(
        99,
        2,
        None,
        Body::Store(crate::wire::StoreBatch {
            epoch: 0,
            columns: vec![],
            rows: vec![],
        }),
    );
    sim.manager().handle(now, from, store, None);
    let reply = Envelope::decode(&sim.manager().poll_transmit().unwrap().bytes).unwrap();
    assert!(
        matches!(reply.body, Body::Reject { seq: 2, .. }),
        "{reply:?}"
    );
    assert!(sim.manager().poll_transmit().is_none());
}

/// A member that took the new view and then died before reporting its hand-off must not
/// stall membership changes forever: the manager asks again, the send gives up, and the
/// change completes.
#[test]
fn a_member_dying_mid_change_does_not_stall_the_ring() {
    let mut sim = cluster(31, Faults::none(), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.add_peer("joiner");
    let victim = "peer-0";
    let victim_addr = sim.peer_named(victim).unwrap().addr;
    // Its ack of the view arrives; its hand-off report is lost as it dies.
    let lost = Rc::new(std::cell::Cell::new(0));
    let counter = lost.clone();
    sim.net.drop_where(move |d| {
        let hit = d.from == victim_addr
            && Envelope::decode(&d.bytes)
                .is_ok_and(|e| matches!(e.body, Body::RebalanceDone { .. }));
        counter.set(counter.get() + usize::from(hit));
        hit
    });
    assert!(
        sim.run_until(Duration::from_secs(10), |_| lost.get() > 0),
        "the victim never reported"
    );
    sim.crash(victim);
    assert_eq!(lost.get(), 1, "exactly one report should have been lost");
    sim.settle();
    let ring = sim.manager().ring().cloned().unwrap();
    assert!(ring.settled, "the join never completed");
    // The victim was declared dead and its ranges repaired from their other replicas.
    assert_eq!(ring.members.len(), 4);
    assert!(ring.members.iter().all(|m| m.name != victim));
    assert_all_found(&mut sim);
    // The ring works again: a later leave completes too.
    sim.terminate("peer-1");
    sim.settle();
    assert_eq!(
        sim.peer_named("peer-1").unwrap().exit().map(|e| e.0),
        Some(0)
    );
    assert!(sim.manager().ring().unwrap().settled);
}

/// `leave` of a peer that died without notice, with one copy: the ring is rebuilt without
/// it, and the client is told plainly that what only it held is lost.
#[test]
fn leaving_a_dead_peer_says_its_records_are_lost() {
    let mut sim = cluster_r(32, Faults::none(), 4, Placement::Consistent, 1);
    setup_and_distribute(&mut sim);
    sim.crash("peer-2");
    let e = sim
        .request(ClientRequest::Leave {
            name: "peer-2".into(),
        })
        .unwrap_err();
    assert!(e.contains("stopped answering") && e.contains("lost"), "{e}");
    sim.settle();
    let ring = sim.manager().ring().cloned().unwrap();
    assert_eq!(ring.members.len(), 3);
    assert!(ring.settled);
}

/// A joiner the manager already counts in the ring, but which has not received the ring
/// yet, refuses a query instead of answering a false "not found"; the manager enters the
/// ring elsewhere.
#[test]
fn a_peer_without_the_ring_refuses_and_the_query_enters_elsewhere() {
    let mut sim = cluster(33, Faults::none(), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let i = sim.add_peer("late");
    let late = sim.peers[i].addr;
    // Let it register and the join begin, but keep the ring from reaching it.
    let rule = sim.net.drop_where(move |d| {
        d.to == late && Envelope::decode(&d.bytes).is_ok_and(|e| matches!(e.body, Body::Ring(_)))
    });
    assert!(sim.run_until(Duration::from_secs(10), |s| {
        s.manager()
            .ring()
            .is_some_and(|r| r.members.iter().any(|m| m.name == "late"))
    }));
    assert!(sim.peers[i].peer().ring().is_none());
    let key = sim.file("default.csv").rows[0].key;
    let q = query(&mut sim, key, Some("late"));
    sim.net.remove_rule(rule);
    assert!(q.found, "{q:?}");
    let late_id = sim.peers[i].peer().id().unwrap();
    assert_ne!(
        q.path.first(),
        Some(&late_id),
        "the query should have entered elsewhere"
    );
}

/// A query the ring cannot answer ends in an error for the client (and an event for the
/// driver, which closes the query's span), never in silence.
#[test]
fn a_query_into_a_dead_ring_fails_with_a_reason() {
    let mut sim = cluster(34, Faults::none(), 3, Placement::Consistent);
    setup_and_distribute(&mut sim);
    for name in ["peer-0", "peer-1", "peer-2"] {
        sim.crash(name);
    }
    let key = sim.file("default.csv").rows[0].key;
    let e = sim
        .request(ClientRequest::Query {
            key,
            via: None,
            routing: None,
        })
        .unwrap_err();
    assert!(e.contains(&key.to_string()), "{e}");
    assert!(
        sim.manager_events()
            .iter()
            .any(|ev| matches!(ev, ManagerEvent::QueryFailed { .. })),
        "no QueryFailed event"
    );
}

/// The ring can reach a peer before its lost `Registered` does: the peer takes its id from
/// the ring, and `setup` answers only once every member knows both.
#[test]
fn a_lost_registration_answer_does_not_break_the_first_queries() {
    let mut sim = Sim::new(35, Faults::none(), Placement::Consistent);
    for i in 0..4 {
        sim.add_peer(&format!("peer-{i}"));
    }
    sim.add_file("default.csv", dataset(200));
    // Lose the first `Registered` in flight.
    let mut lost = false;
    sim.run_until(Duration::from_secs(5), |s| s.manager().peer_count() == 4);
    sim.lose_in_flight(|_, env| {
        let hit = !lost && matches!(env.body, Body::Registered { .. });
        lost |= hit;
        hit
    });
    assert!(lost, "no Registered was in flight");
    setup_and_distribute(&mut sim);
    assert_all_found(&mut sim);
    assert!(sim.peers.iter().all(|p| p.peer().id().is_some()));
}

/// Record counts are sampled when each peer answers a probe: a status whose answers span
/// a membership change must not call itself settled.
#[test]
fn status_is_not_settled_when_its_counts_span_a_ring_change() {
    let mut sim = cluster(36, Faults::none(), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    // Hold back one peer's answer (it is retransmitted later) ...
    let slow = sim.peers[0].addr;
    let held = Rc::new(std::cell::Cell::new(false));
    let flag = held.clone();
    sim.net.drop_where(move |d| {
        let hit = !flag.get()
            && d.from == slow
            && Envelope::decode(&d.bytes).is_ok_and(|e| matches!(e.body, Body::Report { .. }));
        flag.set(flag.get() || hit);
        hit
    });
    let reply = sim.request_in_background(ClientRequest::Status);
    assert!(sim.run_until(Duration::from_secs(10), |_| held.get()));
    // ... while a peer leaves and the ring settles under a new epoch.
    sim.terminate("peer-2");
    sim.run_until(Duration::from_secs(10), |_| reply.borrow().is_some());
    let Some(Ok(ReplyBody::Status(status))) = reply.take() else {
        panic!("no status reply")
    };
    let ring = sim.manager().ring().cloned().unwrap();
    assert!(
        ring.settled && ring.epoch > 1,
        "the leave should have completed first"
    );
    assert!(
        !status.settled,
        "counts from epoch 1 passed for the settled epoch {}",
        ring.epoch
    );
}
