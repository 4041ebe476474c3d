//! The manager's protocol state machine (sans-IO).
//!
//! The manager is the tracker: it registers peers, forms and rebuilds the ring, places records
//! on their owners, relays queries into the ring and answers back to `stormctl`, and tears the
//! cluster down. Membership changes run one at a time, in two steps: a ring view that is not
//! `settled` (a joiner added, or a leaver marked `leaving`), during which every peer hands over
//! the rows it no longer owns and reports `RebalanceDone`; then a settled view without the
//! leaver, which is told to exit. No row is dropped before its new owner acknowledged it.

use crate::link::{Accepted, Link, Outcome, RetryPolicy, Time, Transmit};
use crate::record::{Dataset, RecordKey};
use crate::ring::{RingExt, evenly_spaced_tokens, first_prime_above, token_for_joiner};
use crate::store::{batch_budget, make_batches, row_size};
use crate::wire::{
    Body, ClientReply, ClientRequest, DistributeReport, Envelope, FindEvent, FindResult, Member,
    PeerId, PeerReport, PeerStatus, Placement, QueryOutcome, ReplyBody, RingView, StatusReport,
    StoreBatch, TraceContext, WireRow,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

/// Which placement a new ring uses; the course's `s` is fixed when records are distributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementKind {
    Consistent,
    Modulo,
    Course,
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub retry: RetryPolicy,
    pub max_datagram: usize,
    /// Store batches in flight per peer.
    pub window: usize,
    pub placement: PlacementKind,
    pub query_timeout: Duration,
    pub probe_timeout: Duration,
    /// The CSV that `distribute` loads when the client names none.
    pub default_data: Option<String>,
}

/// A client request waiting for its reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCall {
    pub addr: SocketAddr,
    pub seq: u64,
    pub trace: Option<TraceContext>,
}

#[derive(Debug, Clone)]
pub enum ManagerTag {
    ToPeer(PeerId, &'static str),
    Batch { job: u64, peer: PeerId, rows: u32 },
    Find { query: u64, entry: PeerId },
    Exit { peer: PeerId },
    Reply,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ManagerEvent {
    /// The driver should load this CSV and call [`Manager::file_loaded`].
    LoadFile {
        job: u64,
        path: String,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerState {
    Registered,
    InRing,
    Leaving,
}

#[derive(Debug, Clone)]
struct PeerEntry {
    name: String,
    addr: SocketAddr,
    incarnation: u64,
    state: PeerState,
}

#[derive(Debug, Clone)]
enum Change {
    Join(PeerId),
    Leave(PeerId, Option<ClientCall>),
    /// The course placement's table size changes: every peer re-checks what it owns.
    Reshape(Placement),
}

struct Transition {
    epoch: u64,
    change: Change,
    waiting: BTreeSet<PeerId>,
    /// Members given up on: they never confirmed their hand-off.
    unreachable: BTreeSet<PeerId>,
    handed_over: u64,
    /// When the view is sent again to members that have not reported (a member that cannot
    /// be reached then gives up and is no longer waited for).
    nudge_at: Time,
}

/// The keys of the entries whose deadline has passed.
fn due<V>(map: &HashMap<u64, V>, now: Time, deadline: impl Fn(&V) -> Time) -> Vec<u64> {
    map.iter()
        .filter(|(_, v)| deadline(v) <= now)
        .map(|(k, _)| *k)
        .collect()
}

/// Queries the manager follows at once; beyond it clients are told to retry, so a flood of
/// requests cannot grow its memory without bound.
const MAX_QUERIES_IN_FLIGHT: usize = 16_384;

/// How long a membership change waits for hand-off reports before asking again.
const TRANSITION_NUDGE: Duration = Duration::from_secs(3);

struct DistributeJob {
    id: u64,
    call: ClientCall,
    started: Time,
    queues: BTreeMap<PeerId, VecDeque<StoreBatch>>,
    in_flight: BTreeMap<PeerId, usize>,
    report: DistributeReport,
    per_peer: BTreeMap<PeerId, u64>,
}

struct PendingQuery {
    call: ClientCall,
    key: RecordKey,
    sent: Time,
    deadline: Time,
    /// Entry peers that refused the query or did not acknowledge it.
    tried: Vec<PeerId>,
}

struct StatusGather {
    call: ClientCall,
    deadline: Time,
    waiting: BTreeSet<PeerId>,
    reports: BTreeMap<PeerId, PeerReport>,
    setup: bool,
}

struct TeardownJob {
    call: ClientCall,
    waiting: BTreeSet<PeerId>,
    peers: u32,
}

pub struct Manager {
    cfg: ManagerConfig,
    link: Link<ManagerTag>,
    peers: BTreeMap<PeerId, PeerEntry>,
    next_id: PeerId,
    ring: Option<RingView>,
    last_epoch: u64,
    transition: Option<Transition>,
    changes: VecDeque<Change>,
    job: Option<DistributeJob>,
    next_job: u64,
    queries: HashMap<u64, PendingQuery>,
    next_query: u64,
    next_entry: usize,
    probes: HashMap<u64, StatusGather>,
    next_probe: u64,
    teardown: Option<TeardownJob>,
    /// `setup` calls waiting for every member to acknowledge the ring.
    setups: Vec<ClientCall>,
    events: VecDeque<ManagerEvent>,
}

impl Manager {
    pub fn new(cfg: ManagerConfig, incarnation: u64) -> Self {
        Manager {
            link: Link::new(incarnation, cfg.retry),
            cfg,
            peers: BTreeMap::new(),
            next_id: 1,
            ring: None,
            last_epoch: 0,
            transition: None,
            changes: VecDeque::new(),
            job: None,
            next_job: 1,
            queries: HashMap::new(),
            next_query: 1,
            next_entry: 0,
            probes: HashMap::new(),
            next_probe: 1,
            teardown: None,
            setups: Vec::new(),
            events: VecDeque::new(),
        }
    }

    pub fn ring(&self) -> Option<&RingView> {
        self.ring.as_ref()
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    fn send(
        &mut self,
        now: Time,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
        tag: ManagerTag,
    ) {
        let kind = body.kind();
        if let Err(e) = self.link.send(now, dest, body, trace, tag) {
            self.events.push_back(ManagerEvent::Warning(format!(
                "could not send {kind} to {dest}: {e}"
            )));
        }
    }

    fn reply(&mut self, now: Time, call: &ClientCall, result: Result<ReplyBody, String>) {
        let body = Body::Reply(ClientReply {
            to: call.seq,
            result,
        });
        self.send(now, call.addr, body, call.trace.clone(), ManagerTag::Reply);
    }

    /// Handles one decoded datagram; `trace` is the context of the driver's span for it.
    pub fn handle(
        &mut self,
        now: Time,
        from: SocketAddr,
        env: Envelope,
        trace: Option<TraceContext>,
    ) {
        // Refuse what the manager never handles before acknowledging it.
        if !matches!(
            env.body,
            Body::Ack { .. }
                | Body::Reject { .. }
                | Body::Request(_)
                | Body::Register { .. }
                | Body::RebalanceDone { .. }
                | Body::LeaveRequest
                | Body::Found(_)
                | Body::Report { .. }
        ) {
            let reason = format!("the manager does not handle '{}' messages", env.body.kind());
            self.events
                .push_back(ManagerEvent::Warning(format!("from {from}: {reason}")));
            return self.link.reject(from, env.seq, reason);
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
            Body::Register { name } => self.on_register(now, from, env.from, name),
            Body::RebalanceDone { epoch, handed_over } => {
                let peer = self.peer_by_incarnation(env.from);
                self.on_rebalance_done(now, peer, epoch, handed_over);
            }
            Body::LeaveRequest => match self.peer_by_incarnation(env.from) {
                Some(id) => self.begin_leave(now, id, None),
                None => self.link.reject(from, env.seq, "not a registered peer"),
            },
            Body::Found(result) => self.on_found(now, result),
            Body::Report { probe, report } => {
                if let Some(id) = self.peer_by_incarnation(env.from) {
                    self.on_report(now, probe, id, report);
                }
            }
            // Refused above.
            _ => {}
        }
    }

    fn peer_by_incarnation(&self, incarnation: u64) -> Option<PeerId> {
        self.peers
            .iter()
            .find(|(_, p)| p.incarnation == incarnation)
            .map(|(id, _)| *id)
    }

    fn peer_by_name_or_id(&self, name: &str) -> Option<PeerId> {
        self.peers
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(id, _)| *id)
            .or_else(|| {
                name.parse::<PeerId>()
                    .ok()
                    .filter(|id| self.peers.contains_key(id))
            })
    }

    fn on_request(&mut self, now: Time, call: ClientCall, req: ClientRequest) {
        if self.teardown.is_some() && !matches!(req, ClientRequest::Status) {
            return self.reply(now, &call, Err("a teardown is in progress".into()));
        }
        match req {
            ClientRequest::Setup => self.setup(now, call),
            ClientRequest::Distribute { path } => self.distribute(now, call, path),
            ClientRequest::Query { key, via } => self.query(now, call, key, via),
            ClientRequest::Leave { name } => match self.peer_by_name_or_id(&name) {
                Some(id) => self.begin_leave(now, id, Some(call)),
                None => self.reply(now, &call, Err(format!("no peer is named '{name}'"))),
            },
            ClientRequest::Status => self.start_status(now, call, false),
            ClientRequest::Teardown => self.start_teardown(now, call),
        }
    }

    fn on_register(&mut self, now: Time, addr: SocketAddr, incarnation: u64, name: String) {
        if let Some(id) = self.peer_by_incarnation(incarnation) {
            // The same process again (its earlier answer was lost): same id.
            return self.send(
                now,
                addr,
                Body::Registered { id },
                None,
                ManagerTag::ToPeer(id, "registered"),
            );
        }
        let refusal = if name.trim().is_empty() {
            Some("a peer name must not be empty".to_string())
        } else {
            self.peers
                .iter()
                .find(|(_, p)| p.name == name)
                .map(|(id, p)| format!("the name '{name}' is taken by peer {id} at {}", p.addr))
        };
        if let Some(reason) = refusal {
            self.events.push_back(ManagerEvent::Warning(format!(
                "refused registration from {addr}: {reason}"
            )));
            let tag = ManagerTag::ToPeer(0, "refused");
            return self.send(now, addr, Body::Refused { reason }, None, tag);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.peers.insert(
            id,
            PeerEntry {
                name: name.clone(),
                addr,
                incarnation,
                state: PeerState::Registered,
            },
        );
        self.events
            .push_back(ManagerEvent::PeerRegistered { id, name, addr });
        self.send(
            now,
            addr,
            Body::Registered { id },
            None,
            ManagerTag::ToPeer(id, "registered"),
        );
        if self.ring.is_some() {
            self.enqueue(now, Change::Join(id));
        }
    }

    fn new_epoch(&mut self) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    fn initial_placement(&self) -> Placement {
        match self.cfg.placement {
            PlacementKind::Consistent => Placement::Consistent,
            PlacementKind::Modulo => Placement::Modulo,
            PlacementKind::Course => Placement::Course {
                s: first_prime_above(0),
            },
        }
    }

    fn setup(&mut self, now: Time, call: ClientCall) {
        if self.ring.is_none() {
            let ids: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.state == PeerState::Registered)
                .map(|(id, _)| *id)
                .collect();
            if ids.is_empty() {
                return self.reply(now, &call, Err("no peers have registered yet".into()));
            }
            let members = ids
                .iter()
                .zip(evenly_spaced_tokens(ids.len()))
                .map(|(id, token)| {
                    let p = &self.peers[id];
                    Member {
                        id: *id,
                        name: p.name.clone(),
                        addr: p.addr,
                        token,
                        leaving: false,
                    }
                })
                .collect();
            for id in &ids {
                if let Some(p) = self.peers.get_mut(id) {
                    p.state = PeerState::InRing;
                }
            }
            let epoch = self.new_epoch();
            let view = RingView {
                epoch,
                settled: true,
                placement: self.initial_placement(),
                members,
            };
            self.publish(now, view, call.trace.clone());
        }
        // Answer once every member holds the ring, so that the first query after `setup`
        // cannot enter at a peer that does not know it yet.
        self.setups.push(call);
        self.release_setups(now);
    }

    fn release_setups(&mut self, now: Time) {
        // Every member must know the ring and its own id before the first query walks it.
        let delivering = self.link.has_pending_where(|t| {
            matches!(
                t,
                ManagerTag::ToPeer(_, "ring") | ManagerTag::ToPeer(_, "registered")
            )
        });
        if delivering || self.setups.is_empty() {
            return;
        }
        for call in std::mem::take(&mut self.setups) {
            self.start_status(now, call, true);
        }
    }

    /// Makes `view` current and sends it to every member.
    fn publish(&mut self, now: Time, view: RingView, trace: Option<TraceContext>) {
        self.events.push_back(ManagerEvent::RingChanged {
            epoch: view.epoch,
            settled: view.settled,
            members: view.members.len(),
        });
        for m in &view.members {
            self.send(
                now,
                m.addr,
                Body::Ring(view.clone()),
                trace.clone(),
                ManagerTag::ToPeer(m.id, "ring"),
            );
        }
        self.ring = Some(view);
    }

    fn enqueue(&mut self, now: Time, change: Change) {
        self.changes.push_back(change);
        self.next_change(now);
    }

    fn next_change(&mut self, now: Time) {
        while self.transition.is_none() {
            let Some(change) = self.changes.pop_front() else {
                return;
            };
            let Some(mut view) = self.ring.clone() else {
                return;
            };
            match &change {
                Change::Join(id) => {
                    let Some(p) = self.peers.get_mut(id) else {
                        continue;
                    };
                    if p.state != PeerState::Registered {
                        continue;
                    }
                    p.state = PeerState::InRing;
                    let (name, addr) = (p.name.clone(), p.addr);
                    let token = token_for_joiner(&view.members);
                    view.members.push(Member {
                        id: *id,
                        name,
                        addr,
                        token,
                        leaving: false,
                    });
                    view.members.sort_by_key(|m| (m.token, m.id));
                }
                Change::Leave(id, _) => {
                    let Some(m) = view.members.iter_mut().find(|m| m.id == *id) else {
                        continue;
                    };
                    m.leaving = true;
                    if let Some(p) = self.peers.get_mut(id) {
                        p.state = PeerState::Leaving;
                    }
                }
                Change::Reshape(placement) => view.placement = *placement,
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

    fn on_rebalance_done(&mut self, now: Time, peer: Option<PeerId>, epoch: u64, handed_over: u64) {
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
    fn nudge_transition(&mut self, now: Time) {
        let Some(t) = self.transition.as_mut().filter(|t| t.nudge_at <= now) else {
            return;
        };
        t.nudge_at = now + TRANSITION_NUDGE;
        let waiting: Vec<PeerId> = t.waiting.iter().copied().collect();
        let Some(view) = self.ring.clone() else {
            return;
        };
        for id in waiting {
            if self
                .link
                .has_pending_where(|tag| matches!(tag, ManagerTag::ToPeer(p, "ring") if *p == id))
            {
                continue; // still being retransmitted
            }
            if let Some(m) = view.members.iter().find(|m| m.id == id) {
                let addr = m.addr;
                self.send(
                    now,
                    addr,
                    Body::Ring(view.clone()),
                    None,
                    ManagerTag::ToPeer(id, "ring"),
                );
            }
        }
    }

    fn finish_transition(&mut self, now: Time) {
        let Some(t) = self.transition.take() else {
            return;
        };
        let Some(mut view) = self.ring.clone() else {
            return;
        };
        if let Change::Leave(id, call) = &t.change {
            view.members.retain(|m| m.id != *id);
            if let Some(p) = self.peers.remove(id) {
                let reason = "left the ring; its records are with their new owners".to_string();
                self.send(
                    now,
                    p.addr,
                    Body::Exit { reason },
                    None,
                    ManagerTag::Exit { peer: *id },
                );
                self.events.push_back(ManagerEvent::PeerLeft {
                    id: *id,
                    name: p.name.clone(),
                });
                if let Some(call) = call {
                    let result = if t.unreachable.contains(id) {
                        Err(format!(
                            "peer {id} ({}) did not answer; it was removed from the ring, and the records it held are lost",
                            p.name
                        ))
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
            self.events.push_back(ManagerEvent::RingChanged {
                epoch: view.epoch,
                settled: true,
                members: 0,
            });
            self.ring = None;
        } else {
            self.publish(now, view, None);
        }
        self.next_change(now);
    }

    fn begin_leave(&mut self, now: Time, id: PeerId, call: Option<ClientCall>) {
        let Some(p) = self.peers.get(&id) else { return };
        match p.state {
            PeerState::Registered => {
                // Not in the ring: it holds nothing.
                let p = self.peers.remove(&id).map(|p| (p.addr, p.name));
                if let Some((addr, name)) = p {
                    let reason = "left before joining the ring".to_string();
                    self.send(
                        now,
                        addr,
                        Body::Exit { reason },
                        None,
                        ManagerTag::Exit { peer: id },
                    );
                    self.events.push_back(ManagerEvent::PeerLeft {
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
            PeerState::Leaving => {
                if let Some(call) = call {
                    self.reply(
                        now,
                        &call,
                        Err(format!("peer '{}' is already leaving", p.name)),
                    );
                }
            }
            PeerState::InRing => {
                let queued = self
                    .changes
                    .iter()
                    .any(|c| matches!(c, Change::Leave(l, _) if *l == id));
                if queued {
                    if let Some(call) = call {
                        self.reply(
                            now,
                            &call,
                            Err(format!("peer '{}' is already leaving", p.name)),
                        );
                    }
                } else {
                    self.enqueue(now, Change::Leave(id, call));
                }
            }
        }
    }

    fn distribute(&mut self, now: Time, call: ClientCall, path: Option<String>) {
        if self.job.is_some() {
            return self.reply(now, &call, Err("a distribute is already running".into()));
        }
        if self.ring.is_none() {
            return self.reply(now, &call, Err("no ring yet: run setup first".into()));
        }
        let Some(path) = path.or_else(|| self.cfg.default_data.clone()) else {
            return self.reply(
                now,
                &call,
                Err("no file given and no `data` configured".into()),
            );
        };
        let id = self.next_job;
        self.next_job += 1;
        self.job = Some(DistributeJob {
            id,
            call,
            started: now,
            queues: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            report: DistributeReport {
                path: path.clone(),
                format: String::new(),
                read: 0,
                stored: 0,
                new_rows: 0,
                rejected: 0,
                rejected_samples: Vec::new(),
                fallback_keys: 0,
                batches: 0,
                per_peer: Vec::new(),
                elapsed_micros: 0,
            },
            per_peer: BTreeMap::new(),
        });
        self.events
            .push_back(ManagerEvent::LoadFile { job: id, path });
    }

    /// The driver loaded the file of a distribute job (or failed to).
    pub fn file_loaded(&mut self, now: Time, job_id: u64, loaded: Result<Dataset, String>) {
        let Some(job) = self.job.as_mut().filter(|j| j.id == job_id) else {
            return;
        };
        let dataset = match loaded {
            Ok(d) => d,
            Err(e) => {
                let call = job.call.clone();
                self.job = None;
                self.events.push_back(ManagerEvent::DistributeFailed {
                    job: job_id,
                    reason: e.clone(),
                });
                return self.reply(now, &call, Err(e));
            }
        };
        if self.cfg.placement == PlacementKind::Course {
            let s = first_prime_above(2 * dataset.rows.len() as u64);
            if self
                .ring
                .as_ref()
                .is_some_and(|r| r.placement != Placement::Course { s })
            {
                self.enqueue(now, Change::Reshape(Placement::Course { s }));
                // Place by the new table size at once; peers redirect anything placed early.
                if let Some(r) = self.ring.as_mut() {
                    r.placement = Placement::Course { s };
                }
            }
        }
        let Some(ring) = self.ring.clone() else {
            return;
        };
        let Some(job) = self.job.as_mut() else { return };
        job.report.format = dataset.format.to_string();
        job.report.read = dataset.read();
        job.report.rejected = dataset.rejected.len() as u64;
        job.report.fallback_keys = dataset.fallback_keys;
        job.report.rejected_samples = dataset
            .rejected
            .iter()
            .take(10)
            .map(|e| (e.line, e.reason.clone()))
            .collect();
        let budget = batch_budget(&dataset.columns, self.cfg.max_datagram);
        let mut by_owner: BTreeMap<PeerId, Vec<WireRow>> = BTreeMap::new();
        for row in dataset.rows {
            if row_size(&row.values) > budget {
                job.report.rejected += 1;
                if job.report.rejected_samples.len() < 10 {
                    job.report
                        .rejected_samples
                        .push((row.line, "row too large for one datagram".into()));
                }
                continue;
            }
            if let Some(owner) = ring.owner_of(row.key) {
                by_owner
                    .entry(owner.id)
                    .or_default()
                    .push(WireRow(row.key, row.values));
            }
        }
        for (owner, rows) in by_owner {
            let (batches, _) =
                make_batches(ring.epoch, &dataset.columns, rows, self.cfg.max_datagram);
            job.report.batches += batches.len() as u64;
            job.queues.insert(owner, batches.into());
        }
        self.pump_job(now);
    }

    fn pump_job(&mut self, now: Time) {
        let Some(job) = self.job.as_mut() else { return };
        let mut sends = Vec::new();
        for (peer, queue) in job.queues.iter_mut() {
            let flying = job.in_flight.entry(*peer).or_default();
            while *flying < self.cfg.window.max(1) {
                let Some(batch) = queue.pop_front() else {
                    break;
                };
                *flying += 1;
                sends.push((*peer, batch));
            }
        }
        let (job_id, trace) = (job.id, job.call.trace.clone());
        let done =
            job.queues.values().all(VecDeque::is_empty) && job.in_flight.values().all(|n| *n == 0);
        for (peer, batch) in sends {
            let Some(addr) = self.peers.get(&peer).map(|p| p.addr) else {
                continue;
            };
            let rows = batch.rows.len() as u32;
            let tag = ManagerTag::Batch {
                job: job_id,
                peer,
                rows,
            };
            self.send(now, addr, Body::Store(batch), trace.clone(), tag);
        }
        if done {
            self.finish_job(now, Ok(()));
        }
    }

    fn finish_job(&mut self, now: Time, outcome: Result<(), String>) {
        let Some(mut job) = self.job.take() else {
            return;
        };
        let id = job.id;
        self.link
            .cancel_where(|t| matches!(t, ManagerTag::Batch { job, .. } if *job == id));
        let elapsed = now.saturating_sub(job.started);
        job.report.elapsed_micros = elapsed.as_micros() as u64;
        job.report.per_peer = job.per_peer.into_iter().collect();
        let result = match outcome {
            Ok(()) => {
                self.events.push_back(ManagerEvent::DistributeDone {
                    job: id,
                    stored: job.report.stored,
                    elapsed,
                });
                Ok(ReplyBody::Distribute(job.report))
            }
            Err(e) => {
                let reason = format!(
                    "{e}; {} of {} rows were stored before the failure (distributing again is safe: nothing is stored twice)",
                    job.report.stored, job.report.read
                );
                self.events.push_back(ManagerEvent::DistributeFailed {
                    job: id,
                    reason: reason.clone(),
                });
                Err(reason)
            }
        };
        self.reply(now, &job.call, result);
    }

    fn query(&mut self, now: Time, call: ClientCall, key: RecordKey, via: Option<String>) {
        let Some(ring) = self.ring.as_ref() else {
            return self.reply(now, &call, Err("no ring yet: run setup first".into()));
        };
        if self.queries.len() >= MAX_QUERIES_IN_FLIGHT {
            let reason = format!("busy: {MAX_QUERIES_IN_FLIGHT} queries are in flight; try again");
            return self.reply(now, &call, Err(reason));
        }
        let entry = match via {
            Some(v) => match ring
                .members
                .iter()
                .find(|m| m.name == v || m.id.to_string() == v)
            {
                Some(m) => m.clone(),
                None => return self.reply(now, &call, Err(format!("no peer '{v}' in the ring"))),
            },
            None => {
                self.next_entry = self.next_entry.wrapping_add(1);
                ring.members[self.next_entry % ring.members.len()].clone()
            }
        };
        let query = self.next_query;
        self.next_query += 1;
        let deadline = now + self.cfg.query_timeout;
        self.queries.insert(
            query,
            PendingQuery {
                call,
                key,
                sent: now,
                deadline,
                tried: Vec::new(),
            },
        );
        self.send_find(now, query, entry.id, entry.addr);
    }

    fn send_find(&mut self, now: Time, query: u64, entry: PeerId, entry_addr: SocketAddr) {
        let Some(q) = self.queries.get(&query) else {
            return;
        };
        let (key, trace) = (q.key, q.call.trace.clone());
        self.events.push_back(ManagerEvent::QueryDispatched {
            query,
            key,
            entry,
            entry_addr,
        });
        let find = FindEvent {
            query,
            key,
            path: Vec::new(),
        };
        let tag = ManagerTag::Find { query, entry };
        self.send(now, entry_addr, Body::Find(find), trace, tag);
    }

    /// The entry peer refused the query (not in the ring yet) or did not acknowledge it: enter
    /// the ring somewhere else, until every member has been tried.
    fn retry_find(&mut self, now: Time, query: u64, failed: PeerId, why: String) {
        let Some(q) = self.queries.get_mut(&query) else {
            return;
        };
        q.tried.push(failed);
        let tried = q.tried.clone();
        let next = self
            .ring
            .as_ref()
            .and_then(|r| r.members.iter().find(|m| !tried.contains(&m.id)))
            .map(|m| (m.id, m.addr));
        match next {
            Some((id, addr)) => self.send_find(now, query, id, addr),
            None => {
                let reason = format!("no peer in the ring could take the query (last: {why})");
                self.fail_query(now, query, reason);
            }
        }
    }

    fn fail_query(&mut self, now: Time, query: u64, reason: String) {
        if let Some(q) = self.queries.remove(&query) {
            let reason = format!("{reason} (event {})", q.key);
            self.events.push_back(ManagerEvent::QueryFailed {
                query,
                reason: reason.clone(),
            });
            self.reply(now, &q.call, Err(reason));
        }
    }

    fn on_found(&mut self, now: Time, result: FindResult) {
        let Some(q) = self.queries.remove(&result.query) else {
            return;
        };
        let path_names = result
            .path
            .iter()
            .map(|id| {
                self.peers
                    .get(id)
                    .map_or_else(|| format!("#{id}"), |p| p.name.clone())
            })
            .collect();
        self.events.push_back(ManagerEvent::QueryDone {
            query: result.query,
            found: result.found,
            path: result.path.clone(),
        });
        let outcome = QueryOutcome {
            key: q.key,
            found: result.found,
            records: result.records,
            path: result.path,
            path_names,
            truncated: result.truncated,
            ring_micros: now.saturating_sub(q.sent).as_micros() as u64,
        };
        self.reply(now, &q.call, Ok(ReplyBody::Query(outcome)));
    }

    fn start_status(&mut self, now: Time, call: ClientCall, setup: bool) {
        let probe = self.next_probe;
        self.next_probe += 1;
        let waiting: BTreeSet<PeerId> = self.peers.keys().copied().collect();
        let targets: Vec<(PeerId, SocketAddr)> =
            self.peers.iter().map(|(id, p)| (*id, p.addr)).collect();
        self.probes.insert(
            probe,
            StatusGather {
                call: call.clone(),
                deadline: now + self.cfg.probe_timeout,
                waiting,
                reports: BTreeMap::new(),
                setup,
            },
        );
        for (id, addr) in targets {
            self.send(
                now,
                addr,
                Body::Probe { probe },
                call.trace.clone(),
                ManagerTag::ToPeer(id, "probe"),
            );
        }
        self.maybe_finish_status(now, probe, false);
    }

    fn on_report(&mut self, now: Time, probe: u64, id: PeerId, report: PeerReport) {
        if let Some(g) = self.probes.get_mut(&probe) {
            g.waiting.remove(&id);
            g.reports.insert(id, report);
            self.maybe_finish_status(now, probe, false);
        }
    }

    fn maybe_finish_status(&mut self, now: Time, probe: u64, deadline_passed: bool) {
        let ready = self
            .probes
            .get(&probe)
            .is_some_and(|g| g.waiting.is_empty() || deadline_passed);
        if !ready {
            return;
        }
        let Some(g) = self.probes.remove(&probe) else {
            return;
        };
        let report = self.status_report(&g.reports, &g.waiting);
        let body = if g.setup {
            ReplyBody::Setup(report)
        } else {
            ReplyBody::Status(report)
        };
        self.reply(now, &g.call, Ok(body));
    }

    fn status_report(
        &self,
        reports: &BTreeMap<PeerId, PeerReport>,
        silent: &BTreeSet<PeerId>,
    ) -> StatusReport {
        let shares: BTreeMap<PeerId, f64> = self
            .ring
            .as_ref()
            .map(|r| r.shares().into_iter().collect())
            .unwrap_or_default();
        let tokens: BTreeMap<PeerId, u64> = self
            .ring
            .as_ref()
            .map(|r| r.members.iter().map(|m| (m.id, m.token)).collect())
            .unwrap_or_default();
        let peers = self
            .peers
            .iter()
            .map(|(id, p)| {
                let state = match p.state {
                    _ if silent.contains(id) => "unreachable",
                    PeerState::Registered => "registered",
                    PeerState::InRing => "up",
                    PeerState::Leaving => "leaving",
                };
                PeerStatus {
                    id: *id,
                    name: p.name.clone(),
                    addr: p.addr,
                    state: state.to_string(),
                    records: reports.get(id).map(|r| r.records),
                    keys: reports.get(id).map(|r| r.keys),
                    token: tokens.get(id).copied(),
                    share: shares.get(id).copied().unwrap_or(0.0),
                    counters: reports.get(id).map(|r| r.counters),
                }
            })
            .collect();
        StatusReport {
            epoch: self.ring.as_ref().map_or(self.last_epoch, |r| r.epoch),
            // Counts are sampled when each peer answers: they describe a settled ring only if
            // every answer was given under the current, settled view.
            settled: self
                .ring
                .as_ref()
                .is_none_or(|r| r.settled && reports.values().all(|rep| rep.epoch == r.epoch)),
            placement: self.ring.as_ref().map(|r| r.placement),
            peers,
            manager: self.link.counters(),
        }
    }

    fn start_teardown(&mut self, now: Time, call: ClientCall) {
        let targets: Vec<(PeerId, SocketAddr)> =
            self.peers.iter().map(|(id, p)| (*id, p.addr)).collect();
        let peers = targets.len() as u32;
        // Everything in progress ends here.
        if let Some(job) = self.job.take() {
            self.reply(now, &job.call, Err("the cluster was torn down".into()));
        }
        for call in std::mem::take(&mut self.setups) {
            self.reply(now, &call, Err("the cluster was torn down".into()));
        }
        for (_, q) in std::mem::take(&mut self.queries) {
            self.reply(now, &q.call, Err("the cluster was torn down".into()));
        }
        for c in std::mem::take(&mut self.changes) {
            if let Change::Leave(_, Some(call)) = c {
                self.reply(now, &call, Err("the cluster was torn down".into()));
            }
        }
        if let Some(Transition {
            change: Change::Leave(_, Some(call)),
            ..
        }) = self.transition.take()
        {
            self.reply(now, &call, Err("the cluster was torn down".into()));
        }
        self.link.cancel_where(|t| !matches!(t, ManagerTag::Reply));
        self.peers.clear();
        self.ring = None;
        let waiting = targets.iter().map(|(id, _)| *id).collect();
        for (id, addr) in targets {
            let reason = "the cluster is being torn down".to_string();
            self.send(
                now,
                addr,
                Body::Exit { reason },
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

    fn maybe_finish_teardown(&mut self, now: Time) {
        if self.teardown.as_ref().is_some_and(|t| t.waiting.is_empty())
            && let Some(t) = self.teardown.take()
        {
            self.events.push_back(ManagerEvent::RingChanged {
                epoch: self.last_epoch,
                settled: true,
                members: 0,
            });
            self.reply(now, &t.call, Ok(ReplyBody::Teardown { peers: t.peers }));
        }
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        let deadlines = self
            .queries
            .values()
            .map(|q| q.deadline)
            .chain(self.probes.values().map(|p| p.deadline))
            .chain(self.transition.as_ref().map(|t| t.nudge_at));
        deadlines.chain(self.link.poll_timeout()).min()
    }

    pub fn handle_timeout(&mut self, now: Time) {
        self.link.handle_timeout(now);
        self.nudge_transition(now);
        for id in due(&self.queries, now, |q| q.deadline) {
            let secs = self.cfg.query_timeout.as_secs_f64();
            self.fail_query(
                now,
                id,
                format!("no answer from the ring within {secs:.1} s"),
            );
        }
        for probe in due(&self.probes, now, |p| p.deadline) {
            self.maybe_finish_status(now, probe, true);
        }
        self.drain_outcomes(now);
    }

    fn drain_outcomes(&mut self, now: Time) {
        while let Some(outcome) = self.link.poll_outcome() {
            match outcome {
                Outcome::Acked {
                    tag: ManagerTag::Batch { job, peer, rows },
                    new_rows,
                } => {
                    if let Some(j) = self.job.as_mut().filter(|j| j.id == job) {
                        j.report.stored += rows as u64;
                        j.report.new_rows += new_rows.unwrap_or(0) as u64;
                        *j.per_peer.entry(peer).or_default() += rows as u64;
                        if let Some(n) = j.in_flight.get_mut(&peer) {
                            *n = n.saturating_sub(1);
                        }
                        self.pump_job(now);
                    }
                }
                Outcome::Acked {
                    tag: ManagerTag::Exit { peer },
                    ..
                } => self.exit_confirmed(now, peer),
                Outcome::Acked { .. } => {}
                Outcome::Rejected { tag, reason } => {
                    self.events
                        .push_back(ManagerEvent::Warning(format!("{tag:?} rejected: {reason}")));
                    match tag {
                        ManagerTag::Batch { job, peer, .. }
                            if self.job.as_ref().is_some_and(|j| j.id == job) =>
                        {
                            self.finish_job(
                                now,
                                Err(format!("peer {peer} refused a batch: {reason}")),
                            );
                        }
                        ManagerTag::Find { query, entry } => {
                            self.retry_find(now, query, entry, reason)
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
        self.release_setups(now);
    }

    fn gave_up(&mut self, now: Time, tag: ManagerTag, dest: SocketAddr, attempts: u32) {
        let silent = format!("{dest} did not acknowledge after {attempts} attempts");
        match tag {
            ManagerTag::Batch { job, peer, .. } => {
                if self.job.as_ref().is_some_and(|j| j.id == job) {
                    self.finish_job(now, Err(format!("peer {peer} at {silent}")));
                }
            }
            ManagerTag::Find { query, entry } => {
                self.retry_find(now, query, entry, format!("the entry peer at {silent}"))
            }
            ManagerTag::Exit { peer } => {
                self.events.push_back(ManagerEvent::Warning(format!(
                    "exit for peer {peer}: {silent}"
                )));
                self.exit_confirmed(now, peer);
            }
            ManagerTag::ToPeer(peer, what) => {
                self.events.push_back(ManagerEvent::Warning(format!(
                    "{what} for peer {peer}: {silent}"
                )));
                // A peer that cannot hear the ring cannot report its hand-off: stop waiting for it.
                if what == "ring"
                    && let Some(t) = self.transition.as_mut()
                    && t.waiting.remove(&peer)
                {
                    t.unreachable.insert(peer);
                    if t.waiting.is_empty() {
                        self.finish_transition(now);
                    }
                }
            }
            ManagerTag::Reply => {
                self.events
                    .push_back(ManagerEvent::Warning(format!("reply to client {silent}")));
            }
        }
    }

    fn exit_confirmed(&mut self, now: Time, peer: PeerId) {
        if let Some(t) = self.teardown.as_mut() {
            t.waiting.remove(&peer);
        }
        self.maybe_finish_teardown(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.link.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<ManagerEvent> {
        self.events.pop_front()
    }

    /// The driver saw a datagram that did not decode.
    pub fn note_bad_datagram(&mut self) {
        self.link.note_bad_datagram();
    }

    /// Puts events taken with [`Manager::poll_event`] back in front, in order.
    pub fn requeue_events(&mut self, events: Vec<ManagerEvent>) {
        for ev in events.into_iter().rev() {
            self.events.push_front(ev);
        }
    }
}
