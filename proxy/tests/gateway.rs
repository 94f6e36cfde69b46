//! `ferry gateway`'s refusals on real sockets: unknown SNI, AUTO_PASSTHROUGH without an
//! Istio ALPN, no SNI, plaintext, and a ClientHello that never completes; the backend
//! never sees a byte of any of them. The routed cases (with ferry's proxies on both
//! sides) are in `ferry/tests/proxy_envoy.rs`, shared with stock Envoy as the gateway.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy::gateway::{self, GatewayLimits, GatewayMetrics, GatewayRoute, RouteTable};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const AUTO: &str = "outbound_.8443_._.server.demo.local.domain";
const PASS: &str = "mtls.demo.local.domain";

fn hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(sni.to_owned()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

struct Gw {
    addr: SocketAddr,
    metrics: Arc<GatewayMetrics>,
    backend_hits: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
    _routes: tokio::sync::watch::Sender<Arc<RouteTable>>,
}

async fn start() -> Gw {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.write_all(b"backend").await;
        }
    });
    let routes = HashMap::from([
        (
            AUTO.to_owned(),
            GatewayRoute {
                backend: backend_addr.to_string(),
                istio_alpn_required: true,
            },
        ),
        (
            PASS.to_owned(),
            GatewayRoute {
                backend: backend_addr.to_string(),
                istio_alpn_required: false,
            },
        ),
    ]);
    let (routes_tx, rx) = tokio::sync::watch::channel(Arc::new(RouteTable { routes }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(GatewayMetrics::default());
    let stop = CancellationToken::new();
    let limits = GatewayLimits {
        hello_timeout: Duration::from_millis(300),
        ..GatewayLimits::default()
    };
    tokio::spawn(gateway::serve(
        listener,
        rx,
        metrics.clone(),
        limits,
        stop.clone(),
        Duration::ZERO,
    ));
    Gw {
        addr,
        metrics,
        backend_hits: hits,
        stop,
        _routes: routes_tx,
    }
}

/// Sends `bytes` and returns what comes back before the gateway closes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the gateway answers or closes in time")
        .unwrap_or_default();
    out
}

fn count(m: &GatewayMetrics, reason: &'static str) -> u64 {
    m.connections
        .get_or_create(&gateway::Reason { reason })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_what_istio_routes_and_refuses_the_rest() {
    let gw = start().await;
    // AUTO_PASSTHROUGH with an Istio ALPN, and PASSTHROUGH with any ALPN: routed.
    assert_eq!(
        exchange(gw.addr, &hello(AUTO, &["istio-peer-exchange", "istio"])).await,
        b"backend"
    );
    assert_eq!(
        exchange(gw.addr, &hello(PASS, &["http/1.1"])).await,
        b"backend"
    );
    // Refused: the right SNI without an Istio ALPN, an unknown SNI, no SNI, plaintext, and
    // a ClientHello that never completes.
    assert!(
        exchange(gw.addr, &hello(AUTO, &["h2", "http/1.1"]))
            .await
            .is_empty()
    );
    assert!(
        exchange(gw.addr, &hello("other.demo.local.domain", &["istio"]))
            .await
            .is_empty()
    );
    assert!(
        exchange(gw.addr, &hello("127.0.0.1", &["istio"]))
            .await
            .is_empty()
    );
    assert!(
        exchange(gw.addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .is_empty()
    );
    let partial = hello(AUTO, &["istio"]);
    assert!(exchange(gw.addr, &partial[..20]).await.is_empty());

    assert_eq!(gw.backend_hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(count(&gw.metrics, "routed"), 2);
    assert_eq!(count(&gw.metrics, "no_istio_alpn"), 1);
    assert_eq!(count(&gw.metrics, "unknown_sni"), 1);
    assert_eq!(count(&gw.metrics, "no_sni"), 1);
    assert_eq!(count(&gw.metrics, "not_tls"), 1);
    assert_eq!(count(&gw.metrics, "hello_timeout"), 1);
    gw.stop.cancel();
}
