//! The SPIFFE Workload API and Envoy SDS for ferry, on one socket.
//!
//! A caller is attested from the kernel's peer credentials (`SO_PEERCRED`: pid, uid, gid)
//! and `/proc/<pid>/exe`, and gets exactly the SPIFFE IDs whose registration entries it
//! matches; X.509-SVIDs come from the [`attest`] CA and rotate at half-life. Streams carry
//! the full state on every change (SVID rotation, CA rotation, registration change,
//! federated bundle file change).
//!
//! Socket: `listen.workloadApi`, `unix:///path` or `tcp://ip:port`. The socket is created
//! 0666 (every local process may ask; attestation decides what it gets), so put it in a
//! directory whose own permissions say who may reach it (e.g. `/run/ferry`, mounted into
//! pods as `/spiffe-workload-api`). A leftover socket file is replaced only when nothing
//! accepts connections on it.
//!
//! Modules: [`endpoint`] (listener and peer credentials), [`attestor`] (selectors),
//! [`state`] (snapshot and SVID cache), [`core`] (shared logic), [`workload`]
//! (`SpiffeWorkloadAPI`), [`sds`] (Envoy SDS), [`server`] (wiring).

#![forbid(unsafe_code)]

pub mod accept;
pub mod attestor;
pub mod authority_shim;
pub mod core;
pub mod endpoint;
pub mod error;
pub mod hpack;
pub mod limits;
pub mod peer;
pub mod sds;
pub mod server;
pub mod state;
pub mod workload;

/// The Workload API messages and gRPC stubs generated from `proto/workload.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

pub use error::Error;
pub use server::WorkloadApiServer;
pub use workload::SECURITY_HEADER;
