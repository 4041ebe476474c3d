//! The one thing a driver needs from a network: send a datagram, receive one. Real UDP
//! implements it here; the simulation's in-memory network implements it in `sim`, so the loop
//! that runs in production is the loop the simulations test.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// A datagram socket as the driver uses it. Every method is cancel safe: a `recv_from` dropped
/// by `select!` loses no datagram.
pub trait DatagramSocket {
    fn local_addr(&self) -> io::Result<SocketAddr>;
    fn send_to(&self, bytes: &[u8], dest: SocketAddr) -> impl Future<Output = io::Result<usize>>;
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>>;
    /// A datagram already queued, without waiting (`WouldBlock` when there is none).
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
}

impl DatagramSocket for UdpSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        UdpSocket::local_addr(self)
    }
    fn send_to(&self, bytes: &[u8], dest: SocketAddr) -> impl Future<Output = io::Result<usize>> {
        UdpSocket::send_to(self, bytes, dest)
    }
    fn recv_from(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<(usize, SocketAddr)>> {
        UdpSocket::recv_from(self, buf)
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        UdpSocket::try_recv_from(self, buf)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("could not resolve '{addr}': {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("could not bind UDP {addr}: {source}")]
    Bind { addr: String, source: io::Error },
}

/// Resolves `host:port` (a service name inside compose, an address elsewhere) without blocking
/// the runtime, preferring IPv4.
pub async fn lookup(value: &str) -> Result<SocketAddr, SocketError> {
    let err = |source| SocketError::Resolve {
        addr: value.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(value).await.map_err(err)?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| {
            err(io::Error::new(
                io::ErrorKind::NotFound,
                "resolves to no address",
            ))
        })
}

/// Binds a UDP socket with large kernel buffers: a burst of 60 KB batches overflows the
/// default 208 KiB receive buffer even on loopback.
pub async fn bind_udp(listen: &str, buffer: usize) -> Result<UdpSocket, SocketError> {
    let addr = lookup(listen).await?;
    bind_addr(addr, buffer).map_err(|source| SocketError::Bind {
        addr: listen.to_string(),
        source,
    })
}

fn bind_addr(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // The kernel caps these at its maximum; a smaller buffer is not an error.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The shortest receive timeout (a socket takes no zero).
const MIN_WAIT: Duration = Duration::from_millis(1);
/// How late a wake-up may be rather than set the socket's timeout again: the machines' timers
/// are tens of milliseconds and more.
const SLACK: Duration = Duration::from_millis(1);

/// A blocking socket's receive timeout, set only when it must change (one system call each
/// time): a receive started now must return by the next deadline (within [`SLACK`]), and
/// should not wake much earlier than it. Never above `max`, so that a loop still looks at
/// whatever it polls (a shutdown signal) that often.
pub(crate) struct ReadTimeout {
    current: Option<Duration>,
    max: Duration,
    /// A receive ran out of time since the timeout was last set: a short one is raised again
    /// only then. A busy loop whose deadlines come and go (a peer's held acks, every 5 ms)
    /// keeps its short timeout rather than raise and lower it around each one.
    expired: bool,
}

impl ReadTimeout {
    pub(crate) fn new(max: Duration) -> Self {
        ReadTimeout {
            current: None,
            max,
            expired: false,
        }
    }

    /// The timeout to set for a wait of `want`, if it changes. Lowered for a deadline that
    /// comes closer, it is set to half the wait: as the deadline approaches, each wait is a
    /// little shorter, and a timeout set to the exact wait would be set again every
    /// millisecond (a system call every few queries in the last 100 ms before each of the
    /// machine's deadlines); halving, it is set about log2(wait / 1 ms) times. Raised for a
    /// later deadline only once a receive has run out of time (an idle loop then sleeps
    /// long; a busy one, woken by datagrams long before, never pays for the raise).
    fn change_for(&self, want: Duration) -> Option<Duration> {
        let want = want.clamp(MIN_WAIT, self.max.max(MIN_WAIT));
        match self.current {
            Some(cur) if cur > want + SLACK => Some((want / 2).max(MIN_WAIT)),
            Some(cur) if cur * 2 < want && self.expired => Some(want),
            Some(_) => None,
            None => Some(want),
        }
    }

    /// A receive returned because its time was up.
    pub(crate) fn expired(&mut self) {
        self.expired = true;
    }

    /// Makes the next receive on `socket` wait at most about `want`.
    pub(crate) fn set(&mut self, socket: &std::net::UdpSocket, want: Duration) {
        if let Some(t) = self.change_for(want) {
            match socket.set_read_timeout(Some(t)) {
                Ok(()) => {
                    self.current = Some(t);
                    self.expired = false;
                }
                Err(e) => tracing::warn!("could not set the receive timeout: {e}"),
            }
        }
    }
}

/// True for the errors a receive with a timeout returns when the time is up.
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_timeout_changes_only_when_it_would_oversleep_or_wake_far_too_early() {
        let ms = Duration::from_millis;
        let mut t = ReadTimeout::new(ms(100));
        // Nothing set yet: set, never above the maximum nor below the minimum.
        assert_eq!(t.change_for(ms(5_000)), Some(ms(100)));
        assert_eq!(t.change_for(Duration::ZERO), Some(MIN_WAIT));
        t.current = Some(ms(100));
        // A later deadline: waking at the maximum is as before.
        assert_eq!(t.change_for(ms(5_000)), None);
        // A deadline within the slack of the current timeout: kept.
        assert_eq!(t.change_for(ms(99)), None);
        // One that the current timeout would oversleep: lowered to half of it.
        assert_eq!(t.change_for(ms(40)), Some(ms(20)));
        t.current = Some(ms(20));
        // As that deadline comes closer: kept until the timeout would oversleep it again.
        assert_eq!(t.change_for(ms(30)), None);
        assert_eq!(t.change_for(ms(21)), None);
        assert_eq!(t.change_for(ms(18)), Some(ms(9)));
        t.current = Some(ms(9));
        // Much later (the deadline passed, the next is far): kept while datagrams wake the
        // loop first; raised to the whole wait once a receive ran out of time.
        assert_eq!(t.change_for(ms(90)), None);
        t.expired();
        assert_eq!(t.change_for(ms(90)), Some(ms(90)));
        // Down to the minimum, never below.
        t.current = Some(ms(3));
        assert_eq!(t.change_for(ms(1)), Some(MIN_WAIT));
    }

    #[test]
    fn a_blocking_receive_returns_by_its_timeout_and_says_so() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut t = ReadTimeout::new(Duration::from_millis(100));
        t.set(&socket, Duration::from_millis(20));
        let started = std::time::Instant::now();
        let err = socket.recv_from(&mut [0u8; 8]).unwrap_err();
        assert!(timed_out(&err), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(15));
    }

    #[tokio::test]
    async fn lookup_prefers_ipv4_and_names_the_bad_address() {
        let a = lookup("localhost:5000").await.unwrap();
        assert!(a.is_ipv4() || a.is_ipv6());
        assert_eq!(a.port(), 5000);
        let err = lookup("no-such-host.invalid:1").await.unwrap_err();
        assert!(err.to_string().contains("no-such-host.invalid:1"), "{err}");
    }

    #[tokio::test]
    async fn a_bound_socket_round_trips_a_datagram() {
        let a = bind_udp("127.0.0.1:0", 1 << 20).await.unwrap();
        let b = bind_udp("127.0.0.1:0", 1 << 20).await.unwrap();
        let to = DatagramSocket::local_addr(&b).unwrap();
        DatagramSocket::send_to(&a, b"ping", to).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = DatagramSocket::recv_from(&b, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, DatagramSocket::local_addr(&a).unwrap());
        assert_eq!(
            DatagramSocket::try_recv_from(&b, &mut buf)
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
