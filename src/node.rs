//! The tokio drivers: they own the UDP socket, the clock and the CSV files, feed the sans-IO
//! state machines, and open and close the OpenTelemetry spans around what the machines report.

use crate::config::{ChaosConfig, Config, resolve};
use crate::link::Time;
use crate::manager::{Manager, ManagerEvent};
use crate::peer::{Peer, PeerConfig, PeerEvent};
use crate::record;
use crate::telemetry::{TARGET, context_of, set_remote_parent};
use crate::wire::{Body, ClientRequest, Envelope, WireError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{Span, field, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("could not bind UDP {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("could not resolve the manager address '{addr}': {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
}

/// Tells a node to stop: the manager stops at once, a peer leaves gracefully first.
pub type Shutdown = watch::Receiver<bool>;

/// Binds a UDP socket with large kernel buffers: a burst of 60 KB batches overflows the
/// default 208 KiB receive buffer even on loopback.
pub fn bind_udp(listen: &str, buffer: usize) -> Result<UdpSocket, NodeError> {
    let err = |source| NodeError::Bind {
        addr: listen.to_string(),
        source,
    };
    let addr = resolve(listen).map_err(err)?;
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    // The kernel caps these at its maximum; a smaller buffer is not an error.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

/// Counts datagrams that did not decode, and logs the first few and then every thousandth.
#[derive(Default)]
struct BadDatagrams {
    total: u64,
    /// Not yet reported to the protocol core (which shows them in `status`).
    unreported: u64,
}

impl BadDatagrams {
    fn record(&mut self, from: SocketAddr, len: usize, err: &WireError) {
        self.total += 1;
        self.unreported += 1;
        if self.total <= 10 || self.total.is_multiple_of(1000) {
            warn!(%from, len, total = self.total, "dropped a datagram: {err}");
        }
    }

    fn take_unreported(&mut self) -> u64 {
        std::mem::take(&mut self.unreported)
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
        WireError::Version { .. } => err.to_string(),
        _ => format!("unknown or malformed message: {err}"),
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

const RECV_BURST: usize = 64;

struct Io {
    socket: UdpSocket,
    start: Instant,
    buf: Vec<u8>,
    bad: BadDatagrams,
    chaos: ChaosConfig,
    /// Only drawn from when chaos is on.
    rng: rand::rngs::SmallRng,
}

impl Io {
    fn new(socket: UdpSocket, chaos: &ChaosConfig) -> Self {
        if chaos.loss > 0.0 || chaos.duplicate > 0.0 {
            warn!(
                loss = chaos.loss,
                duplicate = chaos.duplicate,
                "chaos: dropping and duplicating outgoing datagrams"
            );
        }
        Io {
            socket,
            start: Instant::now(),
            buf: vec![0; 65_536],
            bad: BadDatagrams::default(),
            chaos: chaos.clone(),
            rng: rand::SeedableRng::from_os_rng(),
        }
    }

    fn now(&self) -> Time {
        self.start.elapsed()
    }

    fn deadline(&self, at: Option<Time>) -> Option<tokio::time::Instant> {
        at.map(|t| tokio::time::Instant::from_std(self.start + t))
    }

    async fn send(&mut self, dest: SocketAddr, bytes: &[u8]) {
        let mut copies = 1;
        if self.chaos.loss > 0.0 || self.chaos.duplicate > 0.0 {
            use rand::Rng;
            if self.rng.random_bool(self.chaos.loss) {
                return;
            }
            if self.rng.random_bool(self.chaos.duplicate) {
                copies = 2;
            }
        }
        for _ in 0..copies {
            if let Err(e) = self.socket.send_to(bytes, dest).await {
                // Loss is handled by retransmission; a send error is just another loss.
                warn!(%dest, "send failed: {e}");
            }
        }
    }

    /// Decodes the datagram just received and whatever else is already queued (up to a burst),
    /// so a flood of batches is handled with one wake-up.
    async fn burst(
        &mut self,
        first: (usize, SocketAddr),
        incarnation: u64,
    ) -> Vec<(SocketAddr, Envelope)> {
        let mut out = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some((len, from)) = next.take() {
            taken += 1;
            if let Some(env) = self.decode(len, from, incarnation).await {
                out.push((from, env));
            }
            if taken < RECV_BURST {
                next = self.socket.try_recv_from(&mut self.buf).ok();
            }
        }
        out
    }

    /// Decodes one datagram, or counts it and answers it with a rejection where possible.
    async fn decode(&mut self, len: usize, from: SocketAddr, incarnation: u64) -> Option<Envelope> {
        match Envelope::decode(&self.buf[..len]) {
            Ok(env) => Some(env),
            Err(e) => {
                self.bad.record(from, len, &e);
                if let Some(reply) = reject_undecodable(&self.buf[..len], &e, incarnation) {
                    self.send(from, &reply).await;
                }
                None
            }
        }
    }
}

/// Runs the manager until `shutdown` fires. `ready` receives the bound address.
pub async fn run_manager(
    cfg: &Config,
    mut shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), NodeError> {
    let socket = bind_udp(&cfg.listen, cfg.socket_buffer)?;
    let local = socket.local_addr().map_err(|source| NodeError::Bind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let incarnation: u64 = rand::random();
    let mut core = Manager::new(cfg.manager_config(), incarnation);
    let mut io = Io::new(socket, &cfg.chaos);
    info!(%local, placement = ?cfg.placement, "manager listening");
    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    let (loaded_tx, mut loaded_rx) = mpsc::unbounded_channel();
    let mut spans: HashMap<SpanKey, Span> = HashMap::new();
    loop {
        while let Some(t) = core.poll_transmit() {
            io.send(t.dest, &t.bytes).await;
        }
        while let Some(ev) = core.poll_event() {
            on_manager_event(ev, &mut spans, &loaded_tx);
        }
        let wake = io.deadline(core.poll_timeout());
        tokio::select! {
            r = io.socket.recv_from(&mut io.buf) => {
                let Ok(first) = r else { continue };
                for (from, env) in io.burst(first, incarnation).await {
                    manager_receive(&mut core, &mut spans, io.now(), from, env);
                }
                for _ in 0..io.bad.take_unreported() {
                    core.note_bad_datagram();
                }
            }
            _ = sleep_until(wake) => core.handle_timeout(io.now()),
            Some((job, result)) = loaded_rx.recv() => core.file_loaded(io.now(), job, result),
            _ = shutdown.changed() => {
                info!("manager shutting down");
                return Ok(());
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SpanKey {
    Query(u64),
    Distribute(u64),
}

fn manager_receive(
    core: &mut Manager,
    spans: &mut HashMap<SpanKey, Span>,
    now: Time,
    from: SocketAddr,
    env: Envelope,
) {
    let span = match &env.body {
        Body::Request(req) => {
            let span = tracing::info_span!(
                target: TARGET,
                "manager",
                otel.name = field::Empty,
                otel.kind = "server",
                command = req.kind(),
                event.id = field::Empty,
                found = field::Empty,
                path = field::Empty,
                entry.peer.id = field::Empty,
                network.transport = "udp",
                network.peer.address = field::Empty,
                network.peer.port = field::Empty,
                client.address = %from.ip(),
            );
            span.record("otel.name", format!("manager {}", req.kind()));
            if let ClientRequest::Query { key, .. } = req {
                span.record("event.id", key.to_string());
            }
            set_remote_parent(&span, env.trace.as_ref());
            Some(span)
        }
        _ => None,
    };
    let trace = span.as_ref().and_then(context_of).or(env.trace.clone());
    {
        let _entered = span.as_ref().map(Span::enter);
        core.handle(now, from, env, trace);
    }
    // Keep the span of a long-running request open until the core reports its end.
    if let Some(span) = span {
        let mut keep = None;
        let mut pending = Vec::new();
        while let Some(ev) = core.poll_event() {
            match &ev {
                ManagerEvent::QueryDispatched {
                    query,
                    entry,
                    entry_addr,
                    ..
                } => {
                    span.record("entry.peer.id", *entry);
                    span.record("network.peer.address", entry_addr.ip().to_string());
                    span.record("network.peer.port", entry_addr.port());
                    keep = Some(SpanKey::Query(*query));
                }
                ManagerEvent::LoadFile { job, .. } => keep = Some(SpanKey::Distribute(*job)),
                _ => {}
            }
            pending.push(ev);
        }
        if let Some(key) = keep {
            spans.insert(key, span);
        }
        // Events are handled by the main loop; hand them back in order.
        core.requeue_events(pending);
    }
}

fn on_manager_event(
    ev: ManagerEvent,
    spans: &mut HashMap<SpanKey, Span>,
    loaded_tx: &mpsc::UnboundedSender<(u64, Result<record::Dataset, String>)>,
) {
    match ev {
        ManagerEvent::LoadFile { job, path } => {
            let tx = loaded_tx.clone();
            info!(%path, "loading records");
            tokio::task::spawn_blocking(move || {
                let result =
                    record::load_path(std::path::Path::new(&path)).map_err(|e| e.to_string());
                let _ = tx.send((job, result));
            });
        }
        ManagerEvent::PeerRegistered { id, name, addr } => {
            info!(id, %name, %addr, "peer registered")
        }
        ManagerEvent::RingChanged {
            epoch,
            settled,
            members,
        } => info!(epoch, settled, members, "ring changed"),
        ManagerEvent::PeerLeft { id, name } => info!(id, %name, "peer left"),
        ManagerEvent::QueryDispatched { .. } => {}
        ManagerEvent::QueryDone { query, found, path } => {
            if let Some(span) = spans.remove(&SpanKey::Query(query)) {
                span.record("found", found);
                span.record("path", format!("{path:?}"));
            }
        }
        ManagerEvent::QueryFailed { query, reason } => {
            if let Some(span) = spans.remove(&SpanKey::Query(query)) {
                span.set_status(opentelemetry::trace::Status::error(reason));
            }
        }
        ManagerEvent::DistributeDone {
            job,
            stored,
            elapsed,
        } => {
            info!(
                stored,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "distribute done"
            );
            spans.remove(&SpanKey::Distribute(job));
        }
        ManagerEvent::DistributeFailed { job, reason } => {
            warn!("distribute failed: {reason}");
            if let Some(span) = spans.remove(&SpanKey::Distribute(job)) {
                span.set_status(opentelemetry::trace::Status::error(reason));
            }
        }
        ManagerEvent::Warning(w) => warn!("{w}"),
    }
}

/// How a peer process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerExit {
    pub code: i32,
    pub reason: String,
}

/// Runs a peer until it exits (teardown, leave, refusal). `shutdown` asks it to leave.
pub async fn run_peer(
    cfg: &Config,
    mut shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<PeerExit, NodeError> {
    let socket = bind_udp(&cfg.listen, cfg.socket_buffer)?;
    let local = socket.local_addr().map_err(|source| NodeError::Bind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let manager = resolve_with_retry(&cfg.manager, &mut shutdown).await?;
    let name = cfg.peer_name();
    let incarnation: u64 = rand::random();
    let mut io = Io::new(socket, &cfg.chaos);
    let peer_cfg = PeerConfig {
        name: name.clone(),
        manager,
        retry: cfg.retry_policy(),
        max_datagram: cfg.max_datagram,
        window: cfg.window,
    };
    let mut core = Peer::new(peer_cfg, incarnation, io.now());
    info!(%local, %manager, %name, "peer listening; registering");
    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    let mut shutdown_seen = false;
    let mut exiting: Option<(PeerExit, tokio::time::Instant)> = None;
    loop {
        while let Some(t) = core.poll_transmit() {
            io.send(t.dest, &t.bytes).await;
        }
        while let Some(ev) = core.poll_event() {
            if let PeerEvent::Exit { code, reason } = ev {
                info!(code, %reason, "peer exiting");
                // Linger a moment: if our ack of the Exit is lost, the retransmission gets
                // acknowledged again instead of leaving the manager waiting for a dead peer.
                let linger = tokio::time::Instant::now() + EXIT_LINGER;
                exiting = Some((PeerExit { code, reason }, linger));
            } else {
                log_peer_event(&ev);
            }
        }
        let wake = match &exiting {
            Some((exit, at)) if tokio::time::Instant::now() >= *at => return Ok(exit.clone()),
            Some((_, at)) => Some(*at),
            None => io.deadline(core.poll_timeout()),
        };
        tokio::select! {
            r = io.socket.recv_from(&mut io.buf) => {
                let Ok(first) = r else { continue };
                for (from, env) in io.burst(first, incarnation).await {
                    peer_receive(&mut core, io.now(), from, env);
                }
                for _ in 0..io.bad.take_unreported() {
                    core.note_bad_datagram();
                }
            }
            _ = sleep_until(wake) => core.handle_timeout(io.now()),
            r = shutdown.changed(), if !shutdown_seen => {
                shutdown_seen = true;
                if r.is_ok() {
                    info!("leaving the ring: handing records over first");
                    core.request_leave(io.now());
                }
            }
        }
    }
}

/// How long an exiting peer keeps acknowledging repeated messages (a lost ack of its Exit).
const EXIT_LINGER: std::time::Duration = std::time::Duration::from_millis(300);

/// In compose the manager's name may not resolve for a moment after start.
async fn resolve_with_retry(addr: &str, shutdown: &mut Shutdown) -> Result<SocketAddr, NodeError> {
    let mut delay = std::time::Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        match resolve(addr) {
            Ok(a) => return Ok(a),
            Err(source) if attempts >= 30 || *shutdown.borrow() => {
                return Err(NodeError::Resolve {
                    addr: addr.to_string(),
                    source,
                });
            }
            Err(e) => {
                if attempts == 0 {
                    warn!("cannot resolve the manager '{addr}' yet ({e}); retrying");
                }
                attempts += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

fn peer_receive(core: &mut Peer, now: Time, from: SocketAddr, env: Envelope) {
    let id = core.id().unwrap_or_default();
    let span = match &env.body {
        Body::Find(find) => {
            let span = tracing::info_span!(
                target: TARGET,
                "find_event",
                otel.kind = "server",
                event.id = %find.key,
                hop = find.path.len(),
                peer.id = id,
                peer.name = core.name(),
                found = field::Empty,
                network.transport = "udp",
                network.peer.address = field::Empty,
                network.peer.port = field::Empty,
                next.peer.id = field::Empty,
            );
            Some(span)
        }
        Body::Store(batch) => Some(tracing::info_span!(
            target: TARGET,
            "store_batch",
            otel.kind = "server",
            rows = batch.rows.len(),
            new_rows = field::Empty,
            peer.id = id,
            peer.name = core.name(),
            network.transport = "udp",
            network.peer.address = %from.ip(),
            network.peer.port = from.port(),
        )),
        Body::Ring(view) => Some(tracing::info_span!(
            target: TARGET,
            "ring_update",
            epoch = view.epoch,
            settled = view.settled,
            members = view.members.len(),
            peer.id = id,
            peer.name = core.name(),
        )),
        _ => None,
    };
    if let Some(span) = &span {
        set_remote_parent(span, env.trace.as_ref());
    }
    let trace = span.as_ref().and_then(context_of);
    {
        let _entered = span.as_ref().map(Span::enter);
        core.handle(now, from, env, trace);
    }
    if let Some(span) = span {
        // Attributes the core decided: where the query went, whether it was found here.
        let mut rest = Vec::new();
        while let Some(ev) = core.poll_event() {
            match &ev {
                PeerEvent::Hop(h) => {
                    span.record("found", h.found);
                    match h.next {
                        Some((next_id, addr)) => {
                            span.record("network.peer.address", addr.ip().to_string());
                            span.record("network.peer.port", addr.port());
                            span.record("next.peer.id", next_id);
                        }
                        None => {
                            // The answer goes to the manager.
                            span.record("network.peer.address", core.manager().ip().to_string());
                            span.record("network.peer.port", core.manager().port());
                        }
                    }
                }
                PeerEvent::Stored { new_rows, .. } => {
                    span.record("new_rows", *new_rows);
                }
                _ => {}
            }
            rest.push(ev);
        }
        core.requeue_events(rest);
    }
}

fn log_peer_event(ev: &PeerEvent) {
    match ev {
        PeerEvent::Registered { id } => info!(id, "registered"),
        PeerEvent::RingChanged {
            epoch,
            members,
            next,
        } => {
            info!(epoch, members, next = ?next.map(|n| n.0), "ring changed")
        }
        PeerEvent::HandedOver { to, rows } => info!(to, rows, "handed records over"),
        PeerEvent::Warning(w) => warn!("{w}"),
        PeerEvent::Stored { rows, new_rows } => tracing::debug!(rows, new_rows, "stored a batch"),
        PeerEvent::Hop(_) | PeerEvent::Exit { .. } => {}
    }
}
