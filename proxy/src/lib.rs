//! ferry's sidecar data plane.
//!
//! A plain workload's connections reach the proxy through capture rules (or through the
//! VIP listeners it binds itself with `--bind-vips`). For each one it reads the original
//! destination, finds the route in the standard Envoy resources it follows over ADS
//! (`outbound` listener filter chains -> cluster -> endpoints), and either forwards the
//! application's own TLS untouched (`Mtls` services, PASSTHROUGH gateways) or originates
//! mTLS as an Istio peer (`IstioMtls`: Istio SNI and ALPN, the workload's X.509-SVID from
//! the Workload API, SPIFFE verification of the server, TCP metadata exchange). It can also
//! sit in front of a server as an Istio-compatible inbound sidecar.
//!
//! The crate has no `unsafe`: `SO_ORIGINAL_DST` comes through socket2 and `splice(2)`
//! through nix, both safe wrappers.

#![forbid(unsafe_code)]

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod copy;
pub mod gateway;
pub mod identity;
pub mod inbound;
pub mod metadata;
pub mod metrics;
pub mod mx;
pub mod mx_stream;
pub mod orig_dst;
pub mod outbound;
pub mod recycle;
pub mod route;
pub mod run;
pub mod shared;
pub mod splice;
pub mod verify;
pub mod vips;

pub use config::{InboundConfig, Limits, OutboundPolicy, ProxyConfig};
pub use run::{Proxy, StartError, XdsFeed};
pub use shared::Shared;
