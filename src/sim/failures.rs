//! Failure scenarios: crashes, freezes, partitions and a manager restart, under loss,
//! duplication and reordering, seeded and replayable. Every scenario ends by checking that each
//! record is held `replication` times and found, exactly, by a query.

use super::scenarios::{
    assert_all_found, assert_replicated, cluster, cluster_r, default_rows, query,
    setup_and_distribute, status,
};
use super::*;
use crate::record::RecordKey;
use crate::wire::{Body, Envelope, PeerId, PeerState};

fn lossy(loss: f64) -> Faults {
    Faults {
        loss,
        duplicate: 0.1,
        max_delay: Duration::from_millis(5),
    }
}

fn deaths(sim: &Sim) -> Vec<String> {
    sim.manager_events()
        .into_iter()
        .filter_map(|e| match e {
            ManagerEvent::PeerDead { name, .. } => Some(name),
            _ => None,
        })
        .collect()
}

fn ring_without(sim: &Sim, gone: &[&str]) -> bool {
    sim.manager()
        .ring()
        .is_some_and(|r| r.settled && r.members.iter().all(|m| !gone.contains(&m.name.as_str())))
}

/// Runs until the ring is settled without `gone`; returns how long that took.
fn until_rebuilt(sim: &mut Sim, gone: &[&str]) -> Duration {
    let start = sim.now();
    assert!(
        sim.run_until(Duration::from_secs(30), |s| ring_without(s, gone)),
        "ring not rebuilt without {gone:?}"
    );
    sim.now() - start
}

#[test]
fn a_killed_peer_is_declared_dead_and_its_ranges_repaired_then_a_second() {
    let mut sim = cluster(40, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.crash("peer-1");
    let took = until_rebuilt(&mut sim, &["peer-1"]);
    // Default detection: suspect at 1 s of silence, dead at 2.5 s; the ring follows at once.
    assert!(took <= Duration::from_secs(5), "rebuilt after {took:?}");
    sim.settle();
    assert_eq!(deaths(&sim), vec!["peer-1".to_string()]);
    assert_all_found(&mut sim);
    let s = status(&mut sim);
    assert!(
        s.peers
            .iter()
            .any(|p| p.name == "peer-1" && p.state == PeerState::Dead),
        "status shows the dead peer"
    );
    assert_eq!((s.under_replicated_ranges, s.under_replicated_rows), (0, 0));
    // After the repair, a second peer can die without loss too.
    sim.crash("peer-3");
    until_rebuilt(&mut sim, &["peer-1", "peer-3"]);
    sim.settle();
    assert_all_found(&mut sim);
}

#[test]
fn kills_under_loss_duplication_and_reordering_lose_nothing_and_kill_no_one_else() {
    for seed in 41..45 {
        let mut sim = cluster(seed, lossy(0.2), 5, Placement::Consistent);
        setup_and_distribute(&mut sim);
        sim.crash("peer-2");
        until_rebuilt(&mut sim, &["peer-2"]);
        sim.settle();
        assert_eq!(deaths(&sim), vec!["peer-2".to_string()], "seed {seed}");
        assert_all_found(&mut sim);
    }
}

#[test]
fn no_false_deaths_at_twenty_percent_loss() {
    let mut sim = cluster(46, lossy(0.2), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.advance(Duration::from_secs(120));
    assert!(deaths(&sim).is_empty(), "{:?}", deaths(&sim));
    assert_eq!(sim.manager().ring().map(|r| r.members.len()), Some(5));
    sim.settle();
    assert_all_found(&mut sim);
}

#[test]
fn a_short_freeze_is_suspected_not_buried() {
    let mut sim = cluster(47, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.freeze("peer-0");
    sim.advance(Duration::from_millis(1_600));
    assert!(
        sim.manager_events()
            .iter()
            .any(|e| matches!(e, ManagerEvent::PeerSuspected { .. }))
    );
    sim.thaw("peer-0");
    sim.advance(Duration::from_secs(5));
    assert!(deaths(&sim).is_empty());
    assert!(
        sim.manager_events()
            .iter()
            .any(|e| matches!(e, ManagerEvent::PeerAlive { .. }))
    );
    sim.settle();
    assert_all_found(&mut sim);
}

#[test]
fn a_frozen_peer_declared_dead_rejoins_cleanly() {
    for seed in [48, 49] {
        let faults = if seed == 48 {
            Faults::none()
        } else {
            lossy(0.1)
        };
        let mut sim = cluster(seed, faults, 5, Placement::Consistent);
        setup_and_distribute(&mut sim);
        let old_id = sim.peer_named("peer-3").unwrap().peer().id();
        sim.freeze("peer-3");
        until_rebuilt(&mut sim, &["peer-3"]);
        sim.settle();
        assert_replicated_without(&sim, "peer-3");
        // SIGCONT: it hears views and stores meant for a ring long gone, then learns it
        // was declared dead, and joins again under a new id.
        sim.thaw("peer-3");
        assert!(
            sim.run_until(Duration::from_secs(30), |s| {
                s.manager()
                    .ring()
                    .is_some_and(|r| r.settled && r.members.iter().any(|m| m.name == "peer-3"))
            }),
            "seed {seed}: the frozen peer did not rejoin"
        );
        sim.settle();
        let new_id = sim.peer_named("peer-3").unwrap().peer().id();
        assert_ne!(new_id, old_id, "ids are never reused");
        assert_eq!(sim.manager().ring().unwrap().members.len(), 5);
        assert_all_found(&mut sim);
    }
}

/// Every row held twice by the live peers other than `skip` (which is frozen, holding
/// stale rows).
fn assert_replicated_without(sim: &Sim, skip: &str) {
    let data = sim.file("default.csv");
    let mut copies: BTreeMap<(RecordKey, Vec<String>), usize> = BTreeMap::new();
    for p in sim
        .peers
        .iter()
        .filter(|p| p.exit().is_none() && p.name != skip)
    {
        for (key, rows) in p.peer().store().iter() {
            for row in rows {
                *copies.entry((key, row.values())).or_default() += 1;
            }
        }
    }
    for row in &data.rows {
        assert_eq!(
            copies.get(&(row.key, row.values.values())),
            Some(&2),
            "{}",
            row.key
        );
    }
}

#[test]
fn a_restarted_manager_rebuilds_the_cluster_from_its_peers() {
    for (seed, faults) in [(50, Faults::none()), (51, lossy(0.2))] {
        let mut sim = cluster(seed, faults, 5, Placement::Consistent);
        setup_and_distribute(&mut sim);
        let epoch = sim.manager().ring().unwrap().epoch;
        sim.crash_manager();
        // While it is down, peers keep their rows and their ring.
        sim.advance(Duration::from_secs(10));
        assert!(sim.peers.iter().all(|p| p.exit().is_none()));
        assert!(sim.peers.iter().all(|p| p.peer().ring().is_some()));
        sim.restart_manager();
        let restarted = sim.now();
        assert!(
            sim.run_until(Duration::from_secs(30), |s| s.settled_with(5)),
            "seed {seed}: no ring after the restart"
        );
        let took = sim.now() - restarted;
        assert!(took <= Duration::from_secs(5), "seed {seed}: {took:?}");
        assert!(sim.manager().ring().unwrap().epoch > epoch, "epochs go on");
        sim.settle();
        // No setup, no distribute: status and queries work, and every record is there.
        // At 20% loss one status can miss a live peer's report: its probe and every
        // retransmission lost before the probe timeout (soak K = 392: six sends to one peer
        // lost in a row). Heard from meanwhile, the peer is probed once more; if that is lost
        // too, status shows it up with unknown counts, and the operator asks again.
        let s = (0..5)
            .map(|_| status(&mut sim))
            .find(|s| s.peers.iter().all(|p| p.records.is_some()))
            .unwrap_or_else(|| panic!("seed {seed}: no status heard every peer in 5 tries"));
        assert_eq!(s.peers.len(), 5);
        assert_eq!(
            s.peers.iter().filter_map(|p| p.records).sum::<u64>(),
            2 * default_rows(&sim)
        );
        assert_all_found(&mut sim);
    }
}

/// After a manager restart each peer rejoins under its own id. A heartbeat that leaves while
/// its rejoin is on the way is answered "not known", and that answer can come after the
/// rejoin was accepted: it is about the peer before its rejoin, and ignored. Made certain
/// here (rejoins and "not known" answers slowed down), on a lossy, reordering network: every
/// peer keeps its id and its view and registers once, and every record is found.
#[test]
fn a_not_known_answer_that_crossed_a_rejoin_is_ignored() {
    for seed in 0..4 {
        let mut sim = cluster(seed + 600, lossy(0.1), 5, Placement::Consistent);
        setup_and_distribute(&mut sim);
        let ids: BTreeMap<String, Option<PeerId>> = (sim.peers.iter())
            .map(|p| (p.name.clone(), p.peer().id()))
            .collect();
        sim.net
            .delay_where(|d| match Envelope::decode(&d.bytes).map(|e| e.body) {
                // Longer than a heartbeat interval (250 ms): one leaves while each is on the way.
                Ok(Body::Register {
                    rejoin: Some(_), ..
                }) => Some(Duration::from_millis(400)),
                Ok(Body::HeartbeatAck { known: false, .. }) => Some(Duration::from_millis(900)),
                _ => None,
            });
        let registrations = Rc::new(RefCell::new(BTreeMap::<SocketAddr, u64>::new()));
        let counter = registrations.clone();
        sim.net.drop_where(move |d| {
            if let Ok(Body::Register { rejoin, .. }) = Envelope::decode(&d.bytes).map(|e| e.body) {
                // Registrations without a rejoin (as a newcomer), retransmissions included.
                let fresh = u64::from(rejoin.is_none());
                *counter.borrow_mut().entry(d.from).or_default() += fresh;
            }
            false
        });
        sim.crash_manager();
        sim.advance(Duration::from_secs(1));
        sim.restart_manager();
        assert!(
            sim.run_until(Duration::from_secs(30), |s| s.settled_with(5)),
            "seed {seed}: no ring after the restart"
        );
        // Long enough for every slowed answer to arrive.
        sim.advance(Duration::from_secs(3));
        sim.settle();
        let now: BTreeMap<String, Option<PeerId>> = (sim.peers.iter())
            .map(|p| (p.name.clone(), p.peer().id()))
            .collect();
        assert_eq!(now, ids, "seed {seed}: a peer took a new id");
        let fresh: u64 = registrations.borrow().values().sum();
        assert_eq!(fresh, 0, "seed {seed}: registered anew {registrations:?}");
        assert!(
            sim.peers.iter().all(|p| p.peer().ring().is_some()),
            "seed {seed}: a peer holds no view"
        );
        assert_all_found(&mut sim);
    }
}

#[test]
fn a_peer_that_dies_while_the_manager_is_down_is_left_out_and_repaired() {
    let mut sim = cluster(52, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.crash_manager();
    sim.crash("peer-4");
    sim.advance(Duration::from_secs(2));
    sim.restart_manager();
    until_rebuilt(&mut sim, &["peer-4"]);
    sim.settle();
    assert_eq!(sim.manager().ring().unwrap().members.len(), 4);
    assert_all_found(&mut sim);
}

#[test]
fn a_setup_right_after_a_restart_waits_for_the_ring_the_peers_hold() {
    let mut sim = cluster(53, Faults::none(), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let epoch = sim.manager().ring().unwrap().epoch;
    sim.crash_manager();
    sim.restart_manager();
    // At once, before any peer has heard of the restart.
    let setup = sim.request(ClientRequest::Setup).expect("setup");
    assert!(matches!(setup, ReplyBody::Setup(_)));
    assert!(
        sim.manager().ring().unwrap().epoch > epoch,
        "the old ring, not a new one"
    );
    sim.settle();
    assert_all_found(&mut sim);
}

#[test]
fn a_peer_cut_off_from_the_manager_only_is_kept_alive_by_its_neighbours() {
    let mut sim = cluster(54, lossy(0.05), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let (p, m) = (sim.peer_named("peer-2").unwrap().addr, sim.manager_addr);
    sim.net.partition(p, m);
    sim.advance(Duration::from_secs(20));
    assert!(deaths(&sim).is_empty(), "indirect probes should reach it");
    assert!(
        sim.manager_events()
            .iter()
            .any(|e| matches!(e, ManagerEvent::PeerSuspected { .. })),
        "it was suspected"
    );
    sim.net.repair();
    sim.settle();
    assert_all_found(&mut sim);
}

#[test]
fn a_peer_cut_off_from_its_neighbours_only_is_routed_around() {
    let mut sim = cluster(55, Faults::none(), 5, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let cut = sim.peer_named("peer-1").unwrap().addr;
    let others: Vec<SocketAddr> = sim
        .peers
        .iter()
        .filter(|p| p.addr != cut)
        .map(|p| p.addr)
        .collect();
    for o in &others {
        sim.net.partition(cut, *o);
    }
    // The manager still hears it, so it stays; every query is answered by a replica the
    // walk can reach.
    let data = sim.file("default.csv");
    for row in data.rows.iter().step_by(7) {
        let q = query(&mut sim, row.key, Some("peer-0"));
        assert!(q.found, "{} not found; path {:?}", row.key, q.path);
    }
    assert!(deaths(&sim).is_empty());
    sim.net.repair();
    sim.settle();
    assert_all_found(&mut sim);
}

#[test]
fn with_three_copies_two_peers_killed_at_once_lose_nothing() {
    let mut sim = cluster_r(56, lossy(0.1), 6, Placement::Consistent, 3);
    setup_and_distribute(&mut sim);
    sim.crash("peer-1");
    sim.crash("peer-2");
    until_rebuilt(&mut sim, &["peer-1", "peer-2"]);
    sim.settle();
    assert_all_found(&mut sim);
}

/// Found by CI at 10% loss: the manager forgets a leaver when its leave completes and then tells
/// it to exit. Had that `Exit` been lost, the leaver's next heartbeat was answered "unknown" and
/// the leaver, taking that for its own death, registered again just before it exited, leaving a
/// registered peer that then "died". A leaver that handed everything over now just exits.
#[test]
fn a_leaver_whose_exit_is_lost_exits_without_joining_again() {
    let mut sim = cluster(60, Faults::none(), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    let leaver = sim.peer_named("peer-1").map(|p| p.addr).unwrap();
    let exit_lost = sim.net.drop_where(move |d| {
        d.to == leaver
            && Envelope::decode(&d.bytes).is_ok_and(|env| matches!(env.body, Body::Exit { .. }))
    });
    sim.terminate("peer-1");
    assert!(
        sim.run_until(Duration::from_secs(20), |s| s
            .peer_named("peer-1")
            .is_some_and(|p| p.exit().is_some())),
        "the leaver never exited"
    );
    assert_eq!(
        sim.peer_named("peer-1").and_then(|p| p.exit()).map(|e| e.0),
        Some(0)
    );
    sim.net.remove_rule(exit_lost);
    sim.advance(Duration::from_secs(5));
    sim.settle();
    let s = status(&mut sim);
    let names: Vec<&str> = s.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 3, "the leaver registered again: {names:?}");
    assert!(!names.contains(&"peer-1"), "{names:?}");
    assert!(deaths(&sim).is_empty(), "declared dead: {:?}", deaths(&sim));
    assert_replicated(&sim);
    assert_all_found(&mut sim);
}

/// A peer cut off in the middle of its leave (its request got through, nothing else) is
/// given up on (declared dead, or unreachable). At R=1 it holds the only copies: when it is heard again it joins again,
/// then finishes the leave it was asked for, handing everything over. Nothing is lost.
#[test]
fn a_peer_declared_dead_while_leaving_joins_again_then_finishes_its_leave() {
    let mut sim = cluster_r(61, Faults::none(), 4, Placement::Consistent, 1);
    setup_and_distribute(&mut sim);
    let leaver = sim.peer_named("peer-2").map(|p| p.addr).unwrap();
    let cut = sim.net.drop_where(move |d| {
        (d.from == leaver || d.to == leaver)
            && !Envelope::decode(&d.bytes)
                .is_ok_and(|env| matches!(env.body, Body::LeaveRequest | Body::Ack { .. }))
    });
    sim.terminate("peer-2");
    // The manager gives up on the silent leaver (unreachable, or dead) and rebuilds without it.
    until_rebuilt(&mut sim, &["peer-2"]);
    let held = sim
        .peer_named("peer-2")
        .map(|p| p.peer().store().row_count());
    assert!(
        held > Some(0),
        "the cut-off leaver should still hold its rows"
    );
    sim.net.remove_rule(cut);
    assert!(
        sim.run_until(Duration::from_secs(30), |s| s
            .peer_named("peer-2")
            .is_some_and(|p| p.exit().is_some())),
        "the leaver never finished its leave"
    );
    let exit = sim.peer_named("peer-2").and_then(|p| p.exit());
    assert_eq!(exit.as_ref().map(|e| e.0), Some(0), "{exit:?}");
    sim.settle();
    let s = status(&mut sim);
    assert!(
        s.peers
            .iter()
            .all(|p| p.name != "peer-2" || p.state == PeerState::Dead),
        "{:?}",
        s.peers
    );
    assert_replicated(&sim);
    assert_all_found(&mut sim);
}

/// A peer that dies while a distribute is sending (1-40 ms into it, 5% loss): the distribute
/// answers (in these seeds it fails, naming the silent peer and how many rows were stored),
/// and a distribute afterwards, on the ring rebuilt without it, stores every row: it is never
/// refused as still running.
#[test]
fn a_peer_killed_during_a_distribute_does_not_hold_it() {
    for seed in 0..40u64 {
        let mut sim = cluster(seed, lossy(0.05), 5, Placement::Consistent);
        sim.add_file("big.csv", dataset_big());
        let setup = sim.request(ClientRequest::Setup).expect("setup");
        assert!(matches!(setup, ReplyBody::Setup(_)));
        let first = sim.request_in_background(ClientRequest::Distribute {
            path: Some("big.csv".into()),
        });
        sim.advance(Duration::from_millis(1 + seed % 40));
        sim.crash("peer-2");
        let answered = sim.run_until(Duration::from_secs(120), |_| first.borrow().is_some());
        assert!(answered, "seed {seed}: the distribute never answered");
        until_rebuilt(&mut sim, &["peer-2"]);
        let again = sim.request(ClientRequest::Distribute {
            path: Some("big.csv".into()),
        });
        let rows = sim.file("big.csv").rows.len() as u64;
        assert!(
            matches!(&again, Ok(ReplyBody::Distribute(d)) if d.stored == rows),
            "seed {seed}: {again:?} (first: {:?})",
            first.borrow()
        );
    }
}

/// 3,000 events (3,602 rows): a distribute of several dozen batches, long enough to be cut.
fn dataset_big() -> crate::record::Dataset {
    super::scenarios::dataset(3_000)
}

/// A teardown whose `Exit`s are all lost for 3 s, on a lossy network (10% loss and
/// duplication, 20 seeds): every peer exits 0 and none is left registered. Meanwhile each peer
/// keeps sending heartbeats; answered "unknown" (the teardown had emptied the registry), a peer
/// registered again, then ignored the retransmitted `Exit` as older than its registration, and
/// lived on in the torn-down cluster (a CI failure at 10% loss, tests/cluster.rs).
#[test]
fn a_peer_whose_teardown_exit_is_late_exits_and_does_not_register_again() {
    for seed in 0..20u64 {
        let mut sim = cluster(seed, lossy(0.1), 4, Placement::Consistent);
        let setup = sim.request(ClientRequest::Setup).expect("setup");
        assert!(matches!(setup, ReplyBody::Setup(_)), "seed {seed}");
        let teardown = sim.request_in_background(ClientRequest::Teardown);
        let rule = sim.net.drop_where(|d| {
            Envelope::decode(&d.bytes).is_ok_and(|env| matches!(env.body, Body::Exit { .. }))
        });
        sim.advance(Duration::from_secs(3));
        sim.net.remove_rule(rule);
        let all_exited = sim.run_until(Duration::from_secs(60), |s| {
            s.peers.iter().all(|p| p.exit().is_some())
        });
        let exits: Vec<_> = sim.peers.iter().map(|p| p.exit()).collect();
        assert!(all_exited, "seed {seed}: {exits:?}");
        assert!(
            exits.iter().all(|e| e.as_ref().map(|e| e.0) == Some(0)),
            "seed {seed}: {exits:?}"
        );
        assert!(
            matches!(&*teardown.borrow(), Some(Ok(ReplyBody::Teardown { .. }))),
            "seed {seed}: {:?}",
            teardown.borrow()
        );
        sim.advance(Duration::from_secs(10));
        assert_eq!(sim.manager().peer_count(), 0, "seed {seed}");
    }
}

/// A leave asked for with `stormctl leave` (not SIGTERM): the leaver hands its rows over and
/// reports, the manager completes the leave and forgets it, but its `Exit` is lost for 3 s.
/// Its heartbeats are answered "unknown": it must exit, not register again. Before, only a
/// peer leaving on SIGTERM knew it was leaving; one asked by the manager registered again,
/// ignored the late `Exit` as older than its registration, and lived on as a member (a CI
/// failure under load at 10% loss, tests/cluster.rs `a_lossy_duplicating_network_loses_nothing`).
#[test]
fn a_peer_asked_to_leave_whose_exit_is_late_exits_and_does_not_register_again() {
    for seed in 0..10u64 {
        let mut sim = cluster(seed + 600, lossy(0.1), 4, Placement::Consistent);
        setup_and_distribute(&mut sim);
        sim.settle();
        let rule = sim.net.drop_where(|d| {
            Envelope::decode(&d.bytes).is_ok_and(|env| matches!(env.body, Body::Exit { .. }))
        });
        let leave = sim.request_in_background(ClientRequest::Leave {
            name: "peer-1".into(),
        });
        sim.advance(Duration::from_secs(3));
        sim.net.remove_rule(rule);
        let exited = sim.run_until(Duration::from_secs(30), |s| {
            s.peer_named("peer-1").is_some_and(|p| p.exit().is_some())
        });
        let exit = sim.peer_named("peer-1").and_then(|p| p.exit());
        assert!(exited, "seed {seed}: peer-1 lives on");
        assert_eq!(exit.as_ref().map(|e| e.0), Some(0), "seed {seed}: {exit:?}");
        assert!(
            matches!(&*leave.borrow(), Some(Ok(ReplyBody::Leave { .. }))),
            "seed {seed}: {:?}",
            leave.borrow()
        );
        sim.settle();
        assert_eq!(sim.manager().peer_count(), 3, "seed {seed}");
        assert_all_found(&mut sim);
    }
}

/// At 10% loss with duplication and reordering, every probe of one status round to a live
/// peer is lost (its first probe message and all its retransmissions): not suspected by the
/// failure detector, the peer is probed again, is shown up, and its report counts when it
/// gets through (its count is then its own); a peer killed just before
/// is not shown up. Before the failure detector was consulted, the live peer was
/// `Unreachable` (and with only "heard from since the probes went out" as the test, soak
/// K = 742 lost both heartbeats of the probe timeout too).
#[test]
fn a_status_whose_probes_to_a_live_peer_are_lost_asks_again_and_counts_it() {
    for seed in 0..6 {
        let mut sim = cluster(seed + 300, lossy(0.1), 5, Placement::Consistent);
        setup_and_distribute(&mut sim);
        sim.settle();
        let victim = sim.peers.iter().find(|p| p.name == "peer-2").unwrap().addr;
        // Drops the first probe message to the victim and its retransmissions (same seq).
        let first_seq = Rc::new(RefCell::new(None::<u64>));
        let rule = {
            let first_seq = first_seq.clone();
            sim.net.drop_where(move |d| {
                let Ok(env) = Envelope::decode(&d.bytes) else {
                    return false;
                };
                if d.to != victim || !matches!(env.body, Body::Probe { .. }) {
                    return false;
                }
                *first_seq.borrow_mut().get_or_insert(env.seq) == env.seq
            })
        };
        sim.crash("peer-4");
        let s = status(&mut sim);
        sim.net.remove_rule(rule);
        assert!(
            first_seq.borrow().is_some(),
            "seed {seed}: no probe went out"
        );
        let state = |name: &str| {
            let p = s.peers.iter().find(|p| p.name == name).unwrap();
            (p.state, p.records)
        };
        let (victim_state, victim_records) = state("peer-2");
        assert_eq!(victim_state, PeerState::Up, "seed {seed}: {:?}", s.peers);
        // Its count, when the second round's report got through (soak K = 851: the report
        // and its four retransmissions all lost, and status rightly said `?`), is its own.
        let held = sim.peers.iter().find(|p| p.name == "peer-2").unwrap();
        let held = held.peer().store().row_count();
        assert!(
            victim_records.is_none_or(|n| n == held),
            "seed {seed}: {victim_records:?} against {held}"
        );
        let (dead_state, dead_records) = state("peer-4");
        assert!(
            matches!(dead_state, PeerState::Unreachable | PeerState::Suspect),
            "seed {seed}: the killed peer is {dead_state:?}"
        );
        assert_eq!(dead_records, None);
        for name in ["peer-0", "peer-1", "peer-3"] {
            assert_eq!(state(name).0, PeerState::Up, "seed {seed}: {name}");
        }
    }
}

/// Every probe to a live peer lost, the second round's too: it is still shown up (its
/// heartbeats arrive), with unknown counts, never unreachable.
#[test]
fn a_live_peer_whose_probes_are_all_lost_is_up_with_unknown_counts() {
    let mut sim = cluster(310, lossy(0.05), 4, Placement::Consistent);
    setup_and_distribute(&mut sim);
    sim.settle();
    let victim = sim.peers.iter().find(|p| p.name == "peer-1").unwrap().addr;
    let rule = sim.net.drop_where(move |d| {
        d.to == victim
            && Envelope::decode(&d.bytes).is_ok_and(|e| matches!(e.body, Body::Probe { .. }))
    });
    let s = status(&mut sim);
    sim.net.remove_rule(rule);
    let p = s.peers.iter().find(|p| p.name == "peer-1").unwrap();
    assert_eq!((p.state, p.records), (PeerState::Up, None), "{:?}", s.peers);
    assert!(
        s.peers
            .iter()
            .filter(|p| p.name != "peer-1")
            .all(|p| p.state == PeerState::Up && p.records.is_some()),
        "{:?}",
        s.peers
    );
    // Once the probes get through again, so do the counts.
    let s = (0..5)
        .map(|_| status(&mut sim))
        .find(|s| s.peers.iter().all(|p| p.records.is_some()))
        .expect("a status with every count once probes pass");
    assert_eq!(
        s.peers.iter().filter_map(|p| p.records).sum::<u64>(),
        2 * default_rows(&sim)
    );
}

/// Live peers hold two copies' worth of the file's `rows`. Checked after every step of a
/// simulation, so by counts alone (cheap); which rows, and how many copies of each, the
/// scenarios check at the end (`assert_all_found`).
fn holds_every_copy(sim: &Sim, rows: usize) -> bool {
    sim.holdings().values().sum::<u64>() == 2 * rows as u64
}

/// What `stormctl repair` answers.
fn repair(sim: &mut Sim) -> crate::wire::RepairReport {
    match sim.request(crate::wire::ClientRequest::Repair) {
        Ok(crate::wire::ReplyBody::Repair(r)) => r,
        other => panic!("repair: {other:?}"),
    }
}

/// Takes every row of `count` keys away from `peer`, behind the protocol's back (as a bug or
/// a bit flip would): keys it holds, picked by the simulation's seed, other than `spared`
/// (lost elsewhere already: with both copies gone nothing could bring a key back). Their keys.
fn lose_rows(
    sim: &Sim,
    peer: &str,
    count: usize,
    skip: usize,
    spared: &[RecordKey],
) -> Vec<RecordKey> {
    let p = sim.peer_named(peer).expect("a peer of the simulation");
    let mut guard = p.peer();
    let keys: Vec<RecordKey> = guard
        .store()
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !spared.contains(k))
        .skip(skip)
        .step_by(7)
        .take(count)
        .collect();
    let store = guard.store_mut();
    for key in &keys {
        let rows = store.rows_of(*key);
        store.remove_rows(*key, &rows);
    }
    keys
}

/// Copies lost in a settled ring (no peer died, so no hand-off plan would ever copy them
/// again) are found by a repair, which compares each range's holders by rows and digest, and
/// copied back: every record is held `replication` times again, and a second repair finds
/// nothing. Rows lost from two different holders of one range come back from each other.
/// Under loss, duplication and reordering.
#[test]
fn a_repair_restores_copies_lost_in_a_settled_ring() {
    for seed in 4_101..4_105 {
        let faults = if seed == 4_101 {
            Faults::none()
        } else {
            lossy(0.1)
        };
        let mut sim = cluster(seed, faults, 4, Placement::Consistent);
        setup_and_distribute(&mut sim);
        sim.settle();
        let clean = repair(&mut sim);
        assert_eq!(clean.diverged_ranges, 0, "seed {seed}: {clean:?}");
        assert!(
            clean.checked_ranges > 0 && clean.unchecked_ranges == 0,
            "{clean:?}"
        );
        let lost = lose_rows(&sim, "peer-1", 12, seed as usize % 5, &[]);
        let lost_too = lose_rows(&sim, "peer-2", 5, 3, &lost);
        assert!(!lost.is_empty() && !lost_too.is_empty());
        let s = status(&mut sim);
        assert!(
            s.under_replicated_ranges > 0,
            "status shows the loss: {s:?}"
        );
        let found = repair(&mut sim);
        assert!(found.diverged_ranges > 0, "seed {seed}: {found:?}");
        let rows = sim.file("default.csv").rows.len();
        assert!(!found.peers_asked.is_empty());
        assert!(
            sim.run_until(Duration::from_secs(30), |s| holds_every_copy(s, rows)),
            "seed {seed}: copies not restored: {:?}; {found:?}; off: {:?}",
            sim.holdings(),
            {
                let copies = sim.copies();
                sim.file("default.csv")
                    .rows
                    .iter()
                    .filter_map(|r| {
                        let n = copies
                            .get(&(r.key, r.values.values()))
                            .copied()
                            .unwrap_or(0);
                        (n != 2).then_some((
                            r.key,
                            n,
                            lost.contains(&r.key),
                            lost_too.contains(&r.key),
                        ))
                    })
                    .collect::<Vec<_>>()
            }
        );
        sim.settle();
        assert_all_found(&mut sim);
        let after = repair(&mut sim);
        assert_eq!(after.diverged_ranges, 0, "seed {seed}: {after:?}");
        let s = status(&mut sim);
        assert_eq!((s.under_replicated_ranges, s.under_replicated_rows), (0, 0));
    }
}

/// A repair asked while a holder dies: the death's own repair and the resync overlap, and
/// still every record ends on `replication` live holders, none twice.
#[test]
fn a_holder_dying_during_a_repair_loses_nothing() {
    for seed in 4_111..4_114 {
        let mut sim = cluster(seed, lossy(0.1), 5, Placement::Consistent);
        setup_and_distribute(&mut sim);
        sim.settle();
        // Not keys peer-3 holds too: with both copies gone nothing could bring them back.
        let doomed: Vec<RecordKey> = sim
            .peer_named("peer-3")
            .expect("peer-3")
            .peer()
            .store()
            .iter()
            .map(|(k, _)| k)
            .collect();
        lose_rows(&sim, "peer-1", 10, 0, &doomed);
        let reply = sim.request_in_background(crate::wire::ClientRequest::Repair);
        sim.advance(Duration::from_millis(2 + seed % 7));
        sim.crash("peer-3");
        until_rebuilt(&mut sim, &["peer-3"]);
        sim.settle();
        assert!(reply.borrow().is_some(), "the repair answered");
        // The death's hand-off plans trust the last settled view: what peer-1 lost may
        // still be short; a repair after the rebuild finds and copies it.
        let again = repair(&mut sim);
        assert_eq!(again.unchecked_ranges, 0, "seed {seed}: {again:?}");
        let rows = sim.file("default.csv").rows.len();
        assert!(sim.run_until(Duration::from_secs(30), |s| holds_every_copy(s, rows)));
        sim.settle();
        assert_all_found(&mut sim);
        assert_eq!(repair(&mut sim).diverged_ranges, 0, "seed {seed}");
    }
}

/// A repair is refused, with a reason, where it would compare rows in motion.
#[test]
fn a_repair_needs_a_settled_ring_and_no_distribute() {
    let mut sim = cluster(4_121, Faults::none(), 3, Placement::Consistent);
    let before = sim.request(crate::wire::ClientRequest::Repair);
    assert_eq!(before, Err(crate::wire::RequestError::NoRing.to_string()));
    sim.request(crate::wire::ClientRequest::Setup)
        .expect("setup");
    let distribute =
        sim.request_in_background(crate::wire::ClientRequest::Distribute { path: None });
    sim.advance(Duration::from_micros(300));
    if distribute.borrow().is_none() {
        let during = sim.request(crate::wire::ClientRequest::Repair);
        assert_eq!(
            during,
            Err(crate::wire::RequestError::DistributeRunning.to_string())
        );
    }
    assert!(sim.run_until(Duration::from_secs(30), |_| distribute.borrow().is_some()));
    sim.add_peer("peer-late");
    sim.advance(Duration::from_millis(50));
    sim.request(crate::wire::ClientRequest::Setup)
        .expect("setup");
    sim.settle();
    assert_eq!(repair(&mut sim).diverged_ranges, 0);
}

/// Nobody asks: the manager's own audit (`repair_interval_ms`, 60 s by default) finds copies
/// lost in a settled ring and has them copied back, under loss and duplication.
#[test]
fn the_periodic_audit_restores_lost_copies_unasked() {
    for seed in 4_131..4_134 {
        let mut sim = cluster(seed, lossy(0.1), 4, Placement::Consistent);
        setup_and_distribute(&mut sim);
        sim.settle();
        let lost = lose_rows(&sim, "peer-2", 15, 1, &[]);
        assert_eq!(lost.len(), 15);
        let rows = sim.file("default.csv").rows.len();
        let restored = move |s: &Sim| holds_every_copy(s, rows);
        assert!(!restored(&sim));
        // Within one interval and the copies' time.
        assert!(
            sim.run_until(Duration::from_secs(75), restored),
            "seed {seed}: not restored by the audit: {:?}",
            sim.holdings()
        );
        let warned = sim.manager_events().iter().any(
            |e| matches!(e, ManagerEvent::Warning(w) if w.starts_with("repair: the holders of")),
        );
        assert!(warned, "seed {seed}: the audit says what it found");
        sim.settle();
        assert_all_found(&mut sim);
    }
}
