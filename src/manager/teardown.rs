//! Teardown: everything in progress is answered with an error, every peer is told to exit,
//! and the client hears back once each one confirmed (or could not be reached).

use super::membership::{Change, Transition};
use super::{ClientCall, Manager, ManagerEvent, ManagerTag};
use crate::link::Time;
use crate::wire::{Body, ExitReason, PeerId, ReplyBody, RequestError};
use std::collections::BTreeSet;
use std::net::SocketAddr;

pub(super) struct TeardownJob {
    call: ClientCall,
    pub(super) waiting: BTreeSet<PeerId>,
    peers: u32,
}

impl Manager {
    pub(super) fn start_teardown(&mut self, now: Time, call: ClientCall) {
        let targets: Vec<(PeerId, SocketAddr)> = self.registry.targets();
        let peers = targets.len() as u32;
        // Everything in progress ends here.
        if let Some(job) = self.job.take() {
            self.reply(now, &job.call, Err(RequestError::TornDown));
        }
        for call in std::mem::take(&mut self.setups) {
            self.reply(now, &call, Err(RequestError::TornDown));
        }
        for (_, q) in std::mem::take(&mut self.queries) {
            self.reply(now, &q.call, Err(RequestError::TornDown));
        }
        for c in std::mem::take(&mut self.changes) {
            if let Change::Leave(_, Some(call)) = c {
                self.reply(now, &call, Err(RequestError::TornDown));
            }
        }
        if let Some(Transition {
            change: Change::Leave(_, Some(call)),
            ..
        }) = self.transition.take()
        {
            self.reply(now, &call, Err(RequestError::TornDown));
        }
        self.link.cancel_where(|t| !matches!(t, ManagerTag::Reply));
        self.registry.clear();
        self.ring = None;
        let waiting = targets.iter().map(|(id, _)| *id).collect();
        for (id, addr) in targets {
            self.send(
                now,
                addr,
                Body::Exit {
                    reason: ExitReason::TearDown,
                },
                call.trace.clone(),
                ManagerTag::Exit { peer: id },
            );
        }
        self.teardown = Some(TeardownJob {
            call,
            waiting,
            peers,
        });
        self.maybe_finish_teardown(now);
    }

    pub(super) fn maybe_finish_teardown(&mut self, now: Time) {
        if self.teardown.as_ref().is_some_and(|t| t.waiting.is_empty())
            && let Some(t) = self.teardown.take()
        {
            self.events.push(ManagerEvent::RingChanged {
                epoch: self.last_epoch,
                settled: true,
                members: 0,
            });
            self.reply(now, &t.call, Ok(ReplyBody::Teardown { peers: t.peers }));
        }
    }

    pub(super) fn exit_confirmed(&mut self, now: Time, peer: PeerId) {
        if let Some(t) = self.teardown.as_mut() {
            t.waiting.remove(&peer);
        }
        self.maybe_finish_teardown(now);
    }
}
