//! The far side of a mesh, built from stock parts, so `ferry proxy` is tested against the
//! peers it must interoperate with rather than against itself:
//!
//! - [`gateway_bootstrap`]: an Istio east-west gateway as stock Envoy renders it
//!   (protocols.md §5): a `tls_inspector` listener routing on SNI without terminating
//!   TLS, in AUTO_PASSTHROUGH form (`outbound_.<port>_._.<host>` plus an Istio ALPN) or
//!   PASSTHROUGH form (the bare hostname, any ALPN);
//! - [`inbound_bootstrap`]: stock Envoy as the server's Istio inbound sidecar (§3):
//!   filter chain on the Istio TCP ALPNs, client certificate required, SAN prefix
//!   `spiffe://<td>/`, certificate and roots over SDS from ferry's Workload API. Envoy has
//!   no metadata-exchange filter, so it advertises `h2`/`http/1.1` only and never
//!   negotiates `istio-peer-exchange`;
//! - [`HttpServer`] (plain HTTP/1.1) and [`MtlsServer`] (HTTP over rustls mTLS, the `Mtls`
//!   mode's server app), which record what they saw;
//! - rustls client helpers that speak as a SPIFFE workload ([`client_config`],
//!   [`tls_get`]);
//! - [`FerryZone`], [`ProxyCmd`] and [`Spawned`]: `ferry agent` and `ferry proxy` as child
//!   processes whose logs are kept for assertions (`ferry::access` lines).
//!
//! Every Envoy config writes one access-log line per connection to its stdout (the
//! [`crate::envoy::Envoy`] log), tagged [`GATEWAY_LOG_TAG`] or [`INBOUND_LOG_TAG`], with
//! `key=value` fields that [`access_lines`] and [`field`] pick apart.

mod envoy_peers;
mod ferry;
mod servers;
mod tls;

pub use envoy_peers::*;
pub use ferry::*;
pub use servers::*;
pub use tls::*;
