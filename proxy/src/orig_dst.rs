//! Where a captured connection was going before the capture rules redirected it.
//!
//! The Cofide and Istio rules REDIRECT outbound TCP to the proxy's listener; the kernel
//! keeps the original destination in conntrack and hands it back through
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv6: `SOL_IPV6, IP6T_SO_ORIGINAL_DST`). socket2
//! wraps both without `unsafe`. Listeners the proxy binds itself for `--bind-vips` know the
//! destination already: it is their own address.
//!
//! The source is a trait so in-process tests can inject destinations without root
//! (linkerd2-proxy does the same).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Recovers the destination a client meant to reach.
pub trait OrigDst: Send + Sync + std::fmt::Debug + 'static {
    /// The original destination of `stream`, accepted on a listener bound to `listener`.
    fn original_dst(&self, stream: &TcpStream, listener: SocketAddr) -> io::Result<SocketAddr>;
}

/// The kernel's conntrack record, for connections redirected by iptables/nftables.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conntrack;

impl OrigDst for Conntrack {
    fn original_dst(&self, stream: &TcpStream, _listener: SocketAddr) -> io::Result<SocketAddr> {
        let sock = socket2::SockRef::from(stream);
        let local = stream.local_addr()?;
        let addr = match local {
            SocketAddr::V4(_) => sock.original_dst_v4()?,
            SocketAddr::V6(_) => match sock.original_dst_v6() {
                Ok(a) => a,
                // An IPv4 connection on a dual-stack socket is tracked by the IPv4 table.
                Err(_) => sock.original_dst_v4()?,
            },
        };
        let addr = addr.as_socket().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP")
        })?;
        Ok(canonical(addr))
    }
}

/// The listener's own address: for VIP listeners bound with `--bind-vips`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalAddr;

impl OrigDst for LocalAddr {
    fn original_dst(&self, stream: &TcpStream, _listener: SocketAddr) -> io::Result<SocketAddr> {
        stream.local_addr().map(canonical)
    }
}

/// IPv4-mapped IPv6 addresses as plain IPv4, so routes keyed by IPv4 prefixes match.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Whether `dst` is the proxy's own `listener` (a direct connect, or traffic captured in a
/// loop): such connections are refused, never forwarded back to ourselves.
pub fn is_self(dst: SocketAddr, listener: SocketAddr) -> bool {
    dst.port() == listener.port()
        && (listener.ip().is_unspecified() || dst.ip() == canonical(listener).ip())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let a: SocketAddr = "[::ffff:127.240.0.1]:8443"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            canonical(a),
            "127.240.0.1:8443"
                .parse()
                .unwrap_or_else(|_| unreachable!())
        );
    }

    #[test]
    fn own_listener_is_detected() {
        let l: SocketAddr = "0.0.0.0:10000".parse().unwrap();
        assert!(is_self("127.0.0.1:10000".parse().unwrap(), l));
        assert!(is_self("10.1.2.3:10000".parse().unwrap(), l));
        assert!(!is_self("127.0.0.1:6379".parse().unwrap(), l));
        let l: SocketAddr = "127.0.0.1:10000".parse().unwrap();
        assert!(!is_self("127.0.0.2:10000".parse().unwrap(), l));
    }
}
