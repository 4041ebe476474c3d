//! Messages larger than a datagram (ring views with many tokens, rejoins carrying them, status
//! reports) travel in fragments. With small datagrams, every ring change, rejoin and status
//! below is fragmented, on a network that loses, duplicates and reorders: the cluster goes
//! through joins, a leave, a crash and a manager restart, and every record stays found.

use super::scenarios::{assert_all_found, populated, setup_and_distribute, status};
use super::*;
use crate::wire::{Body, Envelope, PeerState};

fn bad_network() -> Faults {
    Faults {
        loss: 0.1,
        duplicate: 0.1,
        max_delay: Duration::from_millis(5),
    }
}

/// Counts the fragments the network carries (dropping none).
fn count_fragments(sim: &Sim) -> Rc<RefCell<u64>> {
    let seen = Rc::new(RefCell::new(0u64));
    let counter = seen.clone();
    sim.net.drop_where(move |d| {
        if Envelope::decode(&d.bytes).is_ok_and(|e| matches!(e.body, Body::Fragment { .. })) {
            *counter.borrow_mut() += 1;
        }
        false
    });
    seen
}

#[test]
fn views_in_fragments_survive_churn_a_crash_and_a_manager_restart_on_a_bad_network() {
    for seed in 0..4 {
        // 32 tokens a peer: a member takes about 350 bytes of the view, so 8 of them need
        // two 2,000-byte datagrams (a query's rows still fit one: what it answers with is
        // cut to `max_datagram` less 1,024 bytes).
        let sim = Sim::with_datagrams(
            seed + 400,
            bad_network(),
            Placement::Consistent,
            2,
            Routing::Fingers,
            32,
            2_000,
        );
        let fragments = count_fragments(&sim);
        let mut sim = populated(sim, 8);
        setup_and_distribute(&mut sim);
        let view = sim.manager().ring().cloned().unwrap();
        assert!(
            crate::wire::cbor_len(&view) > 2_000,
            "seed {seed}: the view fits a datagram"
        );
        assert!(*fragments.borrow() > 0, "seed {seed}: no fragments");
        for p in &sim.peers {
            assert_eq!(p.peer().ring().map(|r| r.epoch), Some(view.epoch));
        }

        assert_all_found(&mut sim);
        sim.add_peer("joiner-a");
        sim.terminate("peer-2");
        sim.crash("peer-5");
        assert!(
            sim.run_until(Duration::from_secs(60), |s| s.settled_with(7)),
            "seed {seed}: no ring after the churn"
        );
        sim.settle();
        assert_all_found(&mut sim);

        // A restarted manager learns the ring from the peers' rejoins, each a view too
        // large for one datagram.
        let before = *fragments.borrow();
        let epoch = sim.manager().ring().unwrap().epoch;
        sim.crash_manager();
        sim.advance(Duration::from_secs(1));
        sim.restart_manager();
        assert!(
            sim.run_until(Duration::from_secs(60), |s| s.settled_with(7)
                && s.manager().ring().is_some_and(|r| r.epoch > epoch)),
            "seed {seed}: no ring after the manager's restart"
        );
        assert!(
            *fragments.borrow() > before,
            "seed {seed}: rejoins not fragmented"
        );
        sim.settle();
        assert_all_found(&mut sim);
        let s = status(&mut sim);
        let up = s.peers.iter().filter(|p| p.state == PeerState::Up).count();
        assert_eq!(up, 7, "seed {seed}: {:?}", s.peers);
    }
}
