//! The peer's side of failure detection and manager recovery.
//!
//! A registered peer sends a heartbeat to the manager every interval; the answer says whether
//! the manager knows it. A manager that answers "unknown" from a new incarnation has restarted:
//! the peer registers again with its id and ring (the new manager rebuilds the cluster from
//! them). The same answer from the incarnation that registered it means this peer was
//! declared dead (it was frozen, or cut off): it drops its ring, whose epoch has long passed,
//! and joins again. The peer also answers pings and relays the manager's indirect probes.

use super::{Peer, PeerEvent, PeerTag};
use crate::link::Time;
use crate::wire::{Body, PeerId, Rejoin};
use std::collections::VecDeque;
use std::net::SocketAddr;

/// Indirect probes a peer relays at once; older ones are forgotten.
const RELAYS_REMEMBERED: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Liveness {
    pub(super) heartbeat_at: Option<Time>,
    /// The incarnation of the manager that registered this peer.
    pub(super) manager: Option<u64>,
    /// Heartbeats sent so far (the last one's number).
    pub(super) beats: u64,
    /// `beats` when the current registration was accepted: a "not known" answer to a
    /// heartbeat numbered at most this is about the peer before it (re)registered.
    pub(super) registered_beat: u64,
    /// Indirect probes being relayed: (the manager's nonce, whom to tell).
    relays: VecDeque<(u64, SocketAddr)>,
}

impl Liveness {
    pub(super) fn next_timeout(&self, exited: bool) -> Option<Time> {
        (!exited).then_some(self.heartbeat_at).flatten()
    }
}

impl Peer {
    pub(super) fn heartbeat_if_due(&mut self, now: Time) {
        if self.live.heartbeat_at.is_none_or(|t| t > now) {
            return;
        }
        self.live.heartbeat_at = Some(now + self.cfg.heartbeat);
        if self.id.is_none() {
            // Registering. The link retransmits a registration until it is acknowledged; but
            // one acknowledged by a manager that then died before its answer (`Registered`)
            // arrived is answered by nobody, and the peer would wait without an id for
            // ever, sending nothing. So, each interval without an id and with no
            // registration in flight, it registers again; a manager that did answer
            // answers again with the same id.
            self.register(now, None);
            return;
        }
        let epoch = self.ring.as_ref().map_or(0, |r| r.epoch);
        let manager = self.cfg.manager;
        self.live.beats += 1;
        let body = Body::Heartbeat {
            epoch,
            id: self.id,
            beat: Some(self.live.beats),
        };
        self.link.send_unsequenced(manager, body);
    }

    pub(super) fn on_heartbeat_ack(
        &mut self,
        now: Time,
        manager: u64,
        known: bool,
        named: Option<PeerId>,
        beat: Option<u64>,
    ) {
        if known {
            self.live.manager.get_or_insert(manager);
            return;
        }
        let Some(id) = self.id else { return };
        // About a heartbeat of an earlier membership, overtaken by this registration (a new
        // id, or a rejoin under the same one, sent before it was accepted): obeying it would
        // drop the id and ring for nothing.
        if named.is_some_and(|named| named != id)
            || beat.is_some_and(|beat| beat <= self.live.registered_beat)
        {
            return;
        }
        // Leaving (on SIGTERM, or marked leaving in the view: `stormctl leave`), with nothing
        // held or every row handed over and reported: our leave is done and the manager
        // forgot us; its `Exit` is late or lost. Joining again here would register a peer
        // that is about to exit, or (when the late `Exit` is then taken for an earlier
        // membership's) one that lives on as a member after its leave.
        if self.live.manager == Some(manager)
            && ((self.leaving && self.store.row_count() == 0) || self.leave_reported())
        {
            return self.exit(0, "left the ring".into());
        }
        if self.live.manager == Some(manager) {
            // Declared dead by the manager that still runs (or given up on while leaving).
            self.join_again(
                now,
                "the manager no longer counts this peer (it was silent too long); joining again",
            );
        } else {
            // A manager that restarted: give it what it needs to rebuild the ring.
            // It names the view held; the manager asks one holder for the whole of it.
            let rejoin = self.ring.as_ref().map(|ring| Rejoin::naming(id, ring));
            self.events.push(PeerEvent::Warning(format!(
                "the manager restarted; registering again as peer {id}"
            )));
            self.register(now, rejoin);
        }
    }

    /// The manager removed this peer from the ring without its rows handed over: drop the
    /// ring, whose epoch has passed, and register again; every row held is placed anew, so
    /// none is lost even at R=1. A peer that was leaving leaves again once back in a ring.
    pub(super) fn join_again(&mut self, now: Time, why: &str) {
        self.events.push(PeerEvent::Warning(why.into()));
        self.leave_once_in_ring = self.leaving;
        self.ring = None;
        self.base = None;
        self.id = None;
        self.reset_handoff();
        // A registration still in flight (a rejoin) names the id and ring just dropped: it
        // is replaced by a new one. (One already answered was cancelled by its answer.)
        self.link.cancel_where(|t| matches!(t, PeerTag::Register));
        self.register(now, None);
    }

    pub(super) fn relay_ping(
        &mut self,
        _now: Time,
        manager: SocketAddr,
        nonce: u64,
        target: SocketAddr,
    ) {
        if self.live.relays.len() >= RELAYS_REMEMBERED {
            self.live.relays.pop_front();
        }
        self.live.relays.push_back((nonce, manager));
        self.link.send_unsequenced(target, Body::Ping { nonce });
    }

    pub(super) fn relay_pong(&mut self, nonce: u64) {
        if let Some(i) = self.live.relays.iter().position(|(n, _)| *n == nonce)
            && let Some((_, manager)) = self.live.relays.remove(i)
        {
            self.link.send_unsequenced(manager, Body::Pong { nonce });
        }
    }
}
