//! Teardown: everything in progress is answered with an error, every peer is told to exit,
//! and the client hears back once each one confirmed (or could not be reached).

use super::membership::{Change, Transition};
use super::{ClientCall, Manager, ManagerEvent, ManagerTag};
use crate::link::Time;
use crate::wire::{Body, ExitReason, ExitedPeer, PeerId, ReplyBody, RequestError};
use std::collections::BTreeSet;
use std::net::SocketAddr;

pub(super) struct TeardownJob {
    call: ClientCall,
    pub(super) waiting: BTreeSet<PeerId>,
    exited: Vec<ExitedPeer>,
}

/// Incarnations of torn-down peers remembered at most (a bound, not a working set: a peer
/// that exits is never heard from again under its incarnation).
const TORN_DOWN_REMEMBERED: usize = 65_536;

impl Manager {
    /// A datagram from a peer a teardown told to exit (its incarnation is no longer
    /// registered): while the teardown retransmits its `Exit`, nothing; after it gave up, the
    /// `Exit` again. Never "unknown": that would make the peer register again and live on in a
    /// cluster that was torn down. False: not such a peer.
    pub(super) fn exit_again_if_torn_down(
        &mut self,
        now: Time,
        from: SocketAddr,
        incarnation: u64,
    ) -> bool {
        let Some(&id) = self.torn_down.get(&incarnation) else {
            return false;
        };
        let pending = |t: &ManagerTag| matches!(t, ManagerTag::Exit { peer } if *peer == id);
        if !self.link.has_pending_where(pending) {
            let exit = Body::Exit {
                reason: ExitReason::TearDown,
            };
            self.send(now, from, exit, None, ManagerTag::Exit { peer: id });
        }
        true
    }

    pub(super) fn start_teardown(&mut self, now: Time, call: ClientCall) {
        let targets: Vec<(PeerId, SocketAddr)> = self.registry.targets();
        let exited = targets
            .iter()
            .map(|&(id, addr)| ExitedPeer {
                id,
                name: self.registry.name_of(id),
                addr,
                confirmed: false,
            })
            .collect();
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
        if self.torn_down.len() > TORN_DOWN_REMEMBERED {
            self.torn_down.clear();
        }
        let incarnations = self.registry.iter().map(|(id, p)| (p.incarnation, id));
        self.torn_down.extend(incarnations);
        self.registry.clear();
        self.ring = None;
        self.delta_base = None;
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
            exited,
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
            let reply = ReplyBody::Teardown {
                peers: t.exited.len() as u32,
                exited: t.exited,
            };
            self.reply(now, &t.call, Ok(reply));
        }
    }

    /// `peer` acknowledged its `Exit` (`confirmed`), or could not be reached.
    pub(super) fn exit_confirmed(&mut self, now: Time, peer: PeerId, confirmed: bool) {
        if let Some(t) = self.teardown.as_mut()
            && t.waiting.remove(&peer)
            && let Some(p) = t.exited.iter_mut().find(|p| p.id == peer)
        {
            p.confirmed = confirmed;
        }
        self.maybe_finish_teardown(now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::Kit;
    use crate::wire::{Body, ClientRequest, ExitReason, ReplyBody, RequestError};
    use std::time::Duration;

    #[test]
    fn teardown_tells_every_peer_to_exit_and_answers_once_they_confirmed() {
        let mut kit = Kit::with_ring(3);
        let seq = kit.request(ClientRequest::Teardown);
        let Ok(ReplyBody::Teardown { peers, exited }) = kit.reply(seq) else {
            panic!("no teardown reply");
        };
        assert_eq!(peers, 3);
        let names: Vec<(&str, bool)> = exited
            .iter()
            .map(|p| (p.name.as_str(), p.confirmed))
            .collect();
        assert_eq!(names, [("p0", true), ("p1", true), ("p2", true)]);
        for p in &kit.peers {
            assert!(p.exited, "{} was not told to exit", p.name);
            assert!(p.inbox.contains(&Body::Exit {
                reason: ExitReason::TearDown
            }));
        }
        assert_eq!(kit.m.peer_count(), 0);
        assert!(kit.m.ring().is_none());
    }

    /// A peer whose `Exit` has not reached it yet heartbeats: while the teardown retransmits
    /// the `Exit`, the manager does not answer it as unknown (it would register again and
    /// live on in the torn-down cluster: a CI failure at 10% loss). After the teardown gave
    /// up on it, a heartbeat or a registration from it is answered with the `Exit` again.
    #[test]
    fn a_peer_being_torn_down_is_never_invited_to_register_again() {
        use crate::wire::UNSEQUENCED;
        let mut kit = Kit::with_ring(2);
        kit.silent.insert("p1".into());
        let teardown = kit.request(ClientRequest::Teardown);
        let exits = |kit: &Kit| {
            let p1 = &kit.peers[1];
            let exit = Body::Exit {
                reason: ExitReason::TearDown,
            };
            p1.inbox.iter().filter(|b| **b == exit).count()
        };
        let unknown = |kit: &Kit| {
            kit.peers[1]
                .inbox
                .iter()
                .any(|b| matches!(b, Body::HeartbeatAck { known: false, .. }))
        };
        let sent = exits(&kit);
        kit.send_from_peer(
            1,
            UNSEQUENCED,
            Body::Heartbeat {
                epoch: 1,
                id: None,
                beat: None,
            },
        );
        kit.run();
        assert!(
            !unknown(&kit),
            "a peer being torn down was told it is unknown"
        );
        assert_eq!(exits(&kit), sent, "the Exit in flight was not doubled");
        kit.wait(Duration::from_secs(2));
        assert!(matches!(
            kit.reply(teardown),
            Ok(ReplyBody::Teardown { .. })
        ));
        let given_up = exits(&kit);
        kit.send_from_peer(
            1,
            UNSEQUENCED,
            Body::Heartbeat {
                epoch: 1,
                id: None,
                beat: None,
            },
        );
        kit.run();
        assert!(!unknown(&kit));
        assert_eq!(
            exits(&kit),
            given_up + 1,
            "no Exit after the teardown gave up"
        );
        kit.silent.remove("p1");
        kit.send_from_peer(
            1,
            99,
            Body::Register {
                name: "p1".into(),
                rejoin: None,
            },
        );
        // The Exit already on its way is retransmitted, not doubled.
        kit.wait(Duration::from_millis(100));
        assert!(kit.peers[1].exited, "p1 was not told to exit again");
        assert_eq!(kit.m.peer_count(), 0, "a torn-down peer registered again");
    }

    #[test]
    fn work_in_progress_is_answered_and_a_silent_peer_does_not_block_it() {
        let mut kit = Kit::with_ring(2);
        kit.silent.insert("p1".into());
        let query = kit.request(ClientRequest::Query {
            key: crate::record::RecordKey::Event(5),
            via: Some("p1".into()),
            routing: None,
        });
        let teardown = kit.request(ClientRequest::Teardown);
        assert_eq!(kit.reply(query), Err(RequestError::TornDown));
        kit.wait(Duration::from_secs(2));
        let Ok(ReplyBody::Teardown { peers, exited }) = kit.reply(teardown) else {
            panic!("no teardown reply");
        };
        assert_eq!(peers, 2);
        // The silent one is named as not confirmed.
        let names: Vec<(&str, bool)> = exited
            .iter()
            .map(|p| (p.name.as_str(), p.confirmed))
            .collect();
        assert_eq!(names, [("p0", true), ("p1", false)]);
        let during = kit.request(ClientRequest::Setup);
        assert_eq!(kit.reply(during), Err(RequestError::NoPeers));
    }
}
