//! Proves the install path: stock Envoy from `.venv` starts with the Cofide sidecar
//! bootstrap (no xDS server running yet) and answers its admin API.

use std::net::SocketAddr;

#[tokio::test]
async fn stock_envoy_starts_with_the_sidecar_bootstrap() {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let dir = testkit::tempdir().unwrap();
    // Nothing listens on the xDS port: Envoy must still start and serve admin.
    let xds: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let envoy = testkit::envoy::Envoy::start_sidecar(&bin, xds, &dir.path().join("agent.sock"))
        .await
        .unwrap();
    let info = envoy.admin_get("/server_info").await.unwrap();
    assert!(info.contains("\"version\""), "{info}");
    assert!(info.contains("/1.40."), "expected Envoy 1.40: {info}");
    let clusters = envoy.admin_get("/clusters").await.unwrap();
    assert!(clusters.contains("xds_cluster::"), "{clusters}");
    assert!(clusters.contains("sds-grpc::"), "{clusters}");
}
