//! Finger routing (`routing = "fingers"`): the same guarantees as the walk (every record found,
//! an absent key "not found" only where its holders were asked) in fewer hops, also while the
//! ring changes under loss, duplication and reordering, and around a dead member.

use super::scenarios::{assert_all_found, populated, query, setup_and_distribute};
use super::*;
use crate::record::RecordKey;
use crate::ring::RingExt;
use crate::wire::Routing;

pub(super) fn cluster_with(
    seed: u64,
    faults: Faults,
    peers: usize,
    routing: Routing,
    vnodes: u32,
) -> Sim {
    let sim = Sim::with_layout(seed, faults, Placement::Consistent, 2, routing, vnodes);
    populated(sim, peers)
}

fn cluster(seed: u64, faults: Faults, peers: usize, routing: Routing) -> Sim {
    cluster_with(seed, faults, peers, routing, 1)
}

fn keys(sim: &Sim) -> Vec<RecordKey> {
    let mut keys: Vec<RecordKey> = sim.file("default.csv").rows.iter().map(|r| r.key).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Mean hops (path length - 1) over `keys`, every one found.
fn mean_hops(sim: &mut Sim, keys: &[RecordKey]) -> f64 {
    let mut total = 0usize;
    for key in keys {
        let q = query(sim, *key, None);
        assert!(q.found, "{key}: path {:?}", q.path);
        total += q.path.len() - 1;
    }
    total as f64 / keys.len() as f64
}

#[test]
fn fingers_find_everything_in_fewer_hops_than_the_walk() {
    let mut walk = cluster(70, Faults::none(), 16, Routing::Walk);
    setup_and_distribute(&mut walk);
    let mut fingers = cluster(70, Faults::none(), 16, Routing::Fingers);
    setup_and_distribute(&mut fingers);
    assert_all_found(&mut fingers);
    let sample: Vec<RecordKey> = keys(&fingers).into_iter().step_by(5).collect();
    let (w, f) = (
        mean_hops(&mut walk, &sample),
        mean_hops(&mut fingers, &sample),
    );
    // n = 16: the walk's mean is about n/2 (less with two copies), Chord's about log2(n)/2.
    assert!(f <= 0.5 * 16f64.log2() + 1.0, "fingers: {f:.2} hops");
    assert!(f < w / 2.0, "fingers {f:.2} hops, walk {w:.2}");
}

#[test]
fn with_fingers_an_absent_key_is_not_found_once_its_holders_were_asked() {
    let mut sim = cluster(71, Faults::none(), 8, Routing::Fingers);
    setup_and_distribute(&mut sim);
    for k in [42u64, 4_242, 424_242] {
        let key = RecordKey::Event(k);
        let holders: Vec<u32> = {
            let m = sim.manager();
            let ring = m.ring().unwrap();
            ring.replicas(key, 2).iter().map(|m| m.id).collect()
        };
        let q = query(&mut sim, key, None);
        assert!(!q.found);
        assert!(holders.iter().all(|h| q.path.contains(h)), "{:?}", q.path);
    }
}

/// Joins and leaves overlapping on a lossy, duplicating, reordering network: peers route with
/// views of different epochs (stale fingers), and still every row is found exactly.
#[test]
fn fingers_through_churn_on_a_bad_network_find_everything() {
    for seed in 72..80 {
        let faults = Faults {
            loss: 0.1,
            duplicate: 0.1,
            max_delay: Duration::from_millis(5),
        };
        let mut sim = cluster(seed, faults, 8, Routing::Fingers);
        setup_and_distribute(&mut sim);
        sim.terminate("peer-1");
        sim.add_peer("joiner-a");
        // Queries while the views differ: each must still be answered right.
        for key in keys(&sim).into_iter().step_by(40) {
            let q = query(&mut sim, key, None);
            assert!(
                q.found,
                "seed {seed}: {key} not found mid-change; path {:?}",
                q.path
            );
        }
        sim.terminate("peer-5");
        sim.add_peer("joiner-b");
        sim.settle();
        assert_all_found(&mut sim);
    }
}

/// A member killed without notice: until it is declared dead, queries that would hop to it
/// are routed around it (the walk from there on), then the ring heals.
#[test]
fn fingers_route_around_a_dead_member() {
    let mut sim = cluster(80, Faults::none(), 12, Routing::Fingers);
    setup_and_distribute(&mut sim);
    sim.crash("peer-4");
    for key in keys(&sim).into_iter().step_by(10) {
        let q = query(&mut sim, key, None);
        assert!(
            q.found,
            "{key} not found with a dead member; path {:?}",
            q.path
        );
    }
    sim.settle();
    assert!(sim.run_until(Duration::from_secs(30), |s| {
        s.manager()
            .ring()
            .is_some_and(|r| r.settled && r.members.iter().all(|m| m.name != "peer-4"))
    }));
    sim.settle();
    assert_all_found(&mut sim);
}
