//! Queries sent by the client straight into the ring (`Lookup` → … → `Answer`): the manager
//! is off the path, the client retries what is lost, and the answers are exactly those of the
//! manager's path, on a bad network, through churn with the client's view going stale, and
//! around a dead entry peer.

use super::fingers::cluster_with;
use super::scenarios::{assert_all_found, query, setup_and_distribute};
use super::*;
use crate::record::RecordKey;
use crate::ring::RingExt;
use crate::wire::{Body, Routing};
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

fn bad_network() -> Faults {
    Faults {
        loss: 0.2,
        duplicate: 0.1,
        max_delay: Duration::from_millis(5),
    }
}

fn dispatched_by_manager(sim: &Sim) -> usize {
    sim.manager_events()
        .iter()
        .filter(|e| matches!(e, ManagerEvent::QueryDispatched { .. }))
        .count()
}

fn absent_keys_are_not_found_once_their_holders_were_asked(sim: &mut Sim) {
    for k in [42u64, 4_242, 424_242] {
        let key = RecordKey::Event(k);
        let holders: Vec<u32> = {
            let m = sim.manager();
            let ring = m.ring().expect("a ring");
            ring.replicas(key, 2).iter().map(|m| m.id).collect()
        };
        let q = query(sim, key, None);
        assert!(!q.found, "{key} found");
        assert!(
            holders.iter().all(|h| q.path.contains(h)),
            "{key}: holders {holders:?}, path {:?}",
            q.path
        );
    }
}

#[test]
fn lookups_find_everything_without_the_manager_on_the_path() {
    for routing in [Routing::Walk, Routing::Fingers] {
        let mut sim = cluster_with(90, Faults::none(), 8, routing, 1);
        setup_and_distribute(&mut sim);
        sim.set_direct_queries(true);
        let before = dispatched_by_manager(&sim);
        assert_all_found(&mut sim);
        absent_keys_are_not_found_once_their_holders_were_asked(&mut sim);
        assert_eq!(
            dispatched_by_manager(&sim),
            before,
            "{routing}: a lookup went through the manager"
        );
        // An entry named by the client is where the walk starts.
        let q = query(&mut sim, RecordKey::Event(5_000_007), Some("peer-3"));
        assert_eq!(q.path_names.first().map(String::as_str), Some("peer-3"));
        assert!(q.found);
    }
}

/// 20% loss, 10% duplication and reordering: lost lookups and lost answers are retried by
/// the client, duplicated answers are ignored, and every answer is still exact.
#[test]
fn lookups_on_a_bad_network_are_retried_and_exact() {
    for seed in 91..95 {
        let mut sim = cluster_with(seed, bad_network(), 6, Routing::Fingers, 4);
        setup_and_distribute(&mut sim);
        sim.set_direct_queries(true);
        assert_all_found(&mut sim);
        absent_keys_are_not_found_once_their_holders_were_asked(&mut sim);
    }
}

/// The client keeps the view it fetched while peers leave, join and crash: lookups that enter
/// at a peer gone from the ring are refused or unanswered, and go in elsewhere (the client
/// fetches the view again); every record is found throughout.
#[test]
fn lookups_through_churn_with_a_stale_view_find_everything() {
    for seed in 95..99 {
        churn_with_a_stale_view(seed);
    }
}

/// The same churn on seeds where, before views named the newest settled epoch, a member gave
/// rows up in a view that their keeper never saw (it skipped to the next one), was taken for
/// their holder again by that keeper's plan, and the rows ended on one holder instead of two
/// (18 seeds of 101 from 99 on; these six among them).
#[test]
fn churn_never_leaves_a_row_on_fewer_holders_than_the_replication() {
    for seed in [99, 101, 103, 109, 126, 140] {
        churn_with_a_stale_view(seed);
    }
}

/// Setup and distribute on eight peers over a bad network; a client that keeps its view while
/// one peer leaves, one joins and one crashes finds every record mid-change, and once the ring
/// settles every record is found and held by exactly `replication` live peers.
fn churn_with_a_stale_view(seed: u64) {
    let mut sim = cluster_with(seed, bad_network(), 8, Routing::Walk, 4);
    setup_and_distribute(&mut sim);
    sim.set_direct_queries(true);
    let keys: Vec<RecordKey> = {
        let mut k: Vec<RecordKey> = sim.file("default.csv").rows.iter().map(|r| r.key).collect();
        k.dedup();
        k
    };
    // The client's view now holds every original member.
    assert!(query(&mut sim, keys[0], None).found);
    sim.terminate("peer-1");
    sim.add_peer("joiner-a");
    sim.crash("peer-6");
    for key in keys.iter().step_by(25) {
        let q = query(&mut sim, *key, None);
        assert!(
            q.found,
            "seed {seed}: {key} not found mid-change; path {:?}",
            q.path
        );
    }
    sim.settle();
    assert!(sim.run_until(Duration::from_secs(30), |s| {
        s.manager().ring().is_some_and(|r| {
            r.settled
                && r.members
                    .iter()
                    .all(|m| m.name != "peer-6" && m.name != "peer-1")
        })
    }));
    sim.settle();
    assert_all_found(&mut sim);
}

/// A verify's window of lookups leaves as multi-gets (each owner's keys in one datagram) and
/// comes back as `Answers`. Under 20% loss, 10% duplication and reordering, and with a peer
/// crashed that the client's view still names as an owner (its keys wait for the retry, then
/// go in elsewhere), every key is found with exactly its rows.
#[test]
fn multi_get_verify_is_exact_on_a_bad_network_and_around_a_crash() {
    for seed in 140..144 {
        let mut sim = cluster_with(seed, bad_network(), 6, Routing::Fingers, 4);
        setup_and_distribute(&mut sim);
        sim.set_direct_queries(true);
        sim.set_owner_entry(true);
        // The client fetches its view, and hears a peer answer, while every peer is up and
        // the network clean: a client that never heard a peer takes two lost lookups for
        // peers it cannot reach, and sends everything through the manager.
        let first = sim.file("default.csv").rows[0].key;
        sim.net.set_faults(Faults::none());
        assert!(query(&mut sim, first, None).found);
        sim.net.set_faults(bad_network());
        if seed % 2 == 1 {
            sim.crash("peer-2");
        }
        let multi = Rc::new(Cell::new((0u64, 0u64)));
        let count = multi.clone();
        let rule = sim.net.drop_where(move |d| {
            if let Ok(env) = crate::wire::Envelope::decode(&d.bytes) {
                let (lookups, answers) = count.get();
                match env.body {
                    Body::Lookups(_) => count.set((lookups + 1, answers)),
                    Body::Answers(_) => count.set((lookups, answers + 1)),
                    _ => {}
                }
            }
            false
        });
        let report = sim.verify("default.csv", 128);
        sim.net.remove_rule(rule);
        let distinct = {
            let mut k: Vec<RecordKey> =
                sim.file("default.csv").rows.iter().map(|r| r.key).collect();
            k.sort();
            k.dedup();
            k.len() as u64
        };
        assert!(report.ok(), "seed {seed}: {report:?}");
        assert_eq!(
            (report.keys, report.found),
            (distinct, distinct),
            "seed {seed}"
        );
        let (lookups, answers) = multi.get();
        assert!(
            lookups > 0 && answers > 0 && lookups < distinct / 4,
            "seed {seed}: {lookups} multi-gets and {answers} multi-answers for {distinct} keys"
        );
    }
}

/// A lookup whose entry peer is dead goes in at another member after the retry delay.
#[test]
fn a_dead_entry_peer_costs_a_retry_not_an_answer() {
    let mut sim = cluster_with(99, Faults::none(), 5, Routing::Walk, 1);
    setup_and_distribute(&mut sim);
    sim.set_direct_queries(true);
    assert!(query(&mut sim, RecordKey::Event(5_000_007), None).found);
    sim.crash("peer-2");
    let started = sim.now();
    // Round-robin entries: within five lookups one enters at the dead peer.
    for i in 0..5u64 {
        let q = query(&mut sim, RecordKey::Event(5_000_000 + 7 * (i + 1)), None);
        assert!(q.found, "{:?}", q.path);
        assert!(!q.path_names.contains(&"peer-2".to_string()) || q.path_names[0] != "peer-2");
    }
    // At most one lookup waited a retry delay (the peer is declared dead soon after).
    assert!(
        sim.now() - started < Duration::from_secs(3),
        "{:?}",
        sim.now() - started
    );
}

/// Keys with more rows than one datagram holds: a lookup's answer (one unacknowledged
/// datagram) carries as many as fit and says it was cut; the client then asks the manager,
/// whose answer travels acknowledged, in fragments, with every row. A multi-get's answers are
/// cut into datagrams that fit; every key of the verify is exact. (Before stop 22 a query
/// returned the rows that fit, marked truncated, and verify counted the 3 heavy keys as
/// mismatched.)
#[test]
fn answers_too_large_for_a_datagram_come_whole_through_the_manager() {
    let mut sim = cluster_with(150, Faults::none(), 4, Routing::Fingers, 4);
    setup_and_distribute(&mut sim);
    // 100 keys of one row, and 3 keys of 100 rows of about 130 bytes each: 13 KB, over the
    // simulated peers' 8,000-byte datagrams.
    let heavy: Vec<RecordKey> = (0..3).map(|i| RecordKey::Event(9_000_000 + i)).collect();
    let mut rows = Vec::new();
    for (i, key) in heavy.iter().enumerate() {
        for r in 0..100 {
            rows.push(crate::record::Row {
                line: rows.len() as u64 + 2,
                key: *key,
                values: crate::wire::PackedRow::pack(&[
                    key.to_string(),
                    format!("HEAVY{i}"),
                    "Flood".into(),
                    format!("{r:03}{}", "x".repeat(120)),
                ]),
            });
        }
    }
    for i in 0..100u64 {
        let id = 9_100_000 + i;
        rows.push(crate::record::Row {
            line: rows.len() as u64 + 2,
            key: RecordKey::Event(id),
            values: crate::wire::PackedRow::pack(&[
                id.to_string(),
                "LIGHT".into(),
                "Hail".into(),
                "0".into(),
            ]),
        });
    }
    let mut data = sim.file("default.csv");
    data.rows = rows;
    data.fallback_keys = 0;
    let all: Vec<Vec<String>> = data.rows.iter().map(|r| r.values.values()).collect();
    sim.add_file("heavy.csv", data);
    let stored = sim.request(ClientRequest::Distribute {
        path: Some("heavy.csv".into()),
    });
    assert!(
        matches!(&stored, Ok(ReplyBody::Distribute(d)) if d.stored == 400),
        "{stored:?}"
    );
    sim.set_direct_queries(true);
    sim.set_owner_entry(true);

    let largest = Rc::new(Cell::new(0usize));
    let through_manager = Rc::new(Cell::new(0usize));
    let (seen, asked) = (largest.clone(), through_manager.clone());
    let rule = sim.net.drop_where(move |d| {
        if let Ok(env) = crate::wire::Envelope::decode(&d.bytes) {
            match env.body {
                Body::Answer(_) | Body::Answers(_) => seen.set(seen.get().max(d.bytes.len())),
                Body::Request(ClientRequest::Query { .. }) => asked.set(asked.get() + 1),
                _ => {}
            }
        }
        false
    });
    for key in &heavy {
        let q = query(&mut sim, *key, None);
        assert!(q.found && !q.truncated, "{key}: {q:?}");
        assert_eq!(q.records.len(), 100, "{key}");
        let mut got: Vec<Vec<String>> = q.records.iter().map(|r| r.values.values()).collect();
        assert!(
            got.iter().all(|v| all.contains(v)),
            "{key}: a row not stored"
        );
        got.sort();
        got.dedup();
        assert_eq!(got.len(), q.records.len(), "{key}: a row twice");
    }
    let report = sim.verify("heavy.csv", 128);
    sim.net.remove_rule(rule);
    assert_eq!(
        (report.keys, report.found, report.mismatched, report.missing),
        (103, 103, 0, 0),
        "{report:?}"
    );
    assert!(
        largest.get() <= 8_000,
        "an answer datagram of {} bytes",
        largest.get()
    );
    // The 3 queries and the verify's 3 heavy keys went through the manager, nothing else.
    assert_eq!(through_manager.get(), 6);
}

/// A peer that dies just after the client fetched its view (too young to be fetched again at
/// once) costs a verify about one retry delay, long before the peer is declared dead: the
/// retries of the lookups it did not answer enter at other members, and the peers that
/// forward them route around it after a few retransmissions, and then around it at once.
/// Entering round the ring too (fingers jump straight at the dead peer), every key is found:
/// routing around a dead finger goes on from the next member, never past an untried one.
#[test]
fn a_peer_dead_under_a_young_view_costs_one_retry_delay() {
    for routing in [Routing::Fingers, Routing::Walk] {
        for seed in 160..163 {
            let mut sim = cluster_with(seed, Faults::none(), 6, routing, 4);
            setup_and_distribute(&mut sim);
            sim.set_direct_queries(true);
            sim.set_owner_entry(true);
            let first = sim.file("default.csv").rows[0].key;
            assert!(query(&mut sim, first, None).found);
            sim.crash("peer-2");
            let started = sim.now();
            let report = sim.verify("default.csv", 128);
            let took = sim.now() - started;
            assert!(report.ok(), "{routing:?} seed {seed}: {report:?}");
            assert!(
                took < Duration::from_millis(700),
                "{routing:?} seed {seed}: the verify took {took:?}"
            );
            sim.set_owner_entry(false);
            let report = sim.verify("default.csv", 128);
            assert!(
                report.ok(),
                "{routing:?} seed {seed}, round the ring: {report:?}"
            );
        }
    }
}

/// A walk that cannot reach any holder of the key (every hop to them lost) ends without
/// asking them: its answer says "unreached", and neither the client nor the manager takes it
/// for a miss; the query fails with no answer instead. Once the holders can be reached, the
/// key is found. (Before, the walk's hop bound answered "not found" for a stored key.)
#[test]
fn a_walk_that_cannot_reach_a_holder_is_no_miss() {
    for direct in [true, false] {
        let mut sim = cluster_with(150, Faults::none(), 6, Routing::Fingers, 4);
        setup_and_distribute(&mut sim);
        sim.set_direct_queries(direct);
        let key = sim.file("default.csv").rows[7].key;
        let ring = sim.manager().ring().cloned().expect("a ring");
        let holders: Vec<SocketAddr> = ring.replicas(key, 2).iter().map(|m| m.addr).collect();
        // The client learns its view, and hears a peer, first.
        let first = sim.file("default.csv").rows[0].key;
        assert!(query(&mut sim, first, None).found);
        let unreached = Rc::new(Cell::new(0u32));
        let seen = unreached.clone();
        let rule = sim.net.drop_where(move |d| {
            let Ok(env) = crate::wire::Envelope::decode(&d.bytes) else {
                return false;
            };
            let to_holder = holders.contains(&d.to);
            match &env.body {
                Body::Answer(r) | Body::Found(r) if r.key == key && r.unreached => {
                    seen.set(seen.get() + 1);
                    false
                }
                Body::Find(f) | Body::Lookup(f) => f.key == key && to_holder,
                Body::Lookups(fs) => to_holder && fs.iter().any(|f| f.key == key),
                _ => false,
            }
        });
        let query_key = ClientRequest::Query {
            key,
            via: None,
            routing: None,
        };
        let reply = sim.request(query_key.clone());
        assert!(reply.is_err(), "direct {direct}: {reply:?}");
        assert!(
            unreached.get() > 0,
            "direct {direct}: no walk ended unreached"
        );
        sim.net.remove_rule(rule);
        match sim.request(query_key) {
            Ok(ReplyBody::Query(q)) => assert!(q.found, "direct {direct}: {q:?}"),
            other => panic!("direct {direct}: {other:?}"),
        }
    }
}
