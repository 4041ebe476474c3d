//! Repair and hand-off planning: after a ring change, which rows this peer copies to whom, and
//! which it stops keeping.
//!
//! Every key has a replica set: its owner and the next `replication - 1` owning members. A
//! peer compares each key's set under the new view with its set under `base`, the last view
//! whose copies this peer finished. Members in both sets (keepers) held the key and still do;
//! the first keeper, and only it, copies the key to the members new to the set (gainers), so a
//! repair moves each row once. A peer no longer in the set (it is leaving, or a joiner displaced
//! it) hands the key to the gainers too and drops it only when they acknowledged, so that the
//! keeper dying during a join or a leave loses nothing: a moved row travels twice and is stored
//! once. When no keeper remains it hands the key to every new holder, likewise. Rows whose placement this peer cannot vouch
//! for (no base yet, or rows that came from a sender with an older view) go to every other
//! member of their set.

use crate::record::RecordKey;
use crate::ring::{Placer, PointIndex};
use crate::store::{Columns, Store, StoredRow};
use crate::wire::{Member, PeerId, RingView};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

/// Rows of one schema bound for one member.
#[derive(Debug)]
pub struct Send {
    pub to: PeerId,
    pub addr: SocketAddr,
    pub columns: Columns,
    pub rows: Vec<(RecordKey, StoredRow)>,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub sends: Vec<Send>,
    /// Keys this peer keeps no longer, once every send holding them is acknowledged.
    pub drop_after_sends: HashSet<RecordKey>,
    /// Keys this peer keeps no longer, now: a keeper holds them.
    pub drop_now: Vec<RecordKey>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.drop_now.is_empty()
    }
}

/// What `me` does with every row of `store` when `view` replaces `base`. `index` is the
/// peer's kept index of `view`'s points, if any (no sort of n × V points per plan); a `base`
/// that is `view` itself (a settled view) is placed by the same placer.
pub fn plan(
    store: &Store,
    me: PeerId,
    base: Option<&RingView>,
    view: &RingView,
    index: Option<&PointIndex>,
    unplaced: &HashSet<RecordKey>,
    ahead: &HashMap<RecordKey, u64>,
) -> Plan {
    if store.is_empty() {
        // Nothing to place: no need to sort two views' points (a few hundred KB at 256 peers).
        return Plan::default();
    }
    let r = view.replication.max(1) as usize;
    let placer = Placer::bound(view, index);
    let other_base = base.filter(|b| !std::ptr::eq(*b, view)).map(Placer::new);
    let base_placer = base.map(|b| {
        (
            other_base.as_ref().unwrap_or(&placer),
            b.replication.max(1) as usize,
        )
    });
    let mut out = Plan::default();
    let mut sends: BTreeMap<(PeerId, usize), Send> = BTreeMap::new();
    let mut schemas: Vec<Columns> = Vec::new();
    for (key, rows) in store.iter() {
        if ahead.contains_key(&key) {
            continue; // placed by a newer view than this one: wait for it
        }
        let holders = placer.replicas(key, r).1;
        if holders.is_empty() {
            continue;
        }
        let i_hold = holders.iter().any(|m| m.id == me);
        let targets: Vec<&Member> = match base_placer.as_ref().filter(|_| !unplaced.contains(&key))
        {
            None => holders.iter().copied().filter(|m| m.id != me).collect(),
            Some((base, base_r)) => {
                let before: Vec<PeerId> =
                    base.replicas(key, *base_r).1.iter().map(|m| m.id).collect();
                let first_keeper = holders.iter().find(|m| before.contains(&m.id));
                let gainers: Vec<&Member> = holders
                    .iter()
                    .copied()
                    .filter(|m| !before.contains(&m.id))
                    .collect();
                match (i_hold, first_keeper) {
                    (true, Some(k)) if k.id == me => gainers,
                    // Another keeper copies; or this peer gained the key and is being sent it.
                    (true, _) => Vec::new(),
                    // A member giving the key up (leaving, or displaced by a joiner) hands it
                    // to the gainers itself, as the keeper does (the gainers store the two
                    // copies once), and drops it only when they have it: the keeper dying
                    // during the change then loses nothing.
                    (false, Some(_)) if !gainers.is_empty() => gainers,
                    (false, Some(_)) => {
                        out.drop_now.push(key);
                        Vec::new()
                    }
                    (false, None) => holders.clone(),
                }
            }
        };
        if targets.is_empty() {
            continue;
        }
        if !i_hold {
            out.drop_after_sends.insert(key);
        }
        for row in rows {
            let schema = match schemas.iter().position(|c| Arc::ptr_eq(c, row.columns)) {
                Some(i) => i,
                None => {
                    schemas.push(row.columns.clone());
                    schemas.len() - 1
                }
            };
            for t in &targets {
                sends
                    .entry((t.id, schema))
                    .or_insert_with(|| Send {
                        to: t.id,
                        addr: t.addr,
                        columns: row.columns.clone(),
                        rows: Vec::new(),
                    })
                    .rows
                    .push((key, row.to_stored()));
            }
        }
    }
    out.sends = sends.into_values().collect();
    out
}

/// Rows held per arc (named as [`Placer`] names them), and of them the rows `me` owns and the
/// rows it keeps as another's replica. Rows outside `me`'s arcs (in transit) count nowhere.
///
/// `index` is the peer's kept index of `view`'s points, if any: a status at 256 peers × 16
/// tokens then sorts and copies nothing (it used to allocate ~150 KB per report, which glibc
/// kept resident).
pub fn holdings(
    store: &Store,
    me: PeerId,
    view: &RingView,
    index: Option<&PointIndex>,
) -> Holdings {
    let r = view.replication.max(1) as usize;
    let placer = Placer::bound(view, index);
    let (mut owned, mut replicas) = (0, 0);
    // Arc → (rows, digest).
    let mut ranges: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (key, rows) in store.iter() {
        let (arc, holders) = placer.replicas(key, r);
        let Some(owner) = holders.first() else {
            continue;
        };
        if !holders.iter().any(|m| m.id == me) {
            continue;
        }
        let range = ranges.entry(arc).or_default();
        let mut n = 0;
        for row in rows {
            range.1 = range.1.wrapping_add(row.digest(key));
            n += 1;
        }
        range.0 += n;
        if owner.id == me {
            owned += n;
        } else {
            replicas += n;
        }
    }
    Holdings {
        owned,
        replicas,
        ranges: ranges.iter().map(|(&arc, &(n, _))| (arc, n)).collect(),
        digests: ranges.values().map(|&(_, d)| d).collect(),
    }
}

/// What a peer holds of a view, for its report.
#[derive(Debug, Default)]
pub struct Holdings {
    /// Rows of its own ranges.
    pub owned: u64,
    /// Rows it keeps for the ranges before its own.
    pub replicas: u64,
    /// (arc, rows) of every arc it holds rows of.
    pub ranges: Vec<(u64, u64)>,
    /// The digest of each arc's rows, in the order of `ranges`.
    pub digests: Vec<u64>,
}

/// The keys of `store` in `arcs` of `view` (its placement's arcs), for a repair's resend.
pub fn keys_in_arcs(
    store: &Store,
    view: &RingView,
    index: Option<&PointIndex>,
    arcs: &[u64],
) -> Vec<RecordKey> {
    let r = view.replication.max(1) as usize;
    let placer = Placer::bound(view, index);
    store
        .iter()
        .map(|(key, _)| key)
        .filter(|&key| arcs.contains(&placer.replicas(key, r).0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{RingExt, evenly_spaced_tokens};
    use crate::wire::PackedRow;
    use crate::wire::Placement;

    fn view(ids: &[PeerId], replication: u32) -> RingView {
        let members = ids
            .iter()
            .zip(evenly_spaced_tokens(ids.len()))
            .map(|(id, token)| Member {
                id: *id,
                name: format!("p{id}"),
                addr: ([127, 0, 0, 1], 7000 + *id as u16).into(),
                token,
                leaving: false,
                vnodes: Vec::new(),
            })
            .collect();
        RingView {
            epoch: 1,
            settled: true,
            placement: Placement::Consistent,
            table_size: 0,
            replication,
            settled_epoch: 0,
            members,
        }
    }

    /// Every peer's store after placing `keys` by `v`: what a finished distribute leaves.
    fn stores(v: &RingView, keys: u64) -> BTreeMap<PeerId, Store> {
        let mut out: BTreeMap<PeerId, Store> = BTreeMap::new();
        for k in 0..keys {
            let key = RecordKey::Event(k);
            for m in v.replicas(key, v.replication as usize) {
                let s = out.entry(m.id).or_default();
                let cols = s.intern(&["event_id".into()]);
                s.insert(key, &cols, PackedRow::pack(&[k.to_string()]));
            }
        }
        out
    }

    /// Applies every peer's plan (sends delivered, drops done) and returns the copies per key.
    fn apply(
        stores: &mut BTreeMap<PeerId, Store>,
        base: &RingView,
        v: &RingView,
    ) -> (BTreeMap<RecordKey, usize>, usize) {
        let none = HashSet::new();
        let plans: Vec<(PeerId, Plan)> = stores
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    plan(s, *id, Some(base), v, None, &none, &HashMap::new()),
                )
            })
            .collect();
        let mut sent = 0;
        for (from, p) in plans {
            for send in &p.sends {
                sent += send.rows.len();
                let dest = stores.entry(send.to).or_default();
                let cols = dest.intern(&send.columns);
                for (k, row) in &send.rows {
                    dest.insert(*k, &cols, row.row.clone());
                }
            }
            let s = stores.get_mut(&from).expect("sender");
            for k in p.drop_now.iter().chain(p.drop_after_sends.iter()) {
                let rows = s.rows_of(*k);
                s.remove_rows(*k, &rows);
            }
        }
        let mut copies = BTreeMap::new();
        for s in stores.values() {
            for (k, _) in s.iter() {
                *copies.entry(k).or_default() += 1;
            }
        }
        (copies, sent)
    }

    #[test]
    fn a_join_copies_each_gained_row_from_keeper_and_loser_and_keeps_two_copies() {
        let base = view(&[1, 2, 3, 4], 2);
        let mut stores = stores(&base, 4_000);
        let mut joined = base.clone();
        joined.members.push(Member {
            id: 5,
            name: "p5".into(),
            addr: ([127, 0, 0, 1], 7005).into(),
            token: crate::ring::token_for_joiner(&base.members),
            leaving: false,
            vnodes: Vec::new(),
        });
        joined.members.sort_by_key(|m| m.token);
        joined.epoch = 2;
        let (copies, sent) = apply(&mut stores, &base, &joined);
        assert_eq!(copies.len(), 4_000);
        assert!(copies.values().all(|c| *c == 2), "every key twice");
        // The joiner takes half of one arc (1/8 of the keys) and holds, as replica, its
        // predecessor's range (1/4): 3/8 of the keys, each sent to it twice (by the keeper
        // and by the member the joiner displaced, so that either may die meanwhile), and
        // nothing sent anywhere else.
        let joiner = stores[&5].key_count() as usize;
        assert_eq!(
            sent,
            2 * joiner,
            "each gained row sent by its keeper and its loser"
        );
        assert!((1_300..1_700).contains(&joiner), "{joiner}");
    }

    #[test]
    fn a_dead_member_is_repaired_from_the_survivors() {
        for replication in [2, 3] {
            let base = view(&[1, 2, 3, 4, 5], replication);
            let mut stores = stores(&base, 3_000);
            stores.remove(&3); // killed: what it held is gone with it
            let mut after = base.clone();
            after.members.retain(|m| m.id != 3);
            after.epoch = 2;
            let (copies, _) = apply(&mut stores, &base, &after);
            assert_eq!(copies.len(), 3_000);
            assert!(
                copies.values().all(|c| *c == replication as usize),
                "R={replication}"
            );
        }
    }

    #[test]
    fn with_one_copy_a_leaver_hands_everything_to_the_new_owners() {
        let base = view(&[1, 2, 3], 1);
        let mut stores = stores(&base, 1_000);
        let mut after = base.clone();
        after.members[1].leaving = true;
        let held = stores[&2].key_count() as usize;
        let (copies, sent) = apply(&mut stores, &base, &after);
        assert!(copies.values().all(|c| *c == 1) && copies.len() == 1_000);
        assert_eq!(sent, held);
        assert_eq!(stores[&2].key_count(), 0);
    }

    #[test]
    fn unplaced_rows_go_to_every_holder_and_leave_a_non_holder() {
        let v = view(&[1, 2, 3], 2);
        let mut s = Store::default();
        let cols = s.intern(&["event_id".into()]);
        for k in 0..300 {
            s.insert(
                RecordKey::Event(k),
                &cols,
                PackedRow::pack(&[k.to_string()]),
            );
        }
        let p = plan(&s, 1, None, &v, None, &HashSet::new(), &HashMap::new());
        for send in &p.sends {
            assert_ne!(send.to, 1);
        }
        let sent: usize = p.sends.iter().map(|s| s.rows.len()).sum();
        let held_by_me = (0..300)
            .filter(|k| {
                v.replicas(RecordKey::Event(*k), 2)
                    .iter()
                    .any(|m| m.id == 1)
            })
            .count();
        // A held key goes to the one other holder; a key held by others goes to both.
        assert_eq!(sent, held_by_me + 2 * (300 - held_by_me));
        assert_eq!(p.drop_after_sends.len(), 300 - held_by_me);
        assert!(p.drop_now.is_empty());
    }

    #[test]
    fn holdings_split_owned_from_replica_rows() {
        let v = view(&[1, 2, 3], 2);
        let stores = stores(&v, 900);
        let h = holdings(&stores[&1], 1, &v, None);
        assert_eq!(h.owned + h.replicas, stores[&1].row_count());
        assert_eq!(h.ranges.len(), 2, "its own range and its predecessor's");
        assert_eq!(h.digests.len(), 2);
        assert!(h.owned > 0 && h.replicas > 0);
    }

    /// The digest a repair compares: the holders of a range report the same one while they
    /// hold the same rows, whatever order the rows came in; a row missing, changed, or under
    /// another header changes it.
    #[test]
    fn holders_of_a_range_report_one_digest_until_their_rows_differ() {
        let v = view(&[1, 2, 3], 2);
        let mut stores = stores(&v, 900);
        let digest_of = |stores: &BTreeMap<PeerId, Store>, id: PeerId| {
            let h = holdings(&stores[&id], id, &v, None);
            h.ranges
                .iter()
                .map(|r| r.0)
                .zip(h.digests)
                .collect::<BTreeMap<u64, u64>>()
        };
        // Peer 2 holds its own range and peer 1's; peer 1 holds its own and peer 3's.
        let (one, two) = (digest_of(&stores, 1), digest_of(&stores, 2));
        let shared: Vec<u64> = one
            .keys()
            .filter(|a| two.contains_key(a))
            .copied()
            .collect();
        assert_eq!(shared.len(), 1, "one range held by both");
        let arc = shared[0];
        assert_eq!(one[&arc], two[&arc]);
        // The same rows stored in the reverse order: the same digest.
        let mut reversed = Store::default();
        let mut keys: Vec<RecordKey> = stores[&2].iter().map(|(k, _)| k).collect();
        keys.reverse();
        for key in keys {
            for row in stores[&2].rows_of(key) {
                reversed.insert(key, &row.columns, row.row.clone());
            }
        }
        let h = holdings(&reversed, 2, &v, None);
        let again: BTreeMap<u64, u64> = h.ranges.iter().map(|r| r.0).zip(h.digests).collect();
        assert_eq!(again, two);
        // One row of the shared range gone from peer 2: the digests of that range differ.
        let key = keys_in_arcs(&stores[&2], &v, None, &[arc])[0];
        let rows = stores[&2].rows_of(key);
        stores.get_mut(&2).unwrap().remove_rows(key, &rows);
        assert_ne!(digest_of(&stores, 2)[&arc], one[&arc]);
        // Back, but with another value: still different; then the same row: equal again.
        let s = stores.get_mut(&2).unwrap();
        let cols = s.intern(&["event_id".into()]);
        s.insert(key, &cols, PackedRow::pack(&["changed"]));
        assert_ne!(digest_of(&stores, 2)[&arc], one[&arc]);
        let changed = stores[&2].rows_of(key);
        let s = stores.get_mut(&2).unwrap();
        s.remove_rows(key, &changed);
        s.insert(key, &cols, rows[0].row.clone());
        assert_eq!(digest_of(&stores, 2)[&arc], one[&arc]);
        // The same values under another header: different.
        let s = stores.get_mut(&2).unwrap();
        s.remove_rows(key, &rows);
        let other = s.intern(&["EVENT_ID".into()]);
        s.insert(key, &other, rows[0].row.clone());
        assert_ne!(digest_of(&stores, 2)[&arc], one[&arc]);
    }

    #[test]
    fn keys_in_arcs_are_the_keys_the_placer_puts_there() {
        let v = view(&[1, 2, 3], 2);
        let stores = stores(&v, 300);
        let h = holdings(&stores[&1], 1, &v, None);
        let arc = h.ranges[0].0;
        let keys = keys_in_arcs(&stores[&1], &v, None, &[arc]);
        assert_eq!(keys.len() as u64, h.ranges[0].1, "one row per key here");
        let placer = Placer::new(&v);
        assert!(keys.iter().all(|&k| placer.replicas(k, 2).0 == arc));
        assert!(keys_in_arcs(&stores[&1], &v, None, &[]).is_empty());
    }
}
