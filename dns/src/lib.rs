//! ferry's local DNS resolver. Federated hostnames (learned from the control plane) are
//! answered with their loopback VIPs; every other name is forwarded to the upstream
//! resolvers. The decision for one packet ([`answer::decide`]) is pure code and fuzzed;
//! the sockets live in [`server`].
//!
//! The protocol is hickory-proto's; the I/O loops are ferry's own rather than
//! hickory-server's, because the resolver must drop (and count) malformed packets rather
//! than answer them, relay upstream answers byte for byte (EDNS0 intact), and answer local
//! names from the receive loop without a task per query.
#![forbid(unsafe_code)]

pub mod answer;
mod error;
pub mod forward;
pub mod metrics;
pub mod server;
pub mod table;

pub use error::{DnsError, ForwardError};
pub use server::{Resolver, ResolverConfig};
pub use table::{DnsTable, follow};
