//! The inbound side: an Istio-compatible server sidecar in front of a plaintext app.
//!
//! Peers (Istio sidecars, ferry, stock Envoy) connect with mTLS; the client certificate
//! must chain to the own or a federated bundle (STRICT: plaintext is refused). The server
//! advertises Istio's ALPN list for TCP filter chains, `["istio-peer-exchange", "h2",
//! "http/1.1"]` (protocols.md section 3). rustls refuses a handshake whose offered ALPN has
//! nothing in common with ours, where Envoy simply negotiates none; to accept any TLS
//! client as an Istio STRICT port does, the ClientHello is read first and a client with no
//! overlap gets a configuration without ALPN. When `istio-peer-exchange` is negotiated the
//! peer's metadata frame is read and stripped before the app sees a byte.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::accept;
use crate::access_log::{ConnLog, Direction};
use crate::config::InboundConfig;
use crate::copy::{self, CopyConfig};
use crate::identity;
use crate::mx_stream::MxStream;
use crate::outbound::ISTIO_PEER_EXCHANGE;
use crate::shared::Shared;

/// What the inbound advertises on TCP chains (Istio's server list).
pub const SERVER_ALPN: [&[u8]; 3] = [b"istio-peer-exchange", b"h2", b"http/1.1"];

/// Accepts until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    inbound: InboundConfig,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    while let Some((stream, peer, permit)) = accept::next(
        &listener,
        Direction::Inbound,
        &shared.inbound_slots,
        &shared,
        &stop,
    )
    .await
    {
        let (app, s) = (inbound.app, shared.clone());
        accept::spawn(
            &shared,
            Direction::Inbound,
            peer,
            local,
            permit,
            move |log| Box::pin(async move { handle(stream, app, &s, log).await }),
        );
    }
}

async fn handle(tcp: TcpStream, app: SocketAddr, shared: &Shared, log: &mut ConnLog) {
    let metrics = &shared.metrics;
    let limits = &shared.config.limits;
    let _ = tcp.set_nodelay(true);
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = match tokio::time::timeout(limits.handshake_timeout, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.refuse("inbound", "plaintext");
            tracing::warn!(src = %log.src, error = %e, "not a TLS ClientHello: plaintext is refused (the inbound is STRICT mTLS)");
            return log.fail("plaintext", e);
        }
        Err(_) => {
            metrics.handshake("inbound", "timeout");
            return log.fail(
                "handshake_timeout",
                format!("no ClientHello within {:?}", limits.handshake_timeout),
            );
        }
    };
    let overlap = start
        .client_hello()
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| SERVER_ALPN.contains(&p)));
    let alpn: &[&[u8]] = if overlap { &SERVER_ALPN } else { &[] };
    let config = match shared.identity.server_config(alpn) {
        Ok(c) => c,
        Err(e) => {
            metrics.handshake("inbound", "no_identity");
            return log.fail("no_identity", e);
        }
    };
    let stream =
        match tokio::time::timeout(limits.handshake_timeout, start.into_stream(config)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                metrics.handshake("inbound", "failed");
                tracing::warn!(src = %log.src, error = %e, "inbound TLS handshake failed");
                return log.fail("handshake_failed", e);
            }
            Err(_) => {
                metrics.handshake("inbound", "timeout");
                return log.fail(
                    "handshake_timeout",
                    format!("no TLS handshake within {:?}", limits.handshake_timeout),
                );
            }
        };
    metrics.handshake("inbound", "ok");
    let (_, conn) = stream.get_ref();
    log.peer_id = conn.peer_certificates().and_then(identity::peer_spiffe_id);
    let negotiated = conn.alpn_protocol().map(<[u8]>::to_vec);
    log.alpn = negotiated
        .as_deref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    tracing::info!(
        peer_id = log.peer_id.as_deref().unwrap_or("-"),
        alpn = log.alpn.as_deref().unwrap_or("-"),
        "inbound mTLS accepted"
    );

    let mut upstream =
        match tokio::time::timeout(limits.app_connect_timeout, TcpStream::connect(app)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return log.fail("app_connect_failed", format!("connect {app}: {e}")),
            Err(_) => return log.fail("app_connect_failed", format!("connect {app}: timed out")),
        };
    let _ = upstream.set_nodelay(true);
    log.endpoint = Some(app);
    log.cluster = Some("inbound".to_owned());
    let cfg = CopyConfig {
        buffer_size: limits.buffer_size,
        idle_timeout: Some(limits.idle_timeout),
    };
    if negotiated.as_deref() == Some(ISTIO_PEER_EXCHANGE) {
        let mut mx = MxStream::server(stream, shared.own_frame(), limits.mx_timeout);
        // Inbound: "client" is the remote peer, "upstream" is the app.
        let reason = copy::bidirectional(&mut mx, &mut upstream, &cfg, &log.counts).await;
        log.closed(reason);
        log.record_mx(mx.outcome(), metrics);
    } else {
        metrics.mx("inbound", "not_negotiated");
        let mut stream = stream;
        let reason = copy::bidirectional(&mut stream, &mut upstream, &cfg, &log.counts).await;
        log.closed(reason);
    }
}
