//! `ferry proxy` against the real peers it must interoperate with (stock Envoy, as the
//! Istio east-west gateway, as the Istio inbound sidecar, and as the Cofide sidecar fed by
//! `ferry agent`), with `ferry agent` serving xDS and the Workload API:
//!
//! - plain HTTP client -> `ferry proxy --bind-vips` -> Envoy AUTO_PASSTHROUGH gateway ->
//!   `ferry proxy --inbound` -> app; both proxies log the peer's SPIFFE ID and metadata;
//! - `ferry proxy` outbound -> Envoy inbound sidecar (no MX filter, no Istio ALPN
//!   negotiated) -> app; Envoy logs ferry's SPIFFE ID;
//! - Envoy sidecar (offers `istio-peer-exchange`, sends no MX frame) -> `ferry proxy
//!   --inbound` -> app: the bytes pass through untouched;
//! - `Mtls`: a rustls client with its own SVID -> `ferry proxy --bind-vips` -> Envoy
//!   PASSTHROUGH gateway -> the mTLS server app, handshake untouched.
//!
//! One trust domain (`local.domain`, the agent's own): the client SVID is selected by uid
//! alone, the server SVID also by `unix:path:` of the server-side process (a copy of the
//! ferry binary, Envoy's executable, or this test), so each process holds the identity of
//! its role. Stock Envoy missing fails under `CI=true`.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::config::Entry;
use testkit::envoy::Envoy;
use testkit::mesh::{self, FerryZone, GatewayRoute, HttpServer, MtlsServer};

const TD: &str = "local.domain";
const HOST: &str = "server.demo.local.domain";
const CLIENT_ID: &str = "spiffe://local.domain/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/server";
const READY: Duration = Duration::from_secs(30);

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn uid_selector() -> String {
    format!("unix:uid:{}", testkit::workload::my_uid())
}

fn path_selector(p: &Path) -> String {
    format!("unix:path:{}", p.display())
}

/// `ferry agent` for `local.domain` with `entries` and `services`, its `listen.outbound`
/// at `outbound` (what a stock Envoy sidecar binds).
async fn zone(
    dir: testkit::TempDir,
    outbound: SocketAddr,
    entries: &[Entry<'_>],
    services: &str,
) -> FerryZone {
    FerryZone::start(
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        dir,
        TD,
        outbound,
        entries,
        services,
    )
    .await
}

/// Which gateway stands between the zones: stock Envoy (Istio's east-west gateway
/// semantics) or `ferry gateway`; the same tests pass with either.
#[derive(Clone, Copy, Debug)]
enum GatewayKind {
    Envoy,
    Ferry,
}

/// A running gateway and what it logs.
enum Gateway {
    Envoy(Envoy),
    Ferry(mesh::Spawned),
}

impl Gateway {
    /// Starts `kind` on `addr` with one `route`; `ferry gateway` derives its routes from the
    /// zone's own FederatedServices, with the route's upstream as the service's backend.
    async fn start(
        kind: GatewayKind,
        bin: Option<&Path>,
        zone: &FerryZone,
        addr: SocketAddr,
        route: GatewayRoute,
    ) -> Gateway {
        match kind {
            GatewayKind::Envoy => {
                let admin = testkit::free_port();
                let bin = bin.expect("Envoy binary");
                let e = Envoy::start(bin, &mesh::gateway_bootstrap(addr, admin, &[route]), admin)
                    .await
                    .unwrap_or_else(|e| panic!("gateway Envoy: {e}"));
                Gateway::Envoy(e)
            }
            GatewayKind::Ferry => {
                let args: Vec<String> = [
                    "gateway".to_owned(),
                    "--config".to_owned(),
                    zone.config.display().to_string(),
                    "--listen".to_owned(),
                    addr.to_string(),
                    "--backend".to_owned(),
                    format!("{HOST}={}", route.upstream),
                ]
                .into();
                let g =
                    mesh::Spawned::start("ferry-gateway", &zone.ferry, &args, &[], zone.dir.path())
                        .unwrap();
                testkit::wait_for_port(addr, READY)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n{}", g.log_tail(20)));
                Gateway::Ferry(g)
            }
        }
    }

    fn log_tail(&self, n: usize) -> String {
        match self {
            Gateway::Envoy(e) => e.log_tail(n),
            Gateway::Ferry(f) => f.log_tail(n),
        }
    }

    /// Waits until the gateway logged a connection with `sni` routed to `upstream`.
    async fn saw(&self, sni: &str, upstream: SocketAddr) -> Result<(), String> {
        match self {
            Gateway::Envoy(e) => testkit::wait_for_log(
                &e.log_path(),
                &format!("{} sni={sni} upstream={upstream}", mesh::GATEWAY_LOG_TAG),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string()),
            Gateway::Ferry(f) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if f.log().lines().any(|l| {
                        l.contains("gateway connection closed")
                            && mesh::log_value(l, "sni") == Some(sni)
                            && mesh::log_value(l, "backend") == Some(upstream.to_string().as_str())
                    }) {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "no routed connection for sni={sni} backend={upstream}"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Stock Envoy for `GatewayKind::Envoy` (`None` = skip outside CI), nothing needed for ferry.
fn gateway_prereq(kind: GatewayKind) -> Option<Option<std::path::PathBuf>> {
    match kind {
        GatewayKind::Envoy => testkit::envoy::require().map(Some),
        GatewayKind::Ferry => Some(None),
    }
}

/// `GET /` through `addr` until the app's `200` comes back.
async fn get_through(addr: SocketAddr, app: &HttpServer, logs: impl Fn() -> String) -> String {
    let body = app.body();
    mesh::retry(&format!("GET via {addr}"), logs, || {
        let body = body.clone();
        async move {
            let r = mesh::plain_get(addr, HOST)
                .await
                .map_err(|e| e.to_string())?;
            if r.starts_with("HTTP/1.1 200") && r.ends_with(&body) {
                Ok(r)
            } else {
                Err(format!("unexpected response {r:?}"))
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_client_reaches_ferry_inbound_through_ferry_outbound_and_envoy_gateway() {
    istio_mtls_through_gateway(GatewayKind::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_client_reaches_ferry_inbound_through_ferry_outbound_and_ferry_gateway() {
    istio_mtls_through_gateway(GatewayKind::Ferry).await;
}

async fn istio_mtls_through_gateway(kind: GatewayKind) {
    let Some(bin) = gateway_prereq(kind) else {
        return;
    };
    let dir = testkit::tempdir().unwrap();
    let server_bin = dir.path().join("ferry-server");
    let app = HttpServer::start("app", loopback(0)).await.unwrap();
    let svc_port = testkit::free_port();
    let gateway_addr = loopback(testkit::free_port());
    let inbound_addr = loopback(testkit::free_port());
    let zone = zone(
        dir,
        loopback(testkit::free_port()),
        &[
            Entry::new(SERVER_ID, [uid_selector(), path_selector(&server_bin)]),
            Entry::new(CLIENT_ID, [uid_selector()]),
        ],
        &mesh::own_domain_service("server", svc_port, "IstioMtls", gateway_addr),
    )
    .await;
    let gateway = Gateway::start(
        kind,
        bin.as_deref(),
        &zone,
        gateway_addr,
        GatewayRoute::auto_passthrough(svc_port, HOST, inbound_addr),
    )
    .await;
    assert_eq!(zone.ferry_copy("ferry-server"), server_bin);
    let inbound = zone
        .inbound_proxy(&server_bin, inbound_addr, app.addr())
        .await;
    let outbound = zone.outbound_proxy().await;
    let vip = zone.vip(HOST);
    let logs = || {
        format!(
            "{}\n{}\n--- gateway ---\n{}",
            outbound.log_tail(40),
            inbound.log_tail(40),
            gateway.log_tail(30)
        )
    };

    get_through((vip, svc_port).into(), &app, logs).await;

    let line = inbound
        .wait_access(Duration::from_secs(10), |l| l.contains(CLIENT_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(
        mesh::meta_mentions(&line, "client"),
        "inbound: no client MX metadata: {line}"
    );
    let line = outbound
        .wait_access(Duration::from_secs(10), |l| l.contains(SERVER_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(
        mesh::meta_mentions(&line, "server"),
        "outbound: no server MX metadata: {line}"
    );
    assert!(
        line.contains(&gateway_addr.to_string()),
        "outbound endpoint: {line}"
    );
    gateway
        .saw(&mesh::auto_passthrough_sni(svc_port, HOST), inbound_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(app.requests().len(), 1, "{:?}", app.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_inbound_accepts_ferry_outbound_and_logs_its_spiffe_id() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let envoy_exe = testkit::envoy::executable(&bin).expect("the real Envoy executable");
    let app = HttpServer::start("app", loopback(0)).await.unwrap();
    let svc_port = testkit::free_port();
    let inbound_addr = loopback(testkit::free_port());
    let zone = zone(
        testkit::tempdir().unwrap(),
        loopback(testkit::free_port()),
        &[
            Entry::new(SERVER_ID, [uid_selector(), path_selector(&envoy_exe)]),
            Entry::new(CLIENT_ID, [uid_selector()]),
        ],
        // The "gateway" is the sidecar itself: ferry dials it directly.
        &mesh::own_domain_service("server", svc_port, "IstioMtls", inbound_addr),
    )
    .await;
    let admin = testkit::free_port();
    let inbound = Envoy::start(
        &bin,
        &mesh::inbound_bootstrap(inbound_addr, admin, &zone.socket, TD, app.addr()),
        admin,
    )
    .await
    .unwrap_or_else(|e| panic!("inbound Envoy: {e}"));
    inbound
        .wait_admin("/certs", READY, |b| b.contains(SERVER_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let outbound = zone.outbound_proxy().await;
    let vip = zone.vip(HOST);
    let logs = || {
        format!(
            "{}\n--- envoy inbound ---\n{}",
            outbound.log_tail(40),
            inbound.log_tail(40)
        )
    };

    // An exact `pong` also proves ferry sent no MX frame: no Istio ALPN was negotiated,
    // and stray bytes in front of the request would make the app answer 400.
    get_through((vip, svc_port).into(), &app, logs).await;

    testkit::wait_for_log(
        &inbound.log_path(),
        &format!("{} peer={CLIENT_ID}", mesh::INBOUND_LOG_TAG),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let line = outbound
        .wait_access(Duration::from_secs(10), |l| l.contains(SERVER_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(line.contains("peer_meta="), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_without_mx_reaches_ferry_inbound_which_passes_bytes_through() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let dir = testkit::tempdir().unwrap();
    let server_bin = dir.path().join("ferry-server");
    let app = HttpServer::start("app", loopback(0)).await.unwrap();
    let svc_port = testkit::free_port();
    let inbound_addr = loopback(testkit::free_port());
    // Envoy's outbound listener takes the service port on every address (as in
    // istio_mtls_envoy.rs); the client connects to the VIP on it.
    let zone = zone(
        dir,
        ([0, 0, 0, 0], svc_port).into(),
        &[
            Entry::new(SERVER_ID, [uid_selector(), path_selector(&server_bin)]),
            Entry::new(CLIENT_ID, [uid_selector()]),
        ],
        &mesh::own_domain_service("server", svc_port, "IstioMtls", inbound_addr),
    )
    .await;
    assert_eq!(zone.ferry_copy("ferry-server"), server_bin);
    let inbound = zone
        .inbound_proxy(&server_bin, inbound_addr, app.addr())
        .await;
    let sidecar = Envoy::start_sidecar(&bin, zone.xds, &zone.socket)
        .await
        .unwrap_or_else(|e| panic!("Envoy sidecar: {e}"));
    let vip = zone.vip(HOST);
    let logs = || {
        format!(
            "{}\n--- envoy sidecar ---\n{}",
            inbound.log_tail(40),
            sidecar.log_tail(60)
        )
    };

    let r = get_through((vip, svc_port).into(), &app, logs).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let line = inbound
        .wait_access(Duration::from_secs(10), |l| l.contains(CLIENT_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(line.contains("peer_meta="), "{line}");
    assert_eq!(app.requests().len(), 1, "{:?}", app.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_reaches_its_server_through_ferry_and_envoy_passthrough_untouched() {
    mtls_through_gateway(GatewayKind::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_reaches_its_server_through_ferry_and_ferry_gateway_untouched() {
    mtls_through_gateway(GatewayKind::Ferry).await;
}

async fn mtls_through_gateway(kind: GatewayKind) {
    let Some(bin) = gateway_prereq(kind) else {
        return;
    };
    let me = std::env::current_exe().unwrap();
    let svc_port = testkit::free_port();
    let gateway_addr = loopback(testkit::free_port());
    let zone = zone(
        testkit::tempdir().unwrap(),
        loopback(testkit::free_port()),
        &[
            Entry::new(CLIENT_ID, [uid_selector()]),
            Entry::new(SERVER_ID, [uid_selector(), path_selector(&me)]),
        ],
        &mesh::own_domain_service("server", svc_port, "Mtls", gateway_addr),
    )
    .await;
    let ctx = mesh::fetch_context(&format!("unix://{}", zone.socket.display())).await;
    let server = MtlsServer::start(
        "mtls-app",
        loopback(0),
        mesh::svid(&ctx, SERVER_ID),
        mesh::roots(&ctx, TD),
    )
    .await
    .unwrap();
    let gateway = Gateway::start(
        kind,
        bin.as_deref(),
        &zone,
        gateway_addr,
        GatewayRoute::passthrough(HOST, server.addr()),
    )
    .await;
    let outbound = zone.outbound_proxy().await;
    let vip = zone.vip(HOST);
    let logs = || {
        format!(
            "{}\n--- gateway ---\n{}",
            outbound.log_tail(40),
            gateway.log_tail(30)
        )
    };

    let dst: SocketAddr = (vip, svc_port).into();
    let r = mesh::retry(&format!("mTLS GET via {dst}"), logs, || {
        let cfg = mesh::client_config(
            Some(mesh::svid(&ctx, CLIENT_ID)),
            mesh::roots(&ctx, TD),
            SERVER_ID,
            &["http/1.1"],
        );
        async move {
            mesh::tls_get(dst, HOST, cfg)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert!(r.text.ends_with(&server.body()), "{}", r.text);
    assert_eq!(r.alpn.as_deref(), Some("http/1.1"));
    let seen = server
        .wait_seen(Duration::from_secs(10))
        .await
        .expect("the server saw the connection");
    assert_eq!(seen.sni.as_deref(), Some(HOST), "SNI at the server");
    assert_eq!(seen.alpn_offered, vec!["http/1.1"], "ALPN untouched");
    assert_eq!(seen.peer_uri_sans, vec![CLIENT_ID.to_owned()], "client ID");
    gateway
        .saw(HOST, server.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let line = outbound
        .wait_access(Duration::from_secs(10), |l| {
            l.contains(&gateway_addr.to_string())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(
        !line.contains(SERVER_ID),
        "passthrough must not terminate TLS: {line}"
    );
}
