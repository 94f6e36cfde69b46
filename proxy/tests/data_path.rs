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
    service_via(
        name,
        port,
        tls_mode,
        &[("istio-eastwestgateway", gateway_port)],
        path,
    )
}

/// [`service`] with several gateways on 127.0.0.1: (type, port).
fn service_via(
    name: &str,
    port: u16,
    tls_mode: &str,
    gateways: &[(&str, u16)],
    path: &str,
) -> String {
    let mut gw = String::new();
    for (kind, p) in gateways {
        gw.push_str(&format!(
            "    - type: {kind}\n      port: {p}\n      ip: 127.0.0.1\n"
        ));
    }
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations:\n    ferry.dev/trust-domain: {TD}\nspec:\n  name: {name}\n  namespace: demo\n  port: {port}\n  exportedTrustDomains: [{TD}]\n  spiffeIDPaths: [{path}]\n  tlsMode: {tls_mode}\n  gateways:\n{gw}"
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

struct Mesh {
    _dir: testkit::TempDir,
    xds: Option<testkit::xds_agent::Agent>,
    yaml: String,
    _wl: testkit::workload::Agent,
    client: AdsClient,
    client_identity: Identity,
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
async fn mesh(
    name: &'static str,
    svid_ttl: &'static str,
    capture: Option<Arc<dyn OrigDst>>,
) -> Mesh {
    mesh_with(Opts {
        name,
        svid_ttl,
        capture,
        ..Opts::default()
    })
    .await
}

/// How a test's mesh differs from the default.
#[derive(Default)]
struct Opts {
    name: &'static str,
    svid_ttl: &'static str,
    capture: Option<Arc<dyn OrigDst>>,
    /// The server SPIFFE ID path the cluster expects [default: the server's own].
    expect_path: Option<&'static str>,
    /// The app echoes (after a tag) instead of answering HTTP.
    echo: bool,
    /// A preferred (east-west) gateway that refuses connections, before the real one
    /// (listed as an ingress gateway, priority 1).
    dead_first: bool,
}

async fn mesh_with(o: Opts) -> Mesh {
    let Opts {
        name,
        svid_ttl,
        capture,
        expect_path,
        echo,
        dead_first,
    } = o;
    let dir = testkit::tempdir().unwrap();
    let inbound_port = testkit::free_port();
    let app_addr = if echo {
        testkit::xds_agent::echo_server(([127, 0, 0, 1], 0).into(), "echo\n").await
    } else {
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = app.local_addr().unwrap();
        http_server(app, name);
        a
    };
    let me = std::env::current_exe().unwrap();
    let uid = testkit::workload::my_uid();
    let yaml = AgentDoc::in_dir(TD, dir.path())
        .ca("svidTtl", svid_ttl)
        .entry(&Entry::new(CLIENT_ID, [format!("unix:uid:{uid}")]).hint("client"))
        .entry(
            &Entry::new(
                &server_id(name),
                [
                    format!("unix:uid:{uid}"),
                    format!("unix:path:{}", me.display()),
                ],
            )
            .hint("server"),
        )
        .render()
        + &service_via(
            name,
            8443,
            "IstioMtls",
            &if dead_first {
                vec![
                    ("istio-eastwestgateway", testkit::free_port()),
                    ("istio-ingressgateway", inbound_port),
                ]
            } else {
                vec![("istio-eastwestgateway", inbound_port)]
            },
            &expect_path.map_or_else(|| format!("/ns/demo/sa/{name}"), str::to_owned),
        );
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
    let inbound = start_proxy(
        icfg,
        identity(&socket, "server").await,
        None,
        Arc::new(Conntrack),
    )
    .await;

    let mut ocfg = base_config();
    ocfg.bind_vips = true;
    if capture.is_some() {
        ocfg.outbound = Some(([127, 0, 0, 1], 0).into());
    }
    let client_identity = identity(&socket, "client").await;
    let outbound = start_proxy(
        ocfg,
        client_identity.clone(),
        Some(feed),
        capture.unwrap_or_else(|| Arc::new(Conntrack)),
    )
    .await;
    Mesh {
        _dir: dir,
        xds: Some(xds),
        yaml,
        _wl: wl,
        client,
        client_identity,
        outbound,
        inbound,
        stop,
    }
}

impl Mesh {
    fn vip(&self, name: &str) -> SocketAddr {
        let host = format!("{name}.demo.{TD}");
        let ip = self
            .client
            .state()
            .resolve(&host)
            .expect("the DNS table names the service");
        SocketAddr::from((ip, 8443))
    }

    async fn wait_vip(&self, name: &str) -> SocketAddr {
        let vip = self.vip(name);
        testkit::wait_for_port(vip, Duration::from_secs(10))
            .await
            .expect("the VIP listener is bound");
        vip
    }

    /// The serial of the SVID the outbound presents now.
    fn outbound_serial(&self) -> String {
        let svid = self.client_identity.source().svid().expect("svid");
        let der = svid.leaf().as_bytes().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        cert.raw_serial_as_string()
    }

    async fn metrics(&self, proxy: &Proxy) -> String {
        let admin = proxy.admin.expect("admin");
        testkit::http::get(admin, "/stats/prometheus")
            .await
            .unwrap()
            .body
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
    assert!(
        metric(
            &out,
            "ferry_proxy_metadata_exchange_total{direction=\"outbound\",reason=\"exchanged\"}"
        ) >= 1,
        "{out}"
    );
    assert!(
        metric(
            &out,
            "ferry_proxy_tls_handshakes_total{direction=\"outbound\",reason=\"ok\"}"
        ) >= 1,
        "{out}"
    );
    m.stop().await;
}

/// Reads until `want` has arrived (or fails after 10 s).
async fn expect_bytes(s: &mut TcpStream, want: &[u8]) {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < want.len() {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("bytes in time")
            .expect("read");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&got));
}

/// One echo round on an open connection through the mesh.
async fn echo_round(s: &mut TcpStream, msg: &str) {
    s.write_all(msg.as_bytes()).await.unwrap();
    expect_bytes(s, msg.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_unexpected_spiffe_id_is_refused() {
    // The cluster expects /ns/demo/sa/someone-else; the inbound presents /ns/demo/sa/beta.
    let m = mesh_with(Opts {
        name: "beta",
        svid_ttl: "1h",
        expect_path: Some("/ns/demo/sa/someone-else"),
        ..Opts::default()
    })
    .await;
    let vip = m.wait_vip("beta").await;
    let resp = get(vip).await.unwrap_or_default();
    assert!(resp.is_empty(), "no bytes may reach the client: {resp}");
    let out = m.metrics(&m.outbound).await;
    assert!(
        metric(
            &out,
            "ferry_proxy_tls_handshakes_total{direction=\"outbound\",reason=\"failed\"}"
        ) >= 1,
        "{out}"
    );
    assert!(
        metric(
            &out,
            "ferry_proxy_connections_closed_total{direction=\"outbound\",reason=\"handshake_failed\"}"
        ) >= 1,
        "{out}"
    );
    m.stop().await;
}

/// The capture listener's destination, as conntrack would report it; `None` reports the
/// listener itself (a capture loop).
#[derive(Debug, Default)]
struct SwitchDst(std::sync::Mutex<Option<SocketAddr>>);

impl OrigDst for SwitchDst {
    fn original_dst(&self, _: &TcpStream, listener: SocketAddr) -> std::io::Result<SocketAddr> {
        Ok(self.0.lock().unwrap().unwrap_or(listener))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_services_pass_through_and_the_proxys_own_port_is_refused() {
    let dst = Arc::new(SwitchDst::default());
    let m = mesh("gamma", "1h", Some(dst.clone())).await;
    let capture = m.outbound.outbound.expect("capture listener");

    // A non-federated loopback service (say the pod's redis) still works through capture.
    let redis = testkit::xds_agent::echo_server(([127, 0, 0, 1], 0).into(), "redis\n").await;
    *dst.0.lock().unwrap() = Some(redis);
    let mut s = TcpStream::connect(capture).await.unwrap();
    expect_bytes(&mut s, b"redis\n").await;
    echo_round(&mut s, "PING\r\n").await;
    drop(s);

    // The original destination is the proxy's own listener: refused, never relayed.
    *dst.0.lock().unwrap() = None;
    let mut s = TcpStream::connect(capture).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a loop must be closed");
    let out = m.metrics(&m.outbound).await;
    assert_eq!(
        metric(
            &out,
            "ferry_proxy_connections_refused_total{direction=\"outbound\",reason=\"loop\"}"
        ),
        1,
        "{out}"
    );
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_connection_to_the_capture_port_is_refused() {
    // Real conntrack: a connection that was not redirected has no original destination.
    let m = mesh("delta", "1h", Some(Arc::new(Conntrack))).await;
    let capture = m.outbound.outbound.expect("capture listener");
    let mut s = TcpStream::connect(capture).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let out = m.metrics(&m.outbound).await;
    assert_eq!(
        metric(
            &out,
            "ferry_proxy_connections_refused_total{direction=\"outbound\",reason=\"not_captured\"}"
        ),
        1,
        "{out}"
    );
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outlives_three_svid_rotations_and_new_ones_use_the_new_svid() {
    let m = mesh_with(Opts {
        name: "epsilon",
        svid_ttl: "4s",
        echo: true,
        ..Opts::default()
    })
    .await;
    let vip = m.wait_vip("epsilon").await;
    let mut long = TcpStream::connect(vip).await.unwrap();
    expect_bytes(&mut long, b"echo\n").await;
    let first = m.outbound_serial();
    let mut serials = vec![first.clone()];
    // A 4 s SVID rotates at half-life: three rotations within ~8 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while serials.len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        echo_round(&mut long, "still here\n").await;
        let now = m.outbound_serial();
        if serials.last() != Some(&now) {
            serials.push(now);
            // A new connection works with the new SVID.
            let mut fresh = TcpStream::connect(vip).await.unwrap();
            expect_bytes(&mut fresh, b"echo\n").await;
            echo_round(&mut fresh, "new\n").await;
        }
    }
    assert!(
        serials.len() >= 4,
        "three rotations expected, saw {serials:?}"
    );
    echo_round(&mut long, "after three rotations\n").await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_config_keeps_serving_while_the_xds_server_is_gone() {
    let mut m = mesh_with(Opts {
        name: "zeta",
        svid_ttl: "1h",
        echo: true,
        ..Opts::default()
    })
    .await;
    let vip = m.wait_vip("zeta").await;
    let mut open = TcpStream::connect(vip).await.unwrap();
    expect_bytes(&mut open, b"echo\n").await;

    let xds = m.xds.take().expect("xds");
    let addr = xds.addr;
    drop(xds);
    testkit::wait_until(
        "the proxy notices the xDS server is gone",
        Duration::from_secs(10),
        || {
            let c = m.client.connection();
            async move { !matches!(*c.borrow(), xds::client::ConnectionState::Connected) }
        },
    )
    .await
    .unwrap();
    echo_round(&mut open, "established\n").await;
    let mut fresh = TcpStream::connect(vip).await.unwrap();
    expect_bytes(&mut fresh, b"echo\n").await;
    echo_round(&mut fresh, "new while xds is down\n").await;

    // Back on the same address with one more service: the proxy resyncs and binds its VIP.
    let more = format!(
        "{}{}",
        m.yaml,
        service("eta", 8443, "IstioMtls", 1, "/ns/demo/sa/eta")
    );
    m.xds = Some(testkit::xds_agent::Agent::start_on(&more, addr).await);
    testkit::wait_until("the new service arrives", Duration::from_secs(15), || {
        let st = m.client.state();
        async move { st.resolve("eta.demo.client.domain").is_some() }
    })
    .await
    .unwrap();
    let eta = m.wait_vip("eta").await;
    assert_ne!(eta, vip);
    echo_round(&mut open, "still established\n").await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_gateway_fails_over_to_the_next_and_is_ejected() {
    let m = mesh_with(Opts {
        name: "theta",
        svid_ttl: "1h",
        dead_first: true,
        ..Opts::default()
    })
    .await;
    let vip = m.wait_vip("theta").await;
    // The port probe above was the first connection; five failures in a row eject.
    for _ in 0..7 {
        let resp = get(vip).await.unwrap();
        assert!(resp.ends_with("pong from theta"), "{resp}");
    }
    let out = m.metrics(&m.outbound).await;
    assert_eq!(
        metric(&out, "ferry_proxy_upstream_connect_failures_total"),
        5,
        "{out}"
    );
    assert_eq!(
        metric(&out, "ferry_proxy_outlier_ejected_endpoints"),
        1,
        "{out}"
    );
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_refuses_plaintext() {
    let m = mesh("iota", "1h", None).await;
    let inbound = m.inbound.inbound.expect("inbound");
    let mut s = TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out).contains("pong"),
        "plaintext reached the app"
    );
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_connections_then_closes_them() {
    let m = mesh_with(Opts {
        name: "kappa",
        svid_ttl: "1h",
        echo: true,
        ..Opts::default()
    })
    .await;
    let vip = m.wait_vip("kappa").await;
    let mut open = TcpStream::connect(vip).await.unwrap();
    expect_bytes(&mut open, b"echo\n").await;
    let Mesh {
        outbound,
        inbound,
        stop,
        xds,
        _wl,
        _dir,
        client,
        ..
    } = m;
    let started = std::time::Instant::now();
    let drain = tokio::spawn(outbound.shutdown());
    // Accepting stops at once; the open connection keeps working during the drain time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(vip).await.is_err(),
        "the VIP listener must be closed"
    );
    echo_round(&mut open, "during the drain\n").await;
    drain.await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450), "drained for {took:?}");
    // After the drain time the proxy closed it.
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    inbound.shutdown().await;
    stop.cancel();
    drop((xds, client));
}
