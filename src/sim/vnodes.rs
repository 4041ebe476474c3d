//! Virtual nodes (`vnodes` tokens per peer): shares even after setup and churn, joins and
//! leaves moving about 1/n of the rows to or from many peers, and every guarantee of the single
//! token ring kept (every row found, held `replication` times) under loss, duplication,
//! reordering and a crash, with both routings.

use super::fingers::cluster_with;
use super::scenarios::{assert_all_found, setup_and_distribute, status};
use super::*;
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
