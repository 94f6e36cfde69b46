//! Who is at the other end of a Workload API connection, captured at accept time.
//!
//! Attestation runs per request, long after `accept`; what the kernel tells us at accept
//! (`SO_PEERCRED`) is the anchor the per-request checks are compared against.

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::net::UnixStream;

/// The kernel's word on who is at the other end of a Unix socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// What is known about a connection's peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Unix sockets: the peer's credentials.
    pub cred: Option<PeerCred>,
    /// TCP: the peer's address.
    pub remote: Option<std::net::SocketAddr>,
    /// TCP: our address on this connection.
    pub local: Option<std::net::SocketAddr>,
}

pub(crate) fn unix_peer(s: &UnixStream) -> PeerInfo {
    let cred = match getsockopt(s, PeerCredentials) {
        Ok(c) => Some(PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "SO_PEERCRED failed; the caller cannot be attested");
            None
        }
    };
    PeerInfo {
        cred,
        ..PeerInfo::default()
    }
}
