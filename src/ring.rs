//! Placement: which peer owns a key, and how the ring is ordered.
//!
//! Members are ordered by their token, a position on a 2^64 hash ring. Under consistent
//! hashing (the default) a member owns the arc that ends at its token, so a member leaving
//! gives only its own arc to its successor, and a member joining takes only part of one arc:
//! records move between two peers, never all at once. Members marked `leaving` are still
//! walked by queries but own nothing.

use crate::record::RecordKey;
use crate::wire::{Member, PeerId, Placement, RingView};

/// A stable 64-bit mix (splitmix64's finaliser): neighbouring event ids land far apart, and
/// the same key hashes the same on every machine and every run.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Where a key sits on the hash ring.
pub fn key_hash(key: RecordKey) -> u64 {
    match key {
        RecordKey::Event(id) => mix64(id),
        // Fallback keys are hashes already; the salt keeps them apart from equal event ids.
        RecordKey::Fallback(h) => mix64(h ^ 0x5f0f_a11b_ac4b_e111),
    }
}

/// The first prime strictly above `n` (the course's table size for `2 × records`).
pub fn first_prime_above(n: u64) -> u64 {
    let is_prime = |m: u64| {
        if m < 2 {
            return false;
        }
        if m.is_multiple_of(2) {
            return m == 2;
        }
        let mut d = 3u64;
        while d.saturating_mul(d) <= m {
            if m.is_multiple_of(d) {
                return false;
            }
            d += 2;
        }
        true
    };
    let mut m = n.saturating_add(1);
    while !is_prime(m) {
        m = m.saturating_add(1);
    }
    m
}

/// Tokens for a freshly formed ring of `n` members: evenly spaced, so each owns 1/n.
pub fn evenly_spaced_tokens(n: usize) -> Vec<u64> {
    if n == 0 {
        return Vec::new();
    }
    let step = u64::MAX / n as u64;
    (0..n as u64).map(|i| step.wrapping_mul(i + 1)).collect()
}

/// A token for a member joining a formed ring: the middle of the widest arc, so the joiner takes
/// half of the most loaded member's share and nobody else's.
pub fn token_for_joiner(members: &[Member]) -> u64 {
    let mut tokens: Vec<u64> = members
        .iter()
        .filter(|m| !m.leaving)
        .map(|m| m.token)
        .collect();
    tokens.sort_unstable();
    match tokens.len() {
        0 => u64::MAX / 2,
        1 => tokens[0].wrapping_add(1u64 << 63),
        n => {
            let mut best = (0u64, 0u64); // (arc length, start)
            for i in 0..n {
                let start = tokens[(i + n - 1) % n];
                let len = tokens[i].wrapping_sub(start);
                if len > best.0 {
                    best = (len, start);
                }
            }
            best.1.wrapping_add(best.0 / 2)
        }
    }
}

/// Whether a view could have come from a manager: members ordered by token, ids and names
/// unique, at least one copy. A view a peer brings back after a manager restart is checked
/// before it is adopted.
pub fn is_well_formed(view: &RingView) -> bool {
    let mut ids = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    view.replication >= 1
        && view
            .members
            .windows(2)
            .all(|w| (w[0].token, w[0].id) <= (w[1].token, w[1].id))
        && view
            .members
            .iter()
            .all(|m| ids.insert(m.id) && names.insert(m.name.as_str()))
}

/// Read-only questions about a ring view.
pub trait RingExt {
    fn owner_of(&self, key: RecordKey) -> Option<&Member>;
    /// The owner of `key` and the next `r - 1` distinct owning members after it in ring order
    /// (fewer when the ring has fewer): the peers that hold the key under replication `r`.
    fn replicas(&self, key: RecordKey, r: usize) -> Vec<&Member>;
    /// The holders of the range that `owner` owns: it and the next `r - 1` owning members.
    fn range_holders(&self, owner: PeerId, r: usize) -> Vec<&Member>;
    fn member(&self, id: PeerId) -> Option<&Member>;
    /// The member after `id` in ring order (leaving members included), or None if `id` is
    /// alone or absent.
    fn next_of(&self, id: PeerId) -> Option<&Member>;
    /// The fraction of the key space each member owns, in member order.
    fn shares(&self) -> Vec<(PeerId, f64)>;
    /// Chord's next hop from `me` towards the owner of `key`: the owner itself when it is the
    /// next owning member, else the farthest of `me`'s fingers (the owners of `token + 2^i`)
    /// that does not pass the key. None when `me` owns the key, is not an owning member, or the
    /// placement is not consistent hashing (the caller walks then).
    fn finger_hop(&self, me: PeerId, key: RecordKey) -> Option<&Member>;
}

fn owners(view: &RingView) -> impl Iterator<Item = &Member> {
    view.members.iter().filter(|m| !m.leaving)
}

/// The owning member whose token is the first at or after `point` (wrapping): who owns `point`.
fn successor<'a>(active: &[&'a Member], point: u64) -> &'a Member {
    let i = active.partition_point(|m| m.token < point);
    active[i % active.len()]
}

impl RingExt for RingView {
    fn finger_hop(&self, me: PeerId, key: RecordKey) -> Option<&Member> {
        if self.placement != Placement::Consistent {
            return None;
        }
        let active: Vec<&Member> = owners(self).collect();
        let mine = active.iter().find(|m| m.id == me)?.token;
        let h = key_hash(key);
        let owner = successor(&active, h);
        if owner.id == me {
            return None;
        }
        let fingers = (0..64).map(|i| successor(&active, mine.wrapping_add(1u64 << i)));
        // A finger that is the owner ends the route at once (this member knows whom its fingers
        // are). Otherwise the farthest finger short of the key (distances clockwise from this
        // member's token) halves the remaining distance, as in Chord.
        let to_key = h.wrapping_sub(mine);
        let mut best: Option<&Member> = None;
        for f in fingers {
            if f.id == owner.id {
                return Some(owner);
            }
            let d = f.token.wrapping_sub(mine);
            if f.id != me && d < to_key && best.is_none_or(|b| d > b.token.wrapping_sub(mine)) {
                best = Some(f);
            }
        }
        Some(best.unwrap_or(owner))
    }

    fn owner_of(&self, key: RecordKey) -> Option<&Member> {
        let n = owners(self).count() as u64;
        if n == 0 {
            return None;
        }
        match self.placement {
            Placement::Consistent => {
                let h = key_hash(key);
                owners(self)
                    .find(|m| m.token >= h)
                    .or_else(|| owners(self).next())
            }
            Placement::Modulo => owners(self).nth((key_hash(key) % n) as usize),
            Placement::Course => {
                let pos = key.as_u64() % self.table_size.max(1);
                owners(self).nth((pos % n) as usize)
            }
        }
    }

    fn replicas(&self, key: RecordKey, r: usize) -> Vec<&Member> {
        match self.owner_of(key) {
            Some(owner) => self.range_holders(owner.id, r),
            None => Vec::new(),
        }
    }

    fn range_holders(&self, owner: PeerId, r: usize) -> Vec<&Member> {
        let active: Vec<&Member> = owners(self).collect();
        let Some(start) = active.iter().position(|m| m.id == owner) else {
            return Vec::new();
        };
        (0..r.min(active.len()))
            .map(|i| active[(start + i) % active.len()])
            .collect()
    }

    fn member(&self, id: PeerId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn next_of(&self, id: PeerId) -> Option<&Member> {
        let i = self.members.iter().position(|m| m.id == id)?;
        let next = &self.members[(i + 1) % self.members.len()];
        (next.id != id).then_some(next)
    }

    fn shares(&self) -> Vec<(PeerId, f64)> {
        let active: Vec<&Member> = owners(self).collect();
        let n = active.len();
        self.members
            .iter()
            .map(|m| {
                if m.leaving || n == 0 {
                    return (m.id, 0.0);
                }
                let share = match self.placement {
                    Placement::Consistent if n > 1 => {
                        let i = active.iter().position(|a| a.id == m.id).unwrap_or(0);
                        let prev = active[(i + n - 1) % n].token;
                        m.token.wrapping_sub(prev) as f64 / u64::MAX as f64
                    }
                    _ => 1.0 / n as f64,
                };
                (m.id, share)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn member(id: PeerId, token: u64) -> Member {
        Member {
            id,
            name: format!("p{id}"),
            addr: ([127, 0, 0, 1], 6000 + id as u16).into(),
            token,
            leaving: false,
        }
    }

    fn ring(n: usize, placement: Placement) -> RingView {
        let members = evenly_spaced_tokens(n)
            .into_iter()
            .enumerate()
            .map(|(i, t)| member(i as PeerId + 1, t))
            .collect();
        RingView {
            epoch: 1,
            settled: true,
            placement,
            table_size: first_prime_above(2 * 48_534),
            replication: 1,
            members,
        }
    }

    fn owners_of(view: &RingView, keys: u64) -> HashMap<u64, PeerId> {
        (0..keys)
            .map(|k| (k, view.owner_of(RecordKey::Event(k)).unwrap().id))
            .collect()
    }

    #[test]
    fn hashing_is_stable() {
        // Pinned: a change here would silently move every stored record.
        assert_eq!(key_hash(RecordKey::Event(5570068)), mix64(5570068));
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
        assert_ne!(
            key_hash(RecordKey::Event(7)),
            key_hash(RecordKey::Fallback(7))
        );
    }

    #[test]
    fn even_tokens_give_balanced_shares() {
        let view = ring(5, Placement::Consistent);
        for (_, share) in view.shares() {
            assert!((share - 0.2).abs() < 1e-6, "{share}");
        }
        let counts = owners_of(&view, 50_000)
            .into_values()
            .fold(HashMap::new(), |mut m, id| {
                *m.entry(id).or_insert(0) += 1;
                m
            });
        for (_, c) in counts {
            assert!((9_000..11_000).contains(&c), "unbalanced: {c}");
        }
    }

    #[test]
    fn a_leaving_member_moves_only_its_own_keys_to_its_successor() {
        let before = ring(5, Placement::Consistent);
        let mut after = before.clone();
        after.members[2].leaving = true;
        let (leaver, successor) = (after.members[2].id, after.members[3].id);
        let (a, b) = (owners_of(&before, 20_000), owners_of(&after, 20_000));
        for k in 0..20_000 {
            if a[&k] == leaver {
                assert_eq!(b[&k], successor);
            } else {
                assert_eq!(a[&k], b[&k], "key {k} moved although its owner stayed");
            }
        }
    }

    #[test]
    fn a_joining_member_takes_only_keys_from_one_arc() {
        let before = ring(5, Placement::Consistent);
        let mut after = before.clone();
        let token = token_for_joiner(&after.members);
        after.members.push(member(6, token));
        after.members.sort_by_key(|m| m.token);
        let (a, b) = (owners_of(&before, 20_000), owners_of(&after, 20_000));
        let mut donors = std::collections::BTreeSet::new();
        let mut moved = 0;
        for k in 0..20_000 {
            if a[&k] != b[&k] {
                assert_eq!(b[&k], 6, "a key moved between two old members");
                donors.insert(a[&k]);
                moved += 1;
            }
        }
        assert_eq!(donors.len(), 1);
        assert!(
            (1_500..2_500).contains(&moved),
            "joiner took {moved} of 20000"
        );
    }

    #[test]
    fn next_of_wraps_and_includes_leaving_members() {
        let mut view = ring(3, Placement::Consistent);
        view.members[1].leaving = true;
        assert_eq!(view.next_of(1).unwrap().id, 2);
        assert_eq!(view.next_of(3).unwrap().id, 1);
        let solo = ring(1, Placement::Consistent);
        assert!(solo.next_of(1).is_none());
        assert!(view.next_of(99).is_none());
    }

    #[test]
    fn course_placement_matches_its_formula() {
        let s = first_prime_above(2 * 48_534);
        assert_eq!(s, 97_073);
        let view = ring(5, Placement::Course);
        let id = 5_570_068u64;
        let expect = ((id % s) % 5) as usize;
        assert_eq!(
            view.owner_of(RecordKey::Event(id)).unwrap().id,
            view.members[expect].id
        );
    }

    #[test]
    fn modulo_placement_uses_all_members() {
        let view = ring(4, Placement::Modulo);
        let used: std::collections::BTreeSet<_> = owners_of(&view, 1000).into_values().collect();
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn replicas_are_the_owner_and_its_next_distinct_successors() {
        for placement in [Placement::Consistent, Placement::Modulo, Placement::Course] {
            let mut view = ring(5, placement);
            view.members[3].leaving = true;
            for k in 0..2_000u64 {
                let key = RecordKey::Event(k);
                let set = view.replicas(key, 3);
                assert_eq!(set[0].id, view.owner_of(key).unwrap().id, "{placement:?}");
                assert_eq!(set.len(), 3);
                let mut ids: Vec<_> = set.iter().map(|m| m.id).collect();
                ids.dedup();
                assert_eq!(ids.len(), 3, "a replica twice");
                assert!(
                    set.iter().all(|m| !m.leaving),
                    "a leaving member holds replicas"
                );
            }
        }
        // Never more replicas than owning members; none in an empty ring.
        assert_eq!(
            ring(2, Placement::Consistent)
                .replicas(RecordKey::Event(1), 5)
                .len(),
            2
        );
        assert!(
            ring(0, Placement::Consistent)
                .replicas(RecordKey::Event(1), 2)
                .is_empty()
        );
    }

    #[test]
    fn a_leaving_member_s_keys_gain_exactly_one_new_replica() {
        let before = ring(5, Placement::Consistent);
        let mut after = before.clone();
        after.members[2].leaving = true;
        let leaver = after.members[2].id;
        for k in 0..5_000u64 {
            let key = RecordKey::Event(k);
            let old: Vec<_> = before.replicas(key, 2).iter().map(|m| m.id).collect();
            let new: Vec<_> = after.replicas(key, 2).iter().map(|m| m.id).collect();
            if old.contains(&leaver) {
                let gained: Vec<_> = new.iter().filter(|id| !old.contains(id)).collect();
                assert_eq!(gained.len(), 1, "key {k}: {old:?} -> {new:?}");
            } else {
                assert_eq!(old, new, "key {k} moved although no holder left");
            }
        }
    }

    /// Follows finger hops from `entry` until the owner; returns the hops taken.
    fn finger_route(view: &RingView, entry: PeerId, key: RecordKey) -> (usize, PeerId) {
        let (mut at, mut hops) = (entry, 0);
        while let Some(next) = view.finger_hop(at, key) {
            at = next.id;
            hops += 1;
            assert!(hops <= view.members.len(), "finger routing loops");
        }
        (hops, at)
    }

    /// A ring grown by joins (each takes the middle of the widest arc), as after churn.
    fn grown_ring(n: usize) -> RingView {
        let mut view = ring(2, Placement::Consistent);
        for id in 3..=n as PeerId {
            let token = token_for_joiner(&view.members);
            view.members.push(member(id, token));
            view.members.sort_by_key(|m| (m.token, m.id));
        }
        view
    }

    #[test]
    fn fingers_reach_the_owner_in_about_half_log2_n_hops() {
        for n in [5usize, 64, 256] {
            for view in [ring(n, Placement::Consistent), grown_ring(n)] {
                let ids: Vec<PeerId> = view.members.iter().map(|m| m.id).collect();
                let (mut total, mut routes, mut worst) = (0usize, 0usize, 0usize);
                for k in 0..2_000u64 {
                    let key = RecordKey::Event(k * 7_919 + 13);
                    let entry = ids[(k as usize * 31) % n];
                    let (hops, end) = finger_route(&view, entry, key);
                    assert_eq!(Some(end), view.owner_of(key).map(|m| m.id), "n={n} key {k}");
                    total += hops;
                    worst = worst.max(hops);
                    routes += 1;
                }
                let mean = total as f64 / routes as f64;
                let bound = 0.5 * (n as f64).log2() + 1.0;
                println!("fingers n={n}: mean {mean:.2} hops (bound {bound:.2}), worst {worst}");
                assert!(mean <= bound, "n={n}: mean {mean:.2} hops > {bound:.2}");
                assert!(
                    worst <= (n as f64).log2().ceil() as usize + 1,
                    "n={n}: worst {worst}"
                );
            }
        }
    }

    #[test]
    fn fingers_skip_leaving_members_and_other_placements_walk() {
        let mut view = ring(8, Placement::Consistent);
        view.members[3].leaving = true;
        let leaver = view.members[3].id;
        for k in 0..500u64 {
            let key = RecordKey::Event(k);
            for entry in view.members.iter().filter(|m| !m.leaving).map(|m| m.id) {
                let mut at = entry;
                while let Some(next) = view.finger_hop(at, key) {
                    assert_ne!(next.id, leaver, "a leaving member owns nothing");
                    at = next.id;
                }
                assert_eq!(Some(at), view.owner_of(key).map(|m| m.id));
            }
        }
        assert!(view.finger_hop(leaver, RecordKey::Event(1)).is_none());
        let modulo = ring(8, Placement::Modulo);
        assert!(modulo.finger_hop(1, RecordKey::Event(1)).is_none());
    }

    #[test]
    fn primes() {
        assert_eq!(first_prime_above(0), 2);
        assert_eq!(first_prime_above(2), 3);
        assert_eq!(first_prime_above(13), 17);
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let view = ring(0, Placement::Consistent);
        assert!(view.owner_of(RecordKey::Event(1)).is_none());
    }
}
