//! Distribution: a CSV loaded by the driver, cut into batches per range (the rows of one
//! owner), each batch sent to every replica of its range with a window per peer; a row counts
//! as stored once every replica acknowledged it.

use super::membership::{CENSUS_ROWS_PER_MEMBER, Change};
use super::{ClientCall, Manager, ManagerEvent, ManagerTag};
use crate::link::Time;
use crate::measure::KeyCensus;
use crate::record::{Dataset, LoadError};
use crate::ring::{Placer, first_prime_above};
use crate::store::{batch_budget, cut_by_budget, row_size};
use crate::wire::{
    Body, DistributeFailure, DistributeReport, PeerId, Placement, ReplyBody, RequestError,
    StoreBatch, WireRow,
};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Rows of one replica set placed together: stored once every batch that carries some of
/// them has been acknowledged.
struct Unit {
    /// Batches (to any holder) that carry rows of it and are not acknowledged yet.
    awaiting: u32,
    rows: u32,
    owner: PeerId,
}

/// What a batch in flight carries, for its acknowledgement.
struct BatchOf {
    /// The units it carries rows of.
    units: Vec<u64>,
    /// Its peer owns these rows (else holds copies): only the owners' acks count new rows,
    /// so that each row is counted once.
    owned: bool,
}

pub(super) struct DistributeJob {
    pub(super) id: u64,
    pub(super) call: ClientCall,
    started: Time,
    queues: BTreeMap<PeerId, VecDeque<(u64, StoreBatch)>>,
    in_flight: BTreeMap<PeerId, usize>,
    /// Rows of one replica set: acks still awaited, and their owner.
    units: HashMap<u64, Unit>,
    /// Batches queued or in flight: the units each carries.
    batches: HashMap<u64, BatchOf>,
    report: DistributeReport,
    per_peer: BTreeMap<PeerId, u64>,
    /// When the client was last told how far the job is.
    progress_at: Option<Time>,
    /// The file is still being read, chunk by chunk.
    loading: bool,
    /// A chunk was asked for and has not come yet.
    asked: bool,
    /// Rows in units not yet stored everywhere (queued or in flight).
    pending_rows: u64,
    /// Course placement needs the row count before placing: its chunks wait here.
    held: Option<Dataset>,
    /// Rows of the file counted before its rows came (its first ones): they are in the
    /// census already; the rest are counted as they are placed.
    counted: u64,
    /// Rows of the file placed so far.
    seen: u64,
    /// The tokens moved to where the file's rows are: the first chunk waits here until every
    /// member holds the new ring, so that no row is placed by the old one.
    placing: bool,
    parked: Option<Dataset>,
    next_unit: u64,
    next_batch: u64,
}

/// Ask for the next chunk once this few rows remain to be stored: the driver reads ahead by
/// about one chunk, so the manager's memory is bounded by a few chunks, not by the file.
const LOW_WATER_ROWS: u64 = 8_192;

/// How often a distribute tells its client how far it is.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Manager {
    pub(super) fn distribute(&mut self, now: Time, call: ClientCall, path: Option<String>) {
        if self.job.is_some() {
            return self.reply(now, &call, Err(RequestError::DistributeRunning));
        }
        if self.ring.is_none() {
            return self.reply(now, &call, Err(RequestError::NoRing));
        }
        let Some(path) = path.or_else(|| self.cfg.default_data.clone()) else {
            return self.reply(now, &call, Err(RequestError::NoData));
        };
        let id = self.next_job;
        self.next_job += 1;
        self.job = Some(DistributeJob {
            id,
            call,
            started: now,
            queues: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            units: HashMap::new(),
            batches: HashMap::new(),
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
            progress_at: None,
            loading: true,
            asked: true,
            pending_rows: 0,
            held: None,
            counted: 0,
            seen: 0,
            placing: false,
            parked: None,
            next_unit: 0,
            next_batch: 0,
        });
        let census = self.may_place_by_data();
        self.events.push(ManagerEvent::LoadFile {
            job: id,
            path,
            census,
        });
    }

    /// The next chunk of the job's file.
    pub(super) fn on_rows(&mut self, now: Time, job_id: u64, chunk: Dataset) {
        let Some(job) = self.job.as_mut().filter(|j| j.id == job_id) else {
            return;
        };
        job.asked = false;
        if job.placing {
            // The next chunk is asked for once this one is placed.
            match &mut job.parked {
                Some(parked) => parked.absorb(chunk),
                None => job.parked = Some(chunk),
            }
            return;
        }
        if self.cfg.placement == Placement::Course {
            // The table size depends on the whole file's row count: hold every chunk.
            match &mut job.held {
                Some(held) => held.absorb(chunk),
                None => job.held = Some(chunk),
            }
            job.asked = true;
            return self.events.push(ManagerEvent::WantRows { job: job_id });
        }
        self.place_chunk(now, chunk);
    }

    /// Where the job's keys hash, before its first row: on a ring that holds nothing yet, the
    /// tokens move to cut it into equal numbers of these rows (a change no row has to follow),
    /// and the rows wait until every member holds that ring.
    pub(super) fn on_census(&mut self, now: Time, job_id: u64, census: &KeyCensus) {
        let Some(job) = self.job.as_mut().filter(|j| j.id == job_id) else {
            return;
        };
        job.counted = census.total();
        self.census.merge(census);
        let members = self.ring.as_ref().map_or(0, |r| r.members.len()) as u64;
        let place = self.may_place_by_data() && census.total() >= CENSUS_ROWS_PER_MEMBER * members;
        if place {
            let trace = self.job.as_mut().and_then(|job| {
                job.placing = true;
                job.call.trace.clone()
            });
            self.place_by_census(now, trace);
            // Nothing to wait for if every member already acknowledged (no member at all).
            self.release_ring_waiters(now);
        }
    }

    /// Every member holds the ring placed by the census: the rows may follow.
    pub(super) fn on_placed_by_data(&mut self, now: Time) {
        let Some(job) = self.job.as_mut().filter(|j| j.placing) else {
            return;
        };
        job.placing = false;
        if let Some(chunk) = job.parked.take() {
            self.place_chunk(now, chunk);
        }
    }

    /// The end of the job's file, or a failure to read it.
    pub(super) fn on_load_done(&mut self, now: Time, job_id: u64, result: Result<(), LoadError>) {
        let Some(job) = self.job.as_mut().filter(|j| j.id == job_id) else {
            return;
        };
        job.loading = false;
        job.asked = false;
        if let Err(e) = result {
            let call = job.call.clone();
            let path = job.report.path.clone();
            self.job = None;
            let reason = e.to_string();
            self.events.push(ManagerEvent::DistributeFailed {
                job: job_id,
                reason: reason.clone(),
            });
            return self.reply(now, &call, Err(RequestError::Load { path, reason }));
        }
        if let Some(held) = job.held.take() {
            let table_size = first_prime_above(2 * held.rows.len() as u64);
            if self
                .ring
                .as_ref()
                .is_some_and(|r| r.table_size != table_size)
            {
                self.enqueue(now, Change::Reshape { table_size });
                // Place by the new table size at once; peers redirect anything placed early.
                if let Some(r) = self.ring.as_mut() {
                    r.table_size = table_size;
                }
            }
            return self.place_chunk(now, held);
        }
        self.pump_job(now);
    }

    /// Batches one chunk's rows for their replica sets and queues them.
    fn place_chunk(&mut self, now: Time, dataset: Dataset) {
        let Some(ring) = self.ring.clone() else {
            return;
        };
        let Some(job) = self.job.as_mut() else { return };
        self.fresh_ring = false;
        let skip = job.counted.saturating_sub(job.seen) as usize;
        for row in dataset.rows.iter().skip(skip) {
            self.census.add(row.key);
        }
        job.seen += dataset.rows.len() as u64;
        if job.report.format.is_empty() {
            job.report.format = dataset.format.to_string();
        }
        job.report.read += dataset.read();
        job.report.rejected += dataset.rejected.len() as u64;
        job.report.fallback_keys += dataset.fallback_keys;
        let room = 10usize.saturating_sub(job.report.rejected_samples.len());
        job.report.rejected_samples.extend(
            dataset
                .rejected
                .iter()
                .take(room)
                .map(|e| (e.line, e.reason.clone())),
        );
        let budget = batch_budget(&dataset.columns, self.cfg.max_datagram);
        // Rows grouped by their replica set (owner first): with virtual nodes one owner's
        // arcs have different replicas, so the set, not the owner, decides where a batch goes.
        let r = ring.replication.max(1) as usize;
        let placer = Placer::new(&ring);
        let mut by_holders: BTreeMap<Vec<PeerId>, Vec<WireRow>> = BTreeMap::new();
        for row in dataset.rows {
            let packed = row.values;
            if row_size(&packed) > budget {
                job.report.rejected += 1;
                if job.report.rejected_samples.len() < 10 {
                    job.report
                        .rejected_samples
                        .push((row.line, "row too large for one datagram".into()));
                }
                continue;
            }
            let holders: Vec<PeerId> = placer.replicas(row.key, r).1.iter().map(|m| m.id).collect();
            if !holders.is_empty() {
                by_holders
                    .entry(holders)
                    .or_default()
                    .push(WireRow(row.key, packed));
            }
        }
        // Batches go to a peer, not to a replica set: with n peers and V tokens each there are
        // up to n x V sets, and a chunk split by set gave each only a few rows (8 a batch at 64
        // peers, a datagram and an ack each). A peer's rows of a chunk travel together, those
        // it owns apart from those it holds copies of.
        let mut streams: BTreeMap<(PeerId, bool), Vec<(u64, WireRow)>> = BTreeMap::new();
        for (holders, rows) in by_holders {
            job.next_unit += 1;
            let unit = job.next_unit;
            job.pending_rows += rows.len() as u64;
            job.units.insert(
                unit,
                Unit {
                    awaiting: 0,
                    rows: rows.len() as u32,
                    owner: holders[0],
                },
            );
            // A copy for each holder but the last, which takes the rows themselves.
            if let Some((last, others)) = holders.split_last() {
                for (i, h) in others.iter().enumerate() {
                    let copies = rows.iter().map(|row| (unit, row.clone()));
                    streams.entry((*h, i == 0)).or_default().extend(copies);
                }
                let rows = rows.into_iter().map(|row| (unit, row));
                streams
                    .entry((*last, others.is_empty()))
                    .or_default()
                    .extend(rows);
            }
        }
        for ((peer, owned), rows) in streams {
            for (units, rows) in cut_by_budget(rows, budget) {
                job.next_batch += 1;
                let id = job.next_batch;
                for u in &units {
                    if let Some(unit) = job.units.get_mut(u) {
                        unit.awaiting += 1;
                    }
                }
                job.batches.insert(id, BatchOf { units, owned });
                job.report.batches += 1;
                let batch = StoreBatch {
                    epoch: ring.epoch,
                    columns: dataset.columns.clone(),
                    rows,
                };
                job.queues.entry(peer).or_default().push_back((id, batch));
            }
        }
        self.pump_job(now);
    }

    pub(super) fn pump_job(&mut self, now: Time) {
        let Some(job) = self.job.as_mut() else { return };
        let mut sends = Vec::new();
        for (peer, queue) in job.queues.iter_mut() {
            let flying = job.in_flight.entry(*peer).or_default();
            while *flying < self.cfg.window.max(1) {
                let Some((unit, batch)) = queue.pop_front() else {
                    break;
                };
                *flying += 1;
                sends.push((*peer, unit, batch));
            }
        }
        let (job_id, trace) = (job.id, job.call.trace.clone());
        let done = !job.loading
            && job.queues.values().all(VecDeque::is_empty)
            && job.in_flight.values().all(|n| *n == 0);
        if job.loading && !job.asked && job.pending_rows <= LOW_WATER_ROWS {
            job.asked = true;
            self.events.push(ManagerEvent::WantRows { job: job_id });
        }
        for (peer, id, batch) in sends {
            // A batch for a peer the registry no longer lists could never be sent nor
            // acknowledged, and the job would wait for it forever: end the job instead.
            let Some(addr) = self.registry.get(peer).map(|p| p.addr) else {
                return self.finish_job(now, Err(DistributeFailure::PeerGone { peer }));
            };
            let tag = ManagerTag::Batch {
                job: job_id,
                peer,
                batch: id,
            };
            self.send(now, addr, Body::Store(batch), trace.clone(), tag);
        }
        if done {
            self.finish_job(now, Ok(()));
        }
    }

    pub(super) fn batch_acked(
        &mut self,
        now: Time,
        job: u64,
        peer: PeerId,
        batch: u64,
        new_rows: Option<u32>,
    ) {
        let Some(j) = self.job.as_mut().filter(|j| j.id == job) else {
            return;
        };
        if let Some(b) = j.batches.remove(&batch) {
            if b.owned {
                j.report.new_rows += new_rows.unwrap_or(0) as u64;
            }
            for unit in b.units {
                let Some(u) = j.units.get_mut(&unit) else {
                    continue;
                };
                u.awaiting = u.awaiting.saturating_sub(1);
                if u.awaiting == 0 {
                    let (rows, owner) = (u.rows as u64, u.owner);
                    j.units.remove(&unit);
                    j.pending_rows = j.pending_rows.saturating_sub(rows);
                    j.report.stored += rows;
                    *j.per_peer.entry(owner).or_default() += rows;
                }
            }
        }
        if let Some(n) = j.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        // Told once rows are stored everywhere (an ack may complete none), then at most every
        // PROGRESS_EVERY.
        if j.report.stored > 0 && j.progress_at.is_none_or(|at| now >= at + PROGRESS_EVERY) {
            j.progress_at = Some(now);
            let progress = Body::Progress {
                to: j.call.seq,
                done: j.report.stored,
                total: j.report.read,
            };
            self.link.send_unsequenced(j.call.addr, progress);
        }
        self.pump_job(now);
    }

    pub(super) fn finish_job(&mut self, now: Time, outcome: Result<(), DistributeFailure>) {
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
                self.events.push(ManagerEvent::DistributeDone {
                    job: id,
                    stored: job.report.stored,
                    elapsed,
                });
                Ok(ReplyBody::Distribute(job.report))
            }
            Err(failure) => {
                let err = RequestError::Distribute {
                    failure,
                    stored: job.report.stored,
                    read: job.report.read,
                };
                self.events.push(ManagerEvent::DistributeFailed {
                    job: id,
                    reason: err.to_string(),
                });
                Err(err)
            }
        };
        self.reply(now, &job.call, result);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{Kit, dataset};
    use crate::ring::RingExt;
    use crate::wire::{ClientRequest, DistributeFailure, Placement, ReplyBody, RequestError};

    #[test]
    fn batches_are_cut_by_size_and_name_every_unit_they_carry() {
        use crate::record::RecordKey;
        use crate::store::{cut_by_budget, row_size};
        use crate::wire::{PackedRow, WireRow};
        let row = |i: u64| WireRow(RecordKey::Event(i), PackedRow::pack(&["x".repeat(40)]));
        let units = [1u64, 1, 1, 2, 2, 3, 4, 4, 4, 4];
        let rows: Vec<(u64, WireRow)> = units
            .iter()
            .enumerate()
            .map(|(i, u)| (*u, row(i as u64)))
            .collect();
        let size = row_size(&rows[0].1.1);
        let batches = cut_by_budget(rows.clone(), 3 * size);
        // Every row once, in order; at most three a batch; each batch names exactly the
        // units of its rows.
        let flat: Vec<&WireRow> = batches.iter().flat_map(|(_, r)| r).collect();
        assert_eq!(flat, rows.iter().map(|(_, r)| r).collect::<Vec<_>>());
        let mut at = 0;
        for (named, carried) in &batches {
            assert!((1..=3).contains(&carried.len()), "{}", carried.len());
            let mut want: Vec<u64> = units[at..at + carried.len()].to_vec();
            want.dedup();
            assert_eq!(named, &want);
            at += carried.len();
        }
        assert_eq!(batches.len(), 4);
        // A row larger than the budget still travels, alone.
        assert_eq!(cut_by_budget(rows[..2].to_vec(), size / 2).len(), 2);
        assert!(cut_by_budget(Vec::<(u64, WireRow)>::new(), size).is_empty());
    }

    /// The client hears how far a distribute is, at most every 100 ms (the kit's clock stands
    /// still while it runs: one report), then the reply.
    #[test]
    fn the_client_is_told_the_progress_at_most_every_100_ms() {
        let mut kit = Kit::with_ring(4);
        let seq = kit.request(ClientRequest::Distribute { path: None });
        kit.load(Ok(dataset(500)));
        assert!(matches!(kit.reply(seq), Ok(ReplyBody::Distribute(_))));
        assert_eq!(kit.progress.len(), 1, "{:?}", kit.progress);
        let (to, done, total) = kit.progress[0];
        assert_eq!((to, total), (seq, 500));
        assert!(done > 0 && done <= 500, "{done}");
    }

    /// The file comes in chunks: the manager asks for the next only when its queue runs low,
    /// counts every chunk, and answers once the end came and every row is stored.
    #[test]
    fn a_file_streamed_in_chunks_is_asked_for_as_the_queue_drains() {
        use crate::machine::Machine;
        use crate::manager::{ManagerEvent, ManagerInput};
        let mut kit = Kit::with_ring(4);
        let seq = kit.request(ClientRequest::Distribute { path: None });
        let job = kit
            .events
            .iter()
            .find_map(|e| match e {
                ManagerEvent::LoadFile { job, .. } => Some(*job),
                _ => None,
            })
            .unwrap();
        let whole = dataset(30_000);
        let mut rows = whole.rows.clone().into_iter();
        let mut asked = 0;
        loop {
            let chunk_rows: Vec<_> = rows.by_ref().take(10_000).collect();
            if chunk_rows.is_empty() {
                break;
            }
            let chunk = crate::record::Dataset {
                rows: chunk_rows,
                ..whole.clone()
            };
            let before = kit.events.len();
            let events = kit
                .m
                .handle_local(kit.now, ManagerInput::Rows { job, chunk });
            kit.events.extend(events);
            kit.run();
            assert!(!kit.replies.contains_key(&seq), "answered early");
            let wants = kit.events[before..]
                .iter()
                .filter(|e| matches!(e, ManagerEvent::WantRows { .. }))
                .count();
            assert_eq!(
                wants, 1,
                "one request for the next chunk once the queue ran low"
            );
            asked += wants;
        }
        assert!(
            !kit.replies.contains_key(&seq),
            "no answer before the end of the file"
        );
        let events = kit.m.handle_local(
            kit.now,
            ManagerInput::LoadDone {
                job,
                result: Ok(()),
            },
        );
        kit.events.extend(events);
        kit.run();
        let Ok(ReplyBody::Distribute(report)) = kit.reply(seq) else {
            panic!("no report");
        };
        assert_eq!((report.read, report.stored), (30_000, 30_000));
        assert_eq!(asked, 3);
    }

    #[test]
    fn distribute_before_setup_asks_for_setup() {
        let mut kit = Kit::new(Placement::Consistent);
        kit.add_peer("p0");
        let seq = kit.request(ClientRequest::Distribute { path: None });
        assert_eq!(kit.reply(seq), Err(RequestError::NoRing));
    }

    #[test]
    fn every_row_goes_to_its_owner_and_is_counted_once_acknowledged() {
        let mut kit = Kit::with_ring(4);
        let seq = kit.request(ClientRequest::Distribute { path: None });
        kit.load(Ok(dataset(500)));
        let report = match kit.reply(seq) {
            Ok(ReplyBody::Distribute(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (report.read, report.stored, report.new_rows),
            (500, 500, 500)
        );
        assert!(report.batches > 4, "{report:?}");
        let ring = kit.m.ring().cloned().unwrap();
        for p in &kit.peers {
            for key in &p.keys {
                assert_eq!(
                    ring.owner_of(*key).map(|m| m.name.as_str()),
                    Some(p.name.as_str())
                );
            }
        }
        assert_eq!(kit.peers.iter().map(|p| p.keys.len()).sum::<usize>(), 500);
    }

    #[test]
    fn a_refused_batch_ends_the_job_with_what_was_stored() {
        let mut kit = Kit::with_ring(3);
        kit.refusing.insert("p1".into());
        let seq = kit.request(ClientRequest::Distribute { path: None });
        kit.load(Ok(dataset(300)));
        match kit.reply(seq) {
            Err(RequestError::Distribute {
                failure: DistributeFailure::BatchRefused { .. },
                read,
                ..
            }) => assert_eq!(read, 300),
            other => panic!("{other:?}"),
        }
    }

    /// Rows placed on a peer that is then dropped from the registry before they are sent
    /// end the job, naming the peer, instead of leaving it waiting for acks that cannot come.
    #[test]
    fn rows_for_a_peer_no_longer_registered_end_the_job_naming_it() {
        let mut kit = Kit::with_ring(3);
        let gone = kit.peer("p1").id.unwrap();
        let seq = kit.request(ClientRequest::Distribute { path: None });
        // The registry forgets p1 while the ring still places rows on it: no path does this
        // today (a peer leaves the ring as it leaves the registry); the job must not hang if
        // one ever does.
        kit.m.registry.remove(gone);
        kit.load(Ok(dataset(300)));
        match kit.reply(seq) {
            Err(RequestError::Distribute {
                failure: DistributeFailure::PeerGone { peer },
                read,
                ..
            }) => assert_eq!((peer, read), (gone, 300)),
            other => panic!("{other:?}"),
        }
        let stored: usize = kit.peers.iter().map(|p| p.keys.len()).sum();
        assert!(stored < 300, "{stored}");
    }

    #[test]
    fn a_file_that_does_not_load_is_reported_with_its_path() {
        let mut kit = Kit::with_ring(2);
        let seq = kit.request(ClientRequest::Distribute {
            path: Some("missing.csv".into()),
        });
        kit.load(Err(crate::record::LoadError::EmptyFile {
            path: Some("missing.csv".into()),
        }));
        match kit.reply(seq) {
            Err(RequestError::Load { path, reason }) => {
                assert_eq!(path, "missing.csv");
                assert!(reason.contains("empty"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
