//! The outbound side: accept captured connections (or connections to a VIP listener),
//! decide their route, dial an endpoint with failover, then either splice the app's own
//! bytes (`Mtls` passthrough, non-federated destinations) or originate Istio mTLS with
//! metadata exchange (`IstioMtls`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use registry::config::GatewayAddress;
use registry::latest::Latest;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xds::client::model::{IstioTls, Upstream, XdsState};

use crate::accept;
use crate::access_log::{ConnLog, Direction};
use crate::copy::{self, CopyConfig};
use crate::identity;
use crate::mx_stream::MxStream;
use crate::orig_dst::{OrigDst, is_self};
use crate::route::{self, Decision};
use crate::shared::Shared;
use crate::splice;

/// The ALPN that turns on Istio's TCP metadata exchange.
pub const ISTIO_PEER_EXCHANGE: &[u8] = b"istio-peer-exchange";
/// Dial timeout for direct (non-cluster) destinations.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which kind of listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The capture listener: the destination comes from conntrack, and a connection whose
    /// destination is this listener itself is refused.
    Capture,
    /// A VIP listener bound with `--bind-vips`: the destination is its own address.
    Vip,
}

/// Accepts until `stop` fires; each connection runs in its own task (tracked by
/// `shared.tracker`) inside a span with its id.
pub async fn serve(
    listener: TcpListener,
    kind: ListenerKind,
    orig_dst: Arc<dyn OrigDst>,
    xds: watch::Receiver<Arc<XdsState>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    let mut state = Latest::new(xds);
    while let Some((stream, peer, permit)) = accept::next(
        &listener,
        Direction::Outbound,
        &shared.outbound_slots,
        &shared,
        &stop,
    )
    .await
    {
        let snapshot = state.current().clone();
        let (orig, s) = (orig_dst.clone(), shared.clone());
        accept::spawn(
            &shared,
            Direction::Outbound,
            peer,
            local,
            permit,
            move |log| {
                Box::pin(async move {
                    handle(stream, kind, local, orig.as_ref(), &snapshot, &s, log).await;
                })
            },
        );
    }
}

async fn handle(
    client: TcpStream,
    kind: ListenerKind,
    local: SocketAddr,
    orig: &dyn OrigDst,
    state: &XdsState,
    shared: &Shared,
    log: &mut ConnLog,
) {
    let metrics = &shared.metrics;
    let dst = match orig.original_dst(&client, local) {
        Ok(d) => d,
        Err(e) => {
            metrics.refuse("outbound", "not_captured");
            log.fail("not_captured", format!("no original destination ({e}): a direct connection to the proxy's capture port is refused"));
            return;
        }
    };
    log.dst = dst;
    if kind == ListenerKind::Capture && is_self(dst, local) {
        metrics.refuse("outbound", "loop");
        log.fail("loop", "the original destination is the proxy's own listener (a direct connection or a capture loop)");
        return;
    }
    let _ = client.set_nodelay(true);
    match route::decide(state, dst, shared.config.outbound_policy) {
        Decision::Refuse { reason, detail } => {
            metrics.refuse("outbound", reason);
            tracing::warn!(%dst, reason, %detail, "outbound connection refused");
            log.fail(reason, detail);
        }
        Decision::Direct { why, chain } => {
            log.cluster =
                Some(chain.map_or_else(|| format!("passthrough:{why}"), |c| c.cluster.clone()));
            let idle = chain.and_then(|c| c.idle_timeout);
            direct(client, dst, idle, shared, log).await;
        }
        Decision::Cluster { chain, upstream } => {
            log.cluster = Some(upstream.name.clone());
            let idle = chain
                .idle_timeout
                .unwrap_or(shared.config.limits.idle_timeout);
            via_cluster(client, upstream, idle, shared, log).await;
        }
    }
}

fn copy_config(shared: &Shared, idle: Duration) -> CopyConfig {
    CopyConfig {
        buffer_size: shared.config.limits.buffer_size,
        idle_timeout: Some(idle),
    }
}

/// Plain bytes to where the client was going.
async fn direct(
    mut client: TcpStream,
    dst: SocketAddr,
    idle: Option<Duration>,
    shared: &Shared,
    log: &mut ConnLog,
) {
    let mut upstream = match tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return log.fail("upstream_connect_failed", format!("connect {dst}: {e}")),
        Err(_) => {
            return log.fail(
                "upstream_connect_failed",
                format!("connect {dst}: timed out after {DIRECT_CONNECT_TIMEOUT:?}"),
            );
        }
    };
    let _ = upstream.set_nodelay(true);
    log.endpoint = Some(dst);
    let cfg = copy_config(shared, idle.unwrap_or(shared.config.limits.idle_timeout));
    let reason = splice::bidirectional(&mut client, &mut upstream, &cfg, &log.counts).await;
    log.closed(reason);
}

/// Dials the cluster's endpoints in the order the balancer gives (priority, then weight,
/// ejected endpoints last), reporting each outcome to outlier detection.
async fn dial(upstream: &Upstream, shared: &Shared, log: &mut ConnLog) -> Option<TcpStream> {
    let seed = log.id ^ (log.src.port() as u64) << 32;
    let mut last_error = String::from("the cluster has no endpoints");
    for ep in shared
        .outliers
        .attempt_order(&upstream.name, &upstream.endpoints, seed)
    {
        let addr = match &ep.address {
            GatewayAddress::Ip(ip) => SocketAddr::new(*ip, ep.port),
            GatewayAddress::Hostname(h) => match tokio::net::lookup_host((h.as_str(), ep.port))
                .await
                .map(|mut a| a.next())
            {
                Ok(Some(a)) => a,
                Ok(None) | Err(_) => {
                    last_error = format!("cannot resolve gateway {h}");
                    shared.metrics.connect_failures.inc();
                    shared.outliers.report(&upstream.name, ep, false);
                    continue;
                }
            },
        };
        match tokio::time::timeout(upstream.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                shared.outliers.report(&upstream.name, ep, true);
                let _ = s.set_nodelay(true);
                log.endpoint = Some(addr);
                return Some(s);
            }
            Ok(Err(e)) => last_error = format!("connect {addr}: {e}"),
            Err(_) => {
                last_error = format!(
                    "connect {addr}: timed out after {:?}",
                    upstream.connect_timeout
                )
            }
        }
        shared.metrics.connect_failures.inc();
        shared.outliers.report(&upstream.name, ep, false);
        tracing::warn!(cluster = %upstream.name, endpoint = %addr, error = %last_error, "gateway unreachable; trying the next endpoint");
    }
    log.fail("upstream_connect_failed", last_error);
    None
}

async fn via_cluster(
    mut client: TcpStream,
    upstream: &Upstream,
    idle: Duration,
    shared: &Shared,
    log: &mut ConnLog,
) {
    let Some(mut tcp) = dial(upstream, shared, log).await else {
        return;
    };
    let cfg = copy_config(shared, idle);
    let Some(tls) = &upstream.tls else {
        // Mtls (PASSTHROUGH gateway): the app's own TLS bytes, untouched.
        let reason = splice::bidirectional(&mut client, &mut tcp, &cfg, &log.counts).await;
        log.closed(reason);
        return;
    };
    istio_mtls(client, tcp, tls, &cfg, shared, log).await;
}

async fn istio_mtls(
    mut client: TcpStream,
    tcp: TcpStream,
    tls: &IstioTls,
    cfg: &CopyConfig,
    shared: &Shared,
    log: &mut ConnLog,
) {
    let metrics = &shared.metrics;
    let config = match shared.identity.client_config(tls) {
        Ok(c) => c,
        Err(e) => {
            metrics.handshake("outbound", "no_identity");
            return log.fail("no_identity", e);
        }
    };
    let name = match ServerName::try_from(tls.sni.clone()) {
        Ok(n) => n,
        Err(_) => match log.endpoint {
            Some(ep) => ServerName::IpAddress(ep.ip().into()),
            None => {
                return log.fail(
                    "bad_sni",
                    format!("SNI {:?} is not a valid server name", tls.sni),
                );
            }
        },
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake = tokio::time::timeout(
        shared.config.limits.handshake_timeout,
        connector.connect(name, tcp),
    )
    .await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.handshake("outbound", "failed");
            tracing::warn!(endpoint = ?log.endpoint, sni = %tls.sni, error = %e, "TLS handshake with the gateway failed");
            return log.fail("handshake_failed", e);
        }
        Err(_) => {
            metrics.handshake("outbound", "timeout");
            return log.fail(
                "handshake_timeout",
                format!(
                    "no TLS handshake within {:?}",
                    shared.config.limits.handshake_timeout
                ),
            );
        }
    };
    metrics.handshake("outbound", "ok");
    let (_, conn) = stream.get_ref();
    log.peer_id = conn.peer_certificates().and_then(identity::peer_spiffe_id);
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    log.alpn = alpn
        .as_deref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    if alpn.as_deref() != Some(ISTIO_PEER_EXCHANGE) {
        metrics.mx("outbound", "not_negotiated");
        let mut stream = stream;
        let reason = copy::bidirectional(&mut client, &mut stream, cfg, &log.counts).await;
        log.closed(reason);
        return;
    }
    let mut mx = MxStream::client(stream, shared.own_frame(), shared.config.limits.mx_timeout);
    if let Err(e) = mx.send_own().await {
        metrics.mx("outbound", "failed");
        return log.fail(
            "mx_failed",
            format!("sending ferry's metadata-exchange frame: {e}"),
        );
    }
    let reason = copy::bidirectional(&mut client, &mut mx, cfg, &log.counts).await;
    log.closed(reason);
    log.record_mx(mx.outcome(), &shared.metrics);
}
