//! `ferry proxy` on both sides, no Envoy: the client-side proxy (`--bind-vips`, xDS from
//! `ferry agent`) originates Istio mTLS straight to the server-side proxy (`--inbound`),
//! both exchange metadata (each logs the other's SPIFFE ID and workload), the app gets
//! the exact request bytes, and the admin API serves readiness, stats and the config.
//! These need no external peer, so they run everywhere.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::config::Entry;
use testkit::mesh::{self, FerryZone, HttpServer};

const TD: &str = "local.domain";
const HOST: &str = "server.demo.local.domain";
const CLIENT_ID: &str = "spiffe://local.domain/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/server";

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_outbound_to_ferry_inbound_exchanges_metadata_both_ways() {
    let dir = testkit::tempdir().unwrap();
    let server_bin = dir.path().join("ferry-server");
    let uid = format!("unix:uid:{}", testkit::workload::my_uid());
    let app = HttpServer::start("app", loopback(0)).await.unwrap();
    let svc_port = testkit::free_port();
    let inbound_addr = loopback(testkit::free_port());
    let zone = FerryZone::start(
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        dir,
        TD,
        loopback(testkit::free_port()),
        &[
            Entry::new(
                SERVER_ID,
                [uid.clone(), format!("unix:path:{}", server_bin.display())],
            ),
            Entry::new(CLIENT_ID, [uid]),
        ],
        // No gateway in between: the "gateway" is the server-side proxy itself.
        &mesh::own_domain_service("server", svc_port, "IstioMtls", inbound_addr),
    )
    .await;
    assert_eq!(zone.ferry_copy("ferry-server"), server_bin);
    let inbound = zone
        .inbound_proxy(&server_bin, inbound_addr, app.addr())
        .await;
    let outbound = zone.outbound_proxy().await;
    let dst: SocketAddr = (zone.vip(HOST), svc_port).into();
    let logs = || format!("{}\n{}", outbound.log_tail(40), inbound.log_tail(40));

    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match mesh::plain_get(dst, HOST).await {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break r,
            other if Instant::now() > deadline => panic!("GET via {dst}: {other:?}\n{}", logs()),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    // Exactly the app's answer: both MX frames were stripped on the way.
    assert!(r.ends_with(&app.body()), "{r}");
    let req = app.requests().pop().unwrap();
    assert_eq!(req.line, "GET / HTTP/1.1");
    assert_eq!(req.header("host"), Some(HOST));

    let line = inbound
        .wait_access(Duration::from_secs(10), |l| l.contains(CLIENT_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(mesh::meta_mentions(&line, "client"), "inbound: {line}");
    let line = outbound
        .wait_access(Duration::from_secs(10), |l| l.contains(SERVER_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(mesh::meta_mentions(&line, "server"), "outbound: {line}");
    assert!(line.contains(&inbound_addr.to_string()), "endpoint: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_admin_serves_ready_stats_and_config_dump() {
    let svc_port = testkit::free_port();
    let zone = FerryZone::start(
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        testkit::tempdir().unwrap(),
        TD,
        loopback(testkit::free_port()),
        &[Entry::new(
            CLIENT_ID,
            [format!("unix:uid:{}", testkit::workload::my_uid())],
        )],
        &mesh::own_domain_service("server", svc_port, "IstioMtls", loopback(9)),
    )
    .await;
    let cmd = mesh::ProxyCmd::new(&zone.socket)
        .arg("--xds", format!("http://{}", zone.xds))
        .flag("--bind-vips");
    let proxy = zone
        .proxy(
            "ferry-outbound",
            Path::new(env!("CARGO_BIN_EXE_ferry")),
            &cmd,
        )
        .await;
    let stats = testkit::http::get(cmd.admin, "/stats/prometheus")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail(30)));
    assert_eq!(stats.status, 200, "{}", stats.body);
    let dump = testkit::http::get(cmd.admin, "/config_dump").await.unwrap();
    assert_eq!(dump.status, 200, "{}", dump.body);
    assert!(
        dump.body.contains(HOST),
        "config_dump lacks the service: {}",
        dump.body
    );
    // The VIP listener is bound by the proxy itself.
    testkit::wait_for_port((zone.vip(HOST), svc_port).into(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_dns_answers_federated_names_forwards_the_rest_and_sigterm_exits_0() {
    if !testkit::require("dig (dnsutils)", testkit::dns::dig_available()) {
        return;
    }
    let svc_port = testkit::free_port();
    let zone = FerryZone::start(
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        testkit::tempdir().unwrap(),
        TD,
        loopback(testkit::free_port()),
        &[Entry::new(
            CLIENT_ID,
            [format!("unix:uid:{}", testkit::workload::my_uid())],
        )],
        &mesh::own_domain_service("server", svc_port, "IstioMtls", loopback(9)),
    )
    .await;
    let upstream = testkit::dns::Upstream::start().await.unwrap();
    let dns = loopback(testkit::free_port());
    let cmd = mesh::ProxyCmd::new(&zone.socket)
        .arg("--xds", format!("http://{}", zone.xds))
        .arg("--dns", dns)
        .arg("--dns-upstream", upstream.addr())
        .arg("--drain-time", "1s");
    let mut proxy = zone
        .proxy("ferry-dns", Path::new(env!("CARGO_BIN_EXE_ferry")), &cmd)
        .await;

    // Federated: the VIP the agent allocated, taken from the xDS dns listener.
    let a = testkit::dns::dig(dns, HOST, "A", &[]).await.unwrap();
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert_eq!(a.answers[0].3, zone.vip(HOST).to_string(), "{}", a.raw);
    // Anything else goes upstream.
    let w = testkit::dns::dig(dns, "www.upstream.test", "A", &[])
        .await
        .unwrap();
    assert_eq!(w.answers[0].3, "192.0.2.10", "{}", w.raw);

    // SIGTERM: the proxy drains (nothing open here; the drain itself is tested in
    // proxy/tests/data_path.rs) and exits 0.
    let started = Instant::now();
    let status = proxy
        .terminate(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail(30)));
    assert!(status.success(), "exit {status}\n{}", proxy.log_tail(30));
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        proxy.log().contains("ferry proxy stopped"),
        "{}",
        proxy.log_tail(30)
    );
}
