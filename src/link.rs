//! Reliable delivery over UDP, sans-IO: sequence numbers, acknowledgements, retransmission with
//! exponential backoff, and duplicate suppression.
//!
//! A [`Link`] belongs to one node. Every sequenced message it sends stays pending until the
//! receiver's `Ack` (or `Reject`) comes back; [`Link::handle_timeout`] retransmits what is due
//! and gives up after the configured number of attempts. On the receiving side
//! [`Link::accept`] acknowledges every sequenced datagram, including duplicates (the earlier
//! ack may have been lost), but reports only the first copy as new, so handlers run once.

use crate::wire::{
    Body, Counters, Envelope, FindEvent, FindResult, MAX_MESSAGE, MAX_UDP_PAYLOAD, RejectReason,
    TraceContext, UNSEQUENCED, WireError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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
    /// The datagram, or the fragments of a message too large for one.
    pieces: Pieces,
    attempts: u32,
    due: Time,
    policy: RetryPolicy,
    tag: T,
}

/// One datagram of a pending message: the whole message under its own sequence number, or one
/// fragment of it under the fragment's.
struct Piece {
    seq: u64,
    bytes: Vec<u8>,
    acked: bool,
}

/// A pending message's datagrams: nearly always one, kept without a list of its own (a query
/// hop's send allocated one).
enum Pieces {
    One(Piece),
    Fragments(Vec<Piece>),
}

impl Pieces {
    fn as_slice(&self) -> &[Piece] {
        match self {
            Pieces::One(piece) => std::slice::from_ref(piece),
            Pieces::Fragments(pieces) => pieces,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Piece] {
        match self {
            Pieces::One(piece) => std::slice::from_mut(piece),
            Pieces::Fragments(pieces) => pieces,
        }
    }
}

/// The longest the ack of a query hop waits for others to the same node (see
/// [`Link::accept`]); an eighth of the link's first retransmission delay when that is shorter,
/// so that a hop's sender never retransmits a hop whose ack is only waiting.
const ACK_DELAY_MAX: Duration = Duration::from_millis(5);

/// Held-back acks that leave at once, together, rather than wait longer: one datagram of
/// them stays a few KB.
const HELD_ACKS_LIMIT: usize = 256;

/// What a fragment's envelope and body take besides its bytes (measured: under 60 bytes).
const FRAGMENT_OVERHEAD: usize = 128;

/// Bounds on what fragments from others may make this node hold: messages being put
/// together (in all, and per sender) and the bytes they may take once whole. A fragment that
/// would start one more message past them is not acknowledged: its sender sends it again
/// later, once others are done (admission, not eviction: a message dropped after its
/// fragments were acknowledged would cost its sender a full resend).
const PARTIALS_LIMIT: usize = 64;
const PARTIALS_PER_SENDER: usize = 4;
const PARTIAL_BYTES_LIMIT: usize = 4 * MAX_MESSAGE;
/// The most fragments a message may have (the smallest `max_datagram` still fits
/// [`MAX_MESSAGE`] in fewer).
const MAX_FRAGMENTS: u32 = 8_192;
/// A message none of whose fragments came for this long is forgotten (its sender
/// retransmits at least every 2 s with the default policy, or has given up).
const PARTIAL_TTL: Duration = Duration::from_secs(10);

/// What becomes of the first fragment of a message.
enum Admission {
    Admitted,
    /// Not now (too much is being put together): not acknowledged, sent again later.
    Later,
    /// Never (it contradicts itself).
    Broken,
}

/// A message from another node, arriving in fragments.
struct Partial {
    parts: Vec<Option<Vec<u8>>>,
    received: usize,
    /// The size of every fragment but the last (all are cut alike).
    chunk: usize,
    /// What the whole may take: `chunk` × the fragment count.
    reserved: usize,
    touched: Time,
}

/// Which sequence numbers of one sender have been seen: all up to `floor`, then a bitmap of
/// the most recent span of numbers, one bit each. A sender numbers everything it sends in one
/// sequence, so a receiver sees only its share of the numbers and the floor moves only where
/// they are contiguous; but they come nearly in order, so the bitmap answers "seen?" with one
/// word, where a set of numbers took a hash, an insert and an eviction on every sequenced
/// datagram (a tenth of a forwarded query's CPU at the peer that received it), and as much
/// memory as 4,096 numbers take.
///
/// The bitmap covers [`SEEN_SPAN`] numbers up to the highest seen: more than any sender sends
/// in its first retransmission interval, so a retransmission is recognised. Numbers the span
/// has moved past are forgotten, not taken as seen: one still being retransmitted from below
/// it is handled again (every handler is idempotent), never acknowledged as a duplicate and
/// lost (a store counted but not kept, a reply never read). The few such late numbers seen
/// most recently are remembered apart, so that a late message is handled once, not once per
/// copy.
#[derive(Default)]
struct SeenWindow {
    floor: u64,
    /// Bit `i` of word `w` is number `base + 64 w + i`; `base` is a multiple of 64.
    base: u64,
    bits: VecDeque<u64>,
    /// Numbers seen below `base` since the span moved past them, oldest first.
    late: VecDeque<u64>,
    last_heard: Time,
}

/// How many numbers the bitmap spans (1,024 words, 8 KiB at most per sender).
const SEEN_SPAN: u64 = 65_536;
const SEEN_SPAN_WORDS: usize = (SEEN_SPAN / 64) as usize;
/// How many late numbers below the span are remembered per sender.
const SEEN_LATE_LIMIT: usize = 64;
/// How many senders are remembered.
const SENDERS_LIMIT: usize = 4096;

impl SeenWindow {
    /// Whether `seq` was seen (without recording it).
    fn contains(&self, seq: u64) -> bool {
        if seq <= self.floor {
            return true;
        }
        if seq < self.base {
            return self.late.contains(&seq);
        }
        let at = seq - self.base;
        self.bits
            .get((at / 64) as usize)
            .is_some_and(|w| w & (1 << (at % 64)) != 0)
    }

    /// True the first time `seq` is seen.
    fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        if seq < self.base {
            if self.late.len() >= SEEN_LATE_LIMIT {
                self.late.pop_front();
            }
            self.late.push_back(seq);
            return true;
        }
        let mut word = ((seq - self.base) / 64) as usize;
        if self.bits.is_empty() || word >= SEEN_SPAN_WORDS + self.bits.len() - 1 {
            // Nothing in the bitmap, or nothing in it within the span of `seq`: it starts
            // again at `seq`'s word (a sender first heard at a high number takes one word,
            // not a span's worth of zeros; numbers below it are new if they ever come).
            self.bits.clear();
            self.base = seq - seq % 64;
            word = 0;
        } else if word >= SEEN_SPAN_WORDS {
            // The span moves up to `seq`: the oldest words are forgotten.
            let gone = word + 1 - SEEN_SPAN_WORDS;
            self.bits.drain(..gone);
            self.base += 64 * gone as u64;
            word -= gone;
        }
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << ((seq - self.base) % 64);
        self.raise_floor();
        true
    }

    /// Moves the floor over the numbers seen contiguously above it, and lets go of the words
    /// below it.
    fn raise_floor(&mut self) {
        while self.floor + 1 >= self.base {
            let at = self.floor + 1 - self.base;
            let Some(&word) = self.bits.get((at / 64) as usize) else {
                break;
            };
            let run = (word >> (at % 64)).trailing_ones() as u64;
            self.floor += run;
            if run == 0 || (at % 64) + run < 64 {
                break;
            }
        }
        while self.floor + 1 >= self.base + 64 && !self.bits.is_empty() {
            self.bits.pop_front();
            self.base += 64;
        }
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
    /// When each pending message is due, earliest first: the next deadline without a scan of
    /// everything pending (a busy peer has hundreds of hops in flight).
    dues: BTreeSet<(Time, u64)>,
    seen: HashMap<u64, SeenWindow>,
    outbox: VecDeque<Transmit>,
    /// Acks leave after everything else an input produced: a forwarded query's answer goes
    /// to the client before the ack goes back to the forwarder (on one CPU, sending the ack
    /// first woke the forwarder, which then ran before the answer was sent).
    acks: VecDeque<Transmit>,
    /// Acks of query hops held back, by the node they go to, and when they must leave.
    held_acks: Vec<(SocketAddr, Vec<u64>)>,
    held_count: usize,
    held_due: Option<Time>,
    outcomes: VecDeque<Outcome<T>>,
    counters: Counters,
    /// Larger messages leave in fragments of at most this many bytes each.
    max_datagram: usize,
    /// A fragment's sequence number → the message it is part of.
    piece_of: HashMap<u64, u64>,
    /// Messages from others being put together: (sender's incarnation, message seq).
    partials: HashMap<(u64, u64), Partial>,
    /// The bytes reserved for them.
    partial_bytes: usize,
}

impl<T> Link<T> {
    pub fn new(incarnation: u64, policy: RetryPolicy) -> Self {
        Link {
            incarnation,
            next_seq: 1,
            policy,
            pending: BTreeMap::new(),
            dues: BTreeSet::new(),
            seen: HashMap::new(),
            outbox: VecDeque::new(),
            acks: VecDeque::new(),
            held_acks: Vec::new(),
            held_count: 0,
            held_due: None,
            outcomes: VecDeque::new(),
            counters: Counters::default(),
            max_datagram: MAX_UDP_PAYLOAD,
            piece_of: HashMap::new(),
            partials: HashMap::new(),
            partial_bytes: 0,
        }
    }

    /// Messages larger than `max_datagram` bytes leave in fragments that each fit it.
    pub fn with_max_datagram(mut self, max_datagram: usize) -> Self {
        self.max_datagram = max_datagram.clamp(1_024, MAX_UDP_PAYLOAD - crate::auth::OVERHEAD);
        self
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
        let bytes = Envelope::new(self.incarnation, seq, trace, body).encode_within(MAX_MESSAGE)?;
        self.enqueue(now, dest, seq, bytes, tag, policy)
    }

    /// Sends a query hop, `Find(find)`, as [`Link::send_with`] sends any message, but encoded
    /// from `find` itself, which is then handed to `tag_of` for the message's tag: a hop's
    /// sender keeps the `FindEvent` to route around a next peer that does not answer, and
    /// sending it costs no copy of it.
    pub fn send_find(
        &mut self,
        now: Time,
        dest: SocketAddr,
        find: FindEvent,
        trace: Option<&TraceContext>,
        policy: RetryPolicy,
        tag_of: impl FnOnce(FindEvent) -> T,
    ) -> Result<u64, WireError> {
        let seq = self.next_seq;
        let bytes = Envelope::encode_find(self.incarnation, seq, trace, &find, MAX_MESSAGE)?;
        self.enqueue(now, dest, seq, bytes, tag_of(find), policy)
    }

    /// Queues the encoded message `seq` (one datagram, or fragments) and keeps it until it is
    /// acknowledged or given up.
    fn enqueue(
        &mut self,
        now: Time,
        dest: SocketAddr,
        seq: u64,
        bytes: Vec<u8>,
        tag: T,
        policy: RetryPolicy,
    ) -> Result<u64, WireError> {
        self.next_seq += 1;
        let pieces = if bytes.len() <= self.max_datagram {
            self.outbox.push_back(Transmit {
                dest,
                bytes: bytes.clone(),
            });
            Pieces::One(Piece {
                seq,
                bytes,
                acked: false,
            })
        } else {
            Pieces::Fragments(self.fragment(seq, dest, &bytes)?)
        };
        let due = now + policy.delay(1);
        self.dues.insert((due, seq));
        self.pending.insert(
            seq,
            Pending {
                dest,
                pieces,
                attempts: 1,
                due,
                policy,
                tag,
            },
        );
        Ok(seq)
    }

    /// Cuts the encoded message `seq` into fragments that each fit a datagram, and queues them.
    fn fragment(
        &mut self,
        seq: u64,
        dest: SocketAddr,
        bytes: &[u8],
    ) -> Result<Vec<Piece>, WireError> {
        self.counters.fragmented += 1;
        let chunk = self.max_datagram.saturating_sub(FRAGMENT_OVERHEAD).max(512);
        let count = bytes.len().div_ceil(chunk);
        let mut pieces = Vec::with_capacity(count);
        for (index, part) in bytes.chunks(chunk).enumerate() {
            let piece_seq = self.next_seq;
            let body = Body::Fragment {
                of: seq,
                index: index as u32,
                count: count as u32,
                bytes: part.to_vec(),
            };
            let datagram = Envelope::new(self.incarnation, piece_seq, None, body).encode()?;
            self.next_seq += 1;
            self.piece_of.insert(piece_seq, seq);
            self.outbox.push_back(Transmit {
                dest,
                bytes: datagram.clone(),
            });
            pieces.push(Piece {
                seq: piece_seq,
                bytes: datagram,
                acked: false,
            });
        }
        Ok(pieces)
    }

    /// Forgets a pending message (and where its fragments point).
    fn take_pending(&mut self, seq: u64) -> Option<Pending<T>> {
        let p = self.pending.remove(&seq)?;
        self.dues.remove(&(p.due, seq));
        for piece in p.pieces.as_slice() {
            self.piece_of.remove(&piece.seq);
        }
        Some(p)
    }

    /// A fragment of a message from another node: kept and acknowledged (or, past the bounds
    /// on what this node holds, left for its sender to send again), and once every fragment
    /// is in, the whole envelope, to be handled as if it had come in one datagram (the caller
    /// then accepts it as usual). Any other envelope is handed back as it is.
    pub fn reassemble(
        &mut self,
        now: Time,
        from: SocketAddr,
        envelope: Envelope,
    ) -> Option<Envelope> {
        let Body::Fragment {
            of,
            index,
            count,
            bytes,
        } = envelope.body
        else {
            return Some(envelope);
        };
        let (sender, seq) = (envelope.from, envelope.seq);
        if self.was_seen(sender, of) {
            // The whole message was handled: its ack may have been lost, so say it again.
            self.ack(from, seq, None);
            self.ack(from, of, None);
            self.counters.duplicates += 1;
            return None;
        }
        let key = (sender, of);
        self.forget_stale_partials(now);
        if !self.partials.contains_key(&key) {
            match self.admit(key, index, count, bytes.len(), now) {
                Admission::Admitted => {}
                Admission::Later => return None,
                Admission::Broken => {
                    // Never to be put together: acknowledged, so its sender stops.
                    self.counters.bad_datagrams += 1;
                    self.ack(from, seq, None);
                    return None;
                }
            }
        }
        let consistent = self.partials.get(&key).is_some_and(|partial| {
            let last = index as usize + 1 == partial.parts.len();
            partial.parts.len() == count as usize
                && if last {
                    bytes.len() <= partial.chunk
                } else {
                    bytes.len() == partial.chunk
                }
        });
        self.ack(from, seq, None);
        if !consistent {
            // Fragments that disagree on their message's count or cut.
            self.drop_partial(key);
            self.counters.bad_datagrams += 1;
            return None;
        }
        let partial = self.partials.get_mut(&key)?;
        partial.touched = now;
        match partial.parts.get_mut(index as usize) {
            Some(slot @ None) => {
                *slot = Some(bytes);
                partial.received += 1;
            }
            _ => {
                self.counters.duplicates += 1;
                return None;
            }
        }
        if partial.received < partial.parts.len() {
            return None;
        }
        let partial = self.partials.remove(&key)?;
        self.partial_bytes -= partial.reserved;
        let whole: Vec<u8> = partial.parts.into_iter().flatten().flatten().collect();
        match Envelope::decode_within(&whole, MAX_MESSAGE) {
            Ok(inner) if inner.from == sender && inner.seq == of && inner.body.is_sequenced() => {
                Some(inner)
            }
            _ => {
                self.counters.bad_datagrams += 1;
                None
            }
        }
    }

    /// Whether the first fragment to arrive of message `key` may start putting it together.
    fn admit(
        &mut self,
        key: (u64, u64),
        index: u32,
        count: u32,
        len: usize,
        now: Time,
    ) -> Admission {
        let reserved = (count as usize).saturating_mul(len);
        if count == 0
            || count > MAX_FRAGMENTS
            || index >= count
            || len == 0
            || len > MAX_UDP_PAYLOAD
            || reserved > MAX_MESSAGE + len
        {
            return Admission::Broken;
        }
        // Only a fragment cut like the others says how large the whole is; the last may be
        // shorter, so it waits (not acknowledged) for another to open the message.
        if index + 1 == count && count > 1 {
            return Admission::Later;
        }
        let of_sender = self.partials.keys().filter(|(s, _)| *s == key.0).count();
        if self.partials.len() >= PARTIALS_LIMIT
            || of_sender >= PARTIALS_PER_SENDER
            || self.partial_bytes + reserved > PARTIAL_BYTES_LIMIT
        {
            return Admission::Later;
        }
        self.partial_bytes += reserved;
        self.partials.insert(
            key,
            Partial {
                parts: vec![None; count as usize],
                received: 0,
                chunk: len,
                reserved,
                touched: now,
            },
        );
        Admission::Admitted
    }

    /// [`Link::reassemble`] for a node whose driver opened a span for the datagram: a message
    /// put together from fragments carries its own trace context (a fragment has none).
    pub fn reassemble_traced(
        &mut self,
        now: Time,
        from: SocketAddr,
        envelope: Envelope,
        trace: Option<TraceContext>,
    ) -> Option<(Envelope, Option<TraceContext>)> {
        if !matches!(envelope.body, Body::Fragment { .. }) {
            return Some((envelope, trace));
        }
        let whole = self.reassemble(now, from, envelope)?;
        let trace = whole.trace.clone();
        Some((whole, trace))
    }

    fn drop_partial(&mut self, key: (u64, u64)) {
        if let Some(p) = self.partials.remove(&key) {
            self.partial_bytes -= p.reserved;
        }
    }

    fn forget_stale_partials(&mut self, now: Time) {
        let stale: Vec<(u64, u64)> = self
            .partials
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.touched) > PARTIAL_TTL)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.drop_partial(key);
        }
    }

    /// Whether `seq` of `sender` was seen (without recording anything).
    fn was_seen(&self, sender: u64, seq: u64) -> bool {
        self.seen.get(&sender).is_some_and(|w| w.contains(seq))
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

    /// Sends a client its answer once, unsequenced, with `records` (packed column names,
    /// packed values) borrowed from the store: see [`Envelope::encode_answer`].
    pub fn send_answer(
        &mut self,
        dest: SocketAddr,
        result: &FindResult,
        records: &[(&[u8], &[u8])],
    ) -> Result<(), WireError> {
        let bytes = Envelope::encode_answer(self.incarnation, result, records)?;
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
    ///
    /// The ack of a query hop (`Find`) is held back for up to [`ACK_DELAY_MAX`] and leaves with
    /// the others to the same node as one `Acks`: its sender only needs it to know, long before
    /// its first retransmission, that the hop was not lost, and sent at once it cost every hop
    /// a datagram beside the query, on the machine's CPU while the query was still walking.
    pub fn accept(&mut self, now: Time, from: SocketAddr, envelope: &Envelope) -> Accepted {
        match &envelope.body {
            Body::Ack { seq, new_rows } => {
                self.acked(*seq, *new_rows);
                Accepted::Control
            }
            Body::Acks { seqs } => {
                for seq in seqs {
                    self.acked(*seq, None);
                }
                Accepted::Control
            }
            Body::Reject { seq, reason } => {
                // A fragment refused refuses its message (a receiver that cannot put it
                // together would refuse every retransmission too).
                let seq = self.piece_of.get(seq).copied().unwrap_or(*seq);
                if let Some(p) = self.take_pending(seq) {
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
                if envelope.body.ack_may_wait() {
                    self.hold_ack(now, from, envelope.seq);
                } else if !matches!(envelope.body, Body::Store(_)) {
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

    /// `seq` arrived: its message, or one fragment of it, is done.
    fn acked(&mut self, seq: u64, new_rows: Option<u32>) {
        if let Some(p) = self.take_pending(seq) {
            self.outcomes.push_back(Outcome::Acked {
                tag: p.tag,
                new_rows,
            });
        } else if let Some(msg) = self.piece_of.get(&seq).copied()
            && let Some(p) = self.pending.get_mut(&msg)
        {
            // One fragment in; the message is done when its receiver acks it whole.
            for piece in p
                .pieces
                .as_mut_slice()
                .iter_mut()
                .filter(|piece| piece.seq == seq)
            {
                piece.acked = true;
            }
        }
    }

    /// Keeps the ack of `seq` for `dest` until the held acks are due (or too many). A copy of
    /// a hop whose ack is already held (the hop retransmitted meanwhile) adds nothing: the
    /// one ack answers both.
    fn hold_ack(&mut self, now: Time, dest: SocketAddr, seq: u64) {
        match self.held_acks.iter_mut().find(|(d, _)| *d == dest) {
            Some((_, seqs)) if seqs.contains(&seq) => return,
            Some((_, seqs)) => seqs.push(seq),
            None => self.held_acks.push((dest, vec![seq])),
        }
        self.held_count += 1;
        let delay = ACK_DELAY_MAX.min(self.policy.initial / 8);
        self.held_due.get_or_insert(now + delay);
        if self.held_count >= HELD_ACKS_LIMIT {
            self.flush_acks();
        }
    }

    /// Sends every held ack now: one datagram per node (a lone one as a plain `Ack`).
    pub fn flush_acks(&mut self) {
        for (dest, seqs) in std::mem::take(&mut self.held_acks) {
            let body = match seqs[..] {
                [seq] => Body::Ack {
                    seq,
                    new_rows: None,
                },
                _ => Body::Acks { seqs },
            };
            // At most HELD_ACKS_LIMIT numbers: a few KB, within any limit.
            if let Ok(bytes) = Envelope::new(self.incarnation, UNSEQUENCED, None, body).encode() {
                self.acks.push_back(Transmit { dest, bytes });
            }
        }
        self.held_count = 0;
        self.held_due = None;
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
        envelope.body.is_sequenced() && self.was_seen(envelope.from, envelope.seq)
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
        self.take_pending(seq).map(|p| p.tag)
    }

    /// Forgets every pending message whose tag matches.
    pub fn cancel_where(&mut self, mut f: impl FnMut(&T) -> bool) {
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| f(&p.tag))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in gone {
            self.take_pending(seq);
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn has_pending_where(&self, mut f: impl FnMut(&T) -> bool) -> bool {
        self.pending.values().any(|p| f(&p.tag))
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        let pending = self.dues.first().map(|(due, _)| *due);
        [pending, self.held_due].into_iter().flatten().min()
    }

    /// Sends the held acks if due; retransmits what is due; gives up on what has used all its
    /// attempts.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.held_due.is_some_and(|due| due <= now) {
            self.flush_acks();
        }
        let due: Vec<u64> = self
            .dues
            .iter()
            .take_while(|(due, _)| *due <= now)
            .map(|(_, seq)| *seq)
            .collect();
        for seq in due {
            let Some(p) = self.pending.get_mut(&seq) else {
                continue;
            };
            if p.policy.attempts.is_some_and(|max| p.attempts >= max) {
                if let Some(p) = self.take_pending(seq) {
                    self.outcomes.push_back(Outcome::GaveUp {
                        tag: p.tag,
                        dest: p.dest,
                        attempts: p.attempts,
                    });
                }
                continue;
            }
            p.attempts += 1;
            self.dues.remove(&(p.due, seq));
            p.due = now + p.policy.delay(p.attempts);
            self.dues.insert((p.due, seq));
            // The datagrams not acknowledged; if every fragment was, all of them again: the
            // receiver either handled the message (a copy makes it repeat its ack of the
            // whole) or forgot it half done (it was silent for long).
            let pieces = p.pieces.as_slice();
            let mut again: Vec<&Piece> = pieces.iter().filter(|piece| !piece.acked).collect();
            if again.is_empty() {
                again.extend(pieces.iter());
            }
            for piece in again {
                self.counters.retransmits += 1;
                self.outbox.push_back(Transmit {
                    dest: p.dest,
                    bytes: piece.bytes.clone(),
                });
            }
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

    fn find(query: u64) -> Body {
        Body::Find(crate::wire::FindEvent {
            query,
            key: crate::record::RecordKey::Event(query),
            path: Vec::new(),
            hops: Vec::new(),
            routing: crate::wire::Routing::Walk,
            reply_to: None,
        })
    }

    /// The bodies of what `link` sends now, decoded.
    fn sent(link: &mut Link<u8>) -> Vec<(SocketAddr, Body)> {
        std::iter::from_fn(|| link.poll_transmit())
            .map(|t| (t.dest, Envelope::decode(&t.bytes).unwrap().body))
            .collect()
    }

    #[test]
    fn query_hops_are_acknowledged_together_a_few_milliseconds_later() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default());
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        for q in 0..3 {
            a.send(ms(0), addr(2), find(q), None, q as u8).unwrap();
        }
        let delivered = deliver(&mut a, &mut b, ms(1));
        assert!(delivered.iter().all(|(_, acc)| *acc == Accepted::New));
        // Nothing goes back yet: the acks wait, well before `a` would send the hops again.
        assert!(sent(&mut b).is_empty());
        assert_eq!(b.poll_timeout(), Some(ms(1) + ACK_DELAY_MAX));
        b.handle_timeout(ms(5));
        assert!(sent(&mut b).is_empty());
        b.handle_timeout(ms(6));
        let acks = sent(&mut b);
        assert_eq!(
            acks,
            vec![(
                addr(1),
                Body::Acks {
                    seqs: vec![1, 2, 3]
                }
            )]
        );
        assert_eq!(b.poll_timeout(), None);
        // One datagram ends all three hops.
        let env = Envelope::new(2, UNSEQUENCED, None, acks[0].1.clone());
        assert_eq!(a.accept(ms(6), addr(2), &env), Accepted::Control);
        assert_eq!(a.pending_len(), 0);
        let mut tags: Vec<u8> = std::iter::from_fn(|| a.poll_outcome())
            .map(|o| match o {
                Outcome::Acked { tag, .. } => tag,
                other => panic!("{other:?}"),
            })
            .collect();
        tags.sort();
        assert_eq!(tags, vec![0, 1, 2]);
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn held_acks_leave_per_sender_a_lone_one_plainly_and_never_after_retransmission() {
        // A link whose first retransmission comes after 16 ms holds acks 2 ms at most.
        let policy = RetryPolicy {
            initial: ms(16),
            ..RetryPolicy::default()
        };
        let mut b: Link<u8> = Link::new(2, policy);
        let hop = |from: u64, seq: u64| Envelope::new(from, seq, None, find(seq));
        assert_eq!(b.accept(ms(0), addr(10), &hop(10, 4)), Accepted::New);
        assert_eq!(b.accept(ms(1), addr(11), &hop(11, 8)), Accepted::New);
        assert_eq!(b.accept(ms(1), addr(11), &hop(11, 9)), Accepted::New);
        // A copy is handled once; its ack is the one already held (nothing is sent twice).
        assert_eq!(b.accept(ms(1), addr(11), &hop(11, 9)), Accepted::Duplicate);
        assert_eq!(b.poll_timeout(), Some(ms(2)));
        // Anything else is acknowledged at once, ahead of the held acks.
        let leave = Envelope::new(10, 5, None, Body::LeaveRequest);
        assert_eq!(b.accept(ms(1), addr(10), &leave), Accepted::New);
        assert_eq!(
            sent(&mut b),
            vec![(
                addr(10),
                Body::Ack {
                    seq: 5,
                    new_rows: None
                }
            )]
        );
        b.handle_timeout(ms(2));
        assert_eq!(
            sent(&mut b),
            vec![
                (
                    addr(10),
                    Body::Ack {
                        seq: 4,
                        new_rows: None
                    }
                ),
                (
                    addr(11),
                    // The copy of 9 is acknowledged by the one ack held for it.
                    Body::Acks { seqs: vec![8, 9] }
                ),
            ]
        );
        // A copy that comes after its ack left (that ack may be what was lost) is
        // acknowledged again.
        assert_eq!(b.accept(ms(3), addr(11), &hop(11, 9)), Accepted::Duplicate);
        b.handle_timeout(ms(5));
        assert_eq!(
            sent(&mut b),
            vec![(
                addr(11),
                Body::Ack {
                    seq: 9,
                    new_rows: None
                }
            )]
        );
    }

    #[test]
    fn held_acks_leave_at_once_when_they_are_many() {
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        for seq in 1..HELD_ACKS_LIMIT as u64 {
            let env = Envelope::new(10, seq, None, find(seq));
            b.accept(ms(0), addr(10), &env);
        }
        assert!(sent(&mut b).is_empty());
        let last = HELD_ACKS_LIMIT as u64;
        b.accept(ms(0), addr(10), &Envelope::new(10, last, None, find(last)));
        let acks = sent(&mut b);
        assert_eq!(acks.len(), 1);
        let Body::Acks { seqs } = &acks[0].1 else {
            panic!("{acks:?}");
        };
        assert_eq!(seqs.len(), HELD_ACKS_LIMIT);
        let bytes = Envelope::new(2, UNSEQUENCED, None, acks[0].1.clone())
            .encode()
            .unwrap();
        assert!(bytes.len() < 4_096, "{} bytes", bytes.len());
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn the_next_deadline_follows_what_is_still_pending() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default());
        a.send(ms(0), addr(2), Body::LeaveRequest, None, 0).unwrap();
        a.send(ms(50), addr(2), Body::LeaveRequest, None, 1)
            .unwrap();
        assert_eq!(a.poll_timeout(), Some(ms(200)));
        let ack = Envelope::new(
            2,
            UNSEQUENCED,
            None,
            Body::Ack {
                seq: 1,
                new_rows: None,
            },
        );
        a.accept(ms(60), addr(2), &ack);
        assert_eq!(a.poll_timeout(), Some(ms(250)));
        // Retransmitted at 250, due again 400 ms later.
        a.handle_timeout(ms(250));
        assert_eq!(a.poll_timeout(), Some(ms(650)));
        a.cancel(2);
        assert_eq!(a.poll_timeout(), None);
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

    /// Contiguous numbers leave nothing but the floor behind; any numbers leave at most the
    /// span's words and the late ones.
    #[test]
    fn the_seen_window_is_bounded() {
        let mut w = SeenWindow::default();
        for seq in 1..=10_000 {
            assert!(w.insert(seq));
        }
        assert_eq!(w.floor, 10_000);
        assert!(w.bits.len() <= 1, "{} words kept", w.bits.len());
        let mut w = SeenWindow::default();
        for seq in (2..).step_by(2).take(200_000) {
            assert!(w.insert(seq));
        }
        for late in (3..).step_by(2).take(500) {
            assert!(w.insert(late), "never seen, and below the span");
        }
        assert!(w.bits.len() <= SEEN_SPAN_WORDS);
        assert!(w.late.len() <= SEEN_LATE_LIMIT);
        // A sender first heard at a high number (a peer up for hours, heard by a joiner)
        // takes a word, not the span's 1,024; its memory follows the numbers it uses.
        let mut w = SeenWindow::default();
        assert!(w.insert(90_000_000));
        assert_eq!(w.bits.len(), 1);
        for seq in (90_000_000..).step_by(7).take(700) {
            w.insert(seq);
        }
        assert_eq!(w.bits.len(), (7 * 699 / 64) + 1);
        assert!(
            w.insert(90_000_001),
            "below what it has seen, never seen: new"
        );
        // A jump past everything remembered starts again at the new number.
        assert!(w.insert(500_000_000));
        assert_eq!(w.bits.len(), 1);
        assert!(!w.insert(500_000_000));
    }

    /// A receiver sees every fifth number of a sender talking to five peers. A message
    /// retransmitted after thousands of newer ones is still handled, never taken for a
    /// duplicate of a number this receiver never saw; once handled, a copy of it is one.
    #[test]
    fn a_late_retransmission_among_sparse_numbers_is_handled() {
        for count in [3 * 4096, 4 * SEEN_SPAN] {
            let mut w = SeenWindow::default();
            let late = 3; // never sent to this receiver, or lost until now
            for seq in (2..).step_by(5).take(count as usize) {
                assert!(w.insert(seq));
            }
            assert!(w.insert(late), "a number never seen is new");
            assert!(!w.insert(late), "and seen once it is");
            assert!(!w.insert(2 + 5 * (count - 1)), "recent ones are");
        }
    }

    /// Against a set of every number seen, over nearly ordered numbers (a sender's share,
    /// reordered a little, some copies late): a number never seen is always new, and one seen
    /// among the span's most recent numbers is always a duplicate.
    #[test]
    fn the_seen_window_never_takes_a_new_number_for_a_duplicate() {
        use proptest::prelude::*;
        let numbers = proptest::collection::vec((1u64..40, 0u64..8, 0u8..16), 1..3_000);
        proptest!(ProptestConfig::with_cases(300), |(steps in numbers)| {
            let mut w = SeenWindow::default();
            let mut seen = std::collections::HashSet::new();
            let (mut top, mut highest) = (0u64, 0u64);
            for (gap, back, late) in steps {
                top += gap * if late == 0 { 3_000 } else { 1 };
                // Mostly in order, a few back a little, one in sixteen far back.
                let seq = match late {
                    1 => top.saturating_sub(SEEN_SPAN + back * 997).max(1),
                    _ => top.saturating_sub(back).max(1),
                };
                let first = seen.insert(seq);
                highest = highest.max(seq);
                let recent = seq + SEEN_SPAN - 64 > highest;
                let new = w.insert(seq);
                prop_assert!(!first || new, "{seq} never seen, taken for a duplicate");
                if !first && recent {
                    prop_assert!(!new, "{seq} seen within the span, taken for new");
                }
                prop_assert_eq!(w.contains(seq), true);
            }
        });
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

    /// A body of about `bytes` bytes (a long name: any sequenced body will do).
    fn large(bytes: usize) -> Body {
        let name: String = (0..bytes)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        Body::Register { name, rejoin: None }
    }

    /// One fragment datagram from `from` (incarnation), as a hostile or broken sender might.
    fn piece(from: u64, seq: u64, of: u64, index: u32, count: u32, bytes: Vec<u8>) -> Envelope {
        let body = Body::Fragment {
            of,
            index,
            count,
            bytes,
        };
        Envelope::new(from, seq, None, body)
    }

    /// Runs `a` → `b` until `a` has nothing pending: `a`'s datagrams go through `net` (which
    /// may drop, duplicate and reorder them), `b`'s acks all come back. Returns what `b`
    /// handled.
    fn exchange(
        a: &mut Link<u8>,
        b: &mut Link<u8>,
        mut net: impl FnMut(Vec<Transmit>) -> Vec<Transmit>,
    ) -> Vec<Envelope> {
        let mut handled = Vec::new();
        let mut now = ms(0);
        for _ in 0..50 {
            let mut sent = Vec::new();
            while let Some(t) = a.poll_transmit() {
                assert!(t.bytes.len() <= a.max_datagram, "{} bytes", t.bytes.len());
                sent.push(t);
            }
            for t in net(sent) {
                let env = Envelope::decode(&t.bytes).unwrap();
                if let Some(inner) = b.reassemble(now, addr(1), env)
                    && b.accept(now, addr(1), &inner) == Accepted::New
                {
                    handled.push(inner);
                }
            }
            while let Some(t) = b.poll_transmit() {
                let env = Envelope::decode(&t.bytes).unwrap();
                a.accept(now, addr(2), &env);
            }
            if a.pending_len() == 0 {
                return handled;
            }
            now += Duration::from_secs(3);
            a.handle_timeout(now);
        }
        panic!("still pending after 50 rounds");
    }

    #[test]
    fn a_message_larger_than_a_datagram_arrives_once_whole_through_loss_duplication_and_reordering()
    {
        let policy = RetryPolicy::default().forever();
        let mut a: Link<u8> = Link::new(1, policy).with_max_datagram(1_024);
        let mut b: Link<u8> = Link::new(2, policy);
        let body = large(40_000);
        a.send(ms(0), addr(2), body.clone(), None, 7).unwrap();
        let mut round = 0u64;
        let handled = exchange(&mut a, &mut b, |mut sent| {
            round += 1;
            assert!(sent.len() > 1, "not in fragments");
            // Every third datagram lost, every fifth sent twice, the rest backwards.
            let mut out = Vec::new();
            for (i, t) in sent.drain(..).enumerate() {
                if (i as u64 + round).is_multiple_of(3) {
                    continue;
                }
                if i % 5 == 0 {
                    out.push(t.clone());
                }
                out.push(t);
            }
            out.reverse();
            out
        });
        assert_eq!(handled.len(), 1);
        assert_eq!(handled[0].body, body);
        assert_eq!(
            a.poll_outcome(),
            Some(Outcome::Acked {
                tag: 7,
                new_rows: None
            })
        );
        assert_eq!(a.poll_outcome(), None);
        assert!(a.piece_of.is_empty() && b.partials.is_empty() && b.partial_bytes == 0);
        assert_eq!((a.counters().fragmented, b.counters().fragmented), (1, 0));
    }

    #[test]
    fn only_the_fragments_not_acknowledged_are_sent_again() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default()).with_max_datagram(1_024);
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        a.send(ms(0), addr(2), large(9_000), None, 1).unwrap();
        let sent: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
        assert!(sent.len() >= 8, "{} fragments", sent.len());
        for (i, t) in sent.iter().enumerate() {
            if i != 3 && i != 7 {
                let env = Envelope::decode(&t.bytes).unwrap();
                assert!(b.reassemble(ms(1), addr(1), env).is_none());
            }
        }
        while let Some(t) = b.poll_transmit() {
            a.accept(ms(2), addr(2), &Envelope::decode(&t.bytes).unwrap());
        }
        a.handle_timeout(ms(10_000));
        let again: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].bytes, sent[3].bytes);
        assert_eq!(again[1].bytes, sent[7].bytes);
        assert_eq!(a.counters().retransmits, 2);
    }

    #[test]
    fn a_late_copy_of_a_fragment_repeats_the_ack_of_the_whole_message() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default()).with_max_datagram(1_024);
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        let seq = a.send(ms(0), addr(2), large(3_000), None, 1).unwrap();
        let sent: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
        let mut whole = None;
        for t in &sent {
            whole = b.reassemble(ms(1), addr(1), Envelope::decode(&t.bytes).unwrap());
        }
        let whole = whole.expect("put together");
        assert_eq!(b.accept(ms(1), addr(1), &whole), Accepted::New);
        while b.poll_transmit().is_some() {} // every ack lost
        let late = Envelope::decode(&sent[0].bytes).unwrap();
        assert!(b.reassemble(ms(2), addr(1), late).is_none());
        let acked: Vec<u64> = std::iter::from_fn(|| b.poll_transmit())
            .filter_map(|t| match Envelope::decode(&t.bytes).unwrap().body {
                Body::Ack { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(acked, vec![seq + 1, seq]);
        assert_eq!(b.counters().duplicates, 1);
    }

    #[test]
    fn broken_or_hostile_fragments_are_counted_and_dropped() {
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        let cases = [
            piece(9, 1, 100, 0, 0, vec![1]),                 // no fragments
            piece(9, 2, 100, 2, 2, vec![1]),                 // index past the count
            piece(9, 3, 101, 0, MAX_FRAGMENTS + 1, vec![1]), // too many
        ];
        for env in cases {
            assert!(b.reassemble(ms(0), addr(1), env).is_none());
        }
        assert_eq!(b.counters().bad_datagrams, 3);
        // Two fragments that disagree on their message's count.
        assert!(
            b.reassemble(ms(0), addr(1), piece(9, 4, 102, 0, 3, vec![1]))
                .is_none()
        );
        assert!(
            b.reassemble(ms(0), addr(1), piece(9, 5, 102, 1, 2, vec![1]))
                .is_none()
        );
        assert_eq!(b.counters().bad_datagrams, 4);
        // Complete, but not an envelope.
        assert!(
            b.reassemble(ms(0), addr(1), piece(9, 6, 103, 0, 2, vec![0xff; 9]))
                .is_none()
        );
        assert!(
            b.reassemble(ms(0), addr(1), piece(9, 7, 103, 1, 2, vec![0xff; 9]))
                .is_none()
        );
        assert_eq!(b.counters().bad_datagrams, 5);
        // Complete, an envelope, but another sender's (or another message's).
        let other = Envelope::new(8, 104, None, Body::LeaveRequest)
            .encode()
            .unwrap();
        let (one, two) = other.split_at(other.len() - other.len() / 2);
        assert!(
            b.reassemble(ms(0), addr(1), piece(9, 8, 104, 0, 2, one.to_vec()))
                .is_none()
        );
        assert!(
            b.reassemble(ms(0), addr(1), piece(9, 9, 104, 1, 2, two.to_vec()))
                .is_none()
        );
        assert_eq!(b.counters().bad_datagrams, 6);
        assert!(b.partials.is_empty() && b.partial_bytes == 0);
        // Every one of them was acknowledged (the sender stops), none handled.
        assert_eq!(std::iter::from_fn(|| b.poll_transmit()).count(), 9);
    }

    #[test]
    fn what_is_being_put_together_is_bounded_and_the_rest_waits_unacknowledged() {
        let mut b: Link<u8> = Link::new(2, RetryPolicy::default());
        let acks = |b: &mut Link<u8>| std::iter::from_fn(|| b.poll_transmit()).count();
        // Half messages of 60 KB fragments from 200 senders: 64 are taken, the rest are
        // not acknowledged (their senders send them again later).
        for i in 0..200u64 {
            let env = piece(1_000 + i, 2, 1, 0, 2, vec![0; 60_000]);
            assert!(b.reassemble(ms(i), addr(1), env).is_none());
        }
        assert_eq!(acks(&mut b), PARTIALS_LIMIT);
        assert_eq!(b.partials.len(), PARTIALS_LIMIT);
        assert!(b.partial_bytes <= PARTIAL_BYTES_LIMIT);
        // One finishes; a waiting sender's retransmission is taken in its place.
        let whole = Envelope::new(1_000, 1, None, large(60_000))
            .encode()
            .unwrap();
        let (head, tail) = whole.split_at(60_000);
        let mut b2: Link<u8> = Link::new(2, RetryPolicy::default());
        assert!(
            b2.reassemble(ms(0), addr(1), piece(1_000, 2, 1, 0, 2, head.to_vec()))
                .is_none()
        );
        let done = b2.reassemble(ms(0), addr(1), piece(1_000, 3, 1, 1, 2, tail.to_vec()));
        assert_eq!(done.map(|e| e.body), Some(large(60_000)));
        b.drop_partial((1_000, 1));
        assert!(
            b.reassemble(ms(300), addr(1), piece(1_150, 2, 1, 0, 2, vec![0; 60_000]))
                .is_none()
        );
        assert!(b.partials.contains_key(&(1_150, 1)));
        // One sender may not hold more than a few messages open.
        let mut c: Link<u8> = Link::new(3, RetryPolicy::default());
        for of in 0..10u64 {
            c.reassemble(ms(0), addr(1), piece(7, 100 + of, of, 0, 3, vec![0; 100]));
        }
        assert_eq!(c.partials.len(), PARTIALS_PER_SENDER);
        // The last fragment, shorter than the others, cannot say how large the whole is:
        // alone it waits, unacknowledged.
        let mut d: Link<u8> = Link::new(4, RetryPolicy::default());
        assert!(
            d.reassemble(ms(0), addr(1), piece(5, 9, 1, 2, 3, vec![0; 10]))
                .is_none()
        );
        assert!(d.partials.is_empty() && acks(&mut d) == 0);
        // A message none of whose fragments came for long is forgotten.
        d.reassemble(ms(0), addr(1), piece(5, 7, 1, 0, 3, vec![0; 100]));
        assert_eq!(d.partials.len(), 1);
        d.reassemble(
            ms(1) + PARTIAL_TTL * 2,
            addr(1),
            piece(6, 1, 1, 0, 2, vec![0; 10]),
        );
        assert!(!d.partials.contains_key(&(5, 1)));
        assert_eq!(d.partial_bytes, 20);
    }

    /// A restarted manager hears a rejoin (a view in several fragments) from every peer at
    /// once: far more than it puts together at a time. Each arrives, once, in the end (when
    /// the receiver evicted half-done messages whose fragments it had acknowledged, their
    /// senders only retransmitted a last fragment, and those messages never completed).
    #[test]
    fn a_storm_of_fragmented_messages_all_arrive_once() {
        let policy = RetryPolicy::default().forever();
        let mut senders: Vec<Link<u8>> = (0..150)
            .map(|i| Link::new(10 + i, policy).with_max_datagram(1_024))
            .collect();
        let mut b: Link<u8> = Link::new(2, policy);
        for (i, a) in senders.iter_mut().enumerate() {
            a.send(ms(0), addr(2), large(6_000 + i), None, 0).unwrap();
        }
        let mut handled = std::collections::BTreeMap::new();
        let mut now = ms(0);
        let mut lost = 0u64;
        for _ in 0..200 {
            for (i, a) in senders.iter_mut().enumerate() {
                while let Some(t) = a.poll_transmit() {
                    lost += 1;
                    if lost.is_multiple_of(7) {
                        continue; // some loss too
                    }
                    let env = Envelope::decode(&t.bytes).unwrap();
                    if let Some(inner) = b.reassemble(now, addr(1), env)
                        && b.accept(now, addr(1), &inner) == Accepted::New
                    {
                        *handled.entry(i).or_insert(0) += 1;
                    }
                }
                while let Some(t) = b.poll_transmit() {
                    let env = Envelope::decode(&t.bytes).unwrap();
                    if let Body::Ack { .. } = env.body {
                        a.accept(now, addr(2), &env);
                    }
                }
            }
            if senders.iter().all(|a| a.pending_len() == 0) {
                break;
            }
            now += Duration::from_millis(500);
            for a in &mut senders {
                a.handle_timeout(now);
            }
        }
        assert_eq!(
            handled.len(),
            senders.len(),
            "{} of {}",
            handled.len(),
            senders.len()
        );
        assert!(handled.values().all(|n| *n == 1));
        assert!(senders.iter().all(|a| a.pending_len() == 0));
        assert!(b.partials.is_empty());
    }

    #[test]
    fn a_message_too_large_even_in_fragments_is_refused_and_nothing_is_sent() {
        let mut a: Link<u8> = Link::new(1, RetryPolicy::default());
        let e = a.send(ms(0), addr(2), large(MAX_MESSAGE + 1), None, 1);
        assert!(matches!(e, Err(WireError::TooLarge(_))), "{e:?}");
        assert!(a.poll_transmit().is_none());
        assert_eq!(a.pending_len(), 0);
    }
}
