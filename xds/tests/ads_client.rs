//! ferry's own ADS client against ferry's server (the in-process agent): routing, endpoints
//! and the DNS table from the standard resources, hot-reload updates, last-known-good while
//! the server is away, reconnect with backoff. (The NACK round trip against the same
//! server code is `xds::client::tests::nack_round_trip_with_the_real_server`: only a unit
//! test can make ferry's translator emit a resource ferry's client refuses.)

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use registry::config::GatewayAddress;
use testkit::xds_agent::{Agent, Gw, Ports, agent_doc, host, service_doc};
use tokio_util::sync::CancellationToken;
use xds::client::{AdsClient, AdsClientConfig, ConnectionState, Discovery, XdsState};

async fn wait_state(
    client: &AdsClient,
    what: &str,
    pred: impl Fn(&XdsState) -> bool,
) -> Arc<XdsState> {
    let mut rx = client.subscribe();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| pred(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .map(|r| r.clone())
        .expect("client alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_the_registry_and_survives_server_restarts() {
    let ports = Ports::free();
    let a = service_doc(
        "alpha",
        8443,
        "IstioMtls",
        &[
            Gw("istio-ingressgateway", "10.0.0.2", 443),
            Gw("istio-eastwestgateway", "10.0.0.1", 15443),
        ],
    );
    let b = service_doc(
        "bravo",
        9443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "gw.example.com", 15443)],
    );
    let agent = Agent::start(&format!("{}{a}{b}", agent_doc(ports))).await;
    let addr = agent.addr;
    let shutdown = CancellationToken::new();
    let mut cfg = AdsClientConfig::new(agent.url());
    cfg.max_backoff = Duration::from_millis(500);
    let client = AdsClient::start(cfg, shutdown.clone());

    let state = tokio::time::timeout(Duration::from_secs(10), client.wait_synced())
        .await
        .expect("synced");
    assert_eq!(state.clusters.len(), 2);
    let cfg_now = agent.config.borrow().clone();
    let alpha_vip = cfg_now.service(&host("alpha")).unwrap().vip;
    let bravo_vip = cfg_now.service(&host("bravo")).unwrap().vip;
    assert_eq!(state.resolve(&host("alpha")), Some(alpha_vip));
    let route = state.route((alpha_vip, 8443).into()).expect("alpha routes");
    let alpha = route.cluster.expect("alpha's cluster is known");
    assert_eq!(alpha.discovery, Discovery::Eds);
    let tls = alpha.tls.as_ref().expect("alpha is IstioMtls");
    assert_eq!(tls.sni, format!("outbound_.8443_._.{}", host("alpha")));
    assert!(
        tls.server_ids
            .accepts("spiffe://local.domain/ns/demo/sa/alpha")
    );
    let eps: Vec<_> = alpha
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.port, e.priority, e.weight))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("10.0.0.1".to_owned(), 15443, 0, 1),
            ("10.0.0.2".to_owned(), 443, 1, 1)
        ]
    );
    let bravo = state
        .route((bravo_vip, 9443).into())
        .unwrap()
        .cluster
        .unwrap();
    assert!(bravo.tls.is_none());
    assert_eq!(bravo.discovery, Discovery::StrictDns);
    assert_eq!(
        bravo.endpoints[0].address,
        GatewayAddress::Hostname("gw.example.com".into())
    );
    let mut vips = state.vips();
    vips.sort();
    let mut want = vec![(alpha_vip, 8443).into(), (bravo_vip, 9443).into()];
    want.sort();
    assert_eq!(vips, want);
    let names: Vec<String> = state
        .dns_table()
        .iter()
        .map(|(h, _)| h.to_string())
        .collect();
    assert_eq!(names, vec![host("alpha"), host("bravo")]);
    assert_eq!(state.dns.as_ref().unwrap().address, ports.dns);
    assert!(
        client.last_nack().borrow().is_none(),
        "ferry's own output is all supported"
    );
    assert_eq!(*client.connection().borrow(), ConnectionState::Connected);

    // A gateway change and a removal arrive.
    let a2 = service_doc(
        "alpha",
        8443,
        "IstioMtls",
        &[Gw("istio-eastwestgateway", "10.0.0.9", 15443)],
    );
    agent.write(&format!("{}{a2}", agent_doc(ports)));
    let alpha_cluster = format!("{}_cluster", host("alpha"));
    let state = wait_state(&client, "the edit", |s| {
        s.clusters.len() == 1
            && s.dns_table().len() == 1
            && s.cluster(&alpha_cluster).is_some_and(|a| {
                a.endpoints.len() == 1 && a.endpoints[0].address.to_string() == "10.0.0.9"
            })
    })
    .await;
    assert!(state.synced);
    assert!(state.route((bravo_vip, 9443).into()).is_none());

    // The server goes away: the last good state keeps serving.
    drop(agent);
    let mut conn = client.connection();
    tokio::time::timeout(
        Duration::from_secs(10),
        conn.wait_for(|c| matches!(c, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("notices the server is gone")
    .unwrap();
    let mut reader = client.reader();
    let last = reader.current();
    assert_eq!(last.resolve(&host("alpha")), Some(alpha_vip));
    let r = last.route((alpha_vip, 8443).into()).unwrap();
    assert_eq!(r.cluster.unwrap().endpoints[0].port, 15443);

    // A server comes back on the same address with a new registry: the client reconnects
    // (backoff) and converges.
    let c = service_doc(
        "charlie",
        7443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.3", 15443)],
    );
    let agent2 = Agent::start_on(&format!("{}{a2}{c}", agent_doc(ports)), addr).await;
    let state = wait_state(&client, "the new registry after reconnect", |s| {
        s.resolve(&host("charlie")).is_some() && s.synced
    })
    .await;
    let charlie_vip = state.resolve(&host("charlie")).unwrap();
    assert!(
        state
            .route((charlie_vip, 7443).into())
            .unwrap()
            .cluster
            .is_some()
    );
    assert_eq!(reader.current().clusters.len(), 2);
    assert_eq!(*client.connection().borrow(), ConnectionState::Connected);
    shutdown.cancel();
    drop(agent2);
}
