//! What one `ferry proxy` runs: listeners, policies and limits. Filled by the binary from
//! its flags; serialized into `/config_dump` and the start-up log so an operator sees
//! exactly what runs.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// What happens to a captured connection whose destination is not a federated service
/// and not on loopback (Istio's `outboundTrafficPolicy.mode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundPolicy {
    /// Forward it to where it was going.
    #[default]
    AllowAny,
    /// Refuse it.
    RegistryOnly,
}

/// The inbound (server-side) sidecar: terminate Istio mTLS, forward plaintext to the app.
#[derive(Debug, Clone, Serialize)]
pub struct InboundConfig {
    /// Where Istio peers connect (`0.0.0.0:15006`).
    pub listen: SocketAddr,
    /// The application's plaintext address.
    pub app: SocketAddr,
}

/// Timeouts and limits of the data path.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// TLS handshake (either side).
    pub handshake_timeout: Duration,
    /// Reading the peer's metadata-exchange frame.
    pub mx_timeout: Duration,
    /// A connection with no bytes either way for this long is closed (a route's
    /// `tcp_proxy.idle_timeout` wins).
    pub idle_timeout: Duration,
    /// Dialling the app on the inbound side.
    pub app_connect_timeout: Duration,
    /// Connections open at once per listener kind; more are closed at accept.
    pub max_connections: usize,
    /// Copy buffer per direction.
    pub buffer_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            mx_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            app_connect_timeout: Duration::from_secs(5),
            max_connections: 32 * 1024,
            buffer_size: 64 * 1024,
        }
    }
}

/// Everything `Proxy::start` needs besides its collaborators (xDS client, identity).
#[derive(Debug, Clone, Serialize)]
pub struct ProxyConfig {
    /// The capture listener (`0.0.0.0:10000`); `None` = no capture listener.
    pub outbound: Option<SocketAddr>,
    /// Bind every federated `VIP:port` from LDS as its own listener.
    pub bind_vips: bool,
    /// The inbound sidecar, if any.
    pub inbound: Option<InboundConfig>,
    /// The DNS listener (`127.0.0.1:15053`); `None` = no DNS.
    pub dns: Option<SocketAddr>,
    /// Where DNS names that are not federated go.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Search suffixes for federated-name lookups (from resolv.conf).
    pub dns_search: Vec<String>,
    /// The admin endpoint (`127.0.0.1:9901`); `None` = none.
    pub admin: Option<SocketAddr>,
    /// Non-federated, non-loopback destinations.
    pub outbound_policy: OutboundPolicy,
    /// How long open connections may finish after SIGTERM.
    pub drain_time: Duration,
    /// Timeouts and limits.
    pub limits: Limits,
}

impl ProxyConfig {
    /// The Cofide sidecar defaults: outbound `0.0.0.0:10000`, DNS `127.0.0.1:15053`, admin
    /// `127.0.0.1:9901`, no inbound, drain 5 s.
    pub fn cofide_defaults() -> Self {
        ProxyConfig {
            outbound: Some(SocketAddr::from(([0, 0, 0, 0], 10000))),
            bind_vips: false,
            inbound: None,
            dns: Some(SocketAddr::from(([127, 0, 0, 1], 15053))),
            dns_upstreams: Vec::new(),
            dns_search: Vec::new(),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            outbound_policy: OutboundPolicy::AllowAny,
            drain_time: Duration::from_secs(5),
            limits: Limits::default(),
        }
    }
}
