//! Reliable delivery over UDP, sans-IO: sequence numbers, acknowledgements, retransmission with
//! exponential backoff, and duplicate suppression.
//!
//! A [`Link`] belongs to one node. Every sequenced message it sends stays pending until the
//! receiver's `Ack` (or `Reject`) comes back; [`Link::handle_timeout`] retransmits what is due
//! and gives up after the configured number of attempts. On the receiving side
//! [`Link::accept`] acknowledges every sequenced datagram, including duplicates (the earlier
//! ack may have been lost), but reports only the first copy as new, so handlers run once.

use crate::wire::{Body, Counters, Envelope, RejectReason, TraceContext, UNSEQUENCED, WireError};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

/// Time as the protocol core sees it: the time since some fixed start, handed in by the driver.
pub type Time = Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// Attempts in all, the first send included. `None` retries until acknowledged.
    pub attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            attempts: Some(8),
        }
    }
}

impl RetryPolicy {
    pub fn forever(self) -> Self {
        RetryPolicy {
            attempts: None,
            ..self
        }
    }

    /// The same backoff, giving up after at most `attempts`.
    pub fn at_most(self, attempts: u32) -> Self {
        RetryPolicy {
            attempts: Some(self.attempts.map_or(attempts, |a| a.min(attempts))),
            ..self
        }
    }

    fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Datagrams the driver dropped since it last told the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Did not decode.
    pub undecodable: u64,
    /// Had no valid cluster-key tag.
    pub unauthenticated: u64,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.undecodable == 0 && self.unauthenticated == 0
    }
}

/// A datagram ready to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dest: SocketAddr,
    pub bytes: Vec<u8>,
}

/// What became of a pending message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    Acked {
        tag: T,
        new_rows: Option<u32>,
    },
    Rejected {
        tag: T,
        reason: RejectReason,
    },
    GaveUp {
        tag: T,
        dest: SocketAddr,
        attempts: u32,
    },
}

struct Pending<T> {
    dest: SocketAddr,
    bytes: Vec<u8>,
    attempts: u32,
    due: Time,
    policy: RetryPolicy,
    tag: T,
}

/// Which sequence numbers of one sender have been seen: all up to `floor`, plus a set above
/// it. A sender numbers everything it sends in one sequence, so a receiver sees only its share
/// of the numbers: the set is where most of them live, and the floor moves only when the
/// numbers are contiguous.
#[derive(Default)]
struct SeenWindow {
    floor: u64,
    above: HashSet<u64>,
    /// The numbers of `above` in the order they arrived, to forget the oldest first.
    arrived: VecDeque<u64>,
    last_heard: Time,
}

/// How many sequence numbers above the floor are remembered per sender (the oldest is then
/// forgotten, and a retransmission of it would be handled again: every handler is
/// idempotent); and how many senders are remembered.
const SEEN_ABOVE_LIMIT: usize = 4096;
const SENDERS_LIMIT: usize = 4096;

impl SeenWindow {
    /// True the first time `seq` is seen.
    fn insert(&mut self, seq: u64) -> bool {
        if seq <= self.floor || !self.above.insert(seq) {
            return false;
        }
        self.arrived.push_back(seq);
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        // Forget the oldest rather than raise the floor over numbers never seen: a message
        // still being retransmitted from below a raised floor would be acknowledged as a
        // duplicate and never handled (a store counted but not kept, a reply never read).
        while self.arrived.len() > SEEN_ABOVE_LIMIT {
            if let Some(oldest) = self.arrived.pop_front() {
                self.above.remove(&oldest);
            }
        }
        true
    }
}

/// Whether an incoming datagram should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// First copy: handle it.
    New,
    /// A copy of something already handled: it was acknowledged again, do nothing else.
    Duplicate,
    /// An ack or rejection, already applied to the pending set.
    Control,
}

pub struct Link<T> {
    incarnation: u64,
    next_seq: u64,
    policy: RetryPolicy,
    pending: BTreeMap<u64, Pending<T>>,
    seen: HashMap<u64, SeenWindow>,
    outbox: VecDeque<Transmit>,
    /// Acks leave after everything else an input produced: a forwarded query's answer goes
    /// to the client before the ack goes back to the forwarder (on one CPU, sending the ack
    /// first woke the forwarder, which then ran before the answer was sent).
    acks: VecDeque<Transmit>,
    outcomes: VecDeque<Outcome<T>>,
    counters: Counters,
}

impl<T> Link<T> {
    pub fn new(incarnation: u64, policy: RetryPolicy) -> Self {
        Link {
            incarnation,
            next_seq: 1,
            policy,
            pending: BTreeMap::new(),
            seen: HashMap::new(),
            outbox: VecDeque::new(),
            acks: VecDeque::new(),
            outcomes: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The driver saw a datagram that did not decode.
    /// The driver dropped datagrams before they reached the protocol.
    pub fn note_dropped(&mut self, dropped: Dropped) {
        self.counters.bad_datagrams += dropped.undecodable;
        self.counters.unauthenticated += dropped.unauthenticated;
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Sends `body` reliably with the default policy; returns its sequence number.
    pub fn send(
        &mut self,
        now: Time,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
        tag: T,
    ) -> Result<u64, WireError> {
        self.send_with(now, dest, body, trace, tag, self.policy)
    }

    pub fn send_with(
        &mut self,
        now: Time,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
        tag: T,
        policy: RetryPolicy,
    ) -> Result<u64, WireError> {
        debug_assert!(body.is_sequenced());
        let seq = self.next_seq;
        let bytes = Envelope::new(self.incarnation, seq, trace, body).encode()?;
        self.next_seq += 1;
        self.outbox.push_back(Transmit {
            dest,
            bytes: bytes.clone(),
        });
        self.pending.insert(
            seq,
            Pending {
                dest,
                bytes,
                attempts: 1,
                due: now + policy.delay(1),
                policy,
                tag,
            },
        );
        Ok(seq)
    }

    /// Sends an unsequenced message (ack or rejection) once.
    pub fn send_unsequenced(&mut self, dest: SocketAddr, body: Body) {
        // An ack or a rejection is a few dozen bytes; encoding cannot exceed the limit.
        let _ = self.send_once(dest, body, None);
    }

    /// Sends an unsequenced message once, with its trace context: a lookup or its answer,
    /// which the client retries itself.
    pub fn send_once(
        &mut self,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
    ) -> Result<(), WireError> {
        debug_assert!(!body.is_sequenced());
        let bytes = Envelope::new(self.incarnation, UNSEQUENCED, trace, body).encode()?;
        self.outbox.push_back(Transmit { dest, bytes });
        Ok(())
    }

    /// Refuses a sequenced message for good: the sender stops retransmitting and learns why.
    pub fn reject(&mut self, dest: SocketAddr, seq: u64, reason: RejectReason) {
        self.send_unsequenced(dest, Body::Reject { seq, reason });
    }

    /// Applies acks and rejections; acknowledges and deduplicates everything else. A `Store` is
    /// the exception: the caller acknowledges it with [`Link::ack`], with how many of its rows
    /// were new (for a duplicate: the count it gave the first time).
    pub fn accept(&mut self, now: Time, from: SocketAddr, envelope: &Envelope) -> Accepted {
        match &envelope.body {
            Body::Ack { seq, new_rows } => {
                if let Some(p) = self.pending.remove(seq) {
                    self.outcomes.push_back(Outcome::Acked {
                        tag: p.tag,
                        new_rows: *new_rows,
                    });
                }
                Accepted::Control
            }
            Body::Reject { seq, reason } => {
                if let Some(p) = self.pending.remove(seq) {
                    self.outcomes.push_back(Outcome::Rejected {
                        tag: p.tag,
                        reason: reason.clone(),
                    });
                }
                Accepted::Control
            }
            // The failure detector's messages: neither acknowledged nor deduplicated.
            body if !body.is_sequenced() => Accepted::New,
            _ => {
                let first = self.mark_seen(now, envelope.from, envelope.seq);
                if !matches!(envelope.body, Body::Store(_)) {
                    self.ack(from, envelope.seq, None);
                }
                if first {
                    Accepted::New
                } else {
                    self.counters.duplicates += 1;
                    Accepted::Duplicate
                }
            }
        }
    }

    /// Acknowledges `seq` (used for `Store`, whose ack carries how many rows were new).
    pub fn ack(&mut self, dest: SocketAddr, seq: u64, new_rows: Option<u32>) {
        let body = Body::Ack { seq, new_rows };
        // A few dozen bytes: encoding cannot exceed the limit.
        if let Ok(bytes) = Envelope::new(self.incarnation, UNSEQUENCED, None, body).encode() {
            self.acks.push_back(Transmit { dest, bytes });
        }
    }

    /// True if `envelope` is a sequenced message already handled (without recording anything).
    pub fn is_duplicate(&self, envelope: &Envelope) -> bool {
        envelope.body.is_sequenced()
            && self
                .seen
                .get(&envelope.from)
                .is_some_and(|w| envelope.seq <= w.floor || w.above.contains(&envelope.seq))
    }

    fn mark_seen(&mut self, now: Time, sender: u64, seq: u64) -> bool {
        if !self.seen.contains_key(&sender) && self.seen.len() >= SENDERS_LIMIT {
            // Forget the sender heard from least recently; its retransmissions are long over.
            if let Some(oldest) = self
                .seen
                .iter()
                .min_by_key(|(_, w)| w.last_heard)
                .map(|(k, _)| *k)
            {
                self.seen.remove(&oldest);
            }
        }
        let window = self.seen.entry(sender).or_default();
        window.last_heard = now;
        window.insert(seq)
    }

    /// Forgets a pending message without an outcome (e.g. its purpose is gone).
    pub fn cancel(&mut self, seq: u64) -> Option<T> {
        self.pending.remove(&seq).map(|p| p.tag)
    }

    /// Forgets every pending message whose tag matches.
    pub fn cancel_where(&mut self, mut f: impl FnMut(&T) -> bool) {
        self.pending.retain(|_, p| !f(&p.tag));
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn has_pending_where(&self, mut f: impl FnMut(&T) -> bool) -> bool {
        self.pending.values().any(|p| f(&p.tag))
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        self.pending.values().map(|p| p.due).min()
    }

    /// Retransmits what is due; gives up on what has used all its attempts.
    pub fn handle_timeout(&mut self, now: Time) {
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            let Some(p) = self.pending.get_mut(&seq) else {
                continue;
            };
            if p.policy.attempts.is_some_and(|max| p.attempts >= max) {
                if let Some(p) = self.pending.remove(&seq) {
                    self.outcomes.push_back(Outcome::GaveUp {
                        tag: p.tag,
                        dest: p.dest,
                        attempts: p.attempts,
                    });
                }
                continue;
            }
            p.attempts += 1;
            p.due = now + p.policy.delay(p.attempts);
            self.counters.retransmits += 1;
            self.outbox.push_back(Transmit {
                dest: p.dest,
                bytes: p.bytes.clone(),
            });
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front().or_else(|| self.acks.pop_front())
    }

    pub fn poll_outcome(&mut self) -> Option<Outcome<T>> {
        self.outcomes.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn at_most_caps_the_attempts_and_keeps_the_backoff() {
        let p = RetryPolicy::default();
        assert_eq!(p.at_most(3).attempts, Some(3));
        assert_eq!(p.at_most(3).initial, p.initial);
        assert_eq!(p.forever().at_most(3).attempts, Some(3));
        let two = RetryPolicy {
            attempts: Some(2),
            ..p
        };
        assert_eq!(two.at_most(3).attempts, Some(2));
    }

    fn ms(n: u64) -> Time {
        Duration::from_millis(n)
    }

    fn deliver<T>(from: &mut Link<T>, to: &mut Link<T>, now: Time) -> Vec<(Envelope, Accepted)> {
        let mut got = Vec::new();
        while let Some(t) = from.poll_transmit() {
            let env = Envelope::decode(&t.bytes).unwrap();
            let a = to.accept(now, addr(1), &env);
            got.push((env, a));
        }
        got
    }

    #[test]
    fn ack_clears_pending_and_reports_the_tag() {
        let mut a: Link<&str> = Link::new(1, RetryPolicy::default());
        let mut b: Link<&str> = Link::new(2, RetryPolicy::default());
        a.send(ms(0), addr(2), Body::LeaveRequest, None, "leave")
            .unwrap();
        assert_eq!(deliver(&mut a, &mut b, ms(0))[0].1, Accepted::New);
        deliver(&mut b, &mut a, ms(1));
        assert_eq!(a.pending_len(), 0);
        assert_eq!(
            a.poll_outcome(),
            Some(Outcome::Acked {
                tag: "leave",
                new_rows: None
            })
        );
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn lost_datagram_is_retransmitted_with_backoff_then_given_up() {
        let policy = RetryPolicy {
            initial: ms(100),
            max: ms(250),
            attempts: Some(4),
        };
        let mut a: Link<u8> = Link::new(1, policy);
        a.send(ms(0), addr(2), Body::LeaveRequest, None, 7).unwrap();
        assert!(a.poll_transmit().is_some());
        // Due at 100, then +200, then +250 (capped).
        assert_eq!(a.poll_timeout(), Some(ms(100)));
        a.handle_timeout(ms(99));
        assert!(a.poll_transmit().is_none());
        a.handle_timeout(ms(100));
        assert!(a.poll_transmit().is_some());
        assert_eq!(a.poll_timeout(), Some(ms(300)));
        a.handle_timeout(ms(300));
        assert!(a.poll_transmit().is_some());
        assert_eq!(a.poll_timeout(), Some(ms(550)));
        a.handle_timeout(ms(550));
        assert!(a.poll_transmit().is_some());
        a.handle_timeout(ms(800));
        assert!(a.poll_transmit().is_none());
        assert_eq!(
            a.poll_outcome(),
            Some(Outcome::GaveUp {
                tag: 7,
                dest: addr(2),
                attempts: 4
            })
        );
    }

    #[test]
    fn duplicates_are_acked_again_but_handled_once() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default());
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        a.send(ms(0), addr(2), Body::LeaveRequest, None, 0).unwrap();
        let first = a.poll_transmit().unwrap();
        let env = Envelope::decode(&first.bytes).unwrap();
        assert_eq!(b.accept(ms(0), addr(1), &env), Accepted::New);
        assert_eq!(b.accept(ms(1), addr(1), &env), Accepted::Duplicate);
        // Both copies were acknowledged.
        assert_eq!(std::iter::from_fn(|| b.poll_transmit()).count(), 2);
    }

    #[test]
    fn what_a_datagram_produced_leaves_before_its_ack() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default());
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        a.send(ms(0), addr(2), Body::LeaveRequest, None, 0).unwrap();
        let env = Envelope::decode(&a.poll_transmit().unwrap().bytes).unwrap();
        assert_eq!(b.accept(ms(0), addr(1), &env), Accepted::New);
        // The handler's answer, queued after the ack was.
        b.send_once(addr(3), Body::Answers(Vec::new()), None)
            .unwrap();
        let out: Vec<Transmit> = std::iter::from_fn(|| b.poll_transmit()).collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].dest, addr(3));
        assert_eq!(out[1].dest, addr(1));
        let ack = Envelope::decode(&out[1].bytes).unwrap();
        assert!(matches!(ack.body, Body::Ack { seq, .. } if seq == env.seq));
    }

    #[test]
    fn reordered_sequence_numbers_are_each_new_once() {
        let mut w = SeenWindow::default();
        for seq in [3, 1, 5, 2, 4] {
            assert!(w.insert(seq));
        }
        assert_eq!(w.floor, 5);
        assert!(w.above.is_empty());
        for seq in 1..=5 {
            assert!(!w.insert(seq));
        }
    }

    #[test]
    fn a_new_incarnation_is_a_new_sender() {
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        let e1 = Envelope::new(10, 1, None, Body::LeaveRequest);
        let e2 = Envelope::new(11, 1, None, Body::LeaveRequest);
        assert_eq!(b.accept(ms(0), addr(1), &e1), Accepted::New);
        assert_eq!(b.accept(ms(0), addr(1), &e2), Accepted::New);
    }

    #[test]
    fn the_seen_window_is_bounded() {
        let mut w = SeenWindow::default();
        for seq in (2..).step_by(2).take(SEEN_ABOVE_LIMIT + 10) {
            w.insert(seq);
        }
        assert!(w.above.len() <= SEEN_ABOVE_LIMIT);
    }

    /// A receiver sees every fifth number of a sender talking to five peers. A message
    /// retransmitted after thousands of newer ones is still handled, never taken for a
    /// duplicate of a number this receiver never saw.
    #[test]
    fn a_late_retransmission_among_sparse_numbers_is_handled() {
        let mut w = SeenWindow::default();
        let late = 3; // never sent to this receiver, or lost until now
        for seq in (2..).step_by(5).take(3 * SEEN_ABOVE_LIMIT) {
            assert!(w.insert(seq));
        }
        assert!(w.insert(late), "a number never seen is new");
        assert!(!w.insert(late), "and seen once it is");
        assert!(
            !w.insert(2 + 5 * (3 * SEEN_ABOVE_LIMIT as u64 - 1)),
            "recent ones are"
        );
    }

    #[test]
    fn rejection_ends_retransmission_with_the_reason() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default());
        let seq = a.send(ms(0), addr(2), Body::LeaveRequest, None, 1).unwrap();
        a.poll_transmit();
        let rej = Envelope::new(
            2,
            UNSEQUENCED,
            None,
            Body::Reject {
                seq,
                reason: RejectReason::NotRegistered,
            },
        );
        assert_eq!(a.accept(ms(1), addr(2), &rej), Accepted::Control);
        assert_eq!(
            a.poll_outcome(),
            Some(Outcome::Rejected {
                tag: 1,
                reason: RejectReason::NotRegistered
            })
        );
        assert_eq!(a.poll_timeout(), None);
    }
}
