//! The stock-Envoy peers of `testkit::mesh` checked against real Envoy before ferry's
//! proxy uses them: an Istio client (rustls with an SVID from ferry's Workload API, the
//! AUTO_PASSTHROUGH SNI and Istio ALPN) reaches the app through the east-west gateway and
//! the Envoy inbound sidecar; the gateway refuses a ClientHello without Istio ALPN; the
//! inbound refuses a client from another trust domain and a client without certificate;
//! a PASSTHROUGH route carries the client's own TLS to the `Mtls` server untouched.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use testkit::config::{AgentDoc, Entry};
use testkit::envoy::Envoy;
use testkit::mesh::{self, GatewayRoute, HttpServer, MtlsServer};

const TD: &str = "local.domain";
const HOST: &str = "server.demo.local.domain";
const SVC_PORT: u16 = 8443;
const CLIENT_ID: &str = "spiffe://local.domain/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/server";
const OTHER_ID: &str = "spiffe://other.domain/ns/demo/sa/intruder";

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// A Workload API for `td` in `dir` with `entries`.
async fn workload_api(
    dir: &std::path::Path,
    td: &str,
    entries: &[Entry<'_>],
) -> testkit::workload::Agent {
    let mut doc = AgentDoc::in_dir(td, dir)
        .ca("caTtl", "1h")
        .ca("svidTtl", "1h");
    for e in entries {
        doc = doc.entry(e);
    }
    testkit::workload::start(dir, &doc.render()).await
}

/// Everything the IstioMtls tests share: the zone's Workload API (the server SVID for
/// Envoy's executable, the client SVID for this process), the app, the inbound sidecar
/// and the gateway in front of it.
struct Zone {
    _dir: testkit::TempDir,
    agent: testkit::workload::Agent,
    app: HttpServer,
    inbound: Envoy,
    gateway: Envoy,
    gateway_addr: SocketAddr,
    ctx: spiffe::X509Context,
}

async fn zone(bin: &std::path::Path) -> Zone {
    let dir = testkit::tempdir().unwrap();
    let uid = format!("unix:uid:{}", testkit::workload::my_uid());
    let envoy_exe: PathBuf = testkit::envoy::executable(bin).expect("the real Envoy executable");
    let agent = workload_api(
        dir.path(),
        TD,
        &[
            // First for Envoy, so SDS `default` is the server's identity.
            Entry::new(
                SERVER_ID,
                [uid.clone(), format!("unix:path:{}", envoy_exe.display())],
            ),
            Entry::new(CLIENT_ID, [uid]),
        ],
    )
    .await;
    testkit::wait_until("the Workload API socket", Duration::from_secs(20), || {
        let s = agent.socket.clone();
        async move { s.exists() }
    })
    .await
    .unwrap();
    let ctx = mesh::fetch_context(&agent.endpoint()).await;

    let app = HttpServer::start("app", loopback(0)).await.unwrap();
    let inbound_addr = loopback(testkit::free_port());
    let admin = testkit::free_port();
    let inbound = Envoy::start(
        bin,
        &mesh::inbound_bootstrap(inbound_addr, admin, &agent.socket, TD, app.addr()),
        admin,
    )
    .await
    .unwrap_or_else(|e| panic!("inbound Envoy: {e}"));
    // Ready once SDS delivered the certificate and the listener is up.
    inbound
        .wait_admin("/certs", Duration::from_secs(20), |b| b.contains(SERVER_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    inbound
        .wait_admin("/listeners", Duration::from_secs(20), |b| {
            b.contains("virtualInbound")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let gateway_addr = loopback(testkit::free_port());
    let admin = testkit::free_port();
    let gateway = Envoy::start(
        bin,
        &mesh::gateway_bootstrap(
            gateway_addr,
            admin,
            &[GatewayRoute::auto_passthrough(SVC_PORT, HOST, inbound_addr)],
        ),
        admin,
    )
    .await
    .unwrap_or_else(|e| panic!("gateway Envoy: {e}"));
    testkit::wait_for_port(gateway_addr, Duration::from_secs(20))
        .await
        .unwrap();
    Zone {
        _dir: dir,
        agent,
        app,
        inbound,
        gateway,
        gateway_addr,
        ctx,
    }
}

fn istio_client(
    z: &Zone,
    identity: Option<mesh::Identity>,
) -> std::sync::Arc<rustls::ClientConfig> {
    mesh::client_config(
        identity,
        mesh::roots(&z.ctx, TD),
        SERVER_ID,
        &mesh::ISTIO_TCP_CLIENT_ALPN,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_client_reaches_the_app_through_envoy_gateway_and_envoy_inbound() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let z = zone(&bin).await;
    let sni = mesh::auto_passthrough_sni(SVC_PORT, HOST);
    let cfg = istio_client(&z, Some(mesh::svid(&z.ctx, CLIENT_ID)));
    let r = mesh::tls_get(z.gateway_addr, &sni, cfg)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ngateway log:\n{}\ninbound log:\n{}",
                z.gateway.log_tail(40),
                z.inbound.log_tail(60)
            )
        });
    assert!(r.text.starts_with("HTTP/1.1 200"), "{}", r.text);
    assert!(r.text.ends_with(&z.app.body()), "{}", r.text);
    // Envoy has no MX filter: it advertises h2/http/1.1, so nothing is negotiated.
    assert_eq!(r.alpn, None, "Envoy must not negotiate an Istio ALPN");
    assert_eq!(z.app.requests().len(), 1);

    testkit::wait_for_log(
        &z.inbound.log_path(),
        &format!("{} peer={CLIENT_ID}", mesh::INBOUND_LOG_TAG),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ninbound log:\n{}", z.inbound.log_tail(40)));
    testkit::wait_for_log(
        &z.gateway.log_path(),
        &format!("{} sni={sni}", mesh::GATEWAY_LOG_TAG),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ngateway log:\n{}", z.gateway.log_tail(40)));
    let line = mesh::access_lines(&z.inbound.log(), mesh::INBOUND_LOG_TAG)
        .pop()
        .unwrap();
    assert_eq!(mesh::field(&line, "local"), Some(SERVER_ID), "{line}");
    assert_eq!(mesh::field(&line, "sni"), Some(sni.as_str()), "{line}");
    z.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refuses_a_client_hello_without_istio_alpn() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let z = zone(&bin).await;
    let sni = mesh::auto_passthrough_sni(SVC_PORT, HOST);
    for alpn in [&[][..], &["h2", "http/1.1"][..]] {
        let cfg = mesh::client_config(
            Some(mesh::svid(&z.ctx, CLIENT_ID)),
            mesh::roots(&z.ctx, TD),
            SERVER_ID,
            alpn,
        );
        let r = mesh::tls_get(z.gateway_addr, &sni, cfg).await;
        assert!(r.is_err(), "ALPN {alpn:?} got through: {r:?}");
    }
    // An unknown SNI is refused too, even with Istio ALPN.
    let cfg = istio_client(&z, Some(mesh::svid(&z.ctx, CLIENT_ID)));
    let r = mesh::tls_get(z.gateway_addr, &mesh::auto_passthrough_sni(9, HOST), cfg).await;
    assert!(r.is_err(), "unknown SNI got through: {r:?}");
    assert!(z.app.requests().is_empty());
    // Control: the same client with Istio ALPN gets through.
    let cfg = istio_client(&z, Some(mesh::svid(&z.ctx, CLIENT_ID)));
    mesh::tls_get(z.gateway_addr, &sni, cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\ngateway log:\n{}", z.gateway.log_tail(40)));
    z.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_other_trust_domains_and_clients_without_certificate() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let z = zone(&bin).await;
    let other_dir = testkit::tempdir().unwrap();
    let uid = format!("unix:uid:{}", testkit::workload::my_uid());
    let other = workload_api(
        other_dir.path(),
        "other.domain",
        &[Entry::new(OTHER_ID, [uid])],
    )
    .await;
    testkit::wait_until(
        "the other Workload API socket",
        Duration::from_secs(20),
        || {
            let s = other.socket.clone();
            async move { s.exists() }
        },
    )
    .await
    .unwrap();
    let other_ctx = mesh::fetch_context(&other.endpoint()).await;
    let sni = mesh::auto_passthrough_sni(SVC_PORT, HOST);

    let intruder = istio_client(&z, Some(mesh::svid(&other_ctx, OTHER_ID)));
    let r = mesh::tls_get(z.gateway_addr, &sni, intruder).await;
    assert!(r.is_err(), "a client of other.domain got through: {r:?}");
    let anonymous = istio_client(&z, None);
    let r = mesh::tls_get(z.gateway_addr, &sni, anonymous).await;
    assert!(
        r.is_err(),
        "a client without certificate got through: {r:?}"
    );
    assert!(z.app.requests().is_empty(), "{:?}", z.app.requests());
    // Refused by the TLS handshake itself (Envoy still writes an access line for the
    // closed connection, peer SAN included, with nothing received).
    let log = z.inbound.log();
    assert!(
        log.contains("CERTIFICATE_VERIFY_FAILED"),
        "no verification failure for the other trust domain:\n{}",
        z.inbound.log_tail(60)
    );
    assert!(
        log.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        "no refusal of the anonymous client:\n{}",
        z.inbound.log_tail(60)
    );
    for line in mesh::access_lines(&log, mesh::INBOUND_LOG_TAG) {
        assert_eq!(mesh::field(&line, "received"), Some("0"), "{line}");
    }
    other.stop().await;
    z.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_route_carries_the_clients_own_tls_to_the_mtls_server() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let dir = testkit::tempdir().unwrap();
    let uid = format!("unix:uid:{}", testkit::workload::my_uid());
    let me = std::env::current_exe().unwrap();
    let agent = workload_api(
        dir.path(),
        TD,
        &[
            Entry::new(CLIENT_ID, [uid.clone()]),
            Entry::new(SERVER_ID, [uid, format!("unix:path:{}", me.display())]),
        ],
    )
    .await;
    testkit::wait_until("the Workload API socket", Duration::from_secs(20), || {
        let s = agent.socket.clone();
        async move { s.exists() }
    })
    .await
    .unwrap();
    let ctx = mesh::fetch_context(&agent.endpoint()).await;
    let server = MtlsServer::start(
        "mtls-app",
        loopback(0),
        mesh::svid(&ctx, SERVER_ID),
        mesh::roots(&ctx, TD),
    )
    .await
    .unwrap();
    let gateway_addr = loopback(testkit::free_port());
    let admin = testkit::free_port();
    let gateway = Envoy::start(
        &bin,
        &mesh::gateway_bootstrap(
            gateway_addr,
            admin,
            &[GatewayRoute::passthrough(HOST, server.addr())],
        ),
        admin,
    )
    .await
    .unwrap_or_else(|e| panic!("gateway Envoy: {e}"));
    testkit::wait_for_port(gateway_addr, Duration::from_secs(20))
        .await
        .unwrap();

    let cfg = mesh::client_config(
        Some(mesh::svid(&ctx, CLIENT_ID)),
        mesh::roots(&ctx, TD),
        SERVER_ID,
        &["http/1.1"],
    );
    let r = mesh::tls_get(gateway_addr, HOST, cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\ngateway log:\n{}", gateway.log_tail(40)));
    assert!(r.text.ends_with(&server.body()), "{}", r.text);
    assert_eq!(r.alpn.as_deref(), Some("http/1.1"));
    let seen = server
        .wait_seen(Duration::from_secs(10))
        .await
        .expect("the server saw the connection");
    assert_eq!(seen.sni.as_deref(), Some(HOST));
    assert_eq!(seen.alpn_offered, vec!["http/1.1"]);
    assert_eq!(seen.peer_uri_sans, vec![CLIENT_ID.to_owned()]);
    testkit::wait_for_log(
        &gateway.log_path(),
        &format!(
            "{} sni={HOST} upstream={}",
            mesh::GATEWAY_LOG_TAG,
            server.addr()
        ),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ngateway log:\n{}", gateway.log_tail(40)));
    agent.stop().await;
}
