//! A manager under test with scripted peers and a client, and no network: the tests hand it
//! datagrams and read what it sends. Peers behave (acknowledge, report, answer) unless a test
//! tells one to stay silent or to refuse.

use super::{Manager, ManagerConfig, ManagerEvent, ManagerInput};
use crate::link::{Link, RetryPolicy, Time};
use crate::machine::Machine;
use crate::record::{CsvFormat, Dataset, RecordKey, Row};
use crate::wire::{
    Body, ClientRequest, Envelope, FindResult, PackedRow, PeerId, PeerReport, Placement,
    RejectReason, ReplyBody, RequestError, RingView, UNSEQUENCED,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

pub struct FakePeer {
    pub name: String,
    pub addr: SocketAddr,
    pub incarnation: u64,
    pub id: Option<PeerId>,
    /// Every message the manager sent it, in order.
    pub inbox: Vec<Body>,
    /// Keys it holds (a find for one of them is answered found).
    pub keys: BTreeSet<RecordKey>,
    /// The last ring it heard.
    pub ring: Option<RingView>,
    /// Ring deltas it could not apply (none held the view they name).
    pub deltas_refused: u32,
    pub exited: bool,
    /// Puts together what the manager sends in fragments (and acknowledges each).
    link: Link<()>,
}

impl FakePeer {
    /// The views the manager sent it, in order, whole or as deltas (then applied to the
    /// view before), each with whether it came as a delta.
    pub fn views(&self) -> Vec<(RingView, bool)> {
        let mut views: Vec<(RingView, bool)> = Vec::new();
        for body in &self.inbox {
            match body {
                Body::Ring(v) => views.push((v.clone(), false)),
                Body::RingDelta(d) => {
                    let base = views.last().map(|(v, _)| v).expect("a delta after a view");
                    let v = d
                        .apply(base)
                        .expect("a delta applies to the view before it");
                    views.push((v, true));
                }
                _ => {}
            }
        }
        views
    }
}

pub struct Kit {
    pub m: Manager,
    pub now: Time,
    pub peers: Vec<FakePeer>,
    client: SocketAddr,
    next_seq: u64,
    /// Replies to the client, by the request's sequence number.
    pub replies: BTreeMap<u64, Result<ReplyBody, RequestError>>,
    /// Progress the client was told: (request, done, total).
    pub progress: Vec<(u64, u64, u64)>,
    pub events: Vec<ManagerEvent>,
    /// Peers that receive but never answer (as if dead).
    pub silent: BTreeSet<String>,
    /// Peers that refuse store batches.
    pub refusing: BTreeSet<String>,
    /// Peers that acknowledge a query and never answer it (its walk lost past them).
    pub mute: BTreeSet<String>,
    /// Peers that answer a query with a result about another key (a bug, or a forgery).
    pub wrong_key: BTreeSet<String>,
    /// The client's side of replies sent in fragments.
    client_link: Link<()>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn dataset(events: u64) -> Dataset {
    let rows = (0..events)
        .map(|i| Row {
            line: i + 2,
            key: RecordKey::Event(1_000 + i),
            values: PackedRow::pack(&[(1_000 + i).to_string(), format!("S{i}")]),
        })
        .collect();
    Dataset {
        format: CsvFormat::Generic,
        columns: vec!["event_id".into(), "state".into()],
        rows,
        rejected: Vec::new(),
        fallback_keys: 0,
    }
}

impl Kit {
    pub fn new(placement: Placement) -> Kit {
        let cfg = ManagerConfig {
            vnodes: 1,
            balance_by_data: true,
            routing: crate::wire::Routing::default(),
            retry: RetryPolicy {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(40),
                attempts: Some(4),
            },
            max_datagram: 4_000,
            window: 2,
            placement,
            query_timeout: Duration::from_secs(2),
            probe_timeout: Duration::from_millis(300),
            default_data: Some("data.csv".into()),
            replication: 1,
            clock_origin_us: 0,
            // Scripted peers do not heartbeat: nobody is suspected within a test's time.
            detection: crate::manager::Detection {
                suspect_after: Duration::from_secs(3_600),
                dead_after: Duration::from_secs(7_200),
                ..Default::default()
            },
            // Scripted peers report no ranges: nothing to audit.
            repair_interval: None,
        };
        Kit {
            m: Manager::new(cfg, 1),
            // Past the start-up wait in which a manager listens for peers of an earlier ring.
            now: Duration::from_secs(1),
            peers: Vec::new(),
            client: addr(4000),
            next_seq: 1,
            replies: BTreeMap::new(),
            progress: Vec::new(),
            events: Vec::new(),
            silent: BTreeSet::new(),
            mute: BTreeSet::new(),
            refusing: BTreeSet::new(),
            wrong_key: BTreeSet::new(),
            client_link: Link::new(7, RetryPolicy::default()),
        }
    }

    /// A kit whose `n` peers registered and formed a ring.
    pub fn with_ring(n: usize) -> Kit {
        let mut kit = Kit::new(Placement::Consistent);
        for i in 0..n {
            kit.add_peer(&format!("p{i}"));
        }
        let setup = kit.request(ClientRequest::Setup);
        assert!(matches!(kit.reply(setup), Ok(ReplyBody::Setup(_))));
        kit
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// A peer process starts and registers; runs until the manager answered.
    pub fn add_peer(&mut self, name: &str) -> usize {
        let i = self.peers.len();
        self.peers.push(FakePeer {
            name: name.into(),
            addr: addr(6000 + i as u16),
            incarnation: 100 + i as u64,
            id: None,
            inbox: Vec::new(),
            keys: BTreeSet::new(),
            ring: None,
            deltas_refused: 0,
            exited: false,
            link: Link::new(100 + i as u64, RetryPolicy::default()),
        });
        let seq = self.seq();
        self.send_from_peer(
            i,
            seq,
            Body::Register {
                name: name.into(),
                rejoin: None,
            },
        );
        self.run();
        i
    }

    pub fn peer(&self, name: &str) -> &FakePeer {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no peer {name}"))
    }

    pub fn send_from_peer(&mut self, i: usize, seq: u64, body: Body) {
        let p = &self.peers[i];
        let env = Envelope::new(p.incarnation, seq, None, body);
        let events = self.m.handle(self.now, p.addr, env, None);
        self.events.extend(events);
    }

    /// Sends a client request; returns its sequence number. Runs until nothing moves.
    pub fn request(&mut self, req: ClientRequest) -> u64 {
        let seq = self.seq();
        let env = Envelope::new(7, seq, None, Body::Request(req));
        let events = self.m.handle(self.now, self.client, env, None);
        self.events.extend(events);
        self.run();
        seq
    }

    pub fn reply(&mut self, seq: u64) -> Result<ReplyBody, RequestError> {
        self.replies
            .remove(&seq)
            .unwrap_or_else(|| panic!("no reply to request {seq}; events {:?}", self.events))
    }

    /// Hands the manager a loaded file for the distribute job it asked for.
    pub fn load(&mut self, data: Result<Dataset, crate::record::LoadError>) {
        let job = self
            .events
            .iter()
            .rev()
            .find_map(|e| match e {
                ManagerEvent::LoadFile { job, .. } => Some(*job),
                _ => None,
            })
            .expect("the manager asked for a file");
        // The whole file as one chunk, then its end (or the failure to read it).
        let result = match data {
            Ok(chunk) => {
                let events = self
                    .m
                    .handle_local(self.now, ManagerInput::Rows { job, chunk });
                self.events.extend(events);
                self.run();
                Ok(())
            }
            Err(e) => Err(e),
        };
        let events = self
            .m
            .handle_local(self.now, ManagerInput::LoadDone { job, result });
        self.events.extend(events);
        self.run();
    }

    /// Lets time pass by `d`, then runs.
    pub fn wait(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.m.poll_timeout().filter(|t| *t <= end) {
            self.now = self.now.max(t);
            let events = self.m.handle_timeout(self.now);
            self.events.extend(events);
            self.run();
        }
        self.now = end;
    }

    /// Delivers everything the manager sends, and the peers' and client's answers, until
    /// nothing moves.
    pub fn run(&mut self) {
        while let Some(t) = self.m.poll_transmit() {
            let Ok(env) = Envelope::decode(&t.bytes) else {
                panic!("the manager sent an undecodable datagram");
            };
            if t.dest == self.client {
                let (now, from) = (self.now, self.client);
                if let Some(env) = self.client_link.reassemble(now, from, env) {
                    self.deliver_to_client(env);
                }
                self.acks_from(from, None);
            } else if let Some(i) = self.peers.iter().position(|p| p.addr == t.dest) {
                let p = &self.peers[i];
                if self.silent.contains(&p.name) || p.exited {
                    self.peers[i].inbox.push(env.body);
                    continue;
                }
                let (now, from) = (self.now, p.addr);
                if let Some(env) = self.peers[i].link.reassemble(now, from, env) {
                    self.deliver_to_peer(i, env);
                }
                self.acks_from(from, Some(i));
            }
        }
    }

    /// Hands the manager what a fake node's reassembly said (acks of fragments).
    fn acks_from(&mut self, from: SocketAddr, peer: Option<usize>) {
        loop {
            let link = match peer {
                Some(i) => &mut self.peers[i].link,
                None => &mut self.client_link,
            };
            let Some(t) = link.poll_transmit() else {
                return;
            };
            if let Ok(env) = Envelope::decode(&t.bytes) {
                let events = self.m.handle(self.now, from, env, None);
                self.events.extend(events);
            }
        }
    }

    fn deliver_to_client(&mut self, env: Envelope) {
        match env.body {
            Body::Reply(r) => {
                self.replies.insert(r.to, r.result);
                self.ack(self.client, 7, env.seq, None);
            }
            Body::Progress { to, done, total } => self.progress.push((to, done, total)),
            _ => {}
        }
    }

    fn ack(&mut self, from: SocketAddr, incarnation: u64, seq: u64, new_rows: Option<u32>) {
        let env = Envelope::new(incarnation, UNSEQUENCED, None, Body::Ack { seq, new_rows });
        let events = self.m.handle(self.now, from, env, None);
        self.events.extend(events);
    }

    /// A fake peer takes `view` and, when it is unsettled, reports its hand-off done.
    fn adopt(&mut self, i: usize, view: RingView) -> Option<Body> {
        let unsettled = (!view.settled).then_some(view.epoch);
        self.peers[i].ring = Some(view);
        unsettled.map(|epoch| Body::RebalanceDone {
            epoch,
            handed_over: 0,
        })
    }

    fn deliver_to_peer(&mut self, i: usize, env: Envelope) {
        let (silent, refusing) = {
            let p = &self.peers[i];
            (
                self.silent.contains(&p.name) || p.exited,
                self.refusing.contains(&p.name),
            )
        };
        self.peers[i].inbox.push(env.body.clone());
        if silent || !env.body.is_sequenced() {
            return;
        }
        let (from, inc) = (self.peers[i].addr, self.peers[i].incarnation);
        if refusing && matches!(env.body, Body::Store(_)) {
            let reason = RejectReason::NotForPeer {
                kind: "store".into(),
            };
            let rej = Envelope::new(
                inc,
                UNSEQUENCED,
                None,
                Body::Reject {
                    seq: env.seq,
                    reason,
                },
            );
            let events = self.m.handle(self.now, from, rej, None);
            self.events.extend(events);
            return;
        }
        let new_rows = match &env.body {
            Body::Store(b) => {
                self.peers[i].keys.extend(b.rows.iter().map(|r| r.0));
                Some(b.rows.len() as u32)
            }
            _ => None,
        };
        self.ack(from, inc, env.seq, new_rows);
        let answer = match env.body {
            Body::Registered { id } => {
                self.peers[i].id = Some(id);
                None
            }
            Body::Ring(view) => self.adopt(i, view),
            // One it cannot apply is left, as a real peer leaves it (and waits for the whole
            // view), and counted.
            Body::RingDelta(delta) => {
                match self.peers[i].ring.as_ref().map(|base| delta.apply(base)) {
                    Some(Ok(view)) => self.adopt(i, view),
                    _ => {
                        self.peers[i].deltas_refused += 1;
                        None
                    }
                }
            }
            Body::Probe { probe } => Some(Body::Report {
                probe,
                report: PeerReport {
                    records: self.peers[i].keys.len() as u64,
                    keys: self.peers[i].keys.len() as u64,
                    epoch: self.peers[i].ring.as_ref().map_or(0, |r| r.epoch),
                    handing_over: 0,
                    ..Default::default()
                },
            }),
            Body::Find(_) if self.mute.contains(&self.peers[i].name) => None,
            Body::Find(mut find) => {
                let p = &self.peers[i];
                find.path.extend(p.id);
                let key = if self.wrong_key.contains(&p.name) {
                    RecordKey::Event(find.key.as_u64().wrapping_add(1))
                } else {
                    find.key
                };
                Some(Body::Found(FindResult {
                    query: find.query,
                    key,
                    found: p.keys.contains(&find.key),
                    records: Vec::new(),
                    path: find.path,
                    truncated: false,
                    hops: find.hops,
                    unreached: false,
                }))
            }
            Body::Exit { .. } => {
                self.peers[i].exited = true;
                None
            }
            _ => None,
        };
        if let Some(body) = answer {
            let seq = self.seq();
            self.send_from_peer(i, seq, body);
        }
    }
}
