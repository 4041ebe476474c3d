//! The registry: which peers the manager knows, under which ids, names and incarnations.
//!
//! Ids are never reused while the manager runs. Names are unique: a second process under a
//! taken name is refused, while the same process registering again (its earlier answer was
//! lost) gets its id back.

use super::{Change, Manager, ManagerEvent, ManagerTag, PeerMessage};
use crate::link::Time;
use crate::wire::{Body, Member, PeerId, PeerState, PeerStatus, Refusal, Rejoin, cbor_len};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

/// Where a peer stands with the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Registered,
    InRing,
    Leaving,
}

#[derive(Debug, Clone)]
pub struct PeerEntry {
    pub name: String,
    pub addr: SocketAddr,
    pub incarnation: u64,
    pub standing: Standing,
}

/// The outcome of a registration that was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// A new peer under a new id.
    New(PeerId),
    /// The same process asking again.
    Again(PeerId),
}

#[derive(Debug)]
pub struct Registry {
    peers: BTreeMap<PeerId, PeerEntry>,
    /// Incarnation → id: every datagram from a peer is looked up here.
    incarnations: HashMap<u64, PeerId>,
    next_id: PeerId,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            peers: BTreeMap::new(),
            incarnations: HashMap::new(),
            next_id: 1,
        }
    }
}

impl Registry {
    pub fn register(
        &mut self,
        name: &str,
        addr: SocketAddr,
        incarnation: u64,
    ) -> Result<Registration, Refusal> {
        if let Some(id) = self.by_incarnation(incarnation) {
            return Ok(Registration::Again(id));
        }
        if name.trim().is_empty() {
            return Err(Refusal::EmptyName);
        }
        if let Some((id, p)) = self.peers.iter().find(|(_, p)| p.name == name) {
            return Err(Refusal::NameTaken {
                name: name.to_string(),
                id: *id,
                addr: p.addr,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let entry = PeerEntry {
            name: name.to_string(),
            addr,
            incarnation,
            standing: Standing::Registered,
        };
        self.peers.insert(id, entry);
        self.incarnations.insert(incarnation, id);
        Ok(Registration::New(id))
    }

    /// Takes back a peer under the id it had with an earlier manager (a restart). Refused when
    /// the id or the name is held by another peer here.
    pub fn restore(&mut self, id: PeerId, entry: PeerEntry) -> Result<(), Refusal> {
        if let Some((other, p)) = self
            .peers
            .iter()
            .find(|(other, p)| p.name == entry.name || **other == id)
        {
            return Err(Refusal::NameTaken {
                name: p.name.clone(),
                id: *other,
                addr: p.addr,
            });
        }
        self.next_id = self.next_id.max(id.saturating_add(1));
        self.incarnations.insert(entry.incarnation, id);
        self.peers.insert(id, entry);
        Ok(())
    }

    pub fn by_incarnation(&self, incarnation: u64) -> Option<PeerId> {
        self.incarnations.get(&incarnation).copied()
    }

    /// A peer by name, or by id written as a number.
    pub fn by_name_or_id(&self, name: &str) -> Option<PeerId> {
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

    pub fn get(&self, id: PeerId) -> Option<&PeerEntry> {
        self.peers.get(&id)
    }

    pub fn set_standing(&mut self, id: PeerId, standing: Standing) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.standing = standing;
        }
    }

    /// Gives the peer registered as `id` the next free id above `reserved` (and every id
    /// given so far); returns the new id. For a newcomer that took, from a manager that had
    /// just restarted, the id of a member not yet back.
    pub fn renumber(&mut self, id: PeerId, reserved: PeerId) -> Option<PeerId> {
        let entry = self.peers.remove(&id)?;
        self.next_id = self.next_id.max(reserved.saturating_add(1));
        let new = self.next_id;
        self.next_id += 1;
        self.incarnations.insert(entry.incarnation, new);
        self.peers.insert(new, entry);
        Some(new)
    }

    pub fn remove(&mut self, id: PeerId) -> Option<PeerEntry> {
        let p = self.peers.remove(&id)?;
        self.incarnations.remove(&p.incarnation);
        Some(p)
    }

    pub fn clear(&mut self) {
        self.peers.clear();
        self.incarnations.clear();
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (PeerId, &PeerEntry)> {
        self.peers.iter().map(|(id, p)| (*id, p))
    }

    pub fn ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Every peer's id and address, for messages to all.
    pub fn targets(&self) -> Vec<(PeerId, SocketAddr)> {
        self.iter().map(|(id, p)| (id, p.addr)).collect()
    }

    /// The name of a peer, or `#id` for one that is gone.
    pub fn name_of(&self, id: PeerId) -> String {
        self.get(id)
            .map_or_else(|| format!("#{id}"), |p| p.name.clone())
    }
}

/// What the ring view and the status report may take, leaving room for the envelope (header,
/// trace context) and a rejoin's or a reply's own fields. Both leave in fragments when they
/// outgrow a datagram.
pub const VIEW_BUDGET: usize = (1 << 20) - 2_048;
/// What one ring change may send in all: every member is sent the whole view, n views of n
/// members. (1,024 peers at 64 tokens each, 665 MB a change, kept the manager from even
/// acknowledging `setup` within stormctl's 4.8 s; 1,024 at 16 tokens, 220 MB, set up in 3 s.)
pub const BROADCAST_BUDGET: usize = 256 << 20;
/// The most peers a cluster registers.
pub const MAX_PEERS: usize = 1_024;
/// What their entries (members, peers' lines) may take: the view's and the report's own
/// fields, generously, are the rest.
pub const ENTRIES_BUDGET: usize = VIEW_BUDGET - 256;

/// What a peer named `name` at `addr` adds to the ring view with `vnodes` tokens (every token
/// at its widest), and to the status report without its datagram counters (counts up to
/// 2^32): a report too large with the counters drops them.
fn footprint(name: &str, addr: SocketAddr, vnodes: u32) -> (usize, usize) {
    let member = Member {
        id: PeerId::MAX,
        name: name.to_string(),
        addr,
        token: u64::MAX,
        leaving: true,
        vnodes: vec![u64::MAX; vnodes.saturating_sub(1) as usize],
    };
    let wide = u64::from(u32::MAX);
    let some = Some(wide);
    let status = PeerStatus {
        id: PeerId::MAX,
        name: name.to_string(),
        addr,
        state: PeerState::Unreachable,
        records: some,
        keys: some,
        token: Some(u64::MAX),
        share: 1.0 / 3.0,
        counters: None,
        owned: some,
        replicas: some,
    };
    (cbor_len(&member), cbor_len(&status))
}

impl Registry {
    /// Whether a peer named `name` at `addr` still fits: at most [`MAX_PEERS`]; the ring view
    /// and the status report with it must each fit [`VIEW_BUDGET`] (the dead that a report
    /// lists are left out of it when they would not fit), and the view sent to every member
    /// [`BROADCAST_BUDGET`].
    pub fn room_for(&self, name: &str, addr: SocketAddr, vnodes: u32) -> Result<(), Refusal> {
        let (mut ring, mut status) = footprint(name, addr, vnodes);
        for p in self.peers.values() {
            let (m, s) = footprint(&p.name, p.addr, vnodes);
            ring = ring.saturating_add(m);
            status = status.saturating_add(s);
        }
        let broadcast = ring.saturating_mul(self.peers.len() + 1);
        if self.peers.len() >= MAX_PEERS
            || ring > ENTRIES_BUDGET
            || status > ENTRIES_BUDGET
            || broadcast > BROADCAST_BUDGET
        {
            return Err(Refusal::ClusterFull {
                peers: self.peers.len(),
                vnodes,
            });
        }
        Ok(())
    }
}

impl Manager {
    pub(super) fn on_register(
        &mut self,
        now: Time,
        addr: SocketAddr,
        incarnation: u64,
        name: String,
        rejoin: Option<Rejoin>,
    ) {
        // The same process asking again (its answer was lost) gets its id back below.
        let new = self.registry.by_incarnation(incarnation).is_none();
        if new
            && let Some(rejoin) = rejoin
            && self.try_rejoin(now, addr, incarnation, &name, rejoin)
        {
            return;
        }
        if new && self.exit_again_if_torn_down(now, addr, incarnation) {
            return;
        }
        let room = match new {
            true => self.registry.room_for(&name, addr, self.cfg.vnodes.max(1)),
            false => Ok(()),
        };
        match room.and_then(|()| self.registry.register(&name, addr, incarnation)) {
            Ok(Registration::Again(id)) => {
                let tag = ManagerTag::ToPeer(id, PeerMessage::Registered);
                self.send(now, addr, Body::Registered { id }, None, tag);
            }
            Ok(Registration::New(id)) => {
                self.watch(now, id);
                // A peer back under the name of one declared dead is that peer restarted.
                self.detector.dead.retain(|d| d.name != name);
                self.events
                    .push(ManagerEvent::PeerRegistered { id, name, addr });
                let tag = ManagerTag::ToPeer(id, PeerMessage::Registered);
                self.send(now, addr, Body::Registered { id }, None, tag);
                if self.ring.is_some() {
                    self.enqueue(now, Change::Join(id));
                }
            }
            Err(reason) => {
                self.events.push(ManagerEvent::Warning(format!(
                    "refused registration from {addr}: {reason}"
                )));
                self.send(
                    now,
                    addr,
                    Body::Refused { reason },
                    None,
                    ManagerTag::Refusal,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn ids_are_unique_and_never_reused() {
        let mut r = Registry::default();
        assert_eq!(r.register("a", addr(1), 10), Ok(Registration::New(1)));
        assert_eq!(r.register("b", addr(2), 20), Ok(Registration::New(2)));
        r.remove(2);
        assert_eq!(r.register("c", addr(3), 30), Ok(Registration::New(3)));
        assert_eq!(r.ids().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn a_renumbered_peer_takes_an_id_above_the_reserved_one_and_keeps_its_process() {
        let mut r = Registry::default();
        assert_eq!(r.register("joiner", addr(1), 10), Ok(Registration::New(1)));
        // A member rejoining as 3 makes way: the joiner moves above it.
        assert_eq!(r.renumber(1, 3), Some(4));
        assert!(r.get(1).is_none());
        assert_eq!(r.by_incarnation(10), Some(4));
        assert_eq!(r.get(4).map(|p| p.name.as_str()), Some("joiner"));
        assert_eq!(
            r.register("joiner", addr(1), 10),
            Ok(Registration::Again(4))
        );
        assert_eq!(r.register("next", addr(2), 20), Ok(Registration::New(5)));
        assert_eq!(r.renumber(9, 9), None, "no such peer");
    }

    #[test]
    fn the_same_process_registering_again_keeps_its_id() {
        let mut r = Registry::default();
        r.register("a", addr(1), 10).unwrap();
        assert_eq!(r.register("a", addr(1), 10), Ok(Registration::Again(1)));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_taken_or_empty_name_is_refused_with_who_holds_it() {
        let mut r = Registry::default();
        r.register("a", addr(1), 10).unwrap();
        assert_eq!(
            r.register("a", addr(2), 11),
            Err(Refusal::NameTaken {
                name: "a".into(),
                id: 1,
                addr: addr(1)
            })
        );
        assert_eq!(r.register("  ", addr(3), 12), Err(Refusal::EmptyName));
        assert_eq!(r.len(), 1);
    }

    /// Registers peers until the manager refuses one as not fitting; returns how many it took.
    fn fill(kit: &mut super::super::testkit::Kit, vnodes: u32) -> usize {
        kit.m.cfg.vnodes = vnodes;
        for i in 0..2_000 {
            kit.add_peer(&format!("peer-{i:04}"));
            let full = kit.peers[i].inbox.iter().find_map(|b| match b {
                Body::Refused {
                    reason: Refusal::ClusterFull { peers, vnodes },
                } => Some((*peers, *vnodes)),
                _ => None,
            });
            if let Some(full) = full {
                assert_eq!(full, (i, vnodes));
                return i;
            }
            assert!(kit.peers[i].id.is_some(), "peer {i} not registered");
        }
        panic!("2,000 peers and never refused");
    }

    /// A cluster grows to [`MAX_PEERS`], then refuses registrations, naming the limit. Its
    /// ring view (67 KB at one token a peer) and its status report are larger than the kit's
    /// 4,000-byte datagrams: each member still gets the whole view, in fragments, then a
    /// leave as deltas, and the client its status, listing every peer and the 64 remembered
    /// dead (before fragments, a view had to fit one datagram: 302 peers at 16 tokens, 425
    /// at one).
    #[test]
    fn a_cluster_grows_to_its_most_peers_and_each_gets_the_whole_view_in_fragments() {
        use super::super::testkit::Kit;
        use crate::wire::{ClientRequest, Envelope, MAX_MESSAGE, Placement, ReplyBody};
        let mut kit = Kit::new(Placement::Consistent);
        let n = fill(&mut kit, 1);
        assert_eq!(n, MAX_PEERS);
        let setup = kit.request(ClientRequest::Setup);
        assert!(matches!(kit.reply(setup), Ok(ReplyBody::Setup(_))));
        let view = kit.m.ring().cloned().expect("a ring");
        assert!(cbor_len(&view) > 16 * 4_000, "{}", cbor_len(&view));
        for p in &kit.peers[..n] {
            assert_eq!(
                p.ring.as_ref(),
                Some(&view),
                "{} has not the whole ring",
                p.name
            );
        }
        // A change after that goes to each member as what changed: a leave's two views (the
        // leaver marked, then gone) to 1,023 members, not 2 × 1,023 whole views.
        let leaver = kit.peers[5].name.clone();
        let leave = kit.request(ClientRequest::Leave {
            name: leaver.clone(),
        });
        assert!(matches!(kit.reply(leave), Ok(ReplyBody::Leave { .. })));
        let after = kit.m.ring().cloned().expect("a ring");
        let (mut delta_bytes, mut whole) = (0, 0);
        for p in kit.peers[..n].iter().filter(|p| p.name != leaver) {
            assert_eq!(p.ring.as_ref(), Some(&after), "{} is behind", p.name);
            for body in &p.inbox {
                match body {
                    Body::RingDelta(d) => delta_bytes += cbor_len(d),
                    Body::Ring(v) if v.epoch > view.epoch => whole += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(whole, 0);
        let views_bytes = 2 * (n - 1) * cbor_len(&view);
        assert!(
            delta_bytes * 100 < views_bytes,
            "{delta_bytes} against {views_bytes}"
        );
        // A rejoin names the view and carries its own entry: one datagram. The holder asked
        // for the whole view sends it in fragments.
        let rejoin = Body::Register {
            name: view.members[7].name.clone(),
            rejoin: Some(Rejoin::naming(view.members[7].id, &view)),
        };
        let rejoin = Envelope::new(u64::MAX, u64::MAX, None, rejoin).encode();
        assert!(rejoin.is_ok_and(|b| b.len() < 4_000));
        let held = Body::HeldView(view);
        let sealed = Envelope::new(u64::MAX, u64::MAX, None, held).encode_within(MAX_MESSAGE);
        assert!(sealed.is_ok(), "{sealed:?}");
        for i in 0..64u32 {
            kit.m.detector.dead.push(super::super::failure::DeadPeer {
                id: 10_000 + i,
                name: format!("{}-{i:02}", "a-peer-that-died".repeat(3)),
                addr: SocketAddr::from(([10, 0, 0, 1], 40_000 + i as u16)),
                at: kit.now,
            });
        }
        let status = kit.request(ClientRequest::Status);
        let Ok(ReplyBody::Status(s)) = kit.reply(status) else {
            panic!("no status");
        };
        let dead = s.peers.iter().filter(|p| p.id >= 10_000).count();
        assert_eq!((s.peers.len() - dead, dead), (n - 1, 64));
        assert!(s.peers.iter().take(n - 1).all(|p| p.counters.is_some()));
    }

    /// Registers peers until one is refused; returns how many fit at `vnodes` tokens each.
    fn capacity(vnodes: u32) -> usize {
        let mut r = Registry::default();
        let mut n = 0u64;
        while r.room_for(&format!("peer-{n:04}"), addr(1), vnodes).is_ok() {
            r.register(&format!("peer-{n:04}"), addr(n as u16), n)
                .unwrap();
            n += 1;
        }
        assert_eq!(
            r.room_for("one-more", addr(1), vnodes),
            Err(Refusal::ClusterFull {
                peers: n as usize,
                vnodes
            })
        );
        let view: usize = r
            .iter()
            .map(|(_, p)| footprint(&p.name, p.addr, vnodes).0)
            .sum();
        assert!(view <= ENTRIES_BUDGET, "{view}");
        assert!(view * r.len() <= BROADCAST_BUDGET, "{view} x {}", r.len());
        eprintln!("{n} peers fit at {vnodes} tokens each (a view of {view} bytes)");
        n as usize
    }

    /// Up to 16 tokens a peer the cluster's own limit comes first; with more, what a ring
    /// change sends to every member (n views of n members) does.
    #[test]
    fn what_a_ring_change_sends_limits_the_peers_at_many_tokens() {
        assert_eq!(capacity(16), MAX_PEERS);
        let at_64 = capacity(64);
        assert!((500..800).contains(&at_64), "{at_64}");
        let at_256 = capacity(256);
        assert!((250..400).contains(&at_256), "{at_256}");
    }

    #[test]
    fn lookups_by_name_id_and_incarnation() {
        let mut r = Registry::default();
        r.register("alpha", addr(1), 10).unwrap();
        r.register("beta", addr(2), 20).unwrap();
        assert_eq!(r.by_name_or_id("beta"), Some(2));
        assert_eq!(r.by_name_or_id("1"), Some(1));
        assert_eq!(r.by_name_or_id("7"), None);
        assert_eq!(r.by_incarnation(20), Some(2));
        assert_eq!(r.name_of(2), "beta");
        assert_eq!(r.name_of(9), "#9");
    }
}
