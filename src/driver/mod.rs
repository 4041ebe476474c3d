//! The driver: the one loop that runs a sans-IO state machine over a datagram socket. It owns
//! the socket, the clock and the chaos settings; the machine owns the protocol. The same loop
//! runs the manager and the peer over real UDP in production, and over the simulation's
//! in-memory network in the tests.
//!
//! Everything a machine produces for one input comes back from that call ([`Machine::handle`]
//! returns the events of that datagram alone), so a span opened for a datagram records what
//! that datagram did and nothing of its neighbours in the same receive burst.
//!
//! Role-specific work — opening and closing spans, loading files, how an exit ends the process
//! — lives in a [`Shell`]: [`manager`] and [`peer`].

pub mod blocking;
pub mod manager;
pub mod peer;
pub mod socket;

use crate::auth::{AuthError, Keyring, open_if_keyed, seal_if_keyed};
use crate::config::ChaosConfig;
use crate::link::{Dropped, Time, Transmit};
pub use crate::machine::Machine;
use crate::wire::{Body, Envelope, RejectReason, WireError};
use rand::{Rng, SeedableRng};
use socket::DatagramSocket;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Span, warn};

pub use manager::run_manager;
pub use peer::{PeerExit, run_peer};
pub use socket::{SocketError, bind_udp, lookup};

/// A machine shared between its driver and whoever wants to look at it (tests, the demo).
/// The driver holds the lock only while the machine computes, never across an await.
pub type Shared<M> = Arc<Mutex<M>>;

pub fn shared<M>(machine: M) -> Shared<M> {
    Arc::new(Mutex::new(machine))
}

/// Locks a shared machine. A panic while it was held cannot leave it half-updated in a way
/// that matters more than stopping would, so a poisoned lock is taken over.
pub fn lock<M>(machine: &Shared<M>) -> MutexGuard<'_, M> {
    machine.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the loop does after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control<X> {
    Continue,
    /// End the loop with this result.
    Stop(X),
    /// Keep answering for a moment (a repeated message whose ack was lost), then end.
    Linger(Duration, X),
}

/// The role-specific side of a driver: spans, side effects, how it ends.
pub trait Shell<M: Machine> {
    type Exit;
    /// The span for an incoming datagram, opened before the machine sees it.
    fn open_span(&mut self, machine: &M, from: SocketAddr, env: &Envelope) -> Option<Span>;
    /// Records on the datagram's span what its own events say (and may keep the span open).
    fn close_span(&mut self, span: Span, events: &[M::Event]);
    fn on_event(&mut self, event: M::Event) -> Control<Self::Exit>;
    /// The next local input; pending forever when there is none. Must be cancel safe.
    fn next_local(&mut self) -> impl Future<Output = M::Local>;
    /// SIGTERM: stop at once (`Err`), or let the machine wind down (`Ok`, its events).
    fn on_shutdown(&mut self, machine: &mut M, now: Time) -> Result<Vec<M::Event>, Self::Exit>;
}

/// Tells a node to stop: the manager stops at once, a peer leaves gracefully first.
pub type Shutdown = watch::Receiver<bool>;

/// Fault injection on the send path, seeded so that a failing run replays.
struct Chaos {
    loss: f64,
    duplicate: f64,
    rng: rand::rngs::SmallRng,
}

impl Chaos {
    fn new(cfg: &ChaosConfig) -> Option<Chaos> {
        if cfg.loss <= 0.0 && cfg.duplicate <= 0.0 {
            return None;
        }
        let seed = cfg.seed.unwrap_or_else(rand::random);
        warn!(
            loss = cfg.loss,
            duplicate = cfg.duplicate,
            seed,
            "chaos: dropping and duplicating outgoing datagrams (set chaos.seed = {seed} to replay)"
        );
        Some(Chaos {
            loss: cfg.loss,
            duplicate: cfg.duplicate,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
        })
    }

    /// How many copies of the next datagram go out: 0, 1 or 2.
    fn copies(&mut self) -> usize {
        if self.rng.random_bool(self.loss) {
            0
        } else if self.rng.random_bool(self.duplicate) {
            2
        } else {
            1
        }
    }
}

/// What the driver needs besides the socket and the machine.
#[derive(Debug, Clone, Default)]
pub struct DriveOptions {
    pub chaos: ChaosConfig,
    /// With a keyring, every datagram is sealed, and only sealed ones are let in.
    pub keyring: Option<Keyring>,
}

/// Counts datagrams dropped before the machine saw them, and logs the first few of each kind
/// and then every thousandth.
#[derive(Default)]
struct DroppedLog {
    undecodable: u64,
    unauthenticated: u64,
    /// Not yet reported to the machine.
    unreported: Dropped,
}

impl DroppedLog {
    fn undecodable(&mut self, from: SocketAddr, len: usize, err: &WireError) {
        self.undecodable += 1;
        self.unreported.undecodable += 1;
        let total = self.undecodable;
        if total <= 10 || total.is_multiple_of(1000) {
            warn!(%from, len, total, "dropped a datagram: {err}");
        }
    }

    fn unauthenticated(&mut self, from: SocketAddr, len: usize, err: &AuthError) {
        self.unauthenticated += 1;
        self.unreported.unauthenticated += 1;
        let total = self.unauthenticated;
        if total <= 10 || total.is_multiple_of(1000) {
            warn!(%from, len, total, "dropped an unauthenticated datagram: {err}");
        }
    }
}

/// Answers a datagram whose header is readable but whose body is not, so that a client of
/// another version learns why instead of timing out.
fn reject_undecodable(bytes: &[u8], err: &WireError, incarnation: u64) -> Option<Vec<u8>> {
    let header = Envelope::decode_header(bytes)?;
    if header.seq == 0 {
        return None;
    }
    let reason = match err {
        WireError::Version { got } => RejectReason::Version { got: *got },
        _ => RejectReason::Malformed {
            detail: err.to_string(),
        },
    };
    Envelope::new(
        incarnation,
        0,
        None,
        Body::Reject {
            seq: header.seq,
            reason,
        },
    )
    .encode()
    .ok()
}

/// Datagrams decoded per wake-up at most, so a flood of batches costs one wake-up, not many,
/// and timers still run between floods.
const RECV_BURST: usize = 64;

/// The driver's own parts that never touch the socket or the clock: the receive buffer, the
/// counters, chaos and the key. Both loops (this module's [`drive`] and
/// [`blocking::drive_blocking`]) send and receive through it, so that they differ only in how
/// they wait.
struct Gate {
    buf: Vec<u8>,
    dropped: DroppedLog,
    chaos: Option<Chaos>,
    keyring: Option<Keyring>,
    incarnation: u64,
}

/// What became of a received datagram.
enum Admitted {
    Envelope(Envelope),
    /// Undecodable but from a key holder: this rejection goes back.
    Reject(Transmit),
    /// Counted and dropped.
    Dropped,
}

impl Gate {
    fn new(options: &DriveOptions, incarnation: u64) -> Gate {
        Gate {
            // Filled, not zeroed: a zeroed allocation's pages stay unmapped until the first
            // large datagram, which then pays the page faults, and its 64 KiB show up as if
            // the datagram's rows took them. Touched now, they are part of the idle footprint.
            buf: vec![0xa5; 65_536],
            dropped: DroppedLog::default(),
            chaos: Chaos::new(&options.chaos),
            keyring: options.keyring.clone(),
            incarnation,
        }
    }

    /// The bytes that go out for `t` (sealed when keyed) and how many times: 0, 1 or 2 under
    /// chaos, else 1.
    fn outgoing<'t>(&mut self, t: &'t Transmit) -> (std::borrow::Cow<'t, [u8]>, usize) {
        let copies = self.chaos.as_mut().map_or(1, Chaos::copies);
        if copies == 0 {
            return (std::borrow::Cow::Borrowed(&[]), 0);
        }
        (seal_if_keyed(self.keyring.as_ref(), &t.bytes), copies)
    }

    /// Checks and decodes the datagram in `buf[..len]`, or counts it. An undecodable datagram
    /// from a sender that holds the key is answered with a rejection; one without a valid tag
    /// gets no answer at all (an answer would tell a stranger something).
    fn admit(&mut self, len: usize, from: SocketAddr) -> Admitted {
        let payload = match open_if_keyed(self.keyring.as_ref(), &self.buf[..len]) {
            Ok(payload) => payload,
            Err(e) => {
                self.dropped.unauthenticated(from, len, &e);
                return Admitted::Dropped;
            }
        };
        match Envelope::decode(payload) {
            Ok(env) => Admitted::Envelope(env),
            Err(e) => {
                let reply = reject_undecodable(payload, &e, self.incarnation);
                self.dropped.undecodable(from, len, &e);
                match reply {
                    Some(bytes) => Admitted::Reject(Transmit { dest: from, bytes }),
                    None => Admitted::Dropped,
                }
            }
        }
    }

    /// Tells the machine what was dropped since it was last told.
    fn report_dropped<M: Machine>(&mut self, machine: &Shared<M>) {
        let dropped = std::mem::take(&mut self.dropped.unreported);
        if !dropped.is_empty() {
            lock(machine).note_dropped(dropped);
        }
    }
}

/// The async loop's socket and clock around its [`Gate`].
struct Io<'s, S> {
    socket: &'s S,
    start: Instant,
    gate: Gate,
}

impl<S: DatagramSocket> Io<'_, S> {
    fn now(&self) -> Time {
        self.start.elapsed()
    }

    fn deadline(&self, at: Time) -> Instant {
        self.start + at
    }

    async fn send(&mut self, t: &Transmit) {
        let (bytes, copies) = self.gate.outgoing(t);
        for _ in 0..copies {
            if let Err(e) = self.socket.send_to(&bytes, t.dest).await {
                // Loss is handled by retransmission; a send error is just another loss.
                warn!(dest = %t.dest, "send failed: {e}");
            }
        }
    }

    async fn decode(&mut self, len: usize, from: SocketAddr) -> Option<Envelope> {
        match self.gate.admit(len, from) {
            Admitted::Envelope(env) => Some(env),
            Admitted::Reject(t) => {
                self.send(&t).await;
                None
            }
            Admitted::Dropped => None,
        }
    }
}

/// One timer, moved to each new deadline instead of made anew: a fresh `Sleep` per loop
/// iteration registers with the runtime's timer wheel and deregisters again on every datagram.
pub(crate) struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Where `sleep` is set; None: parked far away.
    at: Option<Instant>,
}

/// Far enough to mean "never" without overflowing the runtime's clock.
const NEVER: Duration = Duration::from_secs(86_400 * 365);

impl Timer {
    pub(crate) fn new() -> Self {
        Timer {
            sleep: Box::pin(tokio::time::sleep(NEVER)),
            at: None,
        }
    }

    /// Completes at `at`; pending forever when `at` is None. Cancel safe: dropping the
    /// future leaves the timer set.
    pub(crate) async fn until(&mut self, at: Option<Instant>) {
        let Some(at) = at else {
            if self.at.take().is_some() {
                // Parked far away, so that a paused clock (the simulation) does not jump to a
                // deadline nobody waits for any more.
                self.sleep.as_mut().reset(Instant::now() + NEVER);
            }
            return std::future::pending().await;
        };
        if self.at != Some(at) {
            self.sleep.as_mut().reset(at);
            self.at = Some(at);
        }
        self.sleep.as_mut().await
    }
}

/// Runs `machine` over `socket` until the shell ends it (an exit, or a shutdown that stops at
/// once). Sends everything the machine queues, wakes it at its timeouts, and hands it every
/// datagram that decodes.
pub async fn drive<S, M, H>(
    socket: &S,
    machine: &Shared<M>,
    shell: &mut H,
    mut shutdown: Shutdown,
    options: &DriveOptions,
) -> H::Exit
where
    S: DatagramSocket,
    M: Machine,
    H: Shell<M>,
{
    let incarnation = lock(machine).incarnation();
    let start = Instant::now();
    lock(machine).set_clock_origin(crate::config::unix_micros_now());
    let mut io = Io {
        socket,
        start,
        gate: Gate::new(options, incarnation),
    };
    let mut shutdown_seen = false;
    // The shutdown watch and the timer live across iterations: made anew for every datagram,
    // each registered itself with the runtime and deregistered again, a few µs per query.
    let shutdown_changed = shutdown.changed();
    tokio::pin!(shutdown_changed);
    let mut timer = Timer::new();
    let mut lingering: Option<(Instant, H::Exit)> = None;
    let mut outgoing: Vec<Transmit> = Vec::new();
    loop {
        outgoing.extend(std::iter::from_fn(|| lock(machine).poll_transmit()));
        for t in outgoing.drain(..) {
            io.send(&t).await;
        }
        let wake = match lingering.take() {
            Some((at, exit)) if Instant::now() >= at => return exit,
            Some((at, exit)) => {
                lingering = Some((at, exit));
                Some(at)
            }
            None => lock(machine).poll_timeout().map(|t| io.deadline(t)),
        };
        let control = tokio::select! {
            // Fixed order, so that a simulation replays exactly.
            biased;
            r = &mut shutdown_changed, if !shutdown_seen => {
                shutdown_seen = true;
                if r.is_err() {
                    Control::Continue // the sender is gone: nobody can ask us to stop
                } else {
                    let now = io.now();
                    let asked = shell.on_shutdown(&mut lock(machine), now);
                    match asked {
                        Err(exit) => return exit,
                        Ok(events) => react(shell, machine, events),
                    }
                }
            }
            r = socket.recv_from(&mut io.gate.buf) => match r {
                Ok(first) => receive_burst(&mut io, machine, shell, first).await,
                Err(e) => {
                    // ICMP errors surface here on some systems; the next datagram is unaffected.
                    tracing::debug!("receive failed: {e}");
                    Control::Continue
                }
            },
            _ = timer.until(wake) => {
                if lingering.is_some() {
                    Control::Continue
                } else {
                    let events = lock(machine).handle_timeout(io.now());
                    react(shell, machine, events)
                }
            }
            input = shell.next_local() => {
                let events = lock(machine).handle_local(io.now(), input);
                react(shell, machine, events)
            }
        };
        match control {
            Control::Continue => {}
            Control::Stop(exit) => {
                // What the last input queued (the ack of an Exit) still goes out.
                outgoing.extend(std::iter::from_fn(|| lock(machine).poll_transmit()));
                for t in outgoing.drain(..) {
                    io.send(&t).await;
                }
                return exit;
            }
            Control::Linger(d, exit) => {
                if lingering.is_none() {
                    lingering = Some((Instant::now() + d, exit));
                }
            }
        }
    }
}

/// Hands each event to the shell; the first that ends the loop wins, the rest are still seen.
/// The emptied list goes back to the machine, which gathers its next events in it (a list per
/// datagram otherwise).
fn react<M: Machine, H: Shell<M>>(
    shell: &mut H,
    machine: &Shared<M>,
    mut events: Vec<M::Event>,
) -> Control<H::Exit> {
    let mut control = Control::Continue;
    for ev in events.drain(..) {
        let c = shell.on_event(ev);
        if matches!(control, Control::Continue) {
            control = c;
        }
    }
    lock(machine).recycle_events(events);
    control
}

/// Handles the datagram just received and whatever else is already queued, up to a burst.
async fn receive_burst<S, M, H>(
    io: &mut Io<'_, S>,
    machine: &Shared<M>,
    shell: &mut H,
    first: (usize, SocketAddr),
) -> Control<H::Exit>
where
    S: DatagramSocket,
    M: Machine,
    H: Shell<M>,
{
    let mut control = Control::Continue;
    let mut next = Some(first);
    let mut taken = 0;
    let mut outgoing: Vec<Transmit> = Vec::new();
    while let Some((len, from)) = next.take() {
        taken += 1;
        if let Some(env) = io.decode(len, from).await {
            let c = deliver(io.now(), machine, shell, from, env);
            if matches!(control, Control::Continue) {
                control = c;
            }
            // What this datagram produced leaves before the next is looked for: an answer
            // does not wait for a receive that finds nothing.
            outgoing.extend(std::iter::from_fn(|| lock(machine).poll_transmit()));
            for t in outgoing.drain(..) {
                io.send(&t).await;
            }
        }
        if taken < RECV_BURST {
            next = io.socket.try_recv_from(&mut io.gate.buf).ok();
        }
    }
    io.gate.report_dropped(machine);
    control
}

/// One datagram through the machine, inside the span the shell opens for it.
fn deliver<M: Machine, H: Shell<M>>(
    now: Time,
    machine: &Shared<M>,
    shell: &mut H,
    from: SocketAddr,
    env: Envelope,
) -> Control<H::Exit> {
    let mut m = lock(machine);
    let Some(env) = m.reassemble(now, from, env) else {
        return Control::Continue;
    };
    // A span nothing wants (no exporter, no log line) is dropped at once: recording its
    // attributes would format addresses for nobody.
    let span = shell
        .open_span(&m, from, &env)
        .filter(|span| !span.is_disabled());
    let trace = span
        .as_ref()
        .and_then(crate::telemetry::context_of)
        .or_else(|| env.trace.clone());
    let events = {
        let _entered = span.as_ref().map(Span::enter);
        m.handle(now, from, env, trace)
    };
    drop(m);
    if let Some(span) = span {
        shell.close_span(span, &events);
    }
    react(shell, machine, events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    /// Polls `timer.until(at)` once: true when it completed.
    async fn fired(timer: &mut Timer, at: Option<Instant>) -> bool {
        let fut = timer.until(at);
        tokio::pin!(fut);
        poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_its_latest_deadline_and_never_without_one() {
        let mut timer = Timer::new();
        let t0 = Instant::now();
        let (soon, later) = (
            t0 + Duration::from_millis(10),
            t0 + Duration::from_millis(50),
        );
        assert!(!fired(&mut timer, Some(soon)).await);
        // Moved to a later deadline: the earlier one no longer counts.
        assert!(!fired(&mut timer, Some(later)).await);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(!fired(&mut timer, Some(later)).await);
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(fired(&mut timer, Some(later)).await);
        // Moved back to an earlier deadline, already past: fires at once.
        assert!(fired(&mut timer, Some(soon)).await);
        // No deadline: pending, even a year on (the clock is paused, so this takes no time).
        assert!(!fired(&mut timer, None).await);
        tokio::time::advance(Duration::from_secs(86_400 * 400)).await;
        assert!(!fired(&mut timer, None).await);
        // And it can be set again after that.
        let again = Instant::now() + Duration::from_millis(5);
        assert!(!fired(&mut timer, Some(again)).await);
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(fired(&mut timer, Some(again)).await);
    }
}
