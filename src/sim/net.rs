//! The simulation's network: datagrams between in-memory sockets, in the runtime's (paused,
//! virtual) time, with seeded loss, duplication, delay (so datagrams overtake each other),
//! partitions and crashed hosts. It implements [`DatagramSocket`], so the production driver
//! runs over it unchanged.

use crate::driver::socket::DatagramSocket;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How unkind the simulated network is.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub loss: f64,
    pub duplicate: f64,
    /// Each datagram is delayed by a random time up to this, so datagrams overtake each other.
    pub max_delay: Duration,
}

impl Faults {
    pub fn none() -> Self {
        Faults {
            loss: 0.0,
            duplicate: 0.0,
            max_delay: Duration::from_micros(50),
        }
    }
}

pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
struct Inbox {
    queue: VecDeque<(Vec<u8>, SocketAddr)>,
    notify: Rc<Notify>,
}

type DropRule = Box<dyn FnMut(&Datagram) -> bool>;
/// How much longer a datagram takes, if it is one that a rule slows down.
type DelayRule = Box<dyn FnMut(&Datagram) -> Option<Duration>>;

struct State {
    faults: Faults,
    rng: rand::rngs::SmallRng,
    inboxes: HashMap<SocketAddr, Inbox>,
    /// In flight, by (delivery time, send order): the order is total, so runs replay.
    in_flight: BTreeMap<(Instant, u64), Datagram>,
    order: u64,
    /// Pairs that cannot reach each other (both directions are listed).
    cut: BTreeSet<(SocketAddr, SocketAddr)>,
    /// Drops every datagram for which a rule holds, until the rule is removed.
    rules: Vec<(u64, DropRule)>,
    /// Delays every datagram a rule slows down by what it says, on top of the faults'.
    delays: Vec<DelayRule>,
    next_rule: u64,
    /// Hosts whose incoming datagrams wait (as in a frozen process's socket buffer) until
    /// released, and what waits for them.
    held: BTreeSet<SocketAddr>,
    parked: Vec<Datagram>,
    /// Wakes the delivery task when an earlier datagram is queued.
    wake: Rc<Notify>,
    /// `STORM_SIM_TRACE` set: every datagram sent is printed with its fate, timed from the
    /// first one.
    trace: Option<Option<Instant>>,
}

/// One line on stderr per datagram sent: virtual time, sender, receiver, sequence number, kind
/// (an ack with the number it acknowledges), and whether the network lost it. What a failing
/// seed's messages went through, to tell a bug from a run of bad luck.
fn trace_datagram(since: Duration, from: SocketAddr, to: SocketAddr, bytes: &[u8], lost: bool) {
    let what = match crate::wire::Envelope::decode(bytes) {
        Ok(env) => match &env.body {
            crate::wire::Body::Ack { seq, .. } => format!("seq {} ack of {seq}", env.seq),
            crate::wire::Body::Acks { seqs } => format!("seq {} acks of {seqs:?}", env.seq),
            body => format!("seq {} {}", env.seq, body.kind()),
        },
        Err(e) => format!("undecodable ({e})"),
    };
    let lost = if lost { " LOST" } else { "" };
    let ms = since.as_secs_f64() * 1e3;
    eprintln!("simnet {ms:10.3} ms {from} -> {to} {what}{lost}");
}

/// The shared network; cheap to clone.
#[derive(Clone)]
pub struct SimNet(Rc<RefCell<State>>);

impl SimNet {
    pub fn new(seed: u64, faults: Faults) -> SimNet {
        SimNet(Rc::new(RefCell::new(State {
            faults,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            inboxes: HashMap::new(),
            in_flight: BTreeMap::new(),
            order: 0,
            cut: BTreeSet::new(),
            rules: Vec::new(),
            delays: Vec::new(),
            next_rule: 0,
            held: BTreeSet::new(),
            parked: Vec::new(),
            wake: Rc::new(Notify::new()),
            trace: std::env::var_os("STORM_SIM_TRACE").map(|_| None),
        })))
    }

    pub fn set_faults(&self, faults: Faults) {
        self.0.borrow_mut().faults = faults;
    }

    /// A socket at `addr`; a host restarting on the same address gets a fresh, empty one.
    pub fn bind(&self, addr: SocketAddr) -> SimSocket {
        self.0.borrow_mut().inboxes.insert(addr, Inbox::default());
        SimSocket {
            addr,
            net: self.clone(),
        }
    }

    /// The host at `addr` is gone: what it sent and has not arrived is lost with it, and
    /// nothing reaches it any more.
    pub fn crash(&self, addr: SocketAddr) {
        let mut s = self.0.borrow_mut();
        s.inboxes.remove(&addr);
        s.in_flight.retain(|_, d| d.from != addr && d.to != addr);
    }

    /// Cuts `a` off from `b` (both ways) until [`SimNet::repair`].
    pub fn partition(&self, a: SocketAddr, b: SocketAddr) {
        let mut s = self.0.borrow_mut();
        s.cut.insert((a, b));
        s.cut.insert((b, a));
    }

    /// Datagrams for `addr` wait from now on, until [`SimNet::release`].
    pub fn hold(&self, addr: SocketAddr) {
        self.0.borrow_mut().held.insert(addr);
    }

    /// Delivers everything held for `addr` at once, in the order it arrived.
    pub fn release(&self, addr: SocketAddr) {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        s.held.remove(&addr);
        let (now_due, still): (Vec<Datagram>, Vec<Datagram>) = std::mem::take(&mut s.parked)
            .into_iter()
            .partition(|d| d.to == addr);
        s.parked = still;
        if let Some(inbox) = s.inboxes.get_mut(&addr) {
            for d in now_due {
                inbox.queue.push_back((d.bytes, d.from));
            }
            inbox.notify.notify_one();
        }
    }

    pub fn repair(&self) {
        self.0.borrow_mut().cut.clear();
    }

    /// Drops, from now on, every datagram for which `rule` holds; returns its handle.
    pub fn drop_where(&self, rule: impl FnMut(&Datagram) -> bool + 'static) -> u64 {
        let mut s = self.0.borrow_mut();
        let id = s.next_rule;
        s.next_rule += 1;
        s.rules.push((id, Box::new(rule)));
        id
    }

    /// Delays, from now on, every datagram `rule` returns a time for by that much more: a
    /// race that random reordering makes rare, made certain.
    pub fn delay_where(&self, rule: impl FnMut(&Datagram) -> Option<Duration> + 'static) {
        self.0.borrow_mut().delays.push(Box::new(rule));
    }

    pub fn remove_rule(&self, id: u64) {
        self.0.borrow_mut().rules.retain(|(r, _)| *r != id);
    }

    /// Loses the datagrams in flight for which `lose` holds.
    pub fn lose_in_flight(&self, mut lose: impl FnMut(&Datagram) -> bool) {
        self.0.borrow_mut().in_flight.retain(|_, d| !lose(d));
    }

    pub fn in_flight(&self) -> usize {
        self.0.borrow().in_flight.len()
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        let d = Datagram {
            from,
            to,
            bytes: bytes.to_vec(),
        };
        if s.cut.contains(&(from, to)) || s.rules.iter_mut().any(|(_, rule)| rule(&d)) {
            return;
        }
        let lost = s.faults.loss > 0.0 && s.rng.random_bool(s.faults.loss);
        if let Some(first) = &mut s.trace {
            let first = *first.get_or_insert_with(Instant::now);
            trace_datagram(first.elapsed(), from, to, bytes, lost);
        }
        if lost {
            return;
        }
        let copies = if s.faults.duplicate > 0.0 && s.rng.random_bool(s.faults.duplicate) {
            2
        } else {
            1
        };
        let slower = s.delays.iter_mut().find_map(|rule| rule(&d));
        let now = Instant::now() + slower.unwrap_or_default();
        let earliest = s.in_flight.keys().next().map(|k| k.0);
        for _ in 0..copies {
            let max = s.faults.max_delay.as_micros().max(1) as u64;
            let at = now + Duration::from_micros(1 + s.rng.random_range(0..max));
            s.order += 1;
            let copy = Datagram {
                from,
                to,
                bytes: d.bytes.clone(),
            };
            s.in_flight.insert((at, s.order), copy);
            if earliest.is_none_or(|e| at < e) {
                s.wake.notify_one();
            }
        }
    }

    /// Moves every datagram that is due into its receiver's inbox; returns the next due time.
    fn deliver_due(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut s = self.0.borrow_mut();
        while let Some(entry) = s.in_flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let d = entry.remove();
            if s.held.contains(&d.to) {
                s.parked.push(d);
            } else if let Some(inbox) = s.inboxes.get_mut(&d.to) {
                inbox.queue.push_back((d.bytes, d.from));
                inbox.notify.notify_one();
            }
        }
        s.in_flight.keys().next().map(|k| k.0)
    }

    /// The delivery task: runs for as long as the simulation's runtime does.
    pub async fn run(self) {
        let wake = self.0.borrow().wake.clone();
        loop {
            match self.deliver_due() {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = wake.notified() => {}
                    }
                }
                None => wake.notified().await,
            }
        }
    }
}

pub struct SimSocket {
    addr: SocketAddr,
    net: SimNet,
}

impl SimSocket {
    fn pop(&self) -> Option<(Vec<u8>, SocketAddr)> {
        self.net
            .0
            .borrow_mut()
            .inboxes
            .get_mut(&self.addr)
            .and_then(|i| i.queue.pop_front())
    }

    fn notify(&self) -> Option<Rc<Notify>> {
        self.net
            .0
            .borrow()
            .inboxes
            .get(&self.addr)
            .map(|i| i.notify.clone())
    }
}

fn copy_out(buf: &mut [u8], (bytes, from): (Vec<u8>, SocketAddr)) -> (usize, SocketAddr) {
    // A datagram longer than the buffer is cut, as a real socket does.
    let n = bytes.len().min(buf.len());
    buf[..n].copy_from_slice(&bytes[..n]);
    (n, from)
}

impl DatagramSocket for SimSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send_to(&self, bytes: &[u8], dest: SocketAddr) -> io::Result<usize> {
        self.net.send(self.addr, dest, bytes);
        Ok(bytes.len())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            if let Some(d) = self.pop() {
                return Ok(copy_out(buf, d));
            }
            match self.notify() {
                Some(n) => n.notified().await,
                // Crashed: this host hears nothing, ever.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.pop()
            .map(|d| copy_out(buf, d))
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))
    }
}
