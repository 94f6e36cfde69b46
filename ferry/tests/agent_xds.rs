//! `ferry agent --config FILE` serves xDS on `listen.xds` from a config holding only a
//! trust domain and `FederatedService` documents, and stops cleanly on SIGTERM.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xds::client::{AdsClient, AdsClientConfig};

#[tokio::test]
async fn agent_serves_the_registry_over_ads() {
    let dir = testkit::tempdir().unwrap();
    let port = testkit::free_port();
    let cfg = dir.path().join("ferry.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\nlisten:\n  xds: 127.0.0.1:{port}\n  workloadApi: unix://{0}/agent.sock\nca:\n  stateDir: {0}/ca\n---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: server\n  namespace: demo\nspec:\n  name: server\n  namespace: demo\n  port: 8443\n  exportedTrustDomains: [client.domain]\n  tlsMode: Mtls\n  gateways:\n    - type: istio-eastwestgateway\n      port: 15443\n      ip: 10.0.0.1\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--admin", &admin.to_string(), "--config"])
        .arg(&cfg)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry agent");
    testkit::wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(20))
        .await
        .expect("xDS port open");

    let shutdown = CancellationToken::new();
    let client = AdsClient::start(
        AdsClientConfig::new(format!("http://127.0.0.1:{port}")),
        shutdown.clone(),
    );
    let state = tokio::time::timeout(Duration::from_secs(10), client.wait_synced())
        .await
        .expect("synced from ferry agent");
    let vip = state
        .resolve("server.demo.client.domain")
        .expect("the dns listener names the service");
    let route = state.route((vip, 8443).into()).expect("the VIP routes");
    assert_eq!(route.chain.cluster, "server.demo.client.domain_cluster");
    assert_eq!(route.cluster.expect("cluster known").endpoints.len(), 1);

    // The admin endpoint shows the open stream and what was ACKed.
    let m = testkit::http::get(admin, "/metrics")
        .await
        .expect("admin /metrics");
    assert_eq!(m.status, 200);
    assert!(m.body.contains("ferry_xds_streams"), "{}", m.body);
    assert!(
        m.body.contains("ferry_xds_acks_total{type=\"CDS\"} 1"),
        "{}",
        m.body
    );

    // SIGTERM with the ADS stream still open: the agent ends its streams and exits.

    let status = common::sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
    shutdown.cancel();
}
