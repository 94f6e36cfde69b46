//! The resolver's errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why the resolver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The listen address could not be bound.
    #[error(
        "cannot listen for DNS on {addr}: {source} (is another resolver already on this port?)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// Nothing to forward non-federated names to.
    #[error("no upstream resolvers: give --upstream or list nameservers in /etc/resolv.conf")]
    NoUpstreams,
    /// An upstream is this resolver itself, which would loop.
    #[error("upstream {addr} is this resolver's own listen address: queries would loop")]
    UpstreamIsSelf {
        /// The address.
        addr: SocketAddr,
    },
    /// A socket towards an upstream could not be set up.
    #[error("cannot open a UDP socket towards upstream {upstream}: {source}")]
    UpstreamSocket {
        /// The upstream.
        upstream: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// resolv.conf could not be read.
    #[error("cannot read upstream resolvers from {}: {reason}", path.display())]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Why one forwarded query failed (answered with SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream answered in time.
    #[error("no upstream answered within {timeout:?}")]
    Timeout {
        /// The time allowed.
        timeout: Duration,
    },
    /// A socket error talking to an upstream.
    #[error("upstream {upstream}: {source}")]
    Io {
        /// The upstream.
        upstream: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// An upstream's TCP answer was not for our question.
    #[error("upstream {upstream} answered a different question")]
    Mismatch {
        /// The upstream.
        upstream: SocketAddr,
    },
    /// The forwarder is shutting down.
    #[error("forwarder to {upstream} closed")]
    Closed {
        /// The upstream.
        upstream: SocketAddr,
    },
    /// A lock was poisoned by a panic elsewhere.
    #[error("internal state poisoned by an earlier panic")]
    Poisoned,
    /// The packet is too short to forward.
    #[error("packet too short to forward")]
    Malformed,
}
