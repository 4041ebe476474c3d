//! Failure detection, after SWIM and HashiCorp memberlist, with the manager as the prober.
//!
//! Every registered peer heartbeats to the manager; any datagram from it counts as a sign of
//! life. A peer silent for `suspect_after` is suspected: the manager pings it directly and asks
//! `indirect` other members (the ones after it on the ring, i.e. its neighbours) to ping it
//! and relay the pong, every heartbeat interval while the suspicion lasts. Any sign of life
//! clears the suspicion. A peer still silent at `dead_after` is declared dead and removed from
//! the ring, which its surviving replicas then repair.
//!
//! Why this holds at 20% loss without false deaths: in the default 2.5 s a live peer sends
//! about ten heartbeats, and once suspected it is also probed directly and through three
//! neighbours several times over; all of that must be lost for a false death. And why a peer
//! cut off from the manager but not from its neighbours stays: the indirect probes reach it.

use super::registry::Standing;
use super::{Manager, ManagerEvent, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::ring::RingExt;
use crate::wire::{Body, PeerId, RequestError};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

/// The failure detector's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// How often peers heartbeat, and how often the manager checks.
    pub heartbeat: Duration,
    pub suspect_after: Duration,
    pub dead_after: Duration,
    /// Members asked to probe a suspect indirectly.
    pub indirect: usize,
    /// How long a restarted manager waits for the members of the ring it learns.
    pub rejoin_grace: Duration,
}

impl Default for Detection {
    fn default() -> Self {
        Detection {
            heartbeat: Duration::from_millis(250),
            suspect_after: Duration::from_millis(1_000),
            dead_after: Duration::from_millis(2_500),
            indirect: 3,
            rejoin_grace: Duration::from_millis(2_000),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Watch {
    last_heard: Time,
    suspect_since: Option<Time>,
}

/// A peer the detector declared dead, kept for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadPeer {
    pub id: PeerId,
    pub name: String,
    pub addr: SocketAddr,
    pub at: Time,
}

/// Dead peers `status` remembers.
const DEAD_REMEMBERED: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Detector {
    watched: BTreeMap<PeerId, Watch>,
    /// Probes in flight: nonce → (suspect, sent).
    probes: HashMap<u64, (PeerId, Time)>,
    next_nonce: u64,
    pub(super) check_at: Option<Time>,
    pub(super) dead: Vec<DeadPeer>,
}

impl Detector {
    fn new_probe(&mut self, id: PeerId, now: Time) -> u64 {
        self.next_nonce += 1;
        self.probes.insert(self.next_nonce, (id, now));
        self.next_nonce
    }

    /// Whether any datagram from `id` arrived after `t` (one handled at `t` itself came
    /// before whatever is being handled at `t` now).
    pub(super) fn heard_since(&self, id: PeerId, t: Time) -> bool {
        self.watched.get(&id).is_some_and(|w| w.last_heard > t)
    }

    /// Whether `id` is still watched and either heard from after `t` or not suspected: a
    /// peer that may well be alive. One declared dead (or gone) is not watched.
    pub(super) fn may_be_alive(&self, id: PeerId, t: Time) -> bool {
        self.watched
            .get(&id)
            .is_some_and(|w| w.last_heard > t || w.suspect_since.is_none())
    }

    pub(super) fn is_suspect(&self, id: PeerId) -> bool {
        self.watched
            .get(&id)
            .is_some_and(|w| w.suspect_since.is_some())
    }
}

impl Manager {
    /// Starts watching a peer (at registration): silence counts from now.
    pub(super) fn watch(&mut self, now: Time, id: PeerId) {
        self.detector.watched.insert(
            id,
            Watch {
                last_heard: now,
                suspect_since: None,
            },
        );
        self.detector.dead.retain(|d| d.id != id);
        self.detector
            .check_at
            .get_or_insert(now + self.cfg.detection.heartbeat);
    }

    pub(super) fn unwatch(&mut self, id: PeerId) {
        self.detector.watched.remove(&id);
        self.detector.probes.retain(|_, (p, _)| *p != id);
    }

    /// A sign of life from `id`.
    pub(super) fn heard_from(&mut self, now: Time, id: PeerId) {
        if let Some(w) = self.detector.watched.get_mut(&id) {
            w.last_heard = now;
            if w.suspect_since.take().is_some() {
                self.events.push(ManagerEvent::PeerAlive { id });
            }
        }
    }

    pub(super) fn on_heartbeat(
        &mut self,
        now: Time,
        from: SocketAddr,
        incarnation: u64,
        epoch: u64,
        named: Option<PeerId>,
        beat: Option<u64>,
    ) {
        let Some(id) = self.registry.by_incarnation(incarnation) else {
            if self.exit_again_if_torn_down(now, from, incarnation) {
                return;
            }
            // Unknown here: a manager that restarted, or a peer declared dead. It decides.
            return self.link.send_unsequenced(
                from,
                Body::HeartbeatAck {
                    known: false,
                    id: named,
                    beat,
                },
            );
        };
        self.heard_from(now, id);
        self.link.send_unsequenced(
            from,
            Body::HeartbeatAck {
                known: true,
                id: named,
                beat,
            },
        );
        // A member behind the ring (a view it never acknowledged, e.g. while it was frozen)
        // is sent the current one again.
        if let Some(ring) = &self.ring
            && epoch < ring.epoch
            && let Some(m) = ring.member(id)
            && !self.link.has_pending_where(
                |t| matches!(t, ManagerTag::ToPeer(p, PeerMessage::Ring) if *p == id),
            )
        {
            let (addr, view) = (m.addr, ring.clone());
            self.send(
                now,
                addr,
                Body::Ring(view),
                None,
                ManagerTag::ToPeer(id, PeerMessage::Ring),
            );
        }
    }

    pub(super) fn on_pong(&mut self, now: Time, nonce: u64) {
        if let Some((id, _)) = self.detector.probes.remove(&nonce) {
            self.heard_from(now, id);
        }
    }

    /// Every heartbeat interval: suspect the silent, probe the suspects, bury the dead.
    pub(super) fn check_liveness(&mut self, now: Time) {
        let Some(at) = self.detector.check_at else {
            return;
        };
        if at > now {
            return;
        }
        let d = self.cfg.detection;
        self.detector.check_at = (!self.detector.watched.is_empty()).then_some(now + d.heartbeat);
        self.detector
            .probes
            .retain(|_, (_, sent)| now.saturating_sub(*sent) < d.dead_after);
        let mut dead = Vec::new();
        let mut probe = Vec::new();
        for (id, w) in self.detector.watched.iter_mut() {
            let silence = now.saturating_sub(w.last_heard);
            if silence >= d.dead_after {
                dead.push(*id);
            } else if silence >= d.suspect_after {
                if w.suspect_since.is_none() {
                    w.suspect_since = Some(now);
                    self.events.push(ManagerEvent::PeerSuspected { id: *id });
                }
                probe.push(*id);
            }
        }
        for id in probe {
            self.probe_suspect(now, id);
        }
        for id in dead {
            self.declare_dead(now, id);
        }
    }

    fn probe_suspect(&mut self, now: Time, id: PeerId) {
        let Some(addr) = self.registry.get(id).map(|p| p.addr) else {
            return;
        };
        let direct = self.detector.new_probe(id, now);
        let mut relays = Vec::new();
        if let Some(ring) = &self.ring
            && let Some(at) = ring.members.iter().position(|m| m.id == id)
        {
            let n = ring.members.len();
            for step in 1..n {
                if relays.len() >= self.cfg.detection.indirect {
                    break;
                }
                let m = &ring.members[(at + step) % n];
                if !self.detector.is_suspect(m.id) {
                    relays.push(m.addr);
                }
            }
        }
        self.link
            .send_unsequenced(addr, Body::Ping { nonce: direct });
        for relay in relays {
            let nonce = self.detector.new_probe(id, now);
            self.link.send_unsequenced(
                relay,
                Body::PingReq {
                    nonce,
                    target: addr,
                },
            );
        }
    }

    /// Removes a peer that stopped answering: out of the registry (its name is free again),
    /// out of any change in progress, and out of the ring through a change of its own.
    pub(super) fn declare_dead(&mut self, now: Time, id: PeerId) {
        self.unwatch(id);
        let Some(p) = self.registry.remove(id) else {
            return;
        };
        self.events.push(ManagerEvent::PeerDead {
            id,
            name: p.name.clone(),
        });
        self.detector.dead.push(DeadPeer {
            id,
            name: p.name.clone(),
            addr: p.addr,
            at: now,
        });
        if self.detector.dead.len() > DEAD_REMEMBERED {
            self.detector.dead.remove(0);
        }
        // Nothing more goes to it; a distribute's batches are left to fail on their own.
        self.link.cancel_where(
            |t| matches!(t, ManagerTag::ToPeer(p, _) | ManagerTag::Exit { peer: p } if *p == id),
        );
        // Queued changes about it are moot; a leave that asked for it is answered.
        let lost = || RequestError::PeerLost {
            id,
            name: p.name.clone(),
        };
        let mut answered = Vec::new();
        self.changes.retain(|c| match c {
            super::membership::Change::Join(j) => *j != id,
            super::membership::Change::Leave(l, call) if *l == id => {
                answered.extend(call.clone());
                false
            }
            _ => true,
        });
        for call in answered {
            self.reply(now, &call, Err(lost()));
        }
        if p.standing == Standing::Registered {
            return; // never in the ring
        }
        self.remove_from_ring(now, id, lost());
    }
}
