//! Status: every peer is probed, and the answers (or their absence) become the `status`
//! table; `setup` answers with the same table once every member holds the ring.

use super::registry::Standing;
use super::{ClientCall, Manager, ManagerEvent, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::ring::{Placer, RingExt};
use crate::wire::{
    Body, PeerId, PeerReport, PeerState, PeerStatus, RepairReport, ReplyBody, RequestError,
    StatusReport, TraceContext, cbor_len,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Status requests (each probing every peer) the manager follows at once.
const MAX_STATUS_IN_FLIGHT: usize = 64;

/// What a gathering of the peers' reports answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gathering {
    Status,
    /// `setup` answers with the status table.
    Setup,
    /// `repair` compares the holders of every range (`stormctl repair`).
    Repair,
    /// The same comparison on the manager's own timer (`repair_interval_ms`): nobody to
    /// answer.
    Audit,
}

pub(super) struct StatusGather {
    /// Who asked; none for an audit.
    call: Option<ClientCall>,
    kind: Gathering,
    /// When the probes went out: a peer heard from since then is alive, whatever its report.
    started: Time,
    pub(super) deadline: Time,
    /// Whether the deadline was already pushed back once for peers alive but not reporting.
    extended: bool,
    waiting: BTreeSet<PeerId>,
    reports: BTreeMap<PeerId, PeerReport>,
}

impl Manager {
    pub(super) fn start_status(&mut self, now: Time, call: ClientCall, kind: Gathering) {
        // Each status probes every peer: bounded, so a flood of them cannot bury the manager.
        if self.probes.len() >= MAX_STATUS_IN_FLIGHT {
            let busy = RequestError::StatusBusy {
                in_flight: MAX_STATUS_IN_FLIGHT,
            };
            return self.reply(now, &call, Err(busy));
        }
        self.gather(now, Some(call), kind);
    }

    /// The periodic repair (`repair_interval_ms`): when it is due, in a settled ring outside
    /// a distribute, a recovery or a teardown, and with no audit still gathering, the same
    /// comparison as `stormctl repair`.
    pub(super) fn audit_if_due(&mut self, now: Time) {
        let Some(every) = self.cfg.repair_interval else {
            return;
        };
        if now < self.audit_at {
            return;
        }
        self.audit_at = now + every;
        let quiet = self.job.is_none() && self.recovery.is_none() && self.teardown.is_none();
        let settled = self.ring.as_ref().is_some_and(|r| r.settled);
        let gathering = self.probes.values().any(|g| g.kind == Gathering::Audit);
        if quiet && settled && !gathering && self.probes.len() < MAX_STATUS_IN_FLIGHT {
            self.gather(now, None, Gathering::Audit);
        }
    }

    fn gather(&mut self, now: Time, call: Option<ClientCall>, kind: Gathering) {
        let trace = call.as_ref().and_then(|c| c.trace.clone());
        let probe = self.next_probe;
        self.next_probe += 1;
        let waiting: BTreeSet<PeerId> = self.registry.ids().collect();
        let targets: Vec<(PeerId, SocketAddr)> = self.registry.targets();
        self.probes.insert(
            probe,
            StatusGather {
                call,
                started: now,
                deadline: now + self.cfg.probe_timeout,
                extended: false,
                waiting,
                reports: BTreeMap::new(),
                kind,
            },
        );
        for (id, addr) in targets {
            self.send_probe(now, probe, id, addr, trace.clone());
        }
        self.maybe_finish_status(now, probe, false);
    }

    fn send_probe(
        &mut self,
        now: Time,
        probe: u64,
        id: PeerId,
        addr: SocketAddr,
        trace: Option<TraceContext>,
    ) {
        let tag = ManagerTag::ToPeer(id, PeerMessage::Probe);
        self.send(now, addr, Body::Probe { probe }, trace, tag);
    }

    pub(super) fn on_report(&mut self, now: Time, probe: u64, id: PeerId, report: PeerReport) {
        if let Some(g) = self.probes.get_mut(&probe) {
            g.waiting.remove(&id);
            g.reports.insert(id, report);
            self.maybe_finish_status(now, probe, false);
        }
    }

    pub(super) fn maybe_finish_status(&mut self, now: Time, probe: u64, deadline_passed: bool) {
        let ready = self
            .probes
            .get(&probe)
            .is_some_and(|g| g.waiting.is_empty() || deadline_passed);
        if !ready {
            return;
        }
        if self.extend_for_the_living(now, probe) {
            return;
        }
        let Some(g) = self.probes.remove(&probe) else {
            return;
        };
        // Silent and not heard from since the probes went out; one heard from is alive, its
        // counts unknown.
        let unreachable: BTreeSet<PeerId> = g
            .waiting
            .iter()
            .copied()
            .filter(|id| !self.detector.heard_since(*id, g.started))
            .collect();
        let body = match g.kind {
            Gathering::Status => Ok(ReplyBody::Status(
                self.status_report(&g.reports, &unreachable),
            )),
            Gathering::Setup => Ok(ReplyBody::Setup(
                self.status_report(&g.reports, &unreachable),
            )),
            Gathering::Repair | Gathering::Audit => {
                let trace = g.call.as_ref().and_then(|c| c.trace.clone());
                self.repair(now, &g.reports, trace)
            }
        };
        // An audit answers nobody; what it found is logged by `repair` (and a ring that
        // changed meanwhile is simply audited next time).
        if let Some(call) = &g.call {
            self.reply(now, call, body);
        }
    }

    /// `stormctl repair`: only a settled ring, outside a distribute, is compared (while rows
    /// move, holders differ for a while by design).
    pub(super) fn start_repair(&mut self, now: Time, call: ClientCall) {
        if self.job.is_some() {
            return self.reply(now, &call, Err(RequestError::DistributeRunning));
        }
        match &self.ring {
            None => self.reply(now, &call, Err(RequestError::NoRing)),
            Some(r) if !r.settled => self.reply(now, &call, Err(RequestError::Unsettled)),
            Some(_) => self.start_status(now, call, Gathering::Repair),
        }
    }

    /// Compares what the holders of each range of the settled view reported (rows and
    /// digest) and asks every holder of a range whose holders differ to copy its rows of it
    /// to the others (`Resync`). A range is compared only when all its holders reported
    /// under this view with nothing left to hand over; the rest are counted as unchecked.
    fn repair(
        &mut self,
        now: Time,
        reports: &BTreeMap<PeerId, PeerReport>,
        trace: Option<TraceContext>,
    ) -> Result<ReplyBody, RequestError> {
        let ring = match &self.ring {
            None => return Err(RequestError::NoRing),
            Some(r) if !r.settled => return Err(RequestError::Unsettled),
            Some(r) => r,
        };
        if self.job.is_some() {
            return Err(RequestError::DistributeRunning);
        }
        let epoch = ring.epoch;
        let r = ring.replication.max(1) as usize;
        // Each holder's (rows, digest) of one arc, if it can be compared.
        let held = |id: PeerId, arc: u64| -> Option<(u64, u64)> {
            let rep = reports.get(&id)?;
            if rep.epoch != epoch || rep.handing_over > 0 || rep.digests.len() != rep.ranges.len() {
                return None;
            }
            // A holder that reports nothing of an arc holds no row of it.
            Some(rep.range(arc).map_or((0, 0), |(n, d)| (n, d.unwrap_or(0))))
        };
        let (mut checked, mut unchecked, mut diverged) = (0, 0, 0);
        let mut asked: BTreeMap<PeerId, Vec<u64>> = BTreeMap::new();
        for (arc, holders) in Placer::new(ring).arcs(r) {
            let Some(each) = holders
                .iter()
                .map(|h| held(h.id, arc).map(|d| (h.id, d)))
                .collect::<Option<Vec<_>>>()
            else {
                unchecked += 1;
                continue;
            };
            checked += 1;
            if each.windows(2).all(|w| w[0].1 == w[1].1) {
                continue;
            }
            diverged += 1;
            // Every holder with rows sends them all: together the others get the union.
            for (id, (rows, _)) in each {
                if rows > 0 {
                    asked.entry(id).or_default().push(arc);
                }
            }
        }
        let mut peers_asked = Vec::new();
        for (id, arcs) in asked {
            let Some(p) = self.registry.get(id) else {
                continue;
            };
            let (addr, name) = (p.addr, p.name.clone());
            let tag = ManagerTag::ToPeer(id, PeerMessage::Resync);
            self.send(now, addr, Body::Resync { epoch, arcs }, trace.clone(), tag);
            peers_asked.push(name);
        }
        if diverged > 0 {
            self.events.push(ManagerEvent::Warning(format!(
                "repair: the holders of {diverged} of {checked} ranges differ; asked {} to copy their rows of them to the others",
                peers_asked.join(", ")
            )));
        }
        Ok(ReplyBody::Repair(RepairReport {
            epoch,
            checked_ranges: checked,
            diverged_ranges: diverged,
            unchecked_ranges: unchecked,
            peers_asked,
        }))
    }

    /// At a status's first deadline, the peers that did not report but may well be alive
    /// (heard from since the probes went out, or not suspected by the failure detector: their
    /// probe or report may have been lost) are probed once more and given one more probe
    /// timeout. True if the status waits on.
    fn extend_for_the_living(&mut self, now: Time, probe: u64) -> bool {
        let Some(g) = self.probes.get(&probe) else {
            return false;
        };
        if g.extended || g.waiting.is_empty() {
            return false;
        }
        // Heard from meanwhile, or not (yet) suspected by the failure detector: a probe
        // timeout holds only a couple of heartbeats, and both may be lost. Not one declared
        // dead meanwhile (it is no longer watched; waiting for it made a status during a
        // peer's death take two probe timeouts more).
        let alive: Vec<PeerId> = g
            .waiting
            .iter()
            .copied()
            .filter(|id| self.detector.may_be_alive(*id, g.started))
            .collect();
        if alive.is_empty() {
            return false;
        }
        let trace = g.call.as_ref().and_then(|c| c.trace.clone());
        if let Some(g) = self.probes.get_mut(&probe) {
            g.extended = true;
            g.deadline = now + self.cfg.probe_timeout;
        }
        for id in alive {
            if let Some(addr) = self.registry.get(id).map(|p| p.addr) {
                self.send_probe(now, probe, id, addr, trace.clone());
            }
        }
        true
    }

    /// The `status` table. A peer without a report but not `unreachable` is shown in its
    /// standing, with unknown counts.
    pub(super) fn status_report(
        &self,
        reports: &BTreeMap<PeerId, PeerReport>,
        unreachable: &BTreeSet<PeerId>,
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
        let peers = self.registry.iter().map(|(id, p)| {
            let state = match p.standing {
                _ if self.detector.is_suspect(id) => PeerState::Suspect,
                _ if unreachable.contains(&id) => PeerState::Unreachable,
                Standing::Registered => PeerState::Registered,
                Standing::InRing => PeerState::Up,
                Standing::Leaving => PeerState::Leaving,
            };
            PeerStatus {
                id,
                name: p.name.clone(),
                addr: p.addr,
                state,
                records: reports.get(&id).map(|r| r.records),
                keys: reports.get(&id).map(|r| r.keys),
                token: tokens.get(&id).copied(),
                share: shares.get(&id).copied().unwrap_or(0.0),
                counters: reports.get(&id).map(|r| r.counters),
                owned: reports.get(&id).map(|r| r.owned),
                replicas: reports.get(&id).map(|r| r.replicas),
            }
        });
        let mut peers: Vec<PeerStatus> = peers.collect();
        let budget = super::registry::ENTRIES_BUDGET;
        let mut used = cbor_len(&peers);
        if used > budget {
            // Registration keeps the peers inside a datagram, not their counters: a report
            // too large with them keeps every peer and drops the counters.
            for p in &mut peers {
                p.counters = None;
            }
            used = cbor_len(&peers);
        }
        // The dead are listed, newest first, only while the report stays inside a datagram:
        // registration keeps the living inside it, not the up to 64 remembered dead.
        let mut room = budget.saturating_sub(used);
        let dead = self.detector.dead.iter().rev().map(|d| PeerStatus {
            id: d.id,
            name: d.name.clone(),
            addr: d.addr,
            state: PeerState::Dead,
            records: None,
            keys: None,
            token: None,
            share: 0.0,
            counters: None,
            owned: None,
            replicas: None,
        });
        let mut fitting = Vec::new();
        for d in dead {
            let size = cbor_len(&d);
            if size > room {
                break;
            }
            room -= size;
            fitting.push(d);
        }
        peers.extend(fitting.into_iter().rev());
        let (under_replicated_ranges, under_replicated_rows) = self.under_replication(reports);
        StatusReport {
            epoch: self.ring.as_ref().map_or(self.last_epoch, |r| r.epoch),
            // Counts are sampled when each peer answers: they describe a settled ring only if
            // every answer was given under the current, settled view.
            settled: self
                .ring
                .as_ref()
                .is_none_or(|r| r.settled && reports.values().all(|rep| rep.epoch == r.epoch)),
            placement: self.ring.as_ref().map(|r| r.placement),
            table_size: self.ring.as_ref().map_or(0, |r| r.table_size),
            peers,
            manager: self.link.counters(),
            replication: self
                .ring
                .as_ref()
                .map_or(self.cfg.replication, |r| r.replication),
            under_replicated_ranges,
            under_replicated_rows,
            repairing: reports.values().map(|r| r.handing_over).sum(),
        }
    }

    /// Ranges whose holders do not all hold as many rows as the fullest of them (a holder
    /// that did not answer holds none, as far as anyone can tell), or not the same rows (by
    /// their digests), or that have fewer than `replication` holders; and the copies missing
    /// in them (by count: rows that differ in equal numbers count none).
    fn under_replication(&self, reports: &BTreeMap<PeerId, PeerReport>) -> (u64, u64) {
        let Some(ring) = &self.ring else {
            return (0, 0);
        };
        let r = ring.replication.max(1) as usize;
        let (mut ranges, mut rows) = (0, 0);
        for (arc, holders) in Placer::new(ring).arcs(r) {
            let counts: Vec<u64> = holders
                .iter()
                .map(|h| {
                    reports
                        .get(&h.id)
                        .and_then(|rep| rep.range(arc))
                        .map_or(0, |(n, _)| n)
                })
                .collect();
            let full = counts.iter().copied().max().unwrap_or(0);
            let missing =
                counts.iter().map(|c| full - c).sum::<u64>() + full * (r - holders.len()) as u64;
            // As many rows each, but not the same rows: the digests tell (peers that report
            // them under the current view; `repair` copies them).
            let digests: Vec<u64> = holders
                .iter()
                .filter_map(|h| reports.get(&h.id)?.range(arc)?.1)
                .collect();
            let differ = digests.windows(2).any(|w| w[0] != w[1]);
            if missing > 0 || differ {
                ranges += 1;
                rows += missing;
            }
        }
        (ranges, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::Kit;
    use crate::wire::{Body, ClientRequest, PeerState, ReplyBody, StatusReport};
    use std::time::Duration;

    #[test]
    fn a_silent_peer_shows_unreachable_and_the_rest_report_counts() {
        let mut kit = Kit::with_ring(3);
        kit.silent.insert("p2".into());
        let seq = kit.request(ClientRequest::Status);
        kit.wait(Duration::from_secs(1));
        let s = status_reply(&mut kit, seq);
        assert_eq!(
            states(&s),
            vec![
                ("p0".into(), PeerState::Up, Some(0)),
                ("p1".into(), PeerState::Up, Some(0)),
                ("p2".into(), PeerState::Unreachable, None),
            ]
        );
        assert!(s.settled);
        assert!((s.peers.iter().map(|p| p.share).sum::<f64>() - 1.0).abs() < 1e-6);
    }

    /// Holders of a range with as many rows each but different digests hold different rows:
    /// the range is short of copies (`repair` gives each the other's); equal digests are not.
    #[test]
    fn holders_with_equal_counts_but_different_digests_are_under_replicated() {
        use crate::ring::Placer;
        use crate::wire::{PeerId, PeerReport};
        use std::collections::BTreeMap;
        let mut kit = Kit::with_ring(3);
        // The kit's ring keeps one copy: two holders per range here.
        if let Some(r) = kit.m.ring.as_mut() {
            r.replication = 2;
        }
        let ring = kit.m.ring().expect("a ring").clone();
        let arcs = Placer::new(&ring).arcs(2);
        let reports = |odd: Option<(u64, PeerId)>| {
            let mut out: BTreeMap<PeerId, PeerReport> = BTreeMap::new();
            for (arc, holders) in &arcs {
                for h in holders {
                    let rep = out.entry(h.id).or_insert_with(|| PeerReport {
                        epoch: ring.epoch,
                        ..Default::default()
                    });
                    rep.ranges.push((*arc, 10));
                    let digest = if odd == Some((*arc, h.id)) { 8 } else { 7 };
                    rep.digests.push(digest);
                }
            }
            out
        };
        assert_eq!(kit.m.under_replication(&reports(None)), (0, 0));
        let (arc, holders) = &arcs[0];
        let odd = Some((*arc, holders[1].id));
        assert_eq!(kit.m.under_replication(&reports(odd)), (1, 0));
    }

    fn status_reply(kit: &mut Kit, seq: u64) -> StatusReport {
        match kit.reply(seq) {
            Ok(ReplyBody::Status(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Each peer's name, state and record count.
    fn states(s: &StatusReport) -> Vec<(String, PeerState, Option<u64>)> {
        s.peers
            .iter()
            .map(|p| (p.name.clone(), p.state, p.records))
            .collect()
    }

    /// A heartbeat from a peer whose probe went unanswered: alive, so not unreachable.
    fn heartbeat(kit: &mut Kit, name: &str) {
        let i = kit.peers.iter().position(|p| p.name == name).unwrap();
        let (id, epoch) = (kit.peers[i].id, kit.m.ring().map_or(0, |r| r.epoch));
        kit.send_from_peer(
            i,
            crate::wire::UNSEQUENCED,
            Body::Heartbeat {
                epoch,
                id,
                beat: None,
            },
        );
    }

    fn probes_to(kit: &Kit, name: &str) -> usize {
        let inbox = &kit.peer(name).inbox;
        inbox
            .iter()
            .filter(|b| matches!(b, Body::Probe { .. }))
            .count()
    }

    #[test]
    fn a_peer_heard_from_but_not_reporting_is_probed_again_and_its_late_report_counts() {
        let mut kit = Kit::with_ring(3);
        kit.silent.insert("p2".into());
        let seq = kit.request(ClientRequest::Status);
        kit.wait(Duration::from_millis(100));
        heartbeat(&mut kit, "p2");
        let before = probes_to(&kit, "p2");
        // The first probe timeout (300 ms) passes: no answer yet, p2 is probed again.
        kit.wait(Duration::from_millis(250));
        assert!(
            !kit.replies.contains_key(&seq),
            "status waits for a live peer"
        );
        assert!(probes_to(&kit, "p2") > before, "p2 is probed again");
        // Its report gets through this time.
        kit.silent.remove("p2");
        kit.wait(Duration::from_millis(100));
        let s = status_reply(&mut kit, seq);
        assert!(s.peers.iter().all(|p| p.state == PeerState::Up));
        assert!(
            s.peers.iter().all(|p| p.records == Some(0)),
            "{:?}",
            s.peers
        );
    }

    #[test]
    fn a_live_peer_that_never_reports_is_up_with_unknown_counts_not_unreachable() {
        let mut kit = Kit::with_ring(3);
        kit.silent.insert("p1".into());
        kit.silent.insert("p2".into());
        let seq = kit.request(ClientRequest::Status);
        // p1 heartbeats throughout; p2 is never heard. The first probe timeout (300 ms)
        // passes without an answer: status probes both again (neither is suspected) and
        // waits one more.
        for _ in 0..2 {
            kit.wait(Duration::from_millis(100));
            heartbeat(&mut kit, "p1");
        }
        let first_round = (probes_to(&kit, "p1"), probes_to(&kit, "p2"));
        for _ in 0..2 {
            kit.wait(Duration::from_millis(100));
            heartbeat(&mut kit, "p1");
        }
        assert!(probes_to(&kit, "p1") > first_round.0 && probes_to(&kit, "p2") > first_round.1);
        assert!(
            !kit.replies.contains_key(&seq),
            "status waits for a live peer"
        );
        for _ in 0..4 {
            kit.wait(Duration::from_millis(100));
            heartbeat(&mut kit, "p1");
        }
        let s = status_reply(&mut kit, seq);
        assert_eq!(
            states(&s),
            vec![
                ("p0".into(), PeerState::Up, Some(0)),
                ("p1".into(), PeerState::Up, None),
                ("p2".into(), PeerState::Unreachable, None),
            ]
        );
    }

    /// A silent peer declared dead (no longer watched) before the first probe timeout is not
    /// waited for again: the status answers at that timeout (the bench's SIGKILL repair, timed
    /// by status, took 6.0 s instead of 3.0 s while it was).
    #[test]
    fn a_peer_declared_dead_meanwhile_is_not_waited_for_again() {
        let mut kit = Kit::with_ring(3);
        kit.silent.insert("p2".into());
        let id = kit.peer("p2").id.expect("registered");
        let seq = kit.request(ClientRequest::Status);
        kit.wait(Duration::from_millis(100));
        kit.m.unwatch(id);
        kit.wait(Duration::from_millis(250));
        let s = status_reply(&mut kit, seq);
        assert_eq!(states(&s)[2], ("p2".into(), PeerState::Unreachable, None));
    }

    #[test]
    fn status_requests_in_flight_are_bounded() {
        let mut kit = Kit::with_ring(2);
        kit.silent.insert("p1".into());
        let seqs: Vec<u64> = (0..70)
            .map(|_| kit.request(ClientRequest::Status))
            .collect();
        // The first 64 wait for the silent peer; the rest are told to try again at once.
        for seq in &seqs[64..] {
            assert!(matches!(
                kit.reply(*seq),
                Err(crate::wire::RequestError::StatusBusy { in_flight: 64 })
            ));
        }
        kit.wait(Duration::from_secs(1));
        for seq in &seqs[..64] {
            assert!(matches!(kit.reply(*seq), Ok(ReplyBody::Status(_))));
        }
    }

    #[test]
    fn registered_peers_outside_the_ring_say_so() {
        let mut kit = Kit::new(crate::wire::Placement::Consistent);
        kit.add_peer("p0");
        let seq = kit.request(ClientRequest::Status);
        match kit.reply(seq) {
            Ok(ReplyBody::Status(s)) => {
                assert_eq!(s.peers[0].state, PeerState::Registered);
                assert_eq!(s.peers[0].share, 0.0);
            }
            other => panic!("{other:?}"),
        }
    }
}
