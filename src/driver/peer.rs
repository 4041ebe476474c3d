//! The peer's shell: a span per query hop, stored batch and ring update; exit after a short
//! linger; SIGTERM as a graceful leave.

use super::blocking::{BlockingShell, drive_blocking};
use super::manager::{NodeError, open_node};
use super::{Control, Shell, Shutdown, Timer, lookup, shared};
use crate::config::Config;
use crate::link::Time;
use crate::peer::{Peer, PeerConfig, PeerEvent};
use crate::telemetry::{TARGET, set_remote_parent};
use crate::wire::{Body, Envelope};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tracing::{Span, field, info, warn};

/// How a peer process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerExit {
    pub code: i32,
    pub reason: String,
}

/// How long an exiting peer keeps acknowledging repeated messages (a lost ack of its Exit).
const EXIT_LINGER: Duration = Duration::from_millis(300);

/// The peer's shell: spans per datagram, logs, memory hygiene.
#[derive(Default)]
pub struct PeerShell {
    /// Give freed heap pages back this long after work that allocates and frees a lot (a
    /// ring change, a hand-off); None: never (the simulation).
    trim_after: Option<Duration>,
    trim_at: Option<tokio::time::Instant>,
    /// Made at the first trim (inside the runtime), then reset rather than made anew each
    /// time the driver's loop polls for local input while a trim is due.
    trim_timer: Option<Timer>,
}

/// How long after a ring change or a hand-off the peer gives its free memory back: once per
/// burst of them.
const TRIM_AFTER: Duration = Duration::from_millis(250);

impl PeerShell {
    /// The shell of a real peer process: it gives freed memory back after bursts of work.
    pub fn trimming() -> Self {
        PeerShell {
            trim_after: Some(TRIM_AFTER),
            trim_at: None,
            trim_timer: None,
        }
    }

    fn worked(&mut self) {
        if let Some(after) = self.trim_after {
            self.trim_at
                .get_or_insert_with(|| tokio::time::Instant::now() + after);
        }
    }
}

impl Shell<Peer> for PeerShell {
    type Exit = PeerExit;

    fn open_span(&mut self, peer: &Peer, from: SocketAddr, env: &Envelope) -> Option<Span> {
        let id = peer.id();
        let span = match &env.body {
            Body::Find(find) | Body::Lookup(find) => tracing::info_span!(
                target: TARGET,
                "find_event",
                otel.kind = "server",
                event.id = %find.key,
                hop = find.path.len(),
                peer.id = id,
                peer.name = peer.name(),
                found = field::Empty,
                network.transport = "udp",
                network.peer.address = field::Empty,
                network.peer.port = field::Empty,
                next.peer.id = field::Empty,
            ),
            Body::Lookups(finds) => tracing::info_span!(
                target: TARGET,
                "find_events",
                otel.kind = "server",
                keys = finds.len(),
                peer.id = id,
                peer.name = peer.name(),
                answered = field::Empty,
                found = field::Empty,
                forwarded = field::Empty,
                network.transport = "udp",
                network.peer.address = %from.ip(),
                network.peer.port = from.port(),
            ),
            Body::Store(batch) => tracing::info_span!(
                target: TARGET,
                "store_batch",
                otel.kind = "server",
                rows = batch.rows.len(),
                new_rows = field::Empty,
                peer.id = id,
                peer.name = peer.name(),
                network.transport = "udp",
                network.peer.address = %from.ip(),
                network.peer.port = from.port(),
            ),
            Body::Ring(view) => tracing::info_span!(
                target: TARGET,
                "ring_update",
                epoch = view.epoch,
                settled = view.settled,
                members = view.members.len(),
                peer.id = id,
                peer.name = peer.name(),
            ),
            Body::RingDelta(delta) => tracing::info_span!(
                target: TARGET,
                "ring_update",
                epoch = delta.epoch,
                settled = delta.settled,
                delta.base = delta.base,
                delta.changed = delta.changed.len(),
                delta.removed = delta.removed.len(),
                peer.id = id,
                peer.name = peer.name(),
            ),
            _ => return None,
        };
        set_remote_parent(&span, env.trace.as_ref());
        Some(span)
    }

    fn close_span(&mut self, span: Span, events: &[PeerEvent]) {
        // Attributes the peer decided: where the query went, whether it was found here. A
        // multi-get's span counts its keys instead (fields a span lacks are not recorded).
        let hops = events.iter().filter(|e| matches!(e, PeerEvent::Hop(_)));
        if hops.count() > 1 {
            let (mut answered, mut found, mut forwarded) = (0u64, 0u64, 0u64);
            for ev in events {
                if let PeerEvent::Hop(h) = ev {
                    match h.next {
                        Some(_) => forwarded += 1,
                        None => answered += 1,
                    }
                    found += u64::from(h.found);
                }
            }
            span.record("answered", answered);
            span.record("found", found);
            span.record("forwarded", forwarded);
            return;
        }
        for ev in events {
            match ev {
                PeerEvent::Hop(h) => {
                    span.record("found", h.found);
                    span.record("network.peer.address", h.sent_to.ip().to_string());
                    span.record("network.peer.port", h.sent_to.port());
                    if let Some((next_id, _)) = h.next {
                        span.record("next.peer.id", next_id);
                    }
                }
                PeerEvent::Stored { new_rows, .. } => {
                    span.record("new_rows", *new_rows);
                }
                _ => {}
            }
        }
    }

    fn on_event(&mut self, ev: PeerEvent) -> Control<PeerExit> {
        match ev {
            PeerEvent::Exit { code, reason } => {
                // A failure (refused, given up) is shown whatever the log filter.
                if code == 0 {
                    info!(code, %reason, "peer exiting");
                } else {
                    tracing::error!(code, %reason, "peer exiting");
                }
                // Linger a moment: if our ack of the Exit is lost, the retransmission gets
                // acknowledged again instead of leaving the manager waiting for a dead peer.
                return Control::Linger(EXIT_LINGER, PeerExit { code, reason });
            }
            PeerEvent::Registered { id } => info!(id, "registered"),
            PeerEvent::RingChanged {
                epoch,
                members,
                next,
            } => {
                info!(epoch, members, next = ?next.map(|n| n.0), "ring changed");
                self.worked();
            }
            PeerEvent::HandedOver { to, rows } => {
                info!(to, rows, "handed records over");
                self.worked();
            }
            PeerEvent::Warning(w) => warn!("{w}"),
            // Not after stored batches: during a distribute that would trim several times a
            // second, and what decoding a batch frees, the next batch reuses.
            PeerEvent::Stored { rows, new_rows } => {
                tracing::debug!(rows, new_rows, "stored a batch")
            }
            PeerEvent::Hop(_) => {}
        }
        Control::Continue
    }

    /// A peer has no local input; the future only gives memory back when a trim is due (it
    /// is cancel safe: the deadline outlives the future).
    async fn next_local(&mut self) -> Infallible {
        loop {
            let Some(at) = self.trim_at else {
                return std::future::pending().await;
            };
            let timer = self.trim_timer.get_or_insert_with(Timer::new);
            timer.until(Some(at)).await;
            self.trim_at = None;
            release_free_memory();
        }
    }

    fn on_shutdown(&mut self, peer: &mut Peer, now: Time) -> Result<Vec<PeerEvent>, PeerExit> {
        info!("leaving the ring: handing records over first");
        Ok(peer.request_leave(now))
    }
}

/// In compose the manager's name may not resolve for a moment after start.
async fn lookup_with_retry(addr: &str, shutdown: &Shutdown) -> Result<SocketAddr, NodeError> {
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        match lookup(addr).await {
            Ok(a) => return Ok(a),
            Err(e) if attempts >= 30 || *shutdown.borrow() => return Err(e.into()),
            Err(e) => {
                if attempts == 0 {
                    warn!("{e}; retrying");
                }
                attempts += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The protocol settings of a peer from its configuration.
pub fn peer_config(cfg: &Config, manager: SocketAddr) -> PeerConfig {
    PeerConfig {
        name: cfg.peer_name(),
        manager,
        retry: cfg.retry_policy(),
        max_datagram: cfg.max_datagram,
        window: cfg.window,
        heartbeat: Duration::from_millis(cfg.failure.heartbeat_ms),
        clock_origin_us: crate::config::unix_micros_now(),
    }
}

/// Runs a peer on real UDP until it exits (teardown, leave, refusal). `shutdown` asks it to
/// leave.
pub async fn run_peer(
    cfg: &Config,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<PeerExit, NodeError> {
    let (options, socket, local) = open_node(cfg).await?;
    let manager = lookup_with_retry(&cfg.manager, &shutdown).await?;
    let peer_cfg = peer_config(cfg, manager);
    info!(%local, %manager, name = %peer_cfg.name, "peer listening; registering");
    // The peer's clock starts with its driver's: the registration it queues now goes out at 0.
    let peer = shared(Peer::new(peer_cfg, rand::random(), Duration::ZERO));
    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    let mut shell = PeerShell::trimming();
    // The peer's loop runs on a thread of its own over a blocking socket (see
    // [`drive_blocking`]); the runtime keeps the signals and the span exporter.
    let socket = socket
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
        .map_err(|source| NodeError::Blocking {
            addr: cfg.listen.clone(),
            source,
        })?;
    let looped = tokio::task::spawn_blocking(move || {
        drive_blocking(&socket, &peer, &mut shell, shutdown, &options)
    });
    match looped.await {
        Ok(exit) => Ok(exit),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Ok(PeerExit {
            code: 1,
            reason: format!("the peer's loop was stopped: {e}"),
        }),
    }
}

impl BlockingShell<Peer> for PeerShell {
    fn housekeeping(&mut self, now: std::time::Instant) -> Option<std::time::Instant> {
        let at = self.trim_at?.into_std();
        if now < at {
            return Some(at);
        }
        self.trim_at = None;
        release_free_memory();
        None
    }

    fn abandoned(&mut self) -> PeerExit {
        PeerExit {
            code: 1,
            reason: "stopped: whoever started this peer is gone".into(),
        }
    }
}

/// Hands the allocator's free pages back to the kernel. Adopting a view allocates and frees
/// structures the size of the ring (at 256 peers × 16 tokens, a few hundred KiB: the view,
/// its point index, the repair plan's placers), and so does decoding 60 KB batches; glibc
/// keeps freed pages resident, so a peer holding 25 KB of rows stayed a few hundred KB
/// larger for good. Once per burst of work, trimming costs microseconds to a few
/// milliseconds. (musl, in the static image, returns memory itself.)
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap; it takes no
    // pointer and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls the shell's local input for `wait` of the paused clock (it never yields a value).
    async fn local_input_for(shell: &mut PeerShell, wait: Duration) {
        let polled = tokio::time::timeout(wait, shell.next_local()).await;
        assert!(polled.is_err(), "a peer has no local input");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trim_is_due_once_per_burst_and_runs_at_its_deadline() {
        let mut shell = PeerShell::trimming();
        local_input_for(&mut shell, Duration::from_secs(1)).await;
        assert!(shell.trim_timer.is_none(), "no work, no timer");

        shell.worked();
        let due = shell.trim_at.expect("a trim is due after work");
        // More work in the same burst keeps the first deadline.
        tokio::time::advance(Duration::from_millis(100)).await;
        shell.worked();
        assert_eq!(shell.trim_at, Some(due));
        // Polled (and dropped) many times before the deadline, as the driver's loop does
        // on every datagram: still due, one timer.
        for _ in 0..10 {
            local_input_for(&mut shell, Duration::from_millis(10)).await;
        }
        assert_eq!(shell.trim_at, Some(due));
        local_input_for(&mut shell, Duration::from_millis(100)).await;
        assert_eq!(
            shell.trim_at, None,
            "trimmed at {TRIM_AFTER:?} after the first work"
        );

        // The next burst sets a new deadline on the same timer.
        shell.worked();
        let next = shell.trim_at.expect("due again");
        assert!(next > due);
        local_input_for(&mut shell, TRIM_AFTER + Duration::from_millis(1)).await;
        assert_eq!(shell.trim_at, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_simulations_shell_never_trims() {
        let mut shell = PeerShell::default();
        shell.worked();
        assert_eq!(shell.trim_at, None);
        local_input_for(&mut shell, Duration::from_secs(1)).await;
        assert!(shell.trim_timer.is_none());
    }
}
