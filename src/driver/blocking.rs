//! The driver's loop on a thread of its own, over a blocking socket: what a peer process runs.
//!
//! It does what [`super::drive`] does, through the same [`Gate`], [`deliver`] and [`react`]; it
//! differs only in how it waits. The async loop waits in the runtime (`epoll_wait`, then a
//! `recvfrom` that finds the datagram, then one more that finds nothing, with the runtime's
//! own bookkeeping around each), which cost a peer about a third of its CPU per query: a
//! query at its owner took four system calls where the floor's echo takes two. Here the
//! thread sleeps in `recvfrom` itself, with the socket's receive timeout set to the machine's
//! next deadline: one call to receive, one to answer.
//!
//! The simulations drive machines with the async loop (over their in-memory network, on a
//! paused clock); the process tests (`tests/`) and the benchmarks run this one.

use super::socket::{ReadTimeout, timed_out};
use super::{Control, DriveOptions, Gate, Machine, Shared, Shell, Shutdown, deliver, lock, react};
use crate::link::Transmit;
use std::net::UdpSocket;
use std::time::{Duration, Instant};
use tracing::warn;

/// A shell whose local work is housekeeping with a deadline rather than input for the machine,
/// so that it runs without a runtime.
pub trait BlockingShell<M: Machine>: Shell<M> {
    /// Does the housekeeping due by `now`; when the next is due, if any is.
    fn housekeeping(&mut self, now: Instant) -> Option<Instant>;
    /// The exit when whoever could ask the node to stop is gone without asking (a runtime
    /// could abort a task; nothing can stop a thread from outside).
    fn abandoned(&mut self) -> Self::Exit;
}

/// The longest the loop sleeps without looking at its shutdown signal.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Sends what the machine queued, one datagram at a time: the lock is taken per datagram and
/// released before the send (no list of them is built: an allocation per loop turn).
fn send_all<M: Machine>(socket: &UdpSocket, gate: &mut Gate, machine: &Shared<M>) {
    loop {
        let next = lock(machine).poll_transmit();
        let Some(t) = next else { break };
        send(socket, gate, &t);
    }
}

fn send(socket: &UdpSocket, gate: &mut Gate, t: &Transmit) {
    let (bytes, copies) = gate.outgoing(t);
    for _ in 0..copies {
        if let Err(e) = socket.send_to(&bytes, t.dest) {
            // Loss is handled by retransmission; a send error is just another loss.
            warn!(dest = %t.dest, "send failed: {e}");
        }
    }
}

/// What the shutdown signal says since it was last looked at.
enum Signal {
    Quiet,
    Stop,
    /// Its sender is gone without asking.
    Abandoned,
}

fn signal(shutdown: &mut Shutdown) -> Signal {
    match shutdown.has_changed() {
        Ok(false) => Signal::Quiet,
        // Closed right after asking (stormd's signal task ends once it has sent) still asks.
        Ok(true) | Err(_) if *shutdown.borrow_and_update() => Signal::Stop,
        Ok(true) => Signal::Quiet,
        Err(_) => Signal::Abandoned,
    }
}

/// Runs `machine` over a blocking `socket` until the shell ends it, as [`super::drive`] does.
pub fn drive_blocking<M, H>(
    socket: &UdpSocket,
    machine: &Shared<M>,
    shell: &mut H,
    mut shutdown: Shutdown,
    options: &DriveOptions,
) -> H::Exit
where
    M: Machine,
    H: BlockingShell<M>,
{
    let incarnation = lock(machine).incarnation();
    let start = Instant::now();
    lock(machine).set_clock_origin(crate::config::unix_micros_now());
    let mut gate = Gate::new(options, incarnation);
    let mut timeout = ReadTimeout::new(SHUTDOWN_POLL);
    let mut shutdown_seen = false;
    let mut lingering: Option<(Instant, H::Exit)> = None;
    loop {
        send_all(socket, &mut gate, machine);
        let now = Instant::now();
        let mut control = Control::Continue;
        if !shutdown_seen {
            match signal(&mut shutdown) {
                Signal::Quiet => {}
                Signal::Stop => {
                    shutdown_seen = true;
                    // The machine's lock is let go before its events are dealt with.
                    let asked = shell.on_shutdown(&mut lock(machine), now - start);
                    match asked {
                        Err(exit) => return exit,
                        Ok(events) => control = react(shell, machine, events),
                    }
                }
                Signal::Abandoned => return shell.abandoned(),
            }
        }
        if matches!(control, Control::Continue) {
            let wake = match lingering.take() {
                Some((at, exit)) if now >= at => return exit,
                Some((at, exit)) => {
                    lingering = Some((at, exit));
                    Some(at)
                }
                None => lock(machine).poll_timeout().map(|t| start + t),
            };
            let housekeeping = shell.housekeeping(now);
            if lingering.is_none() && wake.is_some_and(|at| at <= now) {
                let events = lock(machine).handle_timeout(now - start);
                control = react(shell, machine, events);
            } else {
                let until = [wake, housekeeping, Some(now + SHUTDOWN_POLL)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(now + SHUTDOWN_POLL);
                timeout.set(socket, until.saturating_duration_since(now));
                control = match socket.recv_from(&mut gate.buf) {
                    Ok((len, from)) => receive(socket, &mut gate, machine, shell, len, from, start),
                    Err(e) if timed_out(&e) => {
                        timeout.expired();
                        Control::Continue
                    }
                    Err(e) => {
                        // ICMP errors surface here on some systems; the next datagram is
                        // unaffected.
                        tracing::debug!("receive failed: {e}");
                        Control::Continue
                    }
                };
            }
        }
        match control {
            Control::Continue => {}
            Control::Stop(exit) => {
                // What the last input queued (the ack of an Exit) still goes out.
                send_all(socket, &mut gate, machine);
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

/// One datagram through the gate and the machine. Unlike the async loop it does not look for
/// more before waiting again: a receive that finds one queued returns at once, and one that
/// finds none would be a wasted system call per query.
fn receive<M: Machine, H: Shell<M>>(
    socket: &UdpSocket,
    gate: &mut Gate,
    machine: &Shared<M>,
    shell: &mut H,
    len: usize,
    from: std::net::SocketAddr,
    start: Instant,
) -> Control<H::Exit> {
    let control = match gate.admit(len, from) {
        super::Admitted::Envelope(env) => deliver(start.elapsed(), machine, shell, from, env),
        super::Admitted::Reject(t) => {
            send(socket, gate, &t);
            Control::Continue
        }
        super::Admitted::Dropped => Control::Continue,
    };
    gate.report_dropped(machine);
    control
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::peer::{PeerShell, peer_config};
    use crate::driver::shared;
    use crate::peer::Peer;
    use crate::wire::{Body, Envelope};
    use tokio::sync::watch;

    #[test]
    fn the_shutdown_signal_is_read_as_asked_quiet_or_abandoned() {
        let (tx, mut rx) = watch::channel(false);
        assert!(matches!(signal(&mut rx), Signal::Quiet));
        tx.send(true).unwrap();
        assert!(matches!(signal(&mut rx), Signal::Stop));
        // Asked, then the sender gone at once (stormd's signal task): still a stop.
        let (tx, mut rx) = watch::channel(false);
        tx.send(true).unwrap();
        drop(tx);
        assert!(matches!(signal(&mut rx), Signal::Stop));
        // Gone without asking: nobody can stop the thread any more.
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        assert!(matches!(signal(&mut rx), Signal::Abandoned));
    }

    /// A peer on a blocking loop, its manager a bare socket: it registers (the loop sends
    /// what the machine queues, and again at the machine's retransmission deadline), and it
    /// stops by itself once its shutdown sender is gone.
    #[test]
    fn a_blocking_peer_registers_again_at_its_deadline_and_stops_when_abandoned() {
        let manager = UdpSocket::bind("127.0.0.1:0").unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let cfg = crate::config::Config {
            name: "blocking-peer".into(),
            ..Default::default()
        };
        let peer = shared(Peer::new(
            peer_config(&cfg, manager.local_addr().unwrap()),
            7,
            Duration::ZERO,
        ));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = watch::channel(false);
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut shell = PeerShell::default();
            let exit = drive_blocking(&socket, &peer, &mut shell, rx, &DriveOptions::default());
            let _ = exit_tx.send(exit);
        });
        let mut buf = [0u8; 2048];
        let mut registrations = Vec::new();
        while registrations.len() < 2 {
            let (len, _) = manager.recv_from(&mut buf).expect("a registration");
            let env = Envelope::decode(&buf[..len]).unwrap();
            if matches!(env.body, Body::Register { .. }) {
                registrations.push((Instant::now(), env.seq));
            }
        }
        // Unanswered, the same registration again after the retry policy's first interval.
        assert_eq!(registrations[0].1, registrations[1].1);
        assert!(registrations[1].0 - registrations[0].0 >= Duration::from_millis(100));
        drop(tx);
        // Within the loop's shutdown poll (100 ms), with room for a busy machine.
        let exit = exit_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the loop stops once nobody can ask it to");
        assert_eq!(exit.code, 1, "{exit:?}");
        assert!(exit.reason.contains("gone"), "{exit:?}");
    }
}
