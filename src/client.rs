//! The client side of `stormctl`: reliable requests to the manager over UDP, many at a time,
//! and `verify`, which checks a CSV file against what the ring answers.

use crate::auth::{Keyring, open_if_keyed, seal_if_keyed};
use crate::driver::socket::DatagramSocket;
use crate::driver::{Timer, bind_udp, lookup};
use crate::link::{Accepted, Link, Outcome, RetryPolicy, Time, Transmit};
use crate::record::{Dataset, RecordKey};
use crate::ring::{PointIndex, RingExt};
use crate::wire::{
    Body, ClientRequest, Envelope, FindEvent, FindResult, QueryOutcome, RejectReason, ReplyBody,
    RequestError, RingView, Routing, TraceContext,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ClientError {
    #[error(
        "cannot resolve the manager address '{addr}': {reason} (check --manager or STORMCTL_MANAGER: HOST:PORT)"
    )]
    Resolve { addr: String, reason: String },
    #[error("UDP socket error: {0}")]
    Io(String),
    #[error(
        "the manager at {manager} did not answer ({attempts} attempts over {secs:.1} s); is it running at that address, and if the cluster has a key, does stormctl have it (--key-file or STORMCTL_KEY)?"
    )]
    NoAnswer {
        manager: SocketAddr,
        attempts: u32,
        secs: f64,
    },
    #[error(
        "the manager at {manager} acknowledged the request but sent no reply within {secs:.1} s: it may still be working (a large distribute): raise --timeout, and see stormctl status"
    )]
    NoReply { manager: SocketAddr, secs: f64 },
    #[error("the manager rejected the request: {0}")]
    Rejected(RejectReason),
    /// The manager handled the request and reports an error.
    #[error("{0}")]
    Failed(RequestError),
    #[error("the request could not be encoded: {0}")]
    Encode(String),
    /// A result was asked of a request that was never sent (a bug, reported rather than a panic).
    #[error("the request produced no result")]
    NoResult,
    #[error(
        "no peer answered the query for {key} ({attempts} attempts over {secs:.1} s, last at {last}); see stormctl status, or raise --timeout"
    )]
    NoLookupAnswer {
        key: RecordKey,
        attempts: u32,
        secs: f64,
        last: SocketAddr,
    },
}

/// What the client knows of the ring, for queries sent straight to its peers.
#[derive(Debug, Clone)]
enum RingState {
    /// Queries go through the manager.
    Off,
    /// Not asked yet.
    Unknown,
    /// The manager was asked (the request's sequence number, when).
    Asking { seq: u64, since: Time },
    Known {
        view: RingView,
        /// The view's points sorted once, for the owner of each key.
        index: PointIndex,
        routing: Routing,
        at: Time,
    },
    /// The manager gave none (no ring yet, recovering, an older manager): queries go through
    /// it, and its reply says why when they cannot be answered.
    Unavailable,
}

/// A query sent straight into the ring, retried by the client (the first attempt's time,
/// the last attempt's, and where it went).
struct Lookup {
    index: usize,
    key: RecordKey,
    routing: Option<Routing>,
    via: Option<String>,
    trace: Option<TraceContext>,
    started: Time,
    sent_at: Time,
    attempts: u32,
    retry_at: Time,
    entry: SocketAddr,
}

/// The tag of the client's own ring request, never a request index.
const RING_TAG: usize = usize::MAX;

/// The first retry of an unanswered lookup: a walk of a few hundred hops takes a few
/// milliseconds, so a lookup unanswered after this was most likely lost.
const LOOKUP_RETRY: Duration = Duration::from_millis(250);
const LOOKUP_RETRY_MAX: Duration = Duration::from_secs(1);

/// Keys per multi-get datagram: a few hundred bytes of lookups, answers that fit a datagram
/// or two.
const LOOKUP_BATCH: usize = 64;

/// How old a ring view may be before a refused or unanswered lookup fetches a new one.
const RING_REFRESH: Duration = Duration::from_secs(1);

/// The client's protocol, sans-IO: requests queued, at most `window` outstanding, each
/// retransmitted until the manager acknowledges it, then awaited until its reply or a timeout.
/// Time comes in as an argument; datagrams and results are pulled.
pub struct ClientCore {
    manager: SocketAddr,
    link: Link<usize>,
    /// How long to wait for a reply once the manager has acknowledged a request.
    reply_timeout: Duration,
    window: usize,
    queue: VecDeque<(usize, ClientRequest, Option<TraceContext>)>,
    in_flight: HashMap<u64, InFlight>,
    results: VecDeque<(usize, Result<ReplyBody, ClientError>)>,
    /// What the manager said of requests under way: (index, done, total).
    progress: VecDeque<(usize, u64, u64)>,
    ring: RingState,
    lookups: BTreeMap<u64, Lookup>,
    next_lookup: u64,
    next_entry: usize,
    /// Wall-clock µs at `Time` zero: peers stamp hops with their wall clocks.
    clock_origin_us: u64,
    /// A request for a newer view while lookups go on with the one known.
    ring_refresh: Option<u64>,
    /// Lookups enter at the key's owner (by the client's view) instead of the next member
    /// round the ring.
    owner_entry: bool,
    /// A peer has answered (or refused) a lookup of this client: peers are reachable.
    peer_heard: bool,
    /// Lookups to send, gathered so that those to one peer leave in one datagram.
    outgoing: Vec<(SocketAddr, FindEvent, Option<TraceContext>)>,
    /// Whether `outgoing` changed since the last flush, and how many lookups were outstanding
    /// then: held lookups wait for answers, so nothing new can leave until one of these moves
    /// (without this, every `poll_transmit` grouped every held lookup again).
    outgoing_changed: bool,
    lookups_at_flush: usize,
    /// Peers a lookup was sent to that did not answer it, until they are heard from again:
    /// retries and owner entries go elsewhere (any member can forward), so a peer that left
    /// or died costs one retry delay, not one per retry that happens to pick it again while
    /// the client's view is too young to be fetched anew.
    silent: HashSet<SocketAddr>,
}

struct InFlight {
    index: usize,
    sent_at: Time,
    acked_at: Option<Time>,
}

/// How the client retransmits a request the manager has not acknowledged: about 4 s in all.
pub fn client_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(250),
        max: Duration::from_secs(1),
        attempts: Some(6),
    }
}

impl ClientCore {
    pub fn new(
        manager: SocketAddr,
        incarnation: u64,
        policy: RetryPolicy,
        reply_timeout: Duration,
    ) -> Self {
        ClientCore {
            manager,
            link: Link::new(incarnation, policy),
            reply_timeout,
            window: 1,
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            results: VecDeque::new(),
            progress: VecDeque::new(),
            ring: RingState::Off,
            lookups: BTreeMap::new(),
            next_lookup: 1,
            next_entry: 0,
            clock_origin_us: 0,
            ring_refresh: None,
            owner_entry: false,
            peer_heard: false,
            outgoing: Vec::new(),
            outgoing_changed: false,
            lookups_at_flush: 0,
            silent: HashSet::new(),
        }
    }

    pub fn manager(&self) -> SocketAddr {
        self.manager
    }

    /// Sends queries straight to the ring's peers (the answer comes back from the peer that
    /// ends the walk: hops + 2 datagrams instead of hops + 4, and the manager is off the
    /// path), after asking the manager once for the ring. Off: through the manager.
    pub fn set_direct(&mut self, direct: bool) {
        self.ring = if direct {
            RingState::Unknown
        } else {
            RingState::Off
        };
    }

    /// Direct queries enter the ring at the key's owner, as the client's view says (a
    /// token-aware client, as Cassandra's drivers are): most take no hop. Off: at the next
    /// member round the ring, so the walk (or the fingers) show in the path.
    pub fn set_owner_entry(&mut self, owner: bool) {
        self.owner_entry = owner;
    }

    /// Wall-clock µs at this core's time zero, for the hop timeline of direct queries.
    pub fn set_clock_origin(&mut self, unix_us: u64) {
        self.clock_origin_us = unix_us;
    }

    /// Requests outstanding at once.
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// Queues request number `index`; its result comes back under the same number.
    pub fn submit(&mut self, index: usize, req: ClientRequest, trace: Option<TraceContext>) {
        self.queue.push_back((index, req, trace));
    }

    /// Nothing queued, nothing outstanding.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && self.lookups.is_empty()
    }

    /// Sends queued requests while the window allows.
    pub fn pump(&mut self, now: Time) {
        while self.in_flight.len() + self.lookups.len() < self.window {
            let Some((index, req, trace)) = self.queue.pop_front() else {
                return;
            };
            if let ClientRequest::Query { key, via, routing } = req {
                match &self.ring {
                    RingState::Off | RingState::Unavailable => {
                        let req = ClientRequest::Query { key, via, routing };
                        self.send_request(now, index, req, trace);
                    }
                    RingState::Known { .. } => {
                        self.start_lookup(now, index, key, via, routing, trace)
                    }
                    RingState::Unknown | RingState::Asking { .. } => {
                        // Queries wait for the ring.
                        let req = ClientRequest::Query { key, via, routing };
                        self.queue.push_front((index, req, trace));
                        self.ask_ring(now);
                        return;
                    }
                }
                continue;
            }
            self.send_request(now, index, req, trace);
        }
    }

    fn ask_ring(&mut self, now: Time) {
        if matches!(self.ring, RingState::Asking { .. } | RingState::Off) {
            return;
        }
        let body = Body::Request(ClientRequest::Ring);
        match self.link.send(now, self.manager, body, None, RING_TAG) {
            Ok(seq) => self.ring = RingState::Asking { seq, since: now },
            Err(_) => self.ring = RingState::Unavailable,
        }
    }

    /// A view at least [`RING_REFRESH`] old is asked for again (a lookup was refused or went
    /// unanswered: the ring may have changed); lookups go on with the old one meanwhile.
    fn refresh_ring(&mut self, now: Time) {
        if let RingState::Known { at, .. } = self.ring
            && now >= at + RING_REFRESH
            && self.ring_refresh.is_none()
        {
            let body = Body::Request(ClientRequest::Ring);
            if let Ok(seq) = self.link.send(now, self.manager, body, None, RING_TAG) {
                self.ring_refresh = Some(seq);
            }
        }
    }

    fn start_lookup(
        &mut self,
        now: Time,
        index: usize,
        key: RecordKey,
        via: Option<String>,
        routing: Option<Routing>,
        trace: Option<TraceContext>,
    ) {
        let query = self.next_lookup;
        self.next_lookup += 1;
        let lookup = Lookup {
            index,
            key,
            routing,
            via,
            trace,
            started: now,
            sent_at: now,
            attempts: 0,
            retry_at: now,
            entry: self.manager,
        };
        self.lookups.insert(query, lookup);
        self.send_lookup(now, query);
    }

    /// Sends lookup `query` (again) to an entry peer: the one named by `via`, else the next
    /// member round the ring, so each attempt enters somewhere else.
    fn send_lookup(&mut self, now: Time, query: u64) {
        let RingState::Known {
            view,
            index,
            routing,
            ..
        } = &self.ring
        else {
            return;
        };
        let Some(lookup) = self.lookups.get_mut(&query) else {
            return;
        };
        let members = &view.members;
        let silent = &self.silent;
        let entry = match &lookup.via {
            Some(v) => members
                .iter()
                .find(|m| &m.name == v || m.id.to_string() == *v),
            // The owner by the client's view: usually no hop at all. A retry enters elsewhere.
            None => (self.owner_entry && lookup.attempts == 0)
                .then(|| index.owner_of(view, lookup.key))
                .flatten()
                .filter(|m| !silent.contains(&m.addr))
                .or_else(|| {
                    // The next member round the ring that has not gone silent (any, if all have).
                    let n = members.len().max(1);
                    let first = self.next_entry.wrapping_add(1);
                    let pick = (0..n)
                        .map(|i| first.wrapping_add(i))
                        .find(|i| {
                            members
                                .get(i % n)
                                .is_some_and(|m| !silent.contains(&m.addr))
                        })
                        .unwrap_or(first);
                    self.next_entry = pick;
                    members.get(pick % n)
                }),
        };
        let Some(entry) = entry else {
            let error = match &lookup.via {
                Some(name) => RequestError::NotInRing { name: name.clone() },
                None => RequestError::NoRing,
            };
            if let Some(l) = self.lookups.remove(&query) {
                self.results
                    .push_back((l.index, Err(ClientError::Failed(error))));
            }
            return;
        };
        lookup.attempts += 1;
        lookup.sent_at = now;
        lookup.entry = entry.addr;
        let backoff = LOOKUP_RETRY * 2u32.saturating_pow(lookup.attempts - 1);
        lookup.retry_at = now + backoff.min(LOOKUP_RETRY_MAX);
        let find = FindEvent {
            query,
            key: lookup.key,
            path: Vec::new(),
            hops: Vec::new(),
            routing: lookup.routing.unwrap_or(*routing),
            reply_to: None,
        };
        // A retry of a lookup still waiting to be sent replaces it.
        self.outgoing.retain(|(_, f, _)| f.query != query);
        self.outgoing.push((entry.addr, find, lookup.trace.clone()));
        self.outgoing_changed = true;
    }

    /// Sends the gathered lookups: those to one peer together as a `Lookups` (a multi-get,
    /// up to [`LOOKUP_BATCH`] keys), a lone or traced one as a `Lookup` (its trace is its own).
    ///
    /// A peer that has lookups of ours unanswered gets the next ones only as a full batch, or
    /// once it has answered them all (Nagle's rule, per peer): without it, each answer frees a
    /// few slots of the window, spread over every owner, and a verify's datagrams shrink
    /// to one key each within a few rounds.
    fn flush_lookups(&mut self) {
        if !self.outgoing_changed && self.lookups.len() == self.lookups_at_flush {
            return;
        }
        self.outgoing_changed = false;
        self.lookups_at_flush = self.lookups.len();
        // Lookups answered (or given up) while they waited are not sent.
        self.outgoing
            .retain(|(_, f, _)| self.lookups.contains_key(&f.query));
        if self.outgoing.is_empty() {
            return;
        }
        // One lookup under way, and it is this one (a single query): nothing to gather it
        // with and nobody busy, so it goes as it is, without the maps below.
        if self.outgoing.len() == 1
            && self.lookups.len() == 1
            && let Some((dest, find, trace)) = self.outgoing.pop()
        {
            let query = find.query;
            let sent = self.link.send_once(dest, Body::Lookup(find), trace);
            return self.fail_lookup_if(query, sent.map_err(|e| e.to_string()));
        }
        let mut unanswered: HashMap<SocketAddr, usize> = HashMap::new();
        for l in self.lookups.values() {
            *unanswered.entry(l.entry).or_default() += 1;
        }
        let mut by_peer: BTreeMap<SocketAddr, Vec<FindEvent>> = BTreeMap::new();
        for (dest, find, trace) in std::mem::take(&mut self.outgoing) {
            if let Some(n) = unanswered.get_mut(&dest) {
                *n = n.saturating_sub(1);
            }
            if trace.is_some() {
                let query = find.query;
                let sent = self.link.send_once(dest, Body::Lookup(find), trace);
                self.fail_lookup_if(query, sent.map_err(|e| e.to_string()));
            } else {
                by_peer.entry(dest).or_default().push(find);
            }
        }
        for (dest, mut finds) in by_peer {
            if unanswered.get(&dest).is_some_and(|n| *n > 0) {
                // Busy: full batches go, the rest waits for its answers.
                let keep = finds.len() % LOOKUP_BATCH;
                let held = finds.split_off(finds.len() - keep);
                self.outgoing
                    .extend(held.into_iter().map(|f| (dest, f, None)));
            }
            let mut finds = finds.into_iter().peekable();
            while finds.peek().is_some() {
                let mut chunk: Vec<FindEvent> = finds.by_ref().take(LOOKUP_BATCH).collect();
                let queries: Vec<u64> = chunk.iter().map(|f| f.query).collect();
                let body = match chunk.len() {
                    1 => Body::Lookup(chunk.remove(0)),
                    _ => Body::Lookups(chunk),
                };
                let sent = self
                    .link
                    .send_once(dest, body, None)
                    .map_err(|e| e.to_string());
                for query in queries {
                    self.fail_lookup_if(query, sent.clone());
                }
            }
        }
    }

    /// A lookup that could not be encoded fails with the reason.
    fn fail_lookup_if(&mut self, query: u64, sent: Result<(), String>) {
        if let Err(e) = sent
            && let Some(l) = self.lookups.remove(&query)
        {
            let err = ClientError::Encode(e);
            self.results.push_back((l.index, Err(err)));
        }
    }

    fn on_answer(&mut self, now: Time, result: FindResult) {
        let Some(lookup) = self
            .lookups
            .get(&result.query)
            .filter(|l| l.key == result.key)
        else {
            return;
        };
        // A walk that could not ask every holder: not a miss. Asked again (entering
        // elsewhere) until the lookup's time is up, as if the answer had been lost.
        if result.unreached && !result.found {
            if now >= lookup.started + self.reply_timeout {
                self.give_up_lookup(now, result.query);
            } else {
                self.send_lookup(now, result.query);
            }
            return;
        }
        let Some(lookup) = self.lookups.remove(&result.query) else {
            return;
        };
        // More rows than one datagram holds: the manager's answer carries them all (it
        // travels acknowledged, in fragments).
        if result.found && result.truncated {
            let req = ClientRequest::Query {
                key: lookup.key,
                via: lookup.via,
                routing: lookup.routing,
            };
            return self.send_request(now, lookup.index, req, lookup.trace);
        }
        let view = match &self.ring {
            RingState::Known { view, .. } => Some(view),
            _ => None,
        };
        let member = |id| view.and_then(|v| v.member(id));
        let outcome = QueryOutcome::from_result(
            result,
            self.clock_origin_us + lookup.sent_at.as_micros() as u64,
            now.saturating_sub(lookup.sent_at).as_micros() as u64,
            |id| member(id).map_or_else(|| id.to_string(), |m| m.name.clone()),
            |id| member(id).map(|m| m.addr),
        );
        self.results
            .push_back((lookup.index, Ok(ReplyBody::Query(outcome))));
    }

    /// The entry peer will not take the lookup (not in a ring): enter at the next one at
    /// once, and fetch the ring again, which may have changed.
    fn on_lookup_refused(&mut self, now: Time, query: u64, reason: RejectReason) {
        let Some(lookup) = self.lookups.get(&query) else {
            return;
        };
        let members = match &self.ring {
            RingState::Known { view, .. } => view.members.len() as u32,
            _ => 0,
        };
        let give_up = lookup.via.is_some() || lookup.attempts >= members.max(1) * 2;
        self.refresh_ring(now);
        if give_up {
            if let Some(l) = self.lookups.remove(&query) {
                let error = RequestError::NoEntry {
                    key: l.key,
                    last: reason.to_string(),
                };
                self.results
                    .push_back((l.index, Err(ClientError::Failed(error))));
            }
        } else {
            self.send_lookup(now, query);
        }
    }

    fn give_up_lookup(&mut self, now: Time, query: u64) {
        if let Some(l) = self.lookups.remove(&query) {
            let err = ClientError::NoLookupAnswer {
                key: l.key,
                attempts: l.attempts,
                secs: now.saturating_sub(l.started).as_secs_f64(),
                last: l.entry,
            };
            self.results.push_back((l.index, Err(err)));
        }
    }

    fn lookups_due(&mut self, now: Time) {
        let due: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.retry_at <= now)
            .map(|(q, _)| *q)
            .collect();
        if !due.is_empty() {
            self.refresh_ring(now);
        }
        for query in &due {
            let sent = !self.outgoing.iter().any(|(_, f, _)| f.query == *query);
            if let Some(l) = self.lookups.get(query)
                && sent
            {
                self.silent.insert(l.entry);
            }
        }
        // No peer has ever answered this client, and a lookup went unanswered twice: the
        // peers' addresses are likely not reachable from here (a client outside the cluster's
        // network, which reaches only the manager's published port). Everything goes through
        // the manager from now on.
        let unreachable = !self.peer_heard
            && due
                .iter()
                .any(|q| self.lookups.get(q).is_some_and(|l| l.attempts >= 2));
        if unreachable {
            self.ring = RingState::Unavailable;
            let pending: Vec<Lookup> = std::mem::take(&mut self.lookups).into_values().collect();
            for l in pending {
                let req = ClientRequest::Query {
                    key: l.key,
                    via: l.via,
                    routing: l.routing,
                };
                self.send_request(now, l.index, req, l.trace);
            }
            return;
        }
        for query in due {
            let expired = self
                .lookups
                .get(&query)
                .is_some_and(|l| now >= l.started + self.reply_timeout);
            if expired {
                self.give_up_lookup(now, query);
            } else {
                self.send_lookup(now, query);
            }
        }
    }

    fn send_request(
        &mut self,
        now: Time,
        index: usize,
        req: ClientRequest,
        trace: Option<TraceContext>,
    ) {
        {
            match self
                .link
                .send(now, self.manager, Body::Request(req), trace, index)
            {
                Ok(seq) => {
                    let f = InFlight {
                        index,
                        sent_at: now,
                        acked_at: None,
                    };
                    self.in_flight.insert(seq, f);
                }
                Err(e) => self
                    .results
                    .push_back((index, Err(ClientError::Encode(e.to_string())))),
            }
        }
    }

    fn on_ring_reply(&mut self, now: Time, result: Result<ReplyBody, RequestError>) {
        match result {
            Ok(ReplyBody::Ring { view, routing }) if !view.members.is_empty() => {
                self.ring = RingState::Known {
                    index: PointIndex::new(&view),
                    view,
                    routing,
                    at: now,
                }
            }
            // A refresh that fails keeps the view it had.
            _ if matches!(self.ring, RingState::Known { .. }) => {}
            _ => self.ring = RingState::Unavailable,
        }
    }

    pub fn handle(&mut self, now: Time, from: SocketAddr, env: Envelope) {
        if !self.silent.is_empty() {
            self.silent.remove(&from);
        }
        // A reply too large for one datagram (a status of many peers) comes in fragments.
        let Some(env) = self.link.reassemble(now, from, env) else {
            return;
        };
        if self.link.accept(now, from, &env) == Accepted::New {
            match env.body {
                Body::Reply(reply) if self.is_ring_request(reply.to) => {
                    self.link.cancel(reply.to);
                    self.ring_refresh = None;
                    self.on_ring_reply(now, reply.result);
                }
                Body::Answer(result) => {
                    self.peer_heard = true;
                    self.on_answer(now, result)
                }
                Body::Answers(results) => {
                    self.peer_heard = true;
                    for result in results {
                        self.on_answer(now, result);
                    }
                }
                Body::LookupRefused { query, reason } => {
                    self.peer_heard = true;
                    self.on_lookup_refused(now, query, reason)
                }
                Body::Reply(reply) => {
                    if let Some(f) = self.in_flight.remove(&reply.to) {
                        self.link.cancel(reply.to);
                        let result = reply.result.map_err(ClientError::Failed);
                        self.results.push_back((f.index, result));
                    }
                }
                // Only from the manager, about a request it acknowledged: the request is
                // alive, so its reply deadline starts again.
                Body::Progress { to, done, total } if from == self.manager => {
                    if let Some(f) = self.in_flight.get_mut(&to)
                        && f.acked_at.is_some()
                    {
                        f.acked_at = Some(now);
                        self.progress.push_back((f.index, done, total));
                    }
                }
                _ => {}
            }
        }
        self.drain_outcomes(now);
    }

    /// One received datagram, as it came off the socket: opened with `keyring` when there is
    /// one, decoded, handled. What is not for us, or does not decode, is ignored.
    pub fn receive(
        &mut self,
        now: Time,
        from: SocketAddr,
        datagram: &[u8],
        keyring: Option<&Keyring>,
    ) {
        let payload = open_if_keyed(keyring, datagram).ok();
        if let Some(env) = payload.and_then(|p| Envelope::decode(p).ok()) {
            self.handle(now, from, env);
        }
    }

    /// The next word from the manager on a request under way: (index, done, total).
    pub fn poll_progress(&mut self) -> Option<(usize, u64, u64)> {
        self.progress.pop_front()
    }

    fn is_ring_request(&self, seq: u64) -> bool {
        matches!(self.ring, RingState::Asking { seq: s, .. } if s == seq)
            || self.ring_refresh == Some(seq)
    }

    pub fn handle_timeout(&mut self, now: Time) {
        self.link.handle_timeout(now);
        self.drain_outcomes(now);
        self.lookups_due(now);
        if let RingState::Asking { seq, since } = self.ring
            && now >= since + self.reply_timeout
        {
            self.link.cancel(seq);
            self.ring = RingState::Unavailable;
        }
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.acked_at.is_some_and(|a| now >= a + self.reply_timeout))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(f) = self.in_flight.remove(&seq) {
                let err = ClientError::NoReply {
                    manager: self.manager,
                    secs: self.reply_timeout.as_secs_f64(),
                };
                self.results.push_back((f.index, Err(err)));
            }
        }
    }

    /// The next retransmission or reply deadline.
    pub fn poll_timeout(&self) -> Option<Time> {
        let replies = self
            .in_flight
            .values()
            .filter_map(|f| f.acked_at)
            .min()
            .map(|a| a + self.reply_timeout);
        let lookups = self.lookups.values().map(|l| l.retry_at).min();
        let ring = match self.ring {
            RingState::Asking { since, .. } => Some(since + self.reply_timeout),
            _ => None,
        };
        [self.link.poll_timeout(), replies, lookups, ring]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.flush_lookups();
        self.link.poll_transmit()
    }

    pub fn has_results(&self) -> bool {
        !self.results.is_empty()
    }

    pub fn poll_result(&mut self) -> Option<(usize, Result<ReplyBody, ClientError>)> {
        self.results.pop_front()
    }

    fn seq_of(&self, index: usize) -> Option<u64> {
        self.in_flight
            .iter()
            .find(|(_, f)| f.index == index)
            .map(|(seq, _)| *seq)
    }

    fn drain_outcomes(&mut self, now: Time) {
        while let Some(outcome) = self.link.poll_outcome() {
            match outcome {
                Outcome::Acked { tag: RING_TAG, .. } => {}
                Outcome::Rejected { tag: RING_TAG, .. } | Outcome::GaveUp { tag: RING_TAG, .. } => {
                    self.ring_refresh = None;
                    self.on_ring_reply(now, Err(RequestError::NoRing));
                }
                Outcome::Acked { tag, .. } => {
                    if let Some(seq) = self.seq_of(tag)
                        && let Some(f) = self.in_flight.get_mut(&seq)
                    {
                        f.acked_at.get_or_insert(now);
                    }
                }
                Outcome::Rejected { tag, reason } => {
                    if let Some(seq) = self.seq_of(tag)
                        && let Some(f) = self.in_flight.remove(&seq)
                    {
                        let err = ClientError::Rejected(reason);
                        self.results.push_back((f.index, Err(err)));
                    }
                }
                Outcome::GaveUp { tag, attempts, .. } => {
                    if let Some(seq) = self.seq_of(tag)
                        && let Some(f) = self.in_flight.remove(&seq)
                    {
                        let err = ClientError::NoAnswer {
                            manager: self.manager,
                            attempts,
                            secs: now.saturating_sub(f.sent_at).as_secs_f64(),
                        };
                        self.results.push_back((f.index, Err(err)));
                    }
                }
            }
        }
    }
}

/// [`ClientCore`] over a datagram socket: real UDP for `stormctl`, the in-memory network in
/// the simulations.
pub struct Client<S = UdpSocket> {
    socket: S,
    core: ClientCore,
    start: Instant,
    buf: Vec<u8>,
    /// The cluster's keyring, when it has one: requests are sealed, replies must be.
    keyring: Option<Keyring>,
    /// Kept from one call to the next (see [`Timer`]); made on the first call, inside the
    /// runtime.
    timer: Option<Timer>,
}

impl Client<UdpSocket> {
    pub async fn connect(manager: &str, reply_timeout: Duration) -> Result<Client, ClientError> {
        let addr = lookup(manager).await.map_err(|e| ClientError::Resolve {
            addr: manager.to_string(),
            reason: e.to_string(),
        })?;
        let socket = bind_udp(&bind_addr_for(addr).to_string(), 4 << 20)
            .await
            .map_err(|e| ClientError::Io(e.to_string()))?;
        Ok(Client::over(
            socket,
            ClientCore::for_manager(addr, reply_timeout),
        ))
    }
}

/// Where a client of `manager` binds: the unspecified address of its family, any port.
fn bind_addr_for(manager: SocketAddr) -> SocketAddr {
    if manager.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    }
}

impl ClientCore {
    /// A client's core as `connect` makes it, async or blocking: a fresh incarnation, queries
    /// straight to the peers, hop timings on this machine's wall clock.
    fn for_manager(manager: SocketAddr, reply_timeout: Duration) -> ClientCore {
        let mut core = ClientCore::new(manager, rand::random(), client_retry(), reply_timeout);
        core.set_direct(true);
        core.set_clock_origin(crate::config::unix_micros_now());
        core
    }
}

impl<S: DatagramSocket> Client<S> {
    pub fn over(socket: S, core: ClientCore) -> Self {
        Client {
            socket,
            core,
            start: Instant::now(),
            buf: vec![0; 65_536],
            keyring: None,
            timer: None,
        }
    }

    /// Seals requests with `keyring`'s first key and hears only replies sealed by one of its.
    pub fn with_keyring(mut self, keyring: Option<Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    async fn send(&self, t: &Transmit) {
        let bytes = seal_if_keyed(self.keyring.as_ref(), &t.bytes);
        if let Err(e) = self.socket.send_to(&bytes, t.dest).await {
            tracing::debug!("send to {} failed: {e}", t.dest);
        }
    }

    pub fn manager(&self) -> SocketAddr {
        self.core.manager()
    }

    /// Queries straight to the ring's peers (the default of [`Client::connect`]) or through
    /// the manager.
    pub fn set_direct(&mut self, direct: bool) {
        self.core.set_direct(direct);
    }

    /// See [`ClientCore::set_owner_entry`].
    pub fn set_owner_entry(&mut self, owner: bool) {
        self.core.set_owner_entry(owner);
    }

    /// One request, one reply.
    pub async fn call(
        &mut self,
        req: ClientRequest,
        trace: Option<TraceContext>,
    ) -> Result<ReplyBody, ClientError> {
        let mut out = self.call_many(vec![(req, trace)], 1).await;
        out.pop().unwrap_or(Err(ClientError::NoResult))
    }

    /// Many requests with at most `window` outstanding; results in request order.
    pub async fn call_many(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
    ) -> Vec<Result<ReplyBody, ClientError>> {
        self.call_many_with(requests, window, |_, _| {}).await
    }

    /// One request, telling `progress` (done, total) whenever the manager reports how far it
    /// is (a distribute does, every 100 ms).
    pub async fn call_with_progress(
        &mut self,
        req: ClientRequest,
        trace: Option<TraceContext>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<ReplyBody, ClientError> {
        let mut out = self
            .drive(
                vec![(req, trace)],
                1,
                |_, _| {},
                |_, done, total| progress(done, total),
            )
            .await;
        out.pop().unwrap_or(Err(ClientError::NoResult))
    }

    /// As [`Client::call_many`], telling `progress` (done, total) as results come in.
    pub async fn call_many_with(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
        progress: impl FnMut(usize, usize),
    ) -> Vec<Result<ReplyBody, ClientError>> {
        self.drive(requests, window, progress, |_, _, _| {}).await
    }

    /// Sends `requests` with at most `window` outstanding until each has a result; `results_in`
    /// hears (results so far, total), `server_progress` what the manager says of a request.
    async fn drive(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
        mut results_in: impl FnMut(usize, usize),
        mut server_progress: impl FnMut(usize, u64, u64),
    ) -> Vec<Result<ReplyBody, ClientError>> {
        let total = requests.len();
        let mut results: Vec<Option<Result<ReplyBody, ClientError>>> = vec![None; total];
        self.core.set_window(window);
        for (index, (req, trace)) in requests.into_iter().enumerate() {
            self.core.submit(index, req, trace);
        }
        let mut done = 0;
        let mut timer = self.timer.take().unwrap_or_else(Timer::new);
        while !self.core.is_idle() {
            self.core.pump(self.start.elapsed());
            while let Some(t) = self.core.poll_transmit() {
                self.send(&t).await;
            }
            // A request can end without a datagram (a lookup via a peer not in the ring).
            let received = if self.core.has_results() {
                None
            } else {
                let wake = self.core.poll_timeout().map(|t| self.start + t);
                tokio::select! {
                    r = self.socket.recv_from(&mut self.buf) => Some(r),
                    _ = timer.until(wake) => None,
                }
            };
            let now = self.start.elapsed();
            match received {
                Some(Ok((len, from))) => {
                    self.core
                        .receive(now, from, &self.buf[..len], self.keyring.as_ref())
                }
                Some(Err(e)) => tracing::debug!("receive failed: {e}"),
                None => {}
            }
            self.core.handle_timeout(self.start.elapsed());
            while let Some((index, result)) = self.core.poll_result() {
                if let Some(slot) = results.get_mut(index) {
                    *slot = Some(result);
                    done += 1;
                    results_in(done, total);
                }
            }
            while let Some((index, so_far, of)) = self.core.poll_progress() {
                server_progress(index, so_far, of);
            }
            // Acks of replies go out before the next wait.
            while let Some(t) = self.core.poll_transmit() {
                self.send(&t).await;
            }
        }
        self.timer = Some(timer);
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ClientError::NoResult)))
            .collect()
    }
}

/// [`ClientCore`] over a blocking socket, on the caller's thread: `stormctl query` and the
/// benchmark's timed queries. With no runtime between the client and its socket, a query is
/// one send and one receive; the async [`Client`] also pays the runtime's wake-up and
/// bookkeeping on every reply (measured: a fifth of a query's CPU at the client).
pub struct BlockingClient {
    socket: std::net::UdpSocket,
    core: ClientCore,
    start: std::time::Instant,
    buf: Vec<u8>,
    keyring: Option<Keyring>,
    timeout: crate::driver::socket::ReadTimeout,
}

/// The longest a blocking client sleeps in one receive before it looks at its deadlines again.
const BLOCKING_WAIT_MAX: Duration = Duration::from_secs(1);

impl BlockingClient {
    /// A client of the manager at `manager` (resolved already), on a socket of its own.
    pub fn connect(manager: SocketAddr, reply_timeout: Duration) -> Result<Self, ClientError> {
        let socket = std::net::UdpSocket::bind(bind_addr_for(manager))
            .map_err(|e| ClientError::Io(e.to_string()))?;
        Ok(BlockingClient {
            socket,
            core: ClientCore::for_manager(manager, reply_timeout),
            start: std::time::Instant::now(),
            buf: vec![0; 65_536],
            keyring: None,
            timeout: crate::driver::socket::ReadTimeout::new(BLOCKING_WAIT_MAX),
        })
    }

    /// A blocking client with `client`'s manager, key, reply timeout and query settings (on a
    /// socket of its own; the ring is fetched again).
    pub fn like<S>(client: &Client<S>) -> Result<Self, ClientError> {
        let core = &client.core;
        let mut blocking = BlockingClient::connect(core.manager(), core.reply_timeout)?
            .with_keyring(client.keyring.clone());
        blocking
            .core
            .set_direct(!matches!(core.ring, RingState::Off));
        blocking.core.set_owner_entry(core.owner_entry);
        Ok(blocking)
    }

    pub fn manager(&self) -> SocketAddr {
        self.core.manager()
    }

    /// Seals requests with `keyring`'s first key and hears only replies sealed by one of its.
    pub fn with_keyring(mut self, keyring: Option<Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    /// See [`ClientCore::set_owner_entry`].
    pub fn set_owner_entry(&mut self, owner: bool) {
        self.core.set_owner_entry(owner);
    }

    /// Queries straight to the ring's peers (the default) or through the manager.
    pub fn set_direct(&mut self, direct: bool) {
        self.core.set_direct(direct);
    }

    fn now(&self) -> Time {
        self.start.elapsed()
    }

    fn send_queued(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            let bytes = seal_if_keyed(self.keyring.as_ref(), &t.bytes);
            if let Err(e) = self.socket.send_to(&bytes, t.dest) {
                tracing::debug!("send to {} failed: {e}", t.dest);
            }
        }
    }

    /// One request, one reply, as [`Client::call`].
    pub fn call(
        &mut self,
        req: ClientRequest,
        trace: Option<TraceContext>,
    ) -> Result<ReplyBody, ClientError> {
        self.core.set_window(1);
        self.core.submit(0, req, trace);
        let mut result = None;
        while !self.core.is_idle() {
            // The clock is read once before the wait and once after it (each read is a
            // measurable part of a query's CPU on this VM).
            let mut now = self.now();
            self.core.pump(now);
            self.send_queued();
            // A request can end without a datagram (a lookup via a peer not in the ring).
            if !self.core.has_results() {
                let wait = self
                    .core
                    .poll_timeout()
                    .map_or(BLOCKING_WAIT_MAX, |at| at.saturating_sub(now));
                if !wait.is_zero() {
                    self.timeout.set(&self.socket, wait);
                    let received = self.socket.recv_from(&mut self.buf);
                    now = self.now();
                    match received {
                        Ok((len, from)) => {
                            self.core
                                .receive(now, from, &self.buf[..len], self.keyring.as_ref());
                        }
                        Err(e) if crate::driver::socket::timed_out(&e) => self.timeout.expired(),
                        Err(e) => tracing::debug!("receive failed: {e}"),
                    }
                }
            }
            self.core.handle_timeout(now);
            while let Some((_, r)) = self.core.poll_result() {
                result = Some(r);
            }
            while self.core.poll_progress().is_some() {}
            // Acks of replies go out before the next wait.
            self.send_queued();
        }
        result.unwrap_or(Err(ClientError::NoResult))
    }
}

/// What `stormctl verify` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    pub file: String,
    pub keys: u64,
    pub rows: u64,
    pub found: u64,
    pub missing: u64,
    pub mismatched: u64,
    pub errors: u64,
    pub first_missing: Vec<String>,
    pub first_mismatched: Vec<String>,
    pub first_errors: Vec<String>,
    pub elapsed_ms: f64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.mismatched == 0 && self.errors == 0 && self.found == self.keys
    }
}

const SAMPLES: usize = 5;

/// Queries every key of `dataset` and compares the rows returned with the file's: a key is
/// found when every row of the file for it comes back (with the same column names and values).
pub async fn verify<S: DatagramSocket>(
    client: &mut Client<S>,
    file: &str,
    dataset: &Dataset,
    window: usize,
) -> VerifyReport {
    verify_with(client, file, dataset, window, |_, _| {}).await
}

/// As [`verify`], telling `progress` (keys checked, keys in all) as answers come in.
pub async fn verify_with<S: DatagramSocket>(
    client: &mut Client<S>,
    file: &str,
    dataset: &Dataset,
    window: usize,
    progress: impl FnMut(usize, usize),
) -> VerifyReport {
    let started = std::time::Instant::now();
    let mut expected: BTreeMap<RecordKey, Vec<&crate::wire::PackedRow>> = BTreeMap::new();
    for row in &dataset.rows {
        expected.entry(row.key).or_default().push(&row.values);
    }
    let keys: Vec<RecordKey> = expected.keys().copied().collect();
    let requests = keys
        .iter()
        .map(|k| {
            (
                ClientRequest::Query {
                    key: *k,
                    via: None,
                    routing: None,
                },
                None,
            )
        })
        .collect();
    let results = client.call_many_with(requests, window, progress).await;
    let mut report = VerifyReport {
        file: file.to_string(),
        keys: keys.len() as u64,
        rows: dataset.rows.len() as u64,
        found: 0,
        missing: 0,
        mismatched: 0,
        errors: 0,
        first_missing: Vec::new(),
        first_mismatched: Vec::new(),
        first_errors: Vec::new(),
        elapsed_ms: 0.0,
    };
    for (key, result) in keys.iter().zip(results) {
        match result {
            Ok(ReplyBody::Query(q)) if q.found => {
                let want = &expected[key];
                let all_there = want
                    .iter()
                    .all(|values| q.records.iter().any(|r| r.is(&dataset.columns, values)));
                if all_there {
                    report.found += 1;
                } else {
                    report.mismatched += 1;
                    if report.first_mismatched.len() < SAMPLES {
                        report.first_mismatched.push(key.to_string());
                    }
                }
            }
            Ok(ReplyBody::Query(_)) => {
                report.missing += 1;
                if report.first_missing.len() < SAMPLES {
                    report.first_missing.push(key.to_string());
                }
            }
            Ok(other) => {
                report.errors += 1;
                if report.first_errors.len() < SAMPLES {
                    report
                        .first_errors
                        .push(format!("{key}: unexpected reply {other:?}"));
                }
            }
            Err(e) => {
                report.errors += 1;
                if report.first_errors.len() < SAMPLES {
                    report.first_errors.push(format!("{key}: {e}"));
                }
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::UNSEQUENCED;

    fn manager() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5000))
    }

    /// A core with one distribute sent and acknowledged at t=0; its reply deadline is 1 s.
    fn acknowledged() -> (ClientCore, u64) {
        let mut core = ClientCore::new(manager(), 1, client_retry(), Duration::from_secs(1));
        core.submit(0, ClientRequest::Distribute { path: None }, None);
        core.pump(Duration::ZERO);
        let sent = core.poll_transmit().expect("the request");
        let seq = Envelope::decode(&sent.bytes).expect("decodes").seq;
        let ack = Body::Ack {
            seq,
            new_rows: None,
        };
        core.handle(
            Duration::ZERO,
            manager(),
            Envelope::new(9, UNSEQUENCED, None, ack),
        );
        (core, seq)
    }

    fn progress(to: u64, done: u64) -> Envelope {
        Envelope::new(
            9,
            UNSEQUENCED,
            None,
            Body::Progress {
                to,
                done,
                total: 100,
            },
        )
    }

    fn peer_addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6000 + i))
    }

    fn view(n: u16) -> RingView {
        RingView {
            epoch: 3,
            settled: true,
            placement: crate::wire::Placement::Consistent,
            table_size: 0,
            replication: 2,
            settled_epoch: 0,
            members: (0..n)
                .map(|i| crate::wire::Member {
                    id: u32::from(i) + 1,
                    name: format!("p{i}"),
                    addr: peer_addr(i),
                    token: u64::from(i) * (u64::MAX / u64::from(n)),
                    leaving: false,
                    vnodes: Vec::new(),
                })
                .collect(),
        }
    }

    fn decode(t: &Transmit) -> Envelope {
        Envelope::decode(&t.bytes).expect("decodes")
    }

    fn reply(to: u64, result: Result<ReplyBody, RequestError>) -> Envelope {
        Envelope::new(
            9,
            1,
            None,
            Body::Reply(crate::wire::ClientReply { to, result }),
        )
    }

    /// A direct core whose query for `key` is waiting on its ring request: answers it with
    /// `view`, and returns the lookup sent (destination, envelope).
    fn direct_query(key: u64, view: RingView, owner_entry: bool) -> (ClientCore, Transmit) {
        let mut core = ClientCore::new(manager(), 1, client_retry(), Duration::from_secs(2));
        core.set_direct(true);
        core.set_owner_entry(owner_entry);
        let query = ClientRequest::Query {
            key: RecordKey::Event(key),
            via: None,
            routing: None,
        };
        core.submit(0, query, None);
        core.pump(Duration::ZERO);
        let ask = core.poll_transmit().expect("the ring request");
        assert_eq!(ask.dest, manager());
        let env = decode(&ask);
        assert!(matches!(env.body, Body::Request(ClientRequest::Ring)));
        let ring = ReplyBody::Ring {
            view,
            routing: Routing::Walk,
        };
        core.handle(Duration::ZERO, manager(), reply(env.seq, Ok(ring)));
        core.pump(Duration::ZERO);
        // Everything queued (the lookup, and the ack of the ring's reply after it).
        let sent: Vec<Transmit> = std::iter::from_fn(|| core.poll_transmit()).collect();
        let lookup = sent
            .into_iter()
            .find(|t| matches!(decode(t).body, Body::Lookup(_)))
            .expect("a lookup");
        (core, lookup)
    }

    fn answer(query: u64, key: u64, path: Vec<u32>) -> Envelope {
        Envelope::new(
            7,
            UNSEQUENCED,
            None,
            Body::Answer(FindResult {
                query,
                key: RecordKey::Event(key),
                found: true,
                records: Vec::new(),
                path,
                truncated: false,
                hops: Vec::new(),
                unreached: false,
            }),
        )
    }

    fn lookup_query(t: &Transmit) -> u64 {
        match decode(t).body {
            Body::Lookup(f) => f.query,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_direct_query_asks_for_the_ring_then_a_peer_and_names_the_path() {
        let (mut core, lookup) = direct_query(42, view(4), false);
        assert_ne!(lookup.dest, manager());
        let q = lookup_query(&lookup);
        // An answer for another key, or another query, is not this one's.
        core.handle(Duration::ZERO, peer_addr(1), answer(q, 43, vec![2]));
        core.handle(Duration::ZERO, peer_addr(1), answer(q + 1, 42, vec![2]));
        assert!(core.poll_result().is_none());
        core.handle(Duration::ZERO, peer_addr(1), answer(q, 42, vec![2, 3]));
        match core.poll_result() {
            Some((0, Ok(ReplyBody::Query(o)))) => {
                assert_eq!(o.path_names, vec!["p1".to_string(), "p2".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        // A duplicated answer finds nothing waiting.
        core.handle(Duration::ZERO, peer_addr(1), answer(q, 42, vec![2, 3]));
        assert!(core.poll_result().is_none() && core.is_idle());
    }

    /// A verify's window of lookups leaves as one multi-get per owner; one `Answers` datagram
    /// ends all of its lookups, and a traced lookup still goes alone (its trace is its own).
    #[test]
    fn lookups_to_one_owner_leave_together_and_one_datagram_answers_them() {
        let ring = view(3);
        let mut core = ClientCore::new(manager(), 1, client_retry(), Duration::from_secs(2));
        core.set_direct(true);
        core.set_owner_entry(true);
        core.set_window(200);
        let keys: Vec<u64> = (1..=150).collect();
        for (i, k) in keys.iter().enumerate() {
            let query = ClientRequest::Query {
                key: RecordKey::Event(*k),
                via: None,
                routing: None,
            };
            core.submit(i, query, None);
        }
        core.pump(Duration::ZERO);
        let ask = decode(&core.poll_transmit().expect("the ring request"));
        let ring_reply = ReplyBody::Ring {
            view: ring.clone(),
            routing: Routing::Walk,
        };
        core.handle(Duration::ZERO, manager(), reply(ask.seq, Ok(ring_reply)));
        core.pump(Duration::ZERO);
        let sent: Vec<Transmit> = std::iter::from_fn(|| core.poll_transmit()).collect();
        let mut lookups: Vec<(SocketAddr, Vec<FindEvent>)> = Vec::new();
        for t in &sent {
            match decode(t).body {
                Body::Lookups(finds) => lookups.push((t.dest, finds)),
                Body::Lookup(find) => lookups.push((t.dest, vec![find])),
                _ => {}
            }
        }
        // 150 keys over 3 owners, at most 64 a datagram: a handful of datagrams, each key in
        // exactly one, at its owner.
        assert!(lookups.len() <= 3 * 3, "{} datagrams", lookups.len());
        let mut seen: Vec<u64> = Vec::new();
        for (dest, finds) in &lookups {
            assert!(finds.len() <= LOOKUP_BATCH);
            for f in finds {
                assert_eq!(ring.owner_of(f.key).map(|m| m.addr), Some(*dest));
                seen.push(f.query);
            }
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), keys.len());
        // One datagram answers every lookup of the first multi-get.
        let (dest, finds) = &lookups[0];
        let results = finds
            .iter()
            .map(|f| FindResult {
                query: f.query,
                key: f.key,
                found: true,
                records: Vec::new(),
                path: vec![1],
                truncated: false,
                hops: Vec::new(),
                unreached: false,
            })
            .collect();
        let answers = Envelope::new(7, UNSEQUENCED, None, Body::Answers(results));
        core.handle(Duration::ZERO, *dest, answers);
        let done: Vec<_> = std::iter::from_fn(|| core.poll_result()).collect();
        assert_eq!(done.len(), finds.len());
        assert!(
            done.iter()
                .all(|(_, r)| matches!(r, Ok(ReplyBody::Query(q)) if q.found))
        );
        // A traced query goes alone, even beside others to the same owner.
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: None,
        };
        let traced = ClientRequest::Query {
            key: RecordKey::Event(1),
            via: None,
            routing: None,
        };
        core.submit(500, traced, Some(trace.clone()));
        core.pump(Duration::ZERO);
        let alone = std::iter::from_fn(|| core.poll_transmit())
            .map(|t| decode(&t))
            .find(|e| matches!(&e.body, Body::Lookup(f) if f.key == RecordKey::Event(1)))
            .expect("the traced lookup, alone");
        assert_eq!(alone.trace, Some(trace));
    }

    /// A query at its owner, as `BlockingClient::call` runs it (submitted, its lookup sent,
    /// the owner's answer with one record read, the result taken), allocates a counted
    /// number of times: what the client spends per query besides its two system calls.
    #[test]
    fn a_query_at_its_owner_allocates_a_counted_number_of_times() {
        let ring = view(5);
        let (mut core, first) = direct_query(1, ring.clone(), true);
        let now = Duration::from_millis(1);
        let answered = |query: u64, key: u64, owner: u32| {
            let mut body = answer(query, key, vec![owner]).body;
            if let Body::Answer(r) = &mut body {
                let columns = crate::wire::PackedRow::pack(&["EVENT_ID", "STATE", "EVENT_TYPE"]);
                let values = crate::wire::PackedRow::pack(&[&key.to_string(), "OHIO", "Hail"]);
                r.records.push(crate::wire::RecordOut { columns, values });
                r.hops.push(crate::wire::HopTiming {
                    peer: owner,
                    at_us: 5,
                });
            }
            Envelope::new(7, UNSEQUENCED, None, body).encode().unwrap()
        };
        let owner = |key: u64| ring.owner_of(RecordKey::Event(key)).unwrap();
        core.receive(
            now,
            first.dest,
            &answered(lookup_query(&first), 1, owner(1).id),
            None,
        );
        assert!(core.poll_result().is_some());
        let mut counts = Vec::new();
        for key in 2..300u64 {
            let query = ClientRequest::Query {
                key: RecordKey::Event(key),
                via: None,
                routing: None,
            };
            let (n, lookup) = crate::alloc_count::allocations_in(|| {
                core.submit(0, query, None);
                core.pump(now);
                core.poll_transmit()
            });
            let lookup = lookup.expect("a lookup");
            assert_eq!(lookup.dest, owner(key).addr);
            let reply = answered(lookup_query(&lookup), key, owner(key).id);
            let (m, result) = crate::alloc_count::allocations_in(|| {
                core.receive(now, lookup.dest, &reply, None);
                core.handle_timeout(now);
                core.poll_result()
            });
            match result {
                Some((0, Ok(ReplyBody::Query(q)))) => assert!(q.found && q.records.len() == 1),
                other => panic!("{other:?}"),
            }
            counts.push(n + m);
        }
        let mean = counts[50..].iter().sum::<u64>() as f64 / (counts.len() - 50) as f64;
        eprintln!("allocations a query at its owner: {mean:.2}");
        // The lookup's bytes; the answer as read (its record's two rows and their list, the
        // path, the hop list); the outcome for people (the hops with their peers' names,
        // the path's names): 10.
        assert!(
            mean <= 10.0,
            "a query at its owner allocates {mean:.2} times"
        );
    }

    #[test]
    fn with_owner_entry_the_lookup_goes_to_the_keys_owner() {
        let ring = view(8);
        for key in [1u64, 99, 5_570_068] {
            let owner = ring.owner_of(RecordKey::Event(key)).unwrap().addr;
            let (_, lookup) = direct_query(key, ring.clone(), true);
            assert_eq!(lookup.dest, owner, "{key}");
        }
    }

    #[test]
    fn an_unanswered_lookup_is_retried_elsewhere_then_given_up() {
        let (mut core, first) = direct_query(42, view(4), false);
        // Peers have been heard (else the client would turn to the manager).
        let stray = answer(lookup_query(&first) + 99, 42, vec![2]);
        core.handle(Duration::ZERO, peer_addr(1), stray);
        let mut entries = vec![first.dest];
        let mut now = Duration::ZERO;
        while core.poll_result().is_none() {
            now = core.poll_timeout().expect("a deadline");
            core.handle_timeout(now);
            entries.extend(
                std::iter::from_fn(|| core.poll_transmit())
                    .filter(|t| matches!(decode(t).body, Body::Lookup(_)))
                    .map(|t| t.dest),
            );
            assert!(now < Duration::from_secs(5), "never gave up");
        }
        assert!(entries.len() >= 3, "{entries:?}");
        assert!(entries.windows(2).all(|w| w[0] != w[1]), "{entries:?}");
        assert!(now >= Duration::from_secs(2));
    }

    #[test]
    fn a_refused_lookup_enters_elsewhere_at_once() {
        let (mut core, first) = direct_query(42, view(4), false);
        let refused = Body::LookupRefused {
            query: lookup_query(&first),
            reason: RejectReason::NotInRing { peer: "p0".into() },
        };
        let env = Envelope::new(7, UNSEQUENCED, None, refused);
        core.handle(Duration::from_millis(1), first.dest, env);
        let again = std::iter::from_fn(|| core.poll_transmit())
            .find(|t| matches!(decode(t).body, Body::Lookup(_)))
            .expect("sent again at once");
        assert_ne!(again.dest, first.dest);
    }

    /// A client that never hears a peer (outside the cluster's network, where only the
    /// manager's port is published) sends its queries through the manager after two tries.
    #[test]
    fn when_no_peer_is_ever_heard_queries_fall_back_to_the_manager() {
        let (mut core, _) = direct_query(42, view(4), false);
        let (relayed, now) = loop {
            let now = core.poll_timeout().expect("a deadline");
            assert!(now < Duration::from_secs(2), "no fallback");
            core.handle_timeout(now);
            let sent: Vec<Transmit> = std::iter::from_fn(|| core.poll_transmit()).collect();
            if let Some(t) = sent
                .iter()
                .find(|t| matches!(decode(t).body, Body::Request(ClientRequest::Query { .. })))
            {
                break (t.dest, now);
            }
        };
        assert_eq!(relayed, manager());
        assert!(now >= Duration::from_millis(750), "{now:?}");
        // A client that has heard a peer keeps retrying at peers instead.
        let (mut core, first) = direct_query(42, view(4), false);
        let q = lookup_query(&first);
        core.handle(Duration::ZERO, peer_addr(1), answer(q + 99, 42, vec![2]));
        for _ in 0..3 {
            let at = core.poll_timeout().expect("a deadline");
            core.handle_timeout(at);
            let sent: Vec<Transmit> = std::iter::from_fn(|| core.poll_transmit()).collect();
            assert!(
                sent.iter().all(|t| t.dest != manager()
                    || matches!(decode(t).body, Body::Request(ClientRequest::Ring))),
                "went through the manager"
            );
        }
    }

    #[test]
    fn without_a_ring_from_the_manager_queries_go_through_it() {
        let mut core = ClientCore::new(manager(), 1, client_retry(), Duration::from_secs(2));
        core.set_direct(true);
        let query = ClientRequest::Query {
            key: RecordKey::Event(1),
            via: None,
            routing: None,
        };
        core.submit(0, query, None);
        core.pump(Duration::ZERO);
        let ask = decode(&core.poll_transmit().expect("the ring request"));
        core.handle(
            Duration::ZERO,
            manager(),
            reply(ask.seq, Err(RequestError::NoRing)),
        );
        core.pump(Duration::ZERO);
        let sent: Vec<Envelope> = std::iter::from_fn(|| core.poll_transmit())
            .map(|t| decode(&t))
            .collect();
        assert!(
            sent.iter()
                .any(|e| matches!(e.body, Body::Request(ClientRequest::Query { .. }))),
            "{sent:?}"
        );
    }

    #[test]
    fn progress_from_the_manager_is_reported_and_keeps_the_request_alive() {
        let (mut core, seq) = acknowledged();
        let at = Duration::from_millis(900);
        core.handle(at, manager(), progress(seq, 40));
        assert_eq!(core.poll_progress(), Some((0, 40, 100)));
        // Without the progress the reply deadline would have passed at 1 s.
        core.handle_timeout(Duration::from_millis(1_500));
        assert!(core.poll_result().is_none());
        core.handle_timeout(Duration::from_millis(1_950));
        assert!(matches!(
            core.poll_result(),
            Some((0, Err(ClientError::NoReply { .. })))
        ));
    }

    #[test]
    fn progress_from_a_stranger_or_for_another_request_is_ignored() {
        let (mut core, seq) = acknowledged();
        let stranger = SocketAddr::from(([127, 0, 0, 1], 6666));
        core.handle(Duration::from_millis(500), stranger, progress(seq, 40));
        core.handle(Duration::from_millis(500), manager(), progress(seq + 1, 40));
        assert_eq!(core.poll_progress(), None);
        core.handle_timeout(Duration::from_millis(1_100));
        assert!(matches!(
            core.poll_result(),
            Some((0, Err(ClientError::NoReply { .. })))
        ));
    }
}
