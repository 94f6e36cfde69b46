//! ferry's own ADS client against ferry's server: typed state, hot-reload updates,
//! last-known-good while the server is away, reconnect with backoff.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use registry::config::GatewayAddress;
use testkit::xds_agent::{Agent, Gw, Ports, agent_doc, host, service_doc};
use tokio_util::sync::CancellationToken;
use xds::client::{AdsClient, AdsClientConfig, ConnectionState, Transport, XdsState};

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
    assert_eq!(state.services.len(), 2);
    let cfg_now = agent.config.borrow().clone();
    let alpha_vip = cfg_now.service(&host("alpha")).unwrap().vip;
    assert_eq!(state.resolve(&host("alpha")), Some(alpha_vip));
    let alpha = state.by_destination((alpha_vip, 8443).into()).unwrap();
    let Transport::IstioMtls(tls) = &alpha.cluster.transport else {
        panic!("alpha is IstioMtls")
    };
    assert_eq!(tls.sni, format!("outbound_.8443_._.{}", host("alpha")));
    assert!(
        tls.server_ids
            .accepts("spiffe://local.domain/ns/demo/sa/alpha")
    );
    assert_eq!(alpha.endpoints.len(), 2);
    assert_eq!(alpha.preferred_endpoints().len(), 1);
    assert_eq!(alpha.preferred_endpoints()[0].port, 15443);
    let bravo = &state.services[&host("bravo")];
    assert_eq!(bravo.cluster.transport, Transport::Passthrough);
    assert_eq!(
        bravo.endpoints[0].address,
        GatewayAddress::Hostname("gw.example.com".into())
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
    let state = wait_state(&client, "the edit", |s| {
        s.services.len() == 1
            && s.services.get(&host("alpha")).is_some_and(|a| {
                a.endpoints.len() == 1 && a.endpoints[0].address.to_string() == "10.0.0.9"
            })
    })
    .await;
    assert!(state.synced);

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
    assert_eq!(reader.current().resolve(&host("alpha")), Some(alpha_vip));

    // A server comes back on the same address with a new registry: the client reconnects
    // (backoff) and converges.
    let c = service_doc(
        "charlie",
        7443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.3", 15443)],
    );
    let agent2 = Agent::start_on(&format!("{}{a2}{c}", agent_doc(ports)), addr).await;
    wait_state(&client, "the new registry after reconnect", |s| {
        s.services.contains_key(&host("charlie")) && s.synced
    })
    .await;
    assert_eq!(reader.current().services.len(), 2);
    assert_eq!(*client.connection().borrow(), ConnectionState::Connected);
    shutdown.cancel();
    drop(agent2);
}
