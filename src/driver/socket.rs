//! The one thing a driver needs from a network: send a datagram, receive one. Real UDP
//! implements it here; the simulation's in-memory network implements it in `sim`, so the loop
//! that runs in production is the loop the simulations test.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
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

#[cfg(test)]
mod tests {
    use super::*;

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
