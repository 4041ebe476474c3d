//! Recovery: a manager that restarted rebuilds the cluster from its peers.
//!
//! The manager keeps nothing on disk. When it restarts, the peers notice (their heartbeats are
//! answered "unknown" by a new incarnation) and register again with their id and the ring
//! view they hold. The manager takes back each peer under its id, adopts the newest view any
//! of them holds, and, once every member of that view is back (or `rejoin_grace` has passed
//! since the last one came back),
//! republishes it under a new epoch as a change of its own: members that did not come back
//! are left out and their ranges repaired by the survivors, a leave that was under way ends.
//! Epochs go on from the highest any peer held, so no peer ever takes the new views for old.

use super::membership::Change;
use super::registry::{PeerEntry, Standing};
use super::{ClientCall, Manager, ManagerEvent, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::ring::{RingExt, is_well_formed};
use crate::wire::{Body, PeerId, Rejoin, RequestError, RingView};
use std::collections::BTreeSet;
use std::net::SocketAddr;

pub(super) struct Recovery {
    view: RingView,
    rejoined: BTreeSet<PeerId>,
    pub(super) deadline: Time,
}

impl Manager {
    /// A peer registering with the ring it held. Taken back under its id while this manager
    /// has no ring of its own (it restarted); otherwise it registers as a newcomer.
    pub(super) fn try_rejoin(
        &mut self,
        now: Time,
        addr: SocketAddr,
        incarnation: u64,
        name: &str,
        rejoin: Rejoin,
    ) -> bool {
        let mine = rejoin
            .ring
            .member(rejoin.id)
            .is_some_and(|m| m.name == name);
        if self.ring.is_some() || self.teardown.is_some() || !mine || !is_well_formed(&rejoin.ring)
        {
            return false;
        }
        let entry = PeerEntry {
            name: name.to_string(),
            addr,
            incarnation,
            standing: Standing::InRing,
        };
        if self.registry.restore(rejoin.id, entry).is_err() {
            return false;
        }
        let id = rejoin.id;
        self.watch(now, id);
        self.events.push(ManagerEvent::PeerRegistered {
            id,
            name: name.to_string(),
            addr,
        });
        let tag = ManagerTag::ToPeer(id, PeerMessage::Registered);
        self.send(now, addr, Body::Registered { id }, None, tag);
        let grace = self.cfg.detection.rejoin_grace;
        let rec = self.recovery.get_or_insert_with(|| Recovery {
            view: rejoin.ring.clone(),
            rejoined: BTreeSet::new(),
            deadline: now + grace,
        });
        if rejoin.ring.epoch > rec.view.epoch {
            rec.view = rejoin.ring;
        }
        // The grace runs from the last member back, not the first: a thousand rejoins,
        // each a view in fragments, take the manager longer than one grace to hear.
        if rec.rejoined.insert(id) {
            rec.deadline = rec.deadline.max(now + grace);
        }
        let complete = rec
            .view
            .members
            .iter()
            .all(|m| rec.rejoined.contains(&m.id));
        if complete {
            self.finish_recovery(now);
        }
        true
    }

    pub(super) fn recovery_due(&mut self, now: Time) {
        if self.recovery.as_ref().is_some_and(|r| r.deadline <= now) {
            self.finish_recovery(now);
        }
    }

    fn finish_recovery(&mut self, now: Time) {
        let Some(rec) = self.recovery.take() else {
            return;
        };
        let mut view = rec.view;
        self.last_epoch = self.last_epoch.max(view.epoch);
        // The members' plans compare against that settled view; they still hold it.
        self.settled_epoch = self.settled_epoch.max(view.settled_epoch);
        let before = view.members.len();
        view.members
            .retain(|m| rec.rejoined.contains(&m.id) && self.registry.get(m.id).is_some());
        let missing = before - view.members.len();
        // Rejoined peers the newest view does not hold (it moved on without them) join anew.
        let members: BTreeSet<PeerId> = view.members.iter().map(|m| m.id).collect();
        let outside: Vec<PeerId> = self
            .registry
            .iter()
            .filter(|(id, p)| !members.contains(id) && p.standing != Standing::Registered)
            .map(|(id, _)| id)
            .collect();
        for id in outside {
            self.registry.set_standing(id, Standing::Registered);
        }
        for m in view.members.iter().filter(|m| m.leaving) {
            self.registry.set_standing(m.id, Standing::Leaving);
        }
        self.events.push(ManagerEvent::Recovered {
            epoch: view.epoch,
            members: view.members.len(),
            missing,
        });
        if view.members.is_empty() {
            return self.release_early_setups(now);
        }
        self.ring = Some(view);
        self.last_published = None;
        self.changes.push_front(Change::Recover);
        let joiners: Vec<PeerId> = self
            .registry
            .iter()
            .filter(|(_, p)| p.standing == Standing::Registered)
            .map(|(id, _)| id)
            .collect();
        for id in joiners {
            self.changes.push_back(Change::Join(id));
        }
        self.next_change(now);
        self.release_early_setups(now);
    }

    /// Whether a command that needs the ring must wait: a restarted manager is gathering its
    /// peers, or has only just started (its peers have not yet had a heartbeat's time to
    /// tell it about a ring they hold).
    pub(super) fn gathering(&self, now: Time) -> bool {
        self.recovery.is_some()
            || (self.ring.is_none()
                && self.last_epoch == 0
                && now < self.cfg.detection.heartbeat * 3)
    }

    /// A setup that arrived while the manager was gathering its peers.
    pub(super) fn defer_setup(&mut self, call: ClientCall) {
        self.early_setups.push(call);
    }

    pub(super) fn release_early_setups(&mut self, now: Time) {
        if self.gathering(now) {
            return;
        }
        for call in std::mem::take(&mut self.early_setups) {
            self.setup(now, call);
        }
    }

    /// The error for a command that needs a ring while the manager gathers its peers.
    pub(super) fn recovering_error(&self) -> RequestError {
        RequestError::Recovering
    }

    pub(super) fn early_setup_due(&self) -> Option<Time> {
        if self.early_setups.is_empty() || self.recovery.is_some() {
            return None;
        }
        Some(self.cfg.detection.heartbeat * 3)
    }
}
