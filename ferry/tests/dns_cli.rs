//! `ferry dns` as a user runs it: names from the config file (hot reloaded), everything
//! else forwarded to the upstream given on the command line.

#![allow(clippy::unwrap_used)] // test setup: a failure should panic with its cause

mod common;
use std::net::SocketAddr;
use std::time::Duration;

use testkit::dns::{UPSTREAM_WWW, Upstream, dig, dig_available};

fn config(services: &[&str]) -> String {
    let mut s = String::from(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\n",
    );
    for name in services {
        s.push_str(&format!(
            "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata: {{name: {name}, namespace: demo, annotations: {{ferry.dev/trust-domain: local.domain}}}}\nspec: {{name: {name}, namespace: demo, port: 8443, spiffeIDPaths: [/ns/demo/sa/{name}], tlsMode: IstioMtls, gateways: [{{type: istio-eastwestgateway, port: 15443, ip: 127.0.0.10}}]}}\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_dns_serves_config_names_and_follows_edits() {
    if !testkit::require("dig (Debian package dnsutils)", dig_available()) {
        return;
    }
    let upstream = Upstream::start().await.unwrap();
    let dir = testkit::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    std::fs::write(&path, config(&["server"])).unwrap();
    let listen: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let mut child = common::spawn_ferry([
        "dns",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--upstream",
        &upstream.addr().to_string(),
        "--search-suffix",
        "demo.svc.cluster.local",
        "--admin",
        &admin.to_string(),
    ]);
    testkit::wait_for_port(listen, Duration::from_secs(10))
        .await
        .unwrap();

    let vips = common::vips(&path);
    let a = dig(listen, "server.demo.local.domain", "A", &[])
        .await
        .unwrap();
    assert_eq!(
        a.answers[0].3, vips["server.demo.local.domain"],
        "{}",
        a.raw
    );
    let w = dig(listen, "www.upstream.test", "A", &[]).await.unwrap();
    assert_eq!(w.answers[0].3, UPSTREAM_WWW.to_string(), "{}", w.raw);

    // The admin endpoint counts what happened.
    let m = testkit::http::get(admin, "/metrics").await.unwrap();
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains("ferry_dns_queries_total{result=\"Federated\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("ferry_dns_queries_total{result=\"Forwarded\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("ferry_dns_upstream_latency_seconds_count 1"),
        "{}",
        m.body
    );

    // Add a service: its name resolves without a restart.
    std::fs::write(&path, config(&["server", "api"])).unwrap();
    testkit::wait_until("api resolves", Duration::from_secs(5), || async {
        dig(
            listen,
            "api.demo.local.domain.demo.svc.cluster.local",
            "A",
            &[],
        )
        .await
        .is_ok_and(|a| a.status == "NOERROR" && !a.answers.is_empty())
    })
    .await
    .unwrap();

    // SIGTERM stops it cleanly.
    let status = common::sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
}
