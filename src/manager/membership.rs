//! Membership: forming the ring, and changing it one member at a time.
//!
//! A change (a join, a leave, a new course table size) is published as an unsettled view;
//! every member hands over what it no longer owns and reports; then a settled view follows
//! (without the leaver, who is told to exit). Every view carries a new epoch. A member that
//! cannot be reached is given up on, so one dead member cannot stall every later change.

use super::registry::Standing;
use super::{ClientCall, Manager, ManagerEvent, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::measure::Measure;
use crate::ring::{
    RingExt, first_prime_above, release_tokens, tokens_for_joiner, vnode_tokens, vnode_tokens_by,
};
use crate::wire::{
    Body, ExitReason, Member, PeerId, ReplyBody, RequestError, RingDelta, RingView, TraceContext,
};
use std::collections::BTreeSet;
use std::time::Duration;

#[derive(Debug, Clone)]
pub(super) enum Change {
    Join(PeerId),
    Leave(PeerId, Option<ClientCall>),
    /// The course placement's table size changes: every peer re-checks what it owns.
    Reshape {
        table_size: u64,
    },
    /// A member declared dead: the ring is rebuilt without it and its ranges repaired.
    Remove(PeerId),
    /// A restarted manager republishes the ring it rebuilt from its peers; members it did
    /// not hear from are left out (and repaired), a leave that was under way completes.
    Recover,
}

/// A census weighs shares only once it has this many rows per member: fewer say little about
/// where the next rows will hash.
pub(super) const CENSUS_ROWS_PER_MEMBER: u64 = 64;

pub(super) struct Transition {
    pub(super) epoch: u64,
    pub(super) change: Change,
    pub(super) waiting: BTreeSet<PeerId>,
    /// Members given up on: they never confirmed their hand-off.
    pub(super) unreachable: BTreeSet<PeerId>,
    pub(super) handed_over: u64,
    /// When the view is sent again to members that have not reported (a member that cannot
    /// be reached then gives up and is no longer waited for).
    pub(super) nudge_at: Time,
}

/// How long a membership change waits for hand-off reports before asking again.
const TRANSITION_NUDGE: Duration = Duration::from_secs(3);

impl Manager {
    /// How shares are weighed: by the census of the rows distributed, once it has enough rows
    /// for the ring's members, else by key space.
    pub(super) fn measure(&self) -> Measure {
        let members = self.ring.as_ref().map_or(0, |r| r.members.len()) as u64;
        if self.cfg.balance_by_data
            && self.census.total() >= CENSUS_ROWS_PER_MEMBER * members.max(1)
        {
            Measure::of(&self.census)
        } else {
            Measure::uniform()
        }
    }

    /// Whether the next distribute's file may place the tokens: a ring formed here that
    /// nothing was placed on, and no change on the way.
    pub(super) fn may_place_by_data(&self) -> bool {
        self.cfg.balance_by_data
            && self.cfg.placement == crate::wire::Placement::Consistent
            && self.fresh_ring
            && self.ring.is_some()
            && self.transition.is_none()
            && self.changes.is_empty()
    }

    /// Moves every member's tokens to cut the ring into equal numbers of the census's rows,
    /// as a settled view of its own: only ever on a ring that holds nothing yet (see
    /// [`Manager::may_place_by_data`]), so no row has to follow, and no hand-off round is
    /// needed (a member that did hold rows would still hand them on, as after any view).
    pub(super) fn place_by_census(&mut self, now: Time, trace: Option<TraceContext>) {
        let Some(mut view) = self.ring.clone() else {
            return;
        };
        let mut owners: Vec<&mut Member> = view.members.iter_mut().filter(|m| !m.leaving).collect();
        owners.sort_by_key(|m| m.id);
        let vnodes = self.cfg.vnodes as usize;
        let cuts = vnode_tokens_by(owners.len(), vnodes, &Measure::of(&self.census));
        for (m, tokens) in owners.into_iter().zip(cuts) {
            m.token = tokens[0];
            m.vnodes = tokens[1..].to_vec();
        }
        view.members.sort_by_key(|m| (m.token, m.id));
        view.epoch = self.new_epoch();
        view.settled = true;
        self.publish(now, view, trace);
    }

    pub(super) fn new_epoch(&mut self) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    pub(super) fn setup(&mut self, now: Time, call: ClientCall) {
        if self.ring.is_none() && self.gathering(now) {
            return self.defer_setup(call);
        }
        if self.ring.is_none() {
            let ids: Vec<PeerId> = self
                .registry
                .iter()
                .filter(|(_, p)| p.standing == Standing::Registered)
                .map(|(id, _)| id)
                .collect();
            if ids.is_empty() {
                return self.reply(now, &call, Err(RequestError::NoPeers));
            }
            let members = ids
                .iter()
                .zip(vnode_tokens(ids.len(), self.cfg.vnodes as usize))
                .filter_map(|(id, tokens)| {
                    let p = self.registry.get(*id)?;
                    Some(Member {
                        id: *id,
                        name: p.name.clone(),
                        addr: p.addr,
                        token: tokens[0],
                        leaving: false,
                        vnodes: tokens[1..].to_vec(),
                    })
                })
                .collect::<Vec<Member>>();
            for id in &ids {
                self.registry.set_standing(*id, Standing::InRing);
            }
            // A new ring holds nothing: the census of an earlier one's rows says nothing.
            self.fresh_ring = true;
            self.census = crate::measure::KeyCensus::default();
            let epoch = self.new_epoch();
            let view = RingView {
                epoch,
                settled: true,
                placement: self.cfg.placement,
                // The course's table size is fixed by the first distribute.
                table_size: first_prime_above(0),
                replication: self.cfg.replication,
                settled_epoch: 0,
                members,
            };
            self.publish(now, view, call.trace.clone());
        }
        // Answer once every member holds the ring, so that the first query after `setup`
        // cannot enter at a peer that does not know it yet.
        self.setups.push(call);
        self.release_ring_waiters(now);
    }

    /// Goes on with what waits for every member to hold the ring: `setup` answers, and a
    /// distribute whose first rows wait for the ring placed by their census.
    pub(super) fn release_ring_waiters(&mut self, now: Time) {
        // Every member must know the ring and its own id before the first query walks it.
        let delivering = self.link.has_pending_where(|t| {
            matches!(
                t,
                ManagerTag::ToPeer(_, PeerMessage::Ring | PeerMessage::Registered)
            )
        });
        if delivering {
            return;
        }
        self.on_placed_by_data(now);
        if self.setups.is_empty() {
            return;
        }
        for call in std::mem::take(&mut self.setups) {
            self.start_status(now, call, super::status::Gathering::Setup);
        }
    }

    /// The last member is gone: no ring until the next `setup`.
    fn clear_ring(&mut self, epoch: u64) {
        self.events.push(ManagerEvent::RingChanged {
            epoch,
            settled: true,
            members: 0,
        });
        self.ring = None;
        self.delta_base = None;
    }

    /// Makes `view` current and sends it to every member, naming the newest settled view.
    pub(super) fn publish(&mut self, now: Time, mut view: RingView, trace: Option<TraceContext>) {
        if view.settled {
            self.settled_epoch = view.epoch;
        }
        view.settled_epoch = self.settled_epoch;
        self.events.push(ManagerEvent::RingChanged {
            epoch: view.epoch,
            settled: view.settled,
            members: view.members.len(),
        });
        // Members that hold the base view (or will: it is retransmitted until acknowledged)
        // are sent only what changed.
        let delta = self
            .delta_base
            .take()
            .map(|(base, had)| (RingDelta::between(&base, &view), had));
        for m in &view.members {
            let body = match &delta {
                Some((delta, had)) if had.contains(&m.id) => Body::RingDelta(delta.clone()),
                _ => Body::Ring(view.clone()),
            };
            self.send(
                now,
                m.addr,
                body,
                trace.clone(),
                ManagerTag::ToPeer(m.id, PeerMessage::Ring),
            );
        }
        let members = view.members.iter().map(|m| m.id).collect();
        self.delta_base = Some((view.clone(), members));
        self.ring = Some(view);
    }

    pub(super) fn enqueue(&mut self, now: Time, change: Change) {
        self.changes.push_back(change);
        self.next_change(now);
    }

    pub(super) fn next_change(&mut self, now: Time) {
        while self.transition.is_none() {
            let Some(change) = self.changes.pop_front() else {
                return;
            };
            let Some(mut view) = self.ring.clone() else {
                return;
            };
            match &change {
                Change::Join(id) => {
                    let Some(p) = self.registry.get(*id) else {
                        continue;
                    };
                    if p.standing != Standing::Registered {
                        continue;
                    }
                    let (name, addr) = (p.name.clone(), p.addr);
                    self.registry.set_standing(*id, Standing::InRing);
                    let tokens =
                        tokens_for_joiner(&view.members, self.cfg.vnodes as usize, &self.measure());
                    view.members.push(Member {
                        id: *id,
                        name,
                        addr,
                        token: tokens[0],
                        leaving: false,
                        vnodes: tokens[1..].to_vec(),
                    });
                    view.members.sort_by_key(|m| (m.token, m.id));
                }
                Change::Leave(id, _) => {
                    release_tokens(&mut view, *id, &self.measure());
                    let Some(m) = view.members.iter_mut().find(|m| m.id == *id) else {
                        continue;
                    };
                    m.leaving = true;
                    self.registry.set_standing(*id, Standing::Leaving);
                }
                Change::Reshape { table_size } => view.table_size = *table_size,
                Change::Remove(id) => {
                    if view.member(*id).is_none() {
                        continue;
                    }
                    view.members.retain(|m| m.id != *id);
                    if view.members.is_empty() {
                        self.clear_ring(self.last_epoch);
                        continue;
                    }
                }
                Change::Recover => {}
            }
            view.epoch = self.new_epoch();
            view.settled = false;
            let waiting = view.members.iter().map(|m| m.id).collect();
            // A leave requested by stormctl continues its trace through the hand-off.
            let trace = match &change {
                Change::Leave(_, Some(call)) => call.trace.clone(),
                _ => None,
            };
            self.transition = Some(Transition {
                epoch: view.epoch,
                change,
                waiting,
                unreachable: BTreeSet::new(),
                handed_over: 0,
                nudge_at: now + TRANSITION_NUDGE,
            });
            self.publish(now, view, trace);
        }
    }

    pub(super) fn on_rebalance_done(
        &mut self,
        now: Time,
        peer: Option<PeerId>,
        epoch: u64,
        handed_over: u64,
    ) {
        let Some(id) = peer else { return };
        let Some(t) = self.transition.as_mut() else {
            return;
        };
        if t.epoch != epoch {
            return; // a report for a view that has since been replaced
        }
        if t.waiting.remove(&id) {
            t.handed_over += handed_over;
        }
        if t.waiting.is_empty() {
            self.finish_transition(now);
        }
    }

    /// Sends the current view again to members that have not reported their hand-off: their
    /// report may have been lost with a crash, or they may be gone (then the send gives up and
    /// they are no longer waited for).
    pub(super) fn nudge_transition(&mut self, now: Time) {
        let Some(t) = self.transition.as_mut().filter(|t| t.nudge_at <= now) else {
            return;
        };
        t.nudge_at = now + TRANSITION_NUDGE;
        let waiting: Vec<PeerId> = t.waiting.iter().copied().collect();
        let Some(view) = self.ring.clone() else {
            return;
        };
        for id in waiting {
            if self.link.has_pending_where(
                |tag| matches!(tag, ManagerTag::ToPeer(p, PeerMessage::Ring) if *p == id),
            ) {
                continue; // still being retransmitted
            }
            if let Some(m) = view.members.iter().find(|m| m.id == id) {
                let addr = m.addr;
                self.send(
                    now,
                    addr,
                    Body::Ring(view.clone()),
                    None,
                    ManagerTag::ToPeer(id, PeerMessage::Ring),
                );
            }
        }
    }

    pub(super) fn finish_transition(&mut self, now: Time) {
        let Some(t) = self.transition.take() else {
            return;
        };
        let Some(mut view) = self.ring.clone() else {
            return;
        };
        if let Change::Remove(id) = &t.change {
            view.members.retain(|m| m.id != *id);
        }
        if let Change::Recover = &t.change {
            // A leave the old manager had begun: its hand-off is done now.
            let leavers: Vec<PeerId> = view
                .members
                .iter()
                .filter(|m| m.leaving)
                .map(|m| m.id)
                .collect();
            for id in leavers {
                view.members.retain(|m| m.id != id);
                if let Some(p) = self.registry.remove(id) {
                    self.unwatch(id);
                    let exit = Body::Exit {
                        reason: ExitReason::Left,
                    };
                    self.send(now, p.addr, exit, None, ManagerTag::Exit { peer: id });
                    self.events
                        .push(ManagerEvent::PeerLeft { id, name: p.name });
                }
            }
        }
        if let Change::Leave(id, call) = &t.change {
            view.members.retain(|m| m.id != *id);
            self.unwatch(*id);
            if let Some(p) = self.registry.remove(*id) {
                self.send(
                    now,
                    p.addr,
                    Body::Exit {
                        reason: ExitReason::Left,
                    },
                    None,
                    ManagerTag::Exit { peer: *id },
                );
                self.events.push(ManagerEvent::PeerLeft {
                    id: *id,
                    name: p.name.clone(),
                });
                if let Some(call) = call {
                    let result = if t.unreachable.contains(id) {
                        Err(RequestError::PeerLost {
                            id: *id,
                            name: p.name,
                        })
                    } else {
                        Ok(ReplyBody::Leave {
                            id: *id,
                            name: p.name,
                            handed_over: t.handed_over,
                        })
                    };
                    self.reply(now, call, result);
                }
            }
        }
        view.epoch = self.new_epoch();
        view.settled = true;
        if view.members.is_empty() {
            self.clear_ring(view.epoch);
        } else {
            self.publish(now, view, None);
        }
        self.next_change(now);
    }

    /// Takes a dead member out of the ring. A change under way is folded into a new view
    /// without it at once (the change could otherwise wait forever on copies to the dead);
    /// a leave of its own ends there, its client told what may be lost.
    pub(super) fn remove_from_ring(&mut self, now: Time, id: PeerId, lost: RequestError) {
        let (Some(t), Some(ring)) = (self.transition.as_mut(), self.ring.clone()) else {
            self.changes.push_front(Change::Remove(id));
            return self.next_change(now);
        };
        let mut asked = None;
        if let Change::Leave(l, call) = &mut t.change
            && *l == id
        {
            asked = call.take();
            t.change = Change::Remove(id);
        }
        if let Some(call) = asked {
            self.reply(now, &call, Err(lost));
        }
        let mut view = ring;
        view.members.retain(|m| m.id != id);
        if view.members.is_empty() {
            self.transition = None;
            self.clear_ring(self.last_epoch);
            return self.next_change(now);
        }
        view.epoch = self.new_epoch();
        view.settled = false;
        if let Some(t) = self.transition.as_mut() {
            t.epoch = view.epoch;
            t.waiting = view.members.iter().map(|m| m.id).collect();
            t.unreachable.insert(id);
            t.nudge_at = now + TRANSITION_NUDGE;
        }
        self.publish(now, view, None);
    }

    pub(super) fn begin_leave(&mut self, now: Time, id: PeerId, call: Option<ClientCall>) {
        let Some(p) = self.registry.get(id) else {
            return;
        };
        let name = p.name.clone();
        match p.standing {
            Standing::Registered => {
                // Not in the ring: it holds nothing.
                if let Some(p) = self.registry.remove(id) {
                    self.send(
                        now,
                        p.addr,
                        Body::Exit {
                            reason: ExitReason::LeftBeforeJoining,
                        },
                        None,
                        ManagerTag::Exit { peer: id },
                    );
                    self.events.push(ManagerEvent::PeerLeft {
                        id,
                        name: name.clone(),
                    });
                    if let Some(call) = call {
                        self.reply(
                            now,
                            &call,
                            Ok(ReplyBody::Leave {
                                id,
                                name,
                                handed_over: 0,
                            }),
                        );
                    }
                }
            }
            Standing::Leaving => {
                if let Some(call) = call {
                    self.reply(now, &call, Err(RequestError::AlreadyLeaving { name }));
                }
            }
            Standing::InRing => {
                let queued = self
                    .changes
                    .iter()
                    .any(|c| matches!(c, Change::Leave(l, _) if *l == id));
                if queued {
                    if let Some(call) = call {
                        self.reply(now, &call, Err(RequestError::AlreadyLeaving { name }));
                    }
                } else {
                    self.enqueue(now, Change::Leave(id, call));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::Kit;
    use crate::ring::RingExt;
    use crate::wire::{
        Body, ClientRequest, ExitReason, Placement, ReplyBody, RequestError, UNSEQUENCED,
    };
    use std::time::Duration;

    #[test]
    fn setup_forms_one_settled_ring_with_even_shares() {
        let mut kit = Kit::with_ring(4);
        let ring = kit.m.ring().cloned().expect("a ring");
        assert!(ring.settled);
        assert_eq!(ring.epoch, 1);
        assert_eq!(ring.members.len(), 4);
        for (_, share) in ring.shares() {
            assert!((share - 0.25).abs() < 1e-6);
        }
        // Every peer holds that very view; a second setup changes nothing.
        assert!(kit.peers.iter().all(|p| p.ring.as_ref() == Some(&ring)));
        let again = kit.request(ClientRequest::Setup);
        assert!(matches!(kit.reply(again), Ok(ReplyBody::Setup(_))));
        assert_eq!(kit.m.ring().map(|r| r.epoch), Some(1));
    }

    #[test]
    fn setup_without_peers_says_so() {
        let mut kit = Kit::new(Placement::Consistent);
        let seq = kit.request(ClientRequest::Setup);
        assert_eq!(kit.reply(seq), Err(RequestError::NoPeers));
    }

    #[test]
    fn a_join_is_published_unsettled_then_settled_with_new_epochs() {
        let mut kit = Kit::with_ring(3);
        kit.add_peer("late");
        let epochs = |name: &str| -> Vec<(u64, bool, usize, bool)> {
            let views = kit.peer(name).views().into_iter();
            views
                .map(|(v, delta)| (v.epoch, v.settled, v.members.len(), delta))
                .collect()
        };
        // The joiner holds no view: it is sent them whole, then what changed.
        assert_eq!(
            epochs("late"),
            vec![(2, false, 4, false), (3, true, 4, true)]
        );
        // The members were sent the setup whole, then only what changed.
        assert_eq!(
            epochs("p0"),
            vec![(1, true, 3, false), (2, false, 4, true), (3, true, 4, true)]
        );
        let ring = kit.m.ring().cloned();
        assert!(kit.peers.iter().all(|p| p.ring == ring));
        // The settling delta carries no member at all; the join's, the joiner alone.
        let deltas: Vec<(usize, usize)> = (kit.peer("p0").inbox.iter())
            .filter_map(|b| match b {
                Body::RingDelta(d) => Some((d.changed.len(), d.removed.len())),
                _ => None,
            })
            .collect();
        assert_eq!(deltas, vec![(1, 0), (0, 0)]);
    }

    /// A member whose heartbeat names an older view than the ring's (it missed one, or
    /// dropped a delta it could not apply) is sent the whole current view: a delta would name
    /// a base it may not hold. A restarted manager, which does not know what its members
    /// hold, publishes whole views too.
    #[test]
    fn a_member_behind_the_ring_or_a_new_manager_sends_the_whole_view() {
        let mut kit = Kit::with_ring(3);
        kit.add_peer("late");
        let p0 = kit.peer("p0").id;
        let before = kit.peer("p0").inbox.len();
        kit.send_from_peer(
            0,
            UNSEQUENCED,
            Body::Heartbeat {
                epoch: 1,
                id: p0,
                beat: Some(1),
            },
        );
        kit.run();
        let views = |kit: &Kit, from: usize| -> Vec<Body> {
            let inbox = kit.peer("p0").inbox[from..].iter();
            inbox
                .filter(|b| matches!(b, Body::Ring(_) | Body::RingDelta(_)))
                .cloned()
                .collect()
        };
        let sent = views(&kit, before);
        assert!(
            matches!(sent.as_slice(), [Body::Ring(v)] if v.epoch == 3 && v.settled),
            "{sent:?}"
        );
        assert!(kit.peers.iter().all(|p| p.deltas_refused == 0));
        // The answer echoes the heartbeat's number (the peer tells a stale answer by it).
        assert!(
            kit.peer("p0").inbox[before..].iter().any(|b| matches!(
                b,
                Body::HeartbeatAck {
                    known: true,
                    beat: Some(1),
                    ..
                }
            )),
            "no answer echoing heartbeat 1"
        );
        // Heartbeats at the ring's epoch change nothing.
        let before = kit.peer("p0").inbox.len();
        kit.send_from_peer(
            0,
            UNSEQUENCED,
            Body::Heartbeat {
                epoch: 3,
                id: p0,
                beat: Some(2),
            },
        );
        kit.run();
        assert_eq!(views(&kit, before), vec![]);
    }

    #[test]
    fn a_leave_marks_the_leaver_then_drops_it_and_tells_it_to_exit() {
        let mut kit = Kit::with_ring(3);
        let seq = kit.request(ClientRequest::Leave { name: "p1".into() });
        match kit.reply(seq) {
            Ok(ReplyBody::Leave { name, .. }) => assert_eq!(name, "p1"),
            other => panic!("{other:?}"),
        }
        let leaver = kit.peer("p1");
        let views: Vec<(bool, bool, bool)> = (leaver.views().into_iter())
            .map(|(v, delta)| {
                let leaving = v.members.iter().any(|m| m.name == "p1" && m.leaving);
                (v.settled, leaving, delta)
            })
            .collect();
        assert_eq!(views, vec![(true, false, false), (false, true, true)]);
        assert!(leaver.inbox.contains(&Body::Exit {
            reason: ExitReason::Left
        }));
        let ring = kit.m.ring().cloned().unwrap();
        assert!(ring.settled && ring.members.iter().all(|m| m.name != "p1"));
        assert_eq!(kit.m.peer_count(), 2);
    }

    #[test]
    fn leaving_twice_or_an_unknown_peer_is_a_clear_error() {
        let mut kit = Kit::with_ring(3);
        kit.silent.insert("p2".into());
        let first = kit.request(ClientRequest::Leave { name: "p2".into() });
        let second = kit.request(ClientRequest::Leave { name: "p2".into() });
        assert_eq!(
            kit.reply(second),
            Err(RequestError::AlreadyLeaving { name: "p2".into() })
        );
        let unknown = kit.request(ClientRequest::Leave {
            name: "nobody".into(),
        });
        assert_eq!(
            kit.reply(unknown),
            Err(RequestError::NoSuchPeer {
                name: "nobody".into()
            })
        );
        // The silent leaver is given up on: the change completes, and says what was lost.
        kit.wait(Duration::from_secs(10));
        assert!(matches!(
            kit.reply(first),
            Err(RequestError::PeerLost { .. })
        ));
        assert!(
            kit.m
                .ring()
                .is_some_and(|r| r.settled && r.members.len() == 2)
        );
    }
}
