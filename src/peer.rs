//! The peer's protocol state machine (sans-IO).
//!
//! A peer registers with the manager (retrying until it answers), keeps the rows it owns,
//! answers `find_event` by walking the ring, and hands rows over whenever a ring change makes
//! someone else their owner: after a join (its successor gives it part of an arc), on leaving
//! (everything goes), and when a row reaches it that it does not own (a sender with an older
//! ring view). A row leaves the store only once its new owner has acknowledged it, so a query
//! that walks the whole ring always finds it somewhere.

use crate::link::{Accepted, Dropped, Link, Outcome, RetryPolicy, Time, Transmit};
use crate::machine::Machine;
use crate::record::RecordKey;
use crate::ring::RingExt;
use crate::store::{Columns, Store, StoredRow, batch_budget, make_batches, row_size};
use crate::wire::{
    Body, Envelope, FindEvent, FindResult, PeerId, PeerReport, RejectReason, RingView, StoreBatch,
    TraceContext, WireRow,
};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub manager: SocketAddr,
    pub retry: RetryPolicy,
    pub max_datagram: usize,
    /// Hand-off batches in flight at once.
    pub window: usize,
}

/// Which message to the manager a pending send was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerMessage {
    Report,
    RebalanceDone,
    Found,
}

/// What a pending message was for.
#[derive(Debug, Clone)]
pub enum PeerTag {
    Register,
    LeaveRequest,
    /// A message to the manager whose loss needs no special handling beyond logging.
    ToManager(ManagerMessage),
    /// A query passed to the next peer; `skipped` counts dead neighbours already routed around.
    Forward {
        find: FindEvent,
        skipped: usize,
    },
    HandOff {
        batch: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    Registered {
        id: PeerId,
    },
    RingChanged {
        epoch: u64,
        members: usize,
        next: Option<(PeerId, SocketAddr)>,
    },
    /// One hop of a query walk happened here.
    Hop(HopReport),
    Stored {
        rows: usize,
        new_rows: u32,
    },
    HandedOver {
        to: PeerId,
        rows: usize,
    },
    /// Something went wrong that the operator should see; the peer carries on.
    Warning(String),
    /// The process should end with this status.
    Exit {
        code: i32,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct HopReport {
    pub query: u64,
    pub key: RecordKey,
    /// 0 for the peer where the query entered the ring.
    pub hop: u32,
    pub found: bool,
    /// Where the query went next, if it was not answered here.
    pub next: Option<(PeerId, SocketAddr)>,
    /// Where this hop sent the query (the next peer) or the answer (the manager).
    pub sent_to: SocketAddr,
}

struct HandOffBatch {
    owner: PeerId,
    dest: SocketAddr,
    batch: StoreBatch,
    /// The rows as stored, removed once the owner acknowledges them.
    rows: Vec<(RecordKey, StoredRow)>,
}

/// Rows bound for one owner, of one schema: (owner's address, columns, rows).
type Moving = (SocketAddr, Columns, Vec<(RecordKey, StoredRow)>);

/// Rows leave only after their owner acknowledged them; a failed batch is tried again later.
const HANDOFF_RETRY: Duration = Duration::from_secs(1);

/// Store acks remembered for duplicates: far more than the batches that can be in flight.
const STORE_ACKS_REMEMBERED: usize = 4096;

pub struct Peer {
    cfg: PeerConfig,
    link: Link<PeerTag>,
    id: Option<PeerId>,
    ring: Option<RingView>,
    store: Store,
    queued: VecDeque<HandOffBatch>,
    in_flight: BTreeMap<u64, HandOffBatch>,
    in_flight_keys: HashSet<RecordKey>,
    next_batch: u64,
    handoff_retry_at: Option<Time>,
    /// Recent store acks, (sender, seq) → new rows, to repeat them exactly for duplicates.
    store_acks: VecDeque<((u64, u64), u32)>,
    done_reported: Option<u64>,
    /// Rows handed over since the current view arrived, for the hand-off report.
    handed_this_epoch: u64,
    leaving: bool,
    /// What the current input produced; handed to the caller when it returns.
    events: Vec<PeerEvent>,
    exited: bool,
}

impl Peer {
    /// A new peer; it starts registering at once.
    pub fn new(cfg: PeerConfig, incarnation: u64, now: Time) -> Self {
        let link = Link::new(incarnation, cfg.retry);
        let mut peer = Peer {
            cfg,
            link,
            id: None,
            ring: None,
            store: Store::default(),
            queued: VecDeque::new(),
            in_flight: BTreeMap::new(),
            in_flight_keys: HashSet::new(),
            next_batch: 1,
            handoff_retry_at: None,
            store_acks: VecDeque::new(),
            done_reported: None,
            handed_this_epoch: 0,
            leaving: false,
            events: Vec::new(),
            exited: false,
        };
        let body = Body::Register {
            name: peer.cfg.name.clone(),
        };
        let policy = peer.cfg.retry.forever();
        let manager = peer.cfg.manager;
        peer.send_with(now, manager, body, None, PeerTag::Register, policy);
        peer
    }

    pub fn id(&self) -> Option<PeerId> {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn ring(&self) -> Option<&RingView> {
        self.ring.as_ref()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn is_exited(&self) -> bool {
        self.exited
    }

    fn send(
        &mut self,
        now: Time,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
        tag: PeerTag,
    ) {
        let policy = self.cfg.retry;
        self.send_with(now, dest, body, trace, tag, policy);
    }

    fn send_with(
        &mut self,
        now: Time,
        dest: SocketAddr,
        body: Body,
        trace: Option<TraceContext>,
        tag: PeerTag,
        policy: RetryPolicy,
    ) {
        let kind = body.kind();
        if let Err(e) = self.link.send_with(now, dest, body, trace, tag, policy) {
            self.events
                .push(PeerEvent::Warning(format!("could not send {kind}: {e}")));
        }
    }

    fn on_datagram(
        &mut self,
        now: Time,
        from: SocketAddr,
        env: Envelope,
        trace: Option<TraceContext>,
    ) {
        if self.exited {
            // Gone, but a repeat of something already handled (the Exit whose ack was lost)
            // is acknowledged again. Nothing new is accepted.
            if self.link.is_duplicate(&env) {
                self.link.ack(from, env.seq, None);
            }
            return;
        }
        // Refuse what a peer never handles before acknowledging it, so the sender sees the
        // reason instead of an ack followed by silence.
        if let Some(reason) = self.refusal(&env.body) {
            self.events
                .push(PeerEvent::Warning(format!("from {from}: {reason}")));
            return self.link.reject(from, env.seq, reason);
        }
        // A first-time store is acknowledged below, once its count of new rows is known.
        match self.link.accept(now, from, &env) {
            Accepted::New => {}
            Accepted::Duplicate => {
                // The first ack may have been lost: repeat it with the same count of new rows.
                if matches!(env.body, Body::Store(_)) {
                    let new_rows = self
                        .store_acks
                        .iter()
                        .find(|(id, _)| *id == (env.from, env.seq));
                    self.link
                        .ack(from, env.seq, Some(new_rows.map_or(0, |(_, n)| *n)));
                }
                return;
            }
            Accepted::Control => {
                self.drain_outcomes(now);
                return;
            }
        }
        match env.body {
            Body::Registered { id } => {
                self.id = Some(id);
                self.events.push(PeerEvent::Registered { id });
            }
            Body::Refused { reason } => {
                self.exit(1, format!("the manager refused registration: {reason}"))
            }
            Body::Ring(view) => self.on_ring(now, view, trace),
            Body::Store(batch) => self.on_store(now, from, env.from, env.seq, batch, trace),
            Body::Find(find) => self.on_find(now, find, trace),
            Body::Probe { probe } => {
                let report = PeerReport {
                    records: self.store.row_count(),
                    keys: self.store.key_count(),
                    epoch: self.ring.as_ref().map_or(0, |r| r.epoch),
                    handing_over: self.handing_over(),
                    counters: self.link.counters(),
                };
                let manager = self.cfg.manager;
                self.send(
                    now,
                    manager,
                    Body::Report { probe, report },
                    trace,
                    PeerTag::ToManager(ManagerMessage::Report),
                );
            }
            Body::Exit { reason } => self.exit(0, reason.to_string()),
            // Refused above.
            _ => {}
        }
    }

    /// Why a peer will never handle `body`, if it will not.
    fn refusal(&self, body: &Body) -> Option<RejectReason> {
        let peer = || self.cfg.name.clone();
        match body {
            // Without a ring view this peer cannot tell owner from walker: let the sender
            // enter the ring elsewhere rather than hear a false "not found".
            Body::Find(_) if !self.in_ring() => Some(RejectReason::NotInRing { peer: peer() }),
            Body::Request(r) => Some(RejectReason::ClientCommandToPeer {
                kind: r.kind().to_string(),
                peer: peer(),
            }),
            Body::Register { .. }
            | Body::RebalanceDone { .. }
            | Body::LeaveRequest
            | Body::Report { .. }
            | Body::Found(_)
            | Body::Reply(_) => Some(RejectReason::NotForPeer {
                kind: body.kind().to_string(),
            }),
            _ => None,
        }
    }

    fn in_ring(&self) -> bool {
        match (&self.ring, self.id) {
            (Some(ring), Some(id)) => ring.member(id).is_some(),
            _ => false,
        }
    }

    /// The operator (SIGTERM) or the manager asked this peer to leave.
    pub fn request_leave(&mut self, now: Time) -> Vec<PeerEvent> {
        self.on_leave_asked(now);
        std::mem::take(&mut self.events)
    }

    fn on_leave_asked(&mut self, now: Time) {
        if self.leaving || self.exited {
            return;
        }
        self.leaving = true;
        if self.id.is_none() {
            return self.exit(0, "left before registering".into());
        }
        let manager = self.cfg.manager;
        self.send(
            now,
            manager,
            Body::LeaveRequest,
            None,
            PeerTag::LeaveRequest,
        );
    }

    fn exit(&mut self, code: i32, reason: String) {
        if !self.exited {
            self.exited = true;
            self.events.push(PeerEvent::Exit { code, reason });
        }
    }

    fn on_ring(&mut self, now: Time, view: RingView, trace: Option<TraceContext>) {
        let current = self.ring.as_ref().map(|r| r.epoch);
        if current == Some(view.epoch) {
            // The manager asks again: our report may have been lost. Repeat it if we are done.
            self.done_reported = None;
            return self.report_if_settled(now);
        }
        if current.is_some_and(|e| e > view.epoch) {
            return; // reordered: an older view never replaces a newer one
        }
        // The ring can overtake a lost `Registered`: names are unique, so it tells us our id.
        if self.id.is_none()
            && let Some(me) = view.members.iter().find(|m| m.name == self.cfg.name)
        {
            self.id = Some(me.id);
            self.events.push(PeerEvent::Registered { id: me.id });
        }
        self.handed_this_epoch = 0;
        let next = self
            .id
            .and_then(|id| view.next_of(id))
            .map(|m| (m.id, m.addr));
        self.events.push(PeerEvent::RingChanged {
            epoch: view.epoch,
            members: view.members.len(),
            next,
        });
        self.ring = Some(view);
        // Batches not yet sent were cut for the old owners.
        for b in self.queued.drain(..) {
            for (key, _) in &b.rows {
                self.in_flight_keys.remove(key);
            }
        }
        self.rebalance(now, trace);
    }

    fn on_store(
        &mut self,
        now: Time,
        from: SocketAddr,
        sender: u64,
        seq: u64,
        batch: StoreBatch,
        trace: Option<TraceContext>,
    ) {
        let rows = batch.rows.len();
        let my_epoch = self.ring.as_ref().map_or(0, |r| r.epoch);
        // A sender with a newer view knows better: keep its rows until our own view catches up.
        // A sender with an older or equal view may have misplaced rows: pass them on.
        let redirect = batch.epoch <= my_epoch && self.misplaced_in(&batch);
        // A row handed over by us and sent back before our hand-off was acknowledged must not
        // be deleted by that acknowledgement.
        if !self.in_flight_keys.is_empty() {
            let returned: HashSet<RecordKey> = batch
                .rows
                .iter()
                .map(|r| r.0)
                .filter(|k| self.in_flight_keys.contains(k))
                .collect();
            if !returned.is_empty() {
                for b in self.in_flight.values_mut() {
                    b.rows.retain(|(k, _)| !returned.contains(k));
                }
                for k in &returned {
                    self.in_flight_keys.remove(k);
                }
            }
        }
        let new_rows = self.store.insert_batch(batch);
        self.link.ack(from, seq, Some(new_rows));
        self.store_acks.push_back(((sender, seq), new_rows));
        if self.store_acks.len() > STORE_ACKS_REMEMBERED {
            self.store_acks.pop_front();
        }
        self.events.push(PeerEvent::Stored { rows, new_rows });
        if redirect {
            self.rebalance(now, trace);
        }
    }

    fn owns(&self, key: RecordKey) -> bool {
        match (&self.ring, self.id) {
            (Some(ring), Some(id)) => ring.owner_of(key).is_some_and(|m| m.id == id),
            // Without a ring there is nobody to give rows to.
            _ => true,
        }
    }

    fn misplaced_in(&self, batch: &StoreBatch) -> bool {
        batch.rows.iter().any(|r| !self.owns(r.0))
    }

    fn handing_over(&self) -> u64 {
        self.queued
            .iter()
            .chain(self.in_flight.values())
            .map(|b| b.rows.len() as u64)
            .sum()
    }

    /// Queues every row this peer no longer owns for its owner, then sends what the window allows.
    fn rebalance(&mut self, now: Time, trace: Option<TraceContext>) {
        let Some(ring) = self.ring.as_ref() else {
            return;
        };
        let epoch = ring.epoch;
        let mut moving: BTreeMap<(PeerId, usize), Moving> = BTreeMap::new();
        let mut schema_ids: Vec<Columns> = Vec::new();
        for (key, rows) in self.store.iter() {
            if self.in_flight_keys.contains(key) {
                continue;
            }
            let Some(owner) = ring.owner_of(*key) else {
                continue;
            };
            if Some(owner.id) == self.id {
                continue;
            }
            for row in rows {
                let schema = match schema_ids
                    .iter()
                    .position(|c| std::sync::Arc::ptr_eq(c, &row.columns))
                {
                    Some(i) => i,
                    None => {
                        schema_ids.push(row.columns.clone());
                        schema_ids.len() - 1
                    }
                };
                moving
                    .entry((owner.id, schema))
                    .or_insert_with(|| (owner.addr, row.columns.clone(), Vec::new()))
                    .2
                    .push((*key, row.clone()));
            }
        }
        for ((owner, _), (dest, columns, rows)) in moving {
            // A row too large for this peer's datagrams (a smaller `max_datagram` than the
            // manager's) stays here, still found by the walk, rather than being lost.
            let budget = batch_budget(&columns, self.cfg.max_datagram);
            let (rows, oversized): (Vec<_>, Vec<_>) = rows
                .into_iter()
                .partition(|(_, r)| row_size(&r.values) <= budget);
            if !oversized.is_empty() {
                self.events.push(PeerEvent::Warning(format!(
                    "{} rows are too large for one datagram and stay here",
                    oversized.len()
                )));
            }
            for (key, _) in &rows {
                self.in_flight_keys.insert(*key);
            }
            let wire: Vec<WireRow> = rows
                .iter()
                .map(|(k, r)| WireRow(*k, r.values.clone()))
                .collect();
            let (batches, _) = make_batches(epoch, &columns, wire, self.cfg.max_datagram);
            let mut rest = rows.into_iter();
            for batch in batches {
                let taken: Vec<(RecordKey, StoredRow)> =
                    rest.by_ref().take(batch.rows.len()).collect();
                self.queued.push_back(HandOffBatch {
                    owner,
                    dest,
                    batch,
                    rows: taken,
                });
            }
        }
        self.pump_handoff(now, trace);
    }

    fn pump_handoff(&mut self, now: Time, trace: Option<TraceContext>) {
        while self.in_flight.len() < self.cfg.window.max(1) {
            let Some(b) = self.queued.pop_front() else {
                break;
            };
            let id = self.next_batch;
            self.next_batch += 1;
            let body = Body::Store(b.batch.clone());
            self.send(
                now,
                b.dest,
                body,
                trace.clone(),
                PeerTag::HandOff { batch: id },
            );
            self.in_flight.insert(id, b);
        }
        self.report_if_settled(now);
    }

    /// Tells the manager once per unsettled epoch that this peer has handed over everything.
    fn report_if_settled(&mut self, now: Time) {
        let Some(ring) = &self.ring else { return };
        let epoch = ring.epoch;
        let nothing_left = self.queued.is_empty() && self.in_flight.is_empty();
        if ring.settled
            || !nothing_left
            || self.done_reported == Some(epoch)
            || self.handoff_retry_at.is_some()
        {
            return;
        }
        self.done_reported = Some(epoch);
        let body = Body::RebalanceDone {
            epoch,
            handed_over: self.handed_this_epoch,
        };
        let manager = self.cfg.manager;
        self.send(
            now,
            manager,
            body,
            None,
            PeerTag::ToManager(ManagerMessage::RebalanceDone),
        );
    }

    fn on_find(&mut self, now: Time, mut find: FindEvent, trace: Option<TraceContext>) {
        let hop = find.path.len() as u32;
        let Some(me) = self.id else {
            return self.answer(now, find, false, trace, hop);
        };
        find.path.push(me);
        if self.store.get(find.key).is_some() {
            return self.answer(now, find, true, trace, hop);
        }
        let (settled, members) = self
            .ring
            .as_ref()
            .map_or((true, 0), |r| (r.settled, r.members.len()));
        // Settled: the owner's miss is final. Unsettled: rows may be in transit, so the walk
        // goes on, at most once round the ring.
        if (settled && self.owns(find.key)) || find.path.len() >= members {
            return self.answer(now, find, false, trace, hop);
        }
        self.forward(now, find, 0, trace, hop);
    }

    fn forward(
        &mut self,
        now: Time,
        find: FindEvent,
        skipped: usize,
        trace: Option<TraceContext>,
        hop: u32,
    ) {
        // Only a member walks a query on; without an id this peer ends the walk here.
        let Some(me) = self.id else {
            return self.answer(now, find, false, trace, hop);
        };
        let next = self.ring.as_ref().and_then(|ring| {
            let mut at = me;
            // Route around `skipped` neighbours that did not acknowledge.
            for _ in 0..=skipped {
                at = ring.next_of(at)?.id;
            }
            (at != me)
                .then(|| ring.member(at))
                .flatten()
                .map(|m| (m.id, m.addr))
        });
        let Some((next_id, next_addr)) = next else {
            return self.answer(now, find, false, trace, hop);
        };
        self.events.push(PeerEvent::Hop(HopReport {
            query: find.query,
            key: find.key,
            hop,
            found: false,
            next: Some((next_id, next_addr)),
            sent_to: next_addr,
        }));
        let body = Body::Find(find.clone());
        self.send(
            now,
            next_addr,
            body,
            trace,
            PeerTag::Forward { find, skipped },
        );
    }

    fn answer(
        &mut self,
        now: Time,
        find: FindEvent,
        found: bool,
        trace: Option<TraceContext>,
        hop: u32,
    ) {
        self.events.push(PeerEvent::Hop(HopReport {
            query: find.query,
            key: find.key,
            hop,
            found,
            next: None,
            sent_to: self.cfg.manager,
        }));
        let mut records = if found {
            self.store.records_out(find.key)
        } else {
            Vec::new()
        };
        // Keep the answer inside one datagram: drop rows from the end until it fits.
        let mut truncated = false;
        let budget = self.cfg.max_datagram.saturating_sub(1024);
        while !records.is_empty()
            && records
                .iter()
                .map(|r| crate::store::row_size(&r.values) * 2)
                .sum::<usize>()
                > budget
        {
            records.pop();
            truncated = true;
        }
        let result = FindResult {
            query: find.query,
            key: find.key,
            found,
            records,
            path: find.path,
            truncated,
        };
        let manager = self.cfg.manager;
        self.send(
            now,
            manager,
            Body::Found(result),
            trace,
            PeerTag::ToManager(ManagerMessage::Found),
        );
    }

    fn on_timeout(&mut self, now: Time) {
        if self.exited {
            return;
        }
        self.link.handle_timeout(now);
        if self.handoff_retry_at.is_some_and(|t| t <= now) {
            self.handoff_retry_at = None;
            self.rebalance(now, None);
        }
        self.drain_outcomes(now);
    }

    fn drain_outcomes(&mut self, now: Time) {
        while let Some(outcome) = self.link.poll_outcome() {
            match outcome {
                Outcome::Acked {
                    tag: PeerTag::HandOff { batch },
                    ..
                } => {
                    if let Some(b) = self.in_flight.remove(&batch) {
                        let n = b.rows.len();
                        self.handed_this_epoch += n as u64;
                        for (key, row) in b.rows {
                            self.in_flight_keys.remove(&key);
                            self.store.remove_rows(key, std::slice::from_ref(&row));
                        }
                        self.events.push(PeerEvent::HandedOver {
                            to: b.owner,
                            rows: n,
                        });
                    }
                    self.pump_handoff(now, None);
                }
                Outcome::Acked {
                    tag: PeerTag::LeaveRequest,
                    ..
                } => {}
                Outcome::Acked { .. } => {}
                Outcome::Rejected {
                    tag: PeerTag::Forward { find, skipped },
                    reason,
                } => {
                    // The next peer cannot walk (not in the ring yet): route around it.
                    let hop = find.path.len().saturating_sub(1) as u32;
                    self.events.push(PeerEvent::Warning(format!(
                        "next peer refused query {}: {reason}; routing around it",
                        find.query
                    )));
                    self.forward(now, find, skipped + 1, None, hop);
                }
                Outcome::Rejected { tag, reason } => {
                    if let PeerTag::HandOff { batch } = tag {
                        self.fail_batch(now, batch);
                    }
                    if matches!(tag, PeerTag::LeaveRequest) {
                        // The manager does not know us (e.g. after a teardown): nothing to hand over.
                        let held = self.store.row_count();
                        self.exit(
                            if held == 0 { 0 } else { 1 },
                            format!("leave refused: {reason}"),
                        );
                    } else {
                        self.events
                            .push(PeerEvent::Warning(format!("rejected: {reason}")));
                    }
                }
                Outcome::GaveUp {
                    tag,
                    dest,
                    attempts,
                } => match tag {
                    PeerTag::HandOff { batch } => {
                        self.events.push(PeerEvent::Warning(format!(
                            "hand-off batch to {dest} unacknowledged after {attempts} attempts; will retry"
                        )));
                        self.fail_batch(now, batch);
                    }
                    PeerTag::Forward { find, skipped } => {
                        let hop = find.path.len().saturating_sub(1) as u32;
                        self.events.push(PeerEvent::Warning(format!(
                            "next peer {dest} did not acknowledge query {}; routing around it",
                            find.query
                        )));
                        self.forward(now, find, skipped + 1, None, hop);
                    }
                    PeerTag::LeaveRequest => {
                        let held = self.store.row_count();
                        let code = if held == 0 { 0 } else { 1 };
                        self.exit(
                            code,
                            format!("the manager did not answer the leave request; {held} records could not be handed over"),
                        );
                    }
                    PeerTag::Register => {}
                    PeerTag::ToManager(what) => self.events.push(PeerEvent::Warning(format!(
                        "the manager did not acknowledge {what:?} after {attempts} attempts"
                    ))),
                },
            }
        }
    }

    fn fail_batch(&mut self, now: Time, batch: u64) {
        if let Some(b) = self.in_flight.remove(&batch) {
            for (key, _) in &b.rows {
                self.in_flight_keys.remove(key);
            }
        }
        self.handoff_retry_at.get_or_insert(now + HANDOFF_RETRY);
        self.pump_handoff(now, None);
    }

    pub fn manager(&self) -> SocketAddr {
        self.cfg.manager
    }
}

impl Machine for Peer {
    type Event = PeerEvent;
    /// A peer takes nothing but datagrams and time.
    type Local = Infallible;

    /// `trace` is the context of the span the driver opened for this datagram; messages sent
    /// in consequence carry it.
    fn handle(
        &mut self,
        now: Time,
        from: SocketAddr,
        env: Envelope,
        trace: Option<TraceContext>,
    ) -> Vec<PeerEvent> {
        self.on_datagram(now, from, env, trace);
        std::mem::take(&mut self.events)
    }

    fn handle_timeout(&mut self, now: Time) -> Vec<PeerEvent> {
        self.on_timeout(now);
        std::mem::take(&mut self.events)
    }

    fn handle_local(&mut self, _: Time, input: Infallible) -> Vec<PeerEvent> {
        match input {}
    }

    fn poll_timeout(&self) -> Option<Time> {
        match (self.link.poll_timeout(), self.handoff_retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
}
