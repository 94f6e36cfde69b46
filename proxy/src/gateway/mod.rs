//! `ferry gateway`: a lightweight SNI router with Istio gateway semantics, for the server
//! side of a federation. It never terminates TLS: it reads the ClientHello, picks the
//! route, writes the bytes it read to the backend and splices the rest.
//!
//! Routes (from the server zone's FederatedService documents, [`RouteTable::from_config`]):
//! - `IstioMtls` -> AUTO_PASSTHROUGH: SNI `outbound_.<port>_._.<hostname>`, and the client
//!   must offer an Istio ALPN (`istio`, `istio-peer-exchange`, `istio-http/*`, `istio-h2`),
//!   as Istio's east-west gateway requires (protocols.md section 5);
//! - `Mtls` -> PASSTHROUGH: SNI = the hostname, any ALPN.
//!
//! An unknown SNI, a missing Istio ALPN where one is required, a ClientHello that does not
//! parse, or one not complete within the handshake timeout: closed, counted and logged.

pub mod client_hello;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use registry::config::{Config, TlsMode};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::copy::{CopyConfig, Transferred};
use client_hello::{HelloError, MAX_HELLO, Parsed};

/// The ALPN values by which Istio's gateway recognises a mesh client.
pub const ISTIO_ALPNS: [&[u8]; 5] = [
    b"istio",
    b"istio-peer-exchange",
    b"istio-http/1.0",
    b"istio-http/1.1",
    b"istio-h2",
];

/// Where one SNI goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayRoute {
    /// `host:port` of the backend (the server's sidecar or the server itself).
    pub backend: String,
    /// AUTO_PASSTHROUGH: the client must offer an Istio ALPN.
    pub istio_alpn_required: bool,
}

/// SNI (lowercase) -> route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// The routes.
    pub routes: HashMap<String, GatewayRoute>,
}

impl RouteTable {
    /// The routes for every FederatedService the zone serves (its server trust domain is
    /// the zone's own). The backend is `backends[hostname]` when given, else Kubernetes'
    /// `<name>.<namespace>.svc.cluster.local:<port>`.
    pub fn from_config(config: &Config, backends: &HashMap<String, String>) -> Self {
        let own = &config.agent.trust_domain;
        let routes = config
            .services
            .iter()
            .filter(|s| &s.server_trust_domain == own)
            .map(|s| {
                let backend = backends
                    .get(s.hostname.as_str())
                    .cloned()
                    .unwrap_or_else(|| {
                        format!("{}.{}.svc.cluster.local:{}", s.name, s.namespace, s.port)
                    });
                match s.tls_mode {
                    TlsMode::IstioMtls => (
                        s.istio_sni(),
                        GatewayRoute {
                            backend,
                            istio_alpn_required: true,
                        },
                    ),
                    TlsMode::Mtls => (
                        s.hostname.to_string(),
                        GatewayRoute {
                            backend,
                            istio_alpn_required: false,
                        },
                    ),
                }
            })
            .collect();
        RouteTable { routes }
    }

    /// The route for a ClientHello, or why there is none.
    pub fn route(&self, sni: Option<&str>, alpn: &[&[u8]]) -> Result<&GatewayRoute, Refusal> {
        let sni = sni.ok_or(Refusal::NoSni)?;
        let route = self
            .routes
            .get(sni)
            .or_else(|| self.routes.get(&sni.to_ascii_lowercase()))
            .ok_or(Refusal::UnknownSni)?;
        if route.istio_alpn_required && !alpn.iter().any(|p| ISTIO_ALPNS.contains(p)) {
            return Err(Refusal::NoIstioAlpn);
        }
        Ok(route)
    }
}

/// Why a connection was closed without a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The ClientHello carries no server_name.
    NoSni,
    /// No route for the SNI.
    UnknownSni,
    /// AUTO_PASSTHROUGH route, but no Istio ALPN offered.
    NoIstioAlpn,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoSni => "no_sni",
            Refusal::UnknownSni => "unknown_sni",
            Refusal::NoIstioAlpn => "no_istio_alpn",
        }
    }
}

/// Labels of the gateway's close counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// `routed` or why not.
    pub reason: &'static str,
}

/// The gateway's counters (`ferry_gateway_*`).
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    /// Connections by outcome: `routed`, `unknown_sni`, `no_istio_alpn`, `no_sni`,
    /// `not_tls`, `bad_client_hello`, `hello_timeout`, `backend_unreachable`, `limit`.
    pub connections: Family<Reason, Counter>,
    /// Bytes spliced client -> backend.
    pub bytes_in: Counter,
    /// Bytes spliced backend -> client.
    pub bytes_out: Counter,
}

impl GatewayMetrics {
    /// Registers under `ferry_gateway_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ferry_gateway");
        r.register(
            "connections",
            "Connections by outcome",
            self.connections.clone(),
        );
        r.register("bytes_in", "Bytes client -> backend", self.bytes_in.clone());
        r.register(
            "bytes_out",
            "Bytes backend -> client",
            self.bytes_out.clone(),
        );
    }

    fn count(&self, reason: &'static str) {
        self.connections.get_or_create(&Reason { reason }).inc();
    }
}

/// Timeouts and limits of the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayLimits {
    /// The whole ClientHello must arrive within this.
    pub hello_timeout: Duration,
    /// Dialling a backend.
    pub connect_timeout: Duration,
    /// Idle connections are closed after this.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 32 * 1024,
        }
    }
}

/// Serves until `stop` fires, then waits for open connections up to `drain`.
pub async fn serve(
    listener: TcpListener,
    routes: watch::Receiver<Arc<RouteTable>>,
    metrics: Arc<GatewayMetrics>,
    limits: GatewayLimits,
    stop: CancellationToken,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let limits = Arc::new(limits);
    let mut id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.count("limit");
            continue;
        };
        id += 1;
        let table = routes.borrow().clone();
        let (m, l) = (metrics.clone(), limits.clone());
        tracker.spawn(
            async move {
                let _permit = permit;
                handle(stream, peer, &table, &m, &l).await;
            }
            .instrument(tracing::info_span!("gateway", conn = id, src = %peer)),
        );
    }
    tracker.close();
    let _ = tokio::time::timeout(drain, tracker.wait()).await;
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    table: &RouteTable,
    metrics: &GatewayMetrics,
    limits: &GatewayLimits,
) {
    let start = Instant::now();
    let mut buf = Vec::with_capacity(2048);
    let mut scratch = Vec::new();
    let deadline = tokio::time::Instant::now() + limits.hello_timeout;
    let (route, sni) = loop {
        match client_hello::parse(&buf, &mut scratch) {
            Ok(Parsed::Hello(hello)) => match table.route(hello.sni, &hello.alpn) {
                Ok(r) => break (r, hello.sni.unwrap_or_default().to_owned()),
                Err(refusal) => {
                    metrics.count(refusal.as_str());
                    tracing::warn!(target: "ferry::access", %peer, sni = hello.sni.unwrap_or("-"),
                        alpn = ?hello.alpn.iter().map(|a| String::from_utf8_lossy(a)).collect::<Vec<_>>(),
                        reason = refusal.as_str(), "gateway refused connection");
                    return;
                }
            },
            Ok(Parsed::NeedMore) => {}
            Err(e) => {
                let reason = match e {
                    HelloError::NotTls(_) => "not_tls",
                    _ => "bad_client_hello",
                };
                metrics.count(reason);
                tracing::warn!(target: "ferry::access", %peer, error = %e, reason, "gateway refused connection");
                return;
            }
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(MAX_HELLO));
        }
        let read = tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                metrics.count("bad_client_hello");
                return;
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                metrics.count("hello_timeout");
                tracing::warn!(target: "ferry::access", %peer, reason = "hello_timeout", "no complete ClientHello in time");
                return;
            }
        }
    };
    let backend = match tokio::time::timeout(
        limits.connect_timeout,
        TcpStream::connect(route.backend.as_str()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.count("backend_unreachable");
            tracing::warn!(target: "ferry::access", %peer, %sni, backend = %route.backend, error = %e, reason = "backend_unreachable", "gateway refused connection");
            return;
        }
        Err(_) => {
            metrics.count("backend_unreachable");
            tracing::warn!(target: "ferry::access", %peer, %sni, backend = %route.backend, reason = "backend_unreachable", "backend connect timed out");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let mut backend = backend;
    if backend.write_all(&buf).await.is_err() {
        metrics.count("backend_unreachable");
        return;
    }
    let hello_len = buf.len() as u64;
    drop(buf);
    metrics.count("routed");
    let counts = Transferred::default();
    let cfg = CopyConfig {
        idle_timeout: Some(limits.idle_timeout),
        ..CopyConfig::default()
    };
    let reason = crate::splice::bidirectional(&mut client, &mut backend, &cfg, &counts).await;
    let (up, down) = counts.snapshot();
    let up = up + hello_len;
    metrics.bytes_in.inc_by(up);
    metrics.bytes_out.inc_by(down);
    tracing::info!(target: "ferry::access", %peer, %sni, backend = %route.backend,
        bytes_in = up, bytes_out = down, duration_ms = start.elapsed().as_millis() as u64,
        reason = ?reason, "gateway connection closed");
}
