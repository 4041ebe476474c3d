//! Status: every peer is probed, and the answers (or their absence) become the `status`
//! table; `setup` answers with the same table once every member holds the ring.

use super::registry::Standing;
use super::{ClientCall, Manager, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::ring::RingExt;
use crate::wire::{Body, PeerId, PeerReport, PeerState, PeerStatus, ReplyBody, StatusReport};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

pub(super) struct StatusGather {
    call: ClientCall,
    pub(super) deadline: Time,
    waiting: BTreeSet<PeerId>,
    reports: BTreeMap<PeerId, PeerReport>,
    setup: bool,
}

impl Manager {
    pub(super) fn start_status(&mut self, now: Time, call: ClientCall, setup: bool) {
        let probe = self.next_probe;
        self.next_probe += 1;
        let waiting: BTreeSet<PeerId> = self.registry.ids().collect();
        let targets: Vec<(PeerId, SocketAddr)> = self.registry.targets();
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
                ManagerTag::ToPeer(id, PeerMessage::Probe),
            );
        }
        self.maybe_finish_status(now, probe, false);
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

    pub(super) fn status_report(
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
            .registry
            .iter()
            .map(|(id, p)| {
                let state = match p.standing {
                    _ if silent.contains(&id) => PeerState::Unreachable,
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
            table_size: self.ring.as_ref().map_or(0, |r| r.table_size),
            peers,
            manager: self.link.counters(),
        }
    }
}
