//! The manager's protocol state machine (sans-IO).
//!
//! The manager is the tracker: it registers peers, forms and rebuilds the ring, places records
//! on their owners, relays queries into the ring and answers back to `stormctl`, and tears the
//! cluster down. Membership changes run one at a time, in two steps: a ring view that is not
//! `settled` (a joiner added, or a leaver marked `leaving`), during which every peer hands over
//! the rows it no longer owns and reports `RebalanceDone`; then a settled view without the
//! leaver, which is told to exit. No row is dropped before its new owner acknowledged it.

mod distribute;
mod failure;
mod membership;
mod query;
mod recovery;
pub mod registry;
mod status;
mod teardown;
#[cfg(test)]
mod testkit;

use crate::link::{Accepted, Dropped, Link, Outcome, RetryPolicy, Time, Transmit};
use crate::machine::Machine;
use crate::measure::KeyCensus;
use crate::record::{Dataset, LoadError, RecordKey};
use crate::wire::{
    Body, ClientReply, ClientRequest, DistributeFailure, Envelope, Placement, RejectReason,
    ReplyBody, RequestError, RingView, Routing, TraceContext,
};
use distribute::DistributeJob;
use membership::{Change, Transition};
use query::PendingQuery;
use registry::Registry;
use status::{Gathering, StatusGather};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;
use teardown::TeardownJob;

pub use crate::wire::PeerId;
pub use failure::{DeadPeer, Detection};

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub retry: RetryPolicy,
    pub max_datagram: usize,
    /// Store batches in flight per peer.
    pub window: usize,
    pub placement: Placement,
    pub query_timeout: Duration,
    pub probe_timeout: Duration,
    /// The CSV that `distribute` loads when the client names none.
    pub default_data: Option<String>,
    /// Copies of every record.
    pub replication: u32,
    /// How queries travel the ring unless the client says otherwise.
    pub routing: Routing,
    /// Tokens per peer on the hash ring (virtual nodes).
    pub vnodes: u32,
    /// Place tokens by where the distributed rows hash (a census), not by key space alone.
    pub balance_by_data: bool,
    /// The wall clock (µs since the Unix epoch) at this machine's time zero, to put the
    /// peers' hop stamps on the query's timeline.
    pub clock_origin_us: u64,
    pub detection: Detection,
    /// How often the manager compares the holders of every range and has diverged ones
    /// copied (as `stormctl repair` does); `None`: only when asked.
    pub repair_interval: Option<Duration>,
}

/// A client request waiting for its reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCall {
    pub addr: SocketAddr,
    pub seq: u64,
    pub trace: Option<TraceContext>,
}

/// Which message to a peer a pending send was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMessage {
    Registered,
    Ring,
    Probe,
    /// A restarted manager asking for the view a rejoin named.
    ViewWanted,
    /// A repair asking a holder to copy its rows of diverged ranges to the others.
    Resync,
}

/// What a pending message was for, so that its outcome (acked, rejected, given up) can be acted on.
#[derive(Debug, Clone)]
pub enum ManagerTag {
    ToPeer(PeerId, PeerMessage),
    /// A refused registration (the sender has no id).
    Refusal,
    Batch {
        job: u64,
        peer: PeerId,
        /// The batch (rows of one or more units, all owned or all replicated by `peer`).
        batch: u64,
    },
    Find {
        query: u64,
        entry: PeerId,
    },
    Exit {
        peer: PeerId,
    },
    Reply,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ManagerEvent {
    /// The driver should start reading this CSV and hand over its first chunk of rows
    /// ([`ManagerInput::Rows`]), then the next whenever asked ([`ManagerEvent::WantRows`]), and
    /// at the end [`ManagerInput::LoadDone`].
    LoadFile {
        job: u64,
        path: String,
        /// Count the file's keys first ([`ManagerInput::Census`]), then hand over its rows.
        census: bool,
    },
    /// The job's queue runs low: hand over the next chunk (or the end).
    WantRows {
        job: u64,
    },
    PeerRegistered {
        id: PeerId,
        name: String,
        addr: SocketAddr,
    },
    RingChanged {
        epoch: u64,
        settled: bool,
        members: usize,
    },
    PeerLeft {
        id: PeerId,
        name: String,
    },
    PeerSuspected {
        id: PeerId,
    },
    /// A suspect was heard from again.
    PeerAlive {
        id: PeerId,
    },
    PeerDead {
        id: PeerId,
        name: String,
    },
    /// A restarted manager rebuilt the ring from the peers that registered again.
    Recovered {
        epoch: u64,
        members: usize,
        missing: usize,
    },
    QueryDispatched {
        query: u64,
        key: RecordKey,
        entry: PeerId,
        entry_addr: SocketAddr,
    },
    QueryDone {
        query: u64,
        found: bool,
        path: Vec<PeerId>,
    },
    QueryFailed {
        query: u64,
        reason: String,
    },
    DistributeFailed {
        job: u64,
        reason: String,
    },
    DistributeDone {
        job: u64,
        stored: u64,
        elapsed: Duration,
    },
    Warning(String),
}

/// The keys of the entries whose deadline has passed.
fn due<V>(map: &HashMap<u64, V>, now: Time, deadline: impl Fn(&V) -> Time) -> Vec<u64> {
    map.iter()
        .filter(|(_, v)| deadline(v) <= now)
        .map(|(k, _)| *k)
        .collect()
}

pub struct Manager {
    cfg: ManagerConfig,
    link: Link<ManagerTag>,
    registry: Registry,
    ring: Option<RingView>,
    /// The view the members named hold (the last one published to them all, or after a
    /// restart the one their rejoins named): the next view goes to them as a delta from it,
    /// to everyone else whole. None once the ring is gone.
    delta_base: Option<(RingView, HashSet<PeerId>)>,
    last_epoch: u64,
    /// The newest settled view's epoch, named in every view published (see
    /// [`RingView::settled_epoch`]).
    settled_epoch: u64,
    transition: Option<Transition>,
    changes: VecDeque<Change>,
    job: Option<DistributeJob>,
    next_job: u64,
    queries: HashMap<u64, PendingQuery>,
    next_query: u64,
    next_entry: usize,
    probes: HashMap<u64, StatusGather>,
    /// When the next periodic repair is due (with `repair_interval`).
    audit_at: Time,
    next_probe: u64,
    teardown: Option<TeardownJob>,
    /// The peers told to exit by a teardown, by incarnation (their old ids): one whose `Exit`
    /// is still on its way is not answered as unknown, which would make it register again.
    torn_down: HashMap<u64, PeerId>,
    /// `setup` calls waiting for every member to acknowledge the ring.
    setups: Vec<ClientCall>,
    /// `setup` calls that came while the manager gathered its peers.
    early_setups: Vec<ClientCall>,
    detector: failure::Detector,
    recovery: Option<recovery::Recovery>,
    /// Where the keys of the rows distributed so far hash: how joins and leaves weigh shares.
    census: KeyCensus,
    /// The ring was formed by `setup` here and nothing was placed on it since: its tokens can
    /// move to where the first file's rows are without moving a row.
    fresh_ring: bool,
    /// What the current input produced; handed to the caller when it returns.
    events: Vec<ManagerEvent>,
}

impl Manager {
    pub fn new(cfg: ManagerConfig, incarnation: u64) -> Self {
        let audit_at = cfg.repair_interval.unwrap_or_default();
        Manager {
            link: Link::new(incarnation, cfg.retry).with_max_datagram(cfg.max_datagram),
            cfg,
            registry: Registry::default(),
            ring: None,
            delta_base: None,
            last_epoch: 0,
            settled_epoch: 0,
            transition: None,
            changes: VecDeque::new(),
            job: None,
            next_job: 1,
            queries: HashMap::new(),
            next_query: 1,
            next_entry: 0,
            audit_at,
            probes: HashMap::new(),
            next_probe: 1,
            teardown: None,
            torn_down: HashMap::new(),
            setups: Vec::new(),
            early_setups: Vec::new(),
            detector: failure::Detector::default(),
            recovery: None,
            census: KeyCensus::default(),
            fresh_ring: false,
            events: Vec::new(),
        }
    }

    pub fn ring(&self) -> Option<&RingView> {
        self.ring.as_ref()
    }

    pub fn peer_count(&self) -> usize {
        self.registry.len()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A restarted manager still gathering its peers' rejoins.
    pub fn is_recovering(&self) -> bool {
        self.recovery.is_some()
    }

    /// Nothing under way: no message unacknowledged, no change, request or recovery pending
    /// (heartbeats and the failure detector's checks go on regardless).
    pub fn is_quiet(&self) -> bool {
        self.link.pending_len() == 0
            && self.transition.is_none()
            && self.changes.is_empty()
            && self.queries.is_empty()
            && self.probes.is_empty()
            && self.job.is_none()
            && self.recovery.is_none()
            && self.early_setups.is_empty()
    }

    pub(super) fn send(
        &mut self,
        now: Time,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
        tag: ManagerTag,
    ) {
        let kind = body.kind();
        if let Err(e) = self.link.send(now, dest, body, trace, tag) {
            self.events.push(ManagerEvent::Warning(format!(
                "could not send {kind} to {dest}: {e}"
            )));
        }
    }

    pub(super) fn reply(
        &mut self,
        now: Time,
        call: &ClientCall,
        result: Result<ReplyBody, RequestError>,
    ) {
        let body = Body::Reply(ClientReply {
            to: call.seq,
            result,
        });
        self.send(now, call.addr, body, call.trace.clone(), ManagerTag::Reply);
    }

    pub(super) fn on_datagram(
        &mut self,
        now: Time,
        from: SocketAddr,
        env: Envelope,
        trace: Option<TraceContext>,
    ) {
        // A message too large for one datagram comes in fragments: handled once whole.
        let Some((env, trace)) = self.link.reassemble_traced(now, from, env, trace) else {
            return;
        };
        // A lookup goes to a peer: say so to the client, which retries at one.
        let queries = match &env.body {
            Body::Lookup(find) => vec![find.query],
            Body::Lookups(finds) => finds.iter().map(|f| f.query).collect(),
            _ => Vec::new(),
        };
        if !queries.is_empty() {
            for query in queries {
                let reason = RejectReason::NotForManager {
                    kind: env.body.kind().to_string(),
                };
                let body = Body::LookupRefused { query, reason };
                self.link.send_unsequenced(from, body);
            }
            return;
        }
        // Refuse what the manager never handles before acknowledging it.
        if !matches!(
            env.body,
            Body::Ack { .. }
                | Body::Acks { .. }
                | Body::Reject { .. }
                | Body::Request(_)
                | Body::Register { .. }
                | Body::RebalanceDone { .. }
                | Body::LeaveRequest
                | Body::Found(_)
                | Body::HeldView(_)
                | Body::Report { .. }
                | Body::Heartbeat { .. }
                | Body::Ping { .. }
                | Body::Pong { .. }
        ) {
            let reason = RejectReason::NotForManager {
                kind: env.body.kind().to_string(),
            };
            self.events
                .push(ManagerEvent::Warning(format!("from {from}: {reason}")));
            return self.link.reject(from, env.seq, reason);
        }
        // Any datagram from a member is a sign of life.
        if let Some(id) = self.registry.by_incarnation(env.from) {
            self.heard_from(now, id);
        }
        match self.link.accept(now, from, &env) {
            Accepted::New => {}
            Accepted::Duplicate => return,
            Accepted::Control => return self.drain_outcomes(now),
        }
        let call = ClientCall {
            addr: from,
            seq: env.seq,
            trace: trace.clone(),
        };
        match env.body {
            Body::Request(req) => self.on_request(now, call, req),
            Body::Register { name, rejoin } => self.on_register(now, from, env.from, name, rejoin),
            Body::Heartbeat { epoch, id, beat } => {
                self.on_heartbeat(now, from, env.from, epoch, id, beat)
            }
            Body::Pong { nonce } => self.on_pong(now, nonce),
            // A health check (`stormd health`): answering says this process is running.
            Body::Ping { nonce } => self.link.send_unsequenced(from, Body::Pong { nonce }),
            Body::RebalanceDone { epoch, handed_over } => {
                let peer = self.registry.by_incarnation(env.from);
                self.on_rebalance_done(now, peer, epoch, handed_over);
            }
            Body::LeaveRequest => match self.registry.by_incarnation(env.from) {
                Some(id) => self.begin_leave(now, id, None),
                None => self.link.reject(from, env.seq, RejectReason::NotRegistered),
            },
            Body::Found(result) => self.on_found(now, result),
            Body::HeldView(view) if self.registry.by_incarnation(env.from).is_some() => {
                self.on_held_view(now, view);
            }
            Body::Report { probe, report } => {
                if let Some(id) = self.registry.by_incarnation(env.from) {
                    self.on_report(now, probe, id, report);
                }
            }
            // Refused above.
            _ => {}
        }
    }

    pub(super) fn on_request(&mut self, now: Time, call: ClientCall, req: ClientRequest) {
        if self.teardown.is_some() && !matches!(req, ClientRequest::Status) {
            return self.reply(now, &call, Err(RequestError::TeardownInProgress));
        }
        if self.recovery.is_some() && !matches!(req, ClientRequest::Status | ClientRequest::Setup) {
            let err = self.recovering_error();
            return self.reply(now, &call, Err(err));
        }
        match req {
            ClientRequest::Setup => self.setup(now, call),
            ClientRequest::Distribute { path } => self.distribute(now, call, path),
            ClientRequest::Query { key, via, routing } => self.query(now, call, key, via, routing),
            ClientRequest::Leave { name } => match self.registry.by_name_or_id(&name) {
                Some(id) => self.begin_leave(now, id, Some(call)),
                None => self.reply(now, &call, Err(RequestError::NoSuchPeer { name })),
            },
            ClientRequest::Status => self.start_status(now, call, Gathering::Status),
            ClientRequest::Repair => self.start_repair(now, call),
            ClientRequest::Teardown => self.start_teardown(now, call),
            ClientRequest::Ring => {
                let routing = self.cfg.routing;
                let view = self
                    .ring
                    .clone()
                    .map(|view| ReplyBody::Ring { view, routing });
                self.reply(now, &call, view.ok_or(RequestError::NoRing))
            }
        }
    }

    pub(super) fn on_timeout(&mut self, now: Time) {
        self.link.handle_timeout(now);
        self.check_liveness(now);
        self.recovery_due(now);
        self.release_early_setups(now);
        self.nudge_transition(now);
        for id in due(&self.queries, now, |q| q.deadline) {
            let secs = self.cfg.query_timeout.as_secs_f64();
            self.fail_query(now, id, |key| RequestError::QueryTimeout { key, secs });
        }
        self.reenter_overdue(now);
        for probe in due(&self.probes, now, |p| p.deadline) {
            self.maybe_finish_status(now, probe, true);
        }
        self.audit_if_due(now);
        self.drain_outcomes(now);
    }

    pub(super) fn drain_outcomes(&mut self, now: Time) {
        while let Some(outcome) = self.link.poll_outcome() {
            match outcome {
                Outcome::Acked {
                    tag: ManagerTag::Batch { job, peer, batch },
                    new_rows,
                } => self.batch_acked(now, job, peer, batch, new_rows),
                Outcome::Acked {
                    tag: ManagerTag::Exit { peer },
                    ..
                } => self.exit_confirmed(now, peer, true),
                Outcome::Acked { .. } => {}
                Outcome::Rejected { tag, reason } => {
                    self.events
                        .push(ManagerEvent::Warning(format!("{tag:?} rejected: {reason}")));
                    match tag {
                        ManagerTag::Batch { job, peer, .. }
                            if self.job.as_ref().is_some_and(|j| j.id == job) =>
                        {
                            let failure = DistributeFailure::BatchRefused { peer, reason };
                            self.finish_job(now, Err(failure));
                        }
                        ManagerTag::Find { query, entry } => {
                            self.retry_find(now, query, entry, reason.to_string())
                        }
                        _ => {}
                    }
                }
                Outcome::GaveUp {
                    tag,
                    dest,
                    attempts,
                } => self.gave_up(now, tag, dest, attempts),
            }
        }
        self.release_ring_waiters(now);
    }

    pub(super) fn gave_up(&mut self, now: Time, tag: ManagerTag, dest: SocketAddr, attempts: u32) {
        let silent = format!("{dest} did not acknowledge after {attempts} attempts");
        match tag {
            ManagerTag::Batch { job, peer, .. } => {
                if self.job.as_ref().is_some_and(|j| j.id == job) {
                    let failure = DistributeFailure::PeerSilent {
                        peer,
                        addr: dest,
                        attempts,
                    };
                    self.finish_job(now, Err(failure));
                }
            }
            ManagerTag::Find { query, entry } => {
                self.retry_find(now, query, entry, format!("the entry peer at {silent}"))
            }
            ManagerTag::Exit { peer } => {
                self.events.push(ManagerEvent::Warning(format!(
                    "exit for peer {peer}: {silent}"
                )));
                self.exit_confirmed(now, peer, false);
            }
            ManagerTag::ToPeer(peer, what) => {
                self.events.push(ManagerEvent::Warning(format!(
                    "{what:?} for peer {peer}: {silent}"
                )));
                // A peer that cannot hear the ring cannot report its hand-off: stop waiting for it.
                if what == PeerMessage::Ring
                    && let Some(t) = self.transition.as_mut()
                    && t.waiting.remove(&peer)
                {
                    t.unreachable.insert(peer);
                    if t.waiting.is_empty() {
                        self.finish_transition(now);
                    }
                }
            }
            ManagerTag::Refusal => {
                self.events.push(ManagerEvent::Warning(format!(
                    "refusal of a registration: {silent}"
                )));
            }
            ManagerTag::Reply => {
                self.events
                    .push(ManagerEvent::Warning(format!("reply to client {silent}")));
            }
        }
    }
}

/// What the manager's driver feeds it besides datagrams.
#[derive(Debug)]
pub enum ManagerInput {
    /// The next stretch of rows of a distribute job's CSV (asked for with
    /// [`ManagerEvent::WantRows`], or the first after [`ManagerEvent::LoadFile`]).
    Rows { job: u64, chunk: Dataset },
    /// Where the keys of a distribute job's CSV hash, counted before its rows are handed over
    /// (asked for by [`ManagerEvent::LoadFile`]'s `census`).
    Census { job: u64, census: Box<KeyCensus> },
    /// The end of a distribute job's CSV: read whole, or not.
    LoadDone {
        job: u64,
        result: Result<(), LoadError>,
    },
}

impl Machine for Manager {
    type Event = ManagerEvent;
    type Local = ManagerInput;

    /// `trace` is the context of the driver's span for this datagram.
    fn handle(
        &mut self,
        now: Time,
        from: SocketAddr,
        env: Envelope,
        trace: Option<TraceContext>,
    ) -> Vec<ManagerEvent> {
        self.on_datagram(now, from, env, trace);
        std::mem::take(&mut self.events)
    }

    fn recycle_events(&mut self, spent: Vec<ManagerEvent>) {
        crate::machine::reuse_events(&mut self.events, spent);
    }

    fn reassemble(&mut self, now: Time, from: SocketAddr, env: Envelope) -> Option<Envelope> {
        self.link.reassemble(now, from, env)
    }

    fn handle_timeout(&mut self, now: Time) -> Vec<ManagerEvent> {
        self.on_timeout(now);
        std::mem::take(&mut self.events)
    }

    fn handle_local(&mut self, now: Time, input: ManagerInput) -> Vec<ManagerEvent> {
        match input {
            ManagerInput::Rows { job, chunk } => self.on_rows(now, job, chunk),
            ManagerInput::Census { job, census } => self.on_census(now, job, &census),
            ManagerInput::LoadDone { job, result } => self.on_load_done(now, job, result),
        }
        std::mem::take(&mut self.events)
    }

    fn poll_timeout(&self) -> Option<Time> {
        let deadlines = self
            .queries
            .values()
            .map(|q| q.deadline.min(q.reenter_at))
            .chain(self.probes.values().map(|p| p.deadline))
            .chain(self.transition.as_ref().map(|t| t.nudge_at))
            .chain(self.detector.check_at)
            .chain(self.recovery.as_ref().map(|r| r.deadline))
            .chain(self.recovery.as_ref().and_then(|r| r.next_ask()))
            .chain(self.early_setup_due())
            .chain(self.cfg.repair_interval.map(|_| self.audit_at));
        deadlines.chain(self.link.poll_timeout()).min()
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.link.poll_transmit()
    }

    fn note_dropped(&mut self, dropped: Dropped) {
        self.link.note_dropped(dropped);
    }

    fn incarnation(&self) -> u64 {
        self.link.incarnation()
    }

    fn set_clock_origin(&mut self, unix_us: u64) {
        self.cfg.clock_origin_us = unix_us;
    }
}
