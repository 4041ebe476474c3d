//! Ring views as changes: a membership change touches one or two members, but a whole view of
//! n members (n × vnodes tokens) went to each of the n members, n² bytes per change (220 MB
//! at 1,024 peers of 16 vnodes). A member that holds the previous view is sent only what
//! changed, with a digest of the view it must arrive at; one that does not (a joiner, one
//! that missed a view) is sent the whole view, as before.
//!
//! A delta that cannot be applied is never guessed at: a member whose view is not the delta's
//! base keeps it until the base arrives (deltas may be reordered), and a result whose digest
//! differs is dropped. Either way the member's next heartbeat reports its older epoch and the
//! manager sends it the whole view.

use crate::wire::{Member, PeerId, Placement, RingView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

/// The view of `epoch` as changes to the view of `base`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingDelta {
    /// The epoch of the view this applies to.
    pub base: u64,
    pub epoch: u64,
    pub settled: bool,
    pub placement: Placement,
    pub table_size: u64,
    pub replication: u32,
    pub settled_epoch: u64,
    /// Members of the base view that are not in this one.
    pub removed: Vec<PeerId>,
    /// Members new in this view, or changed (tokens, address, leaving), whole.
    pub changed: Vec<Member>,
    /// [`digest`] of the view the delta makes.
    pub digest: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("the delta to epoch {epoch} applies to epoch {base}, not {held}")]
    Base { base: u64, epoch: u64, held: u64 },
    #[error("the view made by the delta to epoch {epoch} is not the manager's (digest differs)")]
    Digest { epoch: u64 },
}

/// A digest of a view's encoding: the first 8 bytes of its SHA-256. The encoding of a view is
/// deterministic (fields in declaration order, members in ring order).
pub fn digest(view: &RingView) -> u64 {
    let mut bytes = Vec::new();
    if ciborium::ser::into_writer(view, &mut bytes).is_err() {
        return 0; // a view that cannot be encoded could not have been sent either
    }
    let hash = Sha256::digest(&bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

impl RingDelta {
    /// What changed from `base` to `next`.
    pub fn between(base: &RingView, next: &RingView) -> RingDelta {
        let (before, after) = (by_id(base), by_id(next));
        let removed = base
            .members
            .iter()
            .filter(|m| !after.contains_key(&m.id))
            .map(|m| m.id)
            .collect();
        let changed = next
            .members
            .iter()
            .filter(|m| before.get(&m.id) != Some(m))
            .cloned()
            .collect();
        RingDelta {
            base: base.epoch,
            epoch: next.epoch,
            settled: next.settled,
            placement: next.placement,
            table_size: next.table_size,
            replication: next.replication,
            settled_epoch: next.settled_epoch,
            removed,
            changed,
            digest: digest(next),
        }
    }

    /// The view this delta makes of `base`, checked against its digest.
    pub fn apply(&self, base: &RingView) -> Result<RingView, DeltaError> {
        if base.epoch != self.base {
            return Err(DeltaError::Base {
                base: self.base,
                epoch: self.epoch,
                held: base.epoch,
            });
        }
        let replaced: HashSet<PeerId> = self
            .removed
            .iter()
            .copied()
            .chain(self.changed.iter().map(|m| m.id))
            .collect();
        let mut members: Vec<Member> = base
            .members
            .iter()
            .filter(|m| !replaced.contains(&m.id))
            .cloned()
            .collect();
        members.extend(self.changed.iter().cloned());
        // The manager keeps members in ring order, ties by id.
        members.sort_by_key(|m| (m.token, m.id));
        let view = RingView {
            epoch: self.epoch,
            settled: self.settled,
            placement: self.placement,
            table_size: self.table_size,
            replication: self.replication,
            settled_epoch: self.settled_epoch,
            members,
        };
        if digest(&view) != self.digest {
            return Err(DeltaError::Digest { epoch: self.epoch });
        }
        Ok(view)
    }
}

fn by_id(view: &RingView) -> HashMap<PeerId, &Member> {
    view.members.iter().map(|m| (m.id, m)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// A member with two more tokens, so that views weigh what real ones do.
    fn member(id: PeerId, token: u64) -> Member {
        Member {
            vnodes: vec![token ^ 0x5555, token ^ 0xaaaa_0000],
            ..crate::ring::tests::member(id, token)
        }
    }

    fn view(epoch: u64, members: Vec<Member>) -> RingView {
        let mut members = members;
        members.sort_by_key(|m| (m.token, m.id));
        RingView {
            epoch,
            settled: false,
            placement: Placement::Consistent,
            table_size: 0,
            replication: 2,
            settled_epoch: epoch - 1,
            members,
        }
    }

    #[test]
    fn a_join_a_leave_and_a_changed_member_travel_as_only_what_changed() {
        let base = view(7, (1..=40).map(|i| member(i, u64::from(i) << 40)).collect());
        let mut next = base.clone();
        next.epoch = 8;
        next.settled = true;
        next.settled_epoch = 8;
        next.members.retain(|m| m.id != 3);
        next.members.push(member(41, 5 << 40 | 1));
        next.members.sort_by_key(|m| (m.token, m.id));
        if let Some(m) = next.members.iter_mut().find(|m| m.id == 9) {
            m.leaving = true;
        }
        let delta = RingDelta::between(&base, &next);
        assert_eq!(delta.removed, vec![3]);
        let mut changed: Vec<PeerId> = delta.changed.iter().map(|m| m.id).collect();
        changed.sort();
        assert_eq!(changed, vec![9, 41]);
        assert_eq!(delta.apply(&base), Ok(next.clone()));
        // Far smaller than the view it stands for.
        let (d, v) = (crate::wire::cbor_len(&delta), crate::wire::cbor_len(&next));
        assert!(d * 10 < v, "{d} bytes against {v}");
    }

    #[test]
    fn a_delta_is_applied_only_to_its_base_and_only_when_it_makes_the_same_view() {
        let base = view(3, (1..=5).map(|i| member(i, u64::from(i) << 50)).collect());
        let mut next = base.clone();
        next.epoch = 4;
        next.members.retain(|m| m.id != 2);
        let delta = RingDelta::between(&base, &next);
        let mut other = base.clone();
        other.epoch = 2;
        assert_eq!(
            delta.apply(&other),
            Err(DeltaError::Base {
                base: 3,
                epoch: 4,
                held: 2
            })
        );
        // The same epoch but a different view (a member the manager never had): refused.
        let mut diverged = base.clone();
        diverged.members[0].addr = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(delta.apply(&diverged), Err(DeltaError::Digest { epoch: 4 }));
        // An empty change still moves the epoch and the header.
        let mut settled = next.clone();
        settled.epoch = 5;
        settled.settled = true;
        let delta = RingDelta::between(&next, &settled);
        assert!(delta.removed.is_empty() && delta.changed.is_empty());
        assert_eq!(delta.apply(&next), Ok(settled));
    }
}
