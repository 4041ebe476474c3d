//! Virtual nodes (`vnodes` tokens per peer): shares even after setup and churn, joins and
//! leaves moving about 1/n of the rows to or from many peers, and every guarantee of the single
//! token ring kept (every row found, held `replication` times) under loss, duplication,
//! reordering and a crash, with both routings.

use super::fingers::cluster_with;
use super::scenarios::{
    assert_all_found, assert_replicated, default_rows, setup_and_distribute, status,
};
use super::*;
use crate::ring::RingExt;
use crate::wire::Routing;

/// Rows each live peer owns, from `status`.
fn owned(sim: &mut Sim) -> BTreeMap<String, u64> {
    status(sim)
        .peers
        .into_iter()
        .filter_map(|p| p.owned.map(|o| (p.name, o)))
        .collect()
}

fn max_over_mean(owned: &BTreeMap<String, u64>) -> f64 {
    let mean = owned.values().sum::<u64>() as f64 / owned.len() as f64;
    *owned.values().max().unwrap_or(&0) as f64 / mean
}

#[test]
fn vnodes_spread_a_join_and_a_leave_over_many_peers_and_lose_nothing() {
    let mut sim = cluster_with(90, Faults::none(), 8, Routing::Walk, 32);
    setup_and_distribute(&mut sim);
    let before = owned(&mut sim);
    let total: u64 = before.values().sum();
    assert!(max_over_mean(&before) < 1.3, "{before:?}");
    sim.add_peer("joiner");
    sim.settle();
    let after = owned(&mut sim);
    let taken = after["joiner"];
    let givers = before
        .iter()
        .filter(|(name, n)| after.get(*name).is_some_and(|a| a < n))
        .count();
    // 600 rows: about 1/9 move, from most of the 8 members.
    assert!(
        (taken as f64) <= 1.25 * total as f64 / 9.0 + 10.0,
        "{taken} of {total}"
    );
    assert!(
        givers >= 5,
        "taken from only {givers} members: {before:?} -> {after:?}"
    );
    assert_all_found(&mut sim);
    sim.terminate("peer-2");
    sim.settle();
    let left = owned(&mut sim);
    let takers = left
        .iter()
        .filter(|(name, n)| after.get(*name).is_some_and(|a| a < *n))
        .count();
    assert!(
        takers >= 5,
        "given to only {takers} members: {after:?} -> {left:?}"
    );
    assert_eq!(left.values().sum::<u64>(), total);
    assert_all_found(&mut sim);
}

#[test]
fn vnodes_under_churn_loss_and_a_crash_lose_nothing_with_either_routing() {
    for (seed, routing) in [
        (91, Routing::Walk),
        (92, Routing::Fingers),
        (93, Routing::Fingers),
    ] {
        let faults = Faults {
            loss: 0.1,
            duplicate: 0.1,
            max_delay: Duration::from_millis(5),
        };
        let mut sim = cluster_with(seed, faults, 6, routing, 16);
        setup_and_distribute(&mut sim);
        sim.terminate("peer-1");
        sim.add_peer("joiner-a");
        sim.run_until(Duration::from_millis(30), |_| false);
        sim.crash("peer-4");
        sim.add_peer("joiner-b");
        assert!(
            sim.run_until(Duration::from_secs(30), |s| s.manager().ring().is_some_and(
                |r| { r.settled && r.members.iter().all(|m| m.name != "peer-4") }
            )),
            "seed {seed}: ring not rebuilt"
        );
        sim.settle();
        assert_all_found(&mut sim);
    }
}

/// The first distribute onto a fresh ring counts its file's keys first and moves the tokens
/// to cut the ring into equal numbers of rows (no row moves: nothing is stored yet), so
/// shares are even by rows, not only by key space; a second distribute moves no token; joins
/// and leaves weigh shares by the rows distributed; under loss and duplication nothing is
/// lost and every row is found.
#[test]
fn the_first_distribute_places_tokens_by_its_rows_and_churn_keeps_them_even() {
    let faults = Faults {
        loss: 0.1,
        duplicate: 0.1,
        max_delay: Duration::from_millis(5),
    };
    for (seed, routing) in [(94, Routing::Walk), (95, Routing::Fingers)] {
        let mut sim = cluster_with(seed, faults, 8, routing, 32);
        sim.request(ClientRequest::Setup).expect("setup");
        let formed = sim.manager().ring().cloned().expect("a ring");
        setup_and_distribute(&mut sim);
        let placed = sim.manager().ring().cloned().expect("a ring");
        assert_ne!(
            crate::ring::tokens_of(&formed.members[0]).collect::<Vec<_>>(),
            crate::ring::tokens_of(&placed.members[0]).collect::<Vec<_>>(),
            "seed {seed}: the tokens did not move to the rows"
        );
        let shares = owned(&mut sim);
        let total: u64 = shares.values().sum();
        assert_eq!(total, default_rows(&sim), "seed {seed}");
        // About 90 rows each, 3 per arc: the same ring's arcs cut evenly by key space would
        // spread the largest share by several standard deviations of row noise.
        let mut by_key_space = placed.clone();
        let even = crate::ring::vnode_tokens(by_key_space.members.len(), 32);
        for (m, tokens) in by_key_space.members.iter_mut().zip(even) {
            m.token = tokens[0];
            m.vnodes = tokens[1..].to_vec();
        }
        let mut even_shares: BTreeMap<String, u64> = BTreeMap::new();
        for row in &sim.file("default.csv").rows {
            if let Some(m) = by_key_space.owner_of(row.key) {
                *even_shares.entry(m.name.clone()).or_default() += 1;
            }
        }
        assert!(
            max_over_mean(&even_shares) > 1.1 && max_over_mean(&shares) <= 1.03,
            "seed {seed}: by rows {shares:?}, by key space {even_shares:?}"
        );
        // A second distribute of the file places by the ring as it is.
        sim.request(ClientRequest::Distribute { path: None })
            .expect("distribute again");
        assert_eq!(
            sim.manager().ring().map(|r| r.members.clone()),
            Some(placed.members.clone()),
            "seed {seed}: tokens moved on a ring that holds rows"
        );
        sim.add_peer("joiner-a");
        sim.add_peer("joiner-b");
        sim.settle();
        sim.terminate("peer-3");
        sim.terminate("peer-5");
        sim.settle();
        let churned = owned(&mut sim);
        assert_eq!(
            churned.values().sum::<u64>(),
            total,
            "seed {seed}: {churned:?}"
        );
        assert!(max_over_mean(&churned) <= 1.15, "seed {seed}: {churned:?}");
        assert_replicated(&sim);
        assert_all_found(&mut sim);
    }
}
