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
//!
//! A rejoin names its view by epoch and digest and carries only its own entry: the manager
//! asks one holder of the newest view named for the whole of it ([`Body::ViewWanted`]), the
//! next holder if that one does not answer in [`ASK_AGAIN`], and gives up on a view after
//! [`ASKS_PER_VIEW`] asks (then the newest view before it is wanted). With no whole view at
//! all, the ring is rebuilt from the rejoins themselves: the newest header named and each
//! member's own entry. Recovery ends only once the
//! newest view still wanted is here.

use super::membership::Change;
use super::registry::{PeerEntry, Standing};
use super::{ClientCall, Manager, ManagerEvent, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::ring::{RingExt, is_well_formed};
use crate::wire::{Body, Member, PeerId, Rejoin, RequestError, RingView};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a holder asked for the whole view has to send it before the next one is asked.
const ASK_AGAIN: Duration = Duration::from_secs(1);
/// Asks for one view (each of the next holder, retransmitted by the link until it is
/// acknowledged) before that view is given up on.
const ASKS_PER_VIEW: u32 = 6;

pub(super) struct Recovery {
    /// The newest whole view so far (carried by a rejoin, or sent by a holder).
    view: Option<RingView>,
    /// Views the rejoins named, by (epoch, digest): the members that hold each.
    named: BTreeMap<(u64, u64), Vec<PeerId>>,
    /// The newest named view being asked for.
    asking: Option<Asking>,
    rejoined: BTreeSet<PeerId>,
    /// The header of the newest view any rejoin held (the new views' epochs go on from its),
    /// and each rejoined member's own entry: what the ring is rebuilt from when no holder
    /// sends a whole view.
    newest_header: Option<RingView>,
    entries: BTreeMap<PeerId, Member>,
    pub(super) deadline: Time,
}

struct Asking {
    view: (u64, u64),
    asks: u32,
    again_at: Time,
}

impl Recovery {
    /// The newest view named and not had whole (nor given up on).
    fn wanted(&self) -> Option<(u64, u64)> {
        let had = self.view.as_ref().map_or(0, |v| v.epoch);
        let newest = self.named.keys().next_back().copied()?;
        (newest.0 > had).then_some(newest)
    }

    /// Every member of the newest view is back, and no newer view is wanted.
    fn complete(&self) -> bool {
        self.wanted().is_none()
            && self
                .view
                .as_ref()
                .is_some_and(|v| v.members.iter().all(|m| self.rejoined.contains(&m.id)))
    }

    pub(super) fn next_ask(&self) -> Option<Time> {
        self.asking.as_ref().map(|a| a.again_at)
    }

    /// The newest epoch any rejoin held.
    fn highest_epoch(&self) -> u64 {
        self.newest_header.as_ref().map_or(0, |h| h.epoch)
    }

    /// A view made of the newest header a rejoin named and every rejoined member's own
    /// entry, when no whole view could be had: what the members that came back hold of the
    /// ring. Republished as a change like any recovered view, so every member plans its
    /// hand-off against the settled view it holds.
    fn rebuilt(&self) -> Option<RingView> {
        let mut view = self.newest_header.clone()?;
        view.members = self.entries.values().cloned().collect();
        view.members.sort_by_key(|m| (m.token, m.id));
        is_well_formed(&view).then_some(view)
    }

    /// Keeps `view` if it is newer than the whole view had.
    fn adopt(&mut self, view: RingView) {
        if self.view.as_ref().is_none_or(|v| view.epoch > v.epoch) {
            self.view = Some(view);
        }
    }
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
        let cut_down = rejoin.digest.is_some() && rejoin.ring.members.len() != 1;
        if self.ring.is_some()
            || self.teardown.is_some()
            || !mine
            || cut_down
            || !is_well_formed(&rejoin.ring)
        {
            return false;
        }
        self.make_way_for(now, rejoin.id, name);
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
            view: None,
            named: BTreeMap::new(),
            asking: None,
            rejoined: BTreeSet::new(),
            newest_header: None,
            entries: BTreeMap::new(),
            deadline: now + grace,
        });
        if rejoin.ring.epoch >= rec.highest_epoch() {
            rec.newest_header = Some(rejoin.ring.clone_header());
        }
        if let Some(own) = rejoin.ring.member(id) {
            rec.entries.insert(id, own.clone());
        }
        match rejoin.digest {
            Some(digest) => {
                let holders = rec.named.entry((rejoin.ring.epoch, digest)).or_default();
                if !holders.contains(&id) {
                    holders.push(id);
                }
            }
            None => rec.adopt(rejoin.ring),
        }
        // The grace runs from the last member back, not the first: a thousand rejoins take
        // the manager longer than one grace to hear.
        if rec.rejoined.insert(id) {
            rec.deadline = rec.deadline.max(now + grace);
        }
        self.ask_for_view(now);
        if self.recovery.as_ref().is_some_and(Recovery::complete) {
            self.finish_recovery(now);
        }
        true
    }

    /// A member rejoining under `id` comes before a newcomer that this manager, just
    /// restarted, registered under the same id before the member was back (the newcomer
    /// registered afresh, its first answer lost with the manager that died): the newcomer,
    /// in no ring yet, is given another id. Else the member's rejoin was refused, it
    /// registered as a newcomer in its turn (taking the id of the next member, and so on),
    /// and each of them left its place in the ring and had its rows placed anew.
    fn make_way_for(&mut self, now: Time, id: PeerId, name: &str) {
        let Some((newcomer, addr)) = self
            .registry
            .get(id)
            .filter(|p| p.standing == Standing::Registered && p.name != name)
            .map(|p| (p.name.clone(), p.addr))
        else {
            return;
        };
        let Some(new) = self.registry.renumber(id, id) else {
            return;
        };
        self.unwatch(id);
        self.watch(now, new);
        // Its first answer, if still retransmitted, would name the id it no longer has.
        self.link
            .cancel_where(|t| matches!(t, ManagerTag::ToPeer(p, _) if *p == id));
        self.events.push(ManagerEvent::Warning(format!(
            "peer {newcomer} registered as {id} before member {id} ({name}) rejoined; it is now {new}"
        )));
        let tag = ManagerTag::ToPeer(new, PeerMessage::Registered);
        self.send(now, addr, Body::Registered { id: new }, None, tag);
    }

    /// Asks a holder of the newest view wanted for the whole of it, unless one was asked
    /// for that view less than [`ASK_AGAIN`] ago; gives up on a view after
    /// [`ASKS_PER_VIEW`] asks.
    fn ask_for_view(&mut self, now: Time) {
        loop {
            let Some(rec) = self.recovery.as_mut() else {
                return;
            };
            let Some(wanted) = rec.wanted() else {
                rec.asking = None;
                return;
            };
            let holders = rec.named.get(&wanted).cloned().unwrap_or_default();
            let asking = match rec.asking.take() {
                Some(a) if a.view == wanted && a.again_at > now => {
                    rec.asking = Some(a);
                    return;
                }
                Some(a) if a.view == wanted => a,
                _ => Asking {
                    view: wanted,
                    asks: 0,
                    again_at: now,
                },
            };
            if asking.asks >= ASKS_PER_VIEW || holders.is_empty() {
                rec.named.remove(&wanted);
                self.events.push(ManagerEvent::Warning(format!(
                    "no holder sent the ring view of epoch {} that rejoins named; \
                     going on without it (from an older view, or the members' own entries)",
                    wanted.0
                )));
                continue;
            }
            let holder = holders[asking.asks as usize % holders.len()];
            rec.asking = Some(Asking {
                view: wanted,
                asks: asking.asks + 1,
                again_at: now + ASK_AGAIN,
            });
            if let Some(addr) = self.registry.get(holder).map(|p| p.addr) {
                let tag = ManagerTag::ToPeer(holder, PeerMessage::ViewWanted);
                self.send(now, addr, Body::ViewWanted { epoch: wanted.0 }, None, tag);
            }
            return;
        }
    }

    /// A holder's answer to [`Body::ViewWanted`]: taken if it is a view the rejoins named.
    pub(super) fn on_held_view(&mut self, now: Time, view: RingView) {
        let Some(rec) = self.recovery.as_mut() else {
            return;
        };
        let key = (view.epoch, crate::ring_delta::digest(&view));
        if !rec.named.contains_key(&key) || !is_well_formed(&view) {
            return;
        }
        rec.adopt(view);
        self.ask_for_view(now);
        if self.recovery.as_ref().is_some_and(Recovery::complete) {
            self.finish_recovery(now);
        }
    }

    pub(super) fn recovery_due(&mut self, now: Time) {
        if self
            .recovery
            .as_ref()
            .and_then(Recovery::next_ask)
            .is_some_and(|at| at <= now)
        {
            self.ask_for_view(now);
        }
        let Some(rec) = self.recovery.as_mut() else {
            return;
        };
        if rec.deadline > now {
            return;
        }
        if rec.wanted().is_none() {
            return self.finish_recovery(now);
        }
        // The grace is over, but a newer view than the one had is on its way: wait for it
        // (or for it to be given up on), looking again at the next ask.
        rec.deadline = rec
            .next_ask()
            .unwrap_or(now + ASK_AGAIN)
            .max(now + Duration::from_millis(1));
    }

    fn finish_recovery(&mut self, now: Time) {
        let Some(mut rec) = self.recovery.take() else {
            return;
        };
        self.last_epoch = self.last_epoch.max(rec.highest_epoch());
        let Some(mut view) = rec.view.take().or_else(|| rec.rebuilt()) else {
            // No rejoin's view could be had: the peers are registered, with no ring until
            // the next `setup` (their rows are placed anew then).
            let ids: Vec<PeerId> = self.registry.iter().map(|(id, _)| id).collect();
            for id in ids {
                self.registry.set_standing(id, Standing::Registered);
            }
            self.events.push(ManagerEvent::Recovered {
                epoch: 0,
                members: 0,
                missing: rec.rejoined.len(),
            });
            return self.release_early_setups(now);
        };
        self.last_epoch = self.last_epoch.max(view.epoch);
        let key = (view.epoch, crate::ring_delta::digest(&view));
        let holders: HashSet<PeerId> = rec
            .named
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let base = view.clone();
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
        // The members whose rejoins named the adopted view hold it as it was, before the
        // missing were left out: the recovered ring goes to them as a delta from it.
        self.delta_base = Some((base, holders));
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
