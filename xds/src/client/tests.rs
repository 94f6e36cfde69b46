//! The client against ferry's own translator output (end to end through the cache), the
//! last-good rules, NACK naming, a NACK round trip with the real server, and backoff.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::Resource as PbResource;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use registry::config::{Config, GatewayAddress};
use testkit::config::{AgentDoc, Gw, host, service_doc};

use super::cache::Cache;
use super::*;
use crate::resources::{Resource, Snapshot, build};

fn config(services: &str, passthrough: bool) -> Config {
    let mut agent = AgentDoc::new("client.domain")
        .listen("outbound", "0.0.0.0:10000")
        .listen("dns", "127.0.0.1:15053");
    if passthrough {
        agent = agent.listen("outboundPassthrough", "true");
    }
    let yaml = format!("{}{services}", agent.render());
    registry::config::parse(&yaml, Path::new("t.yaml"), Path::new("/"))
        .unwrap()
        .config
}

fn standard() -> Config {
    let alpha = service_doc(
        "alpha",
        8443,
        "IstioMtls",
        &[
            Gw("istio-ingressgateway", "10.0.0.2", 443),
            Gw("istio-eastwestgateway", "10.0.0.1", 15443),
        ],
    );
    let bravo = service_doc(
        "bravo",
        9443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "gw.example.com", 15443)],
    );
    config(&format!("{alpha}{bravo}"), true)
}

/// A SotW response carrying every resource of type `t` in `snap`.
fn response(snap: &Snapshot, t: ResourceType, version: &str) -> DiscoveryResponse {
    DiscoveryResponse {
        type_url: t.type_url().into(),
        version_info: version.into(),
        nonce: format!("n-{version}"),
        resources: snap
            .of(t)
            .resources
            .values()
            .map(|r| r.any().unwrap())
            .collect(),
        ..Default::default()
    }
}

fn any_of<M: prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

#[test]
fn ferry_translator_output_routes_end_to_end() {
    let cfg = standard();
    let snap = build(&cfg, 1);
    let mut cache = Cache::default();
    assert!(
        cache
            .apply_clusters(&response(&snap, ResourceType::Cluster, "1"))
            .is_empty()
    );
    assert!(
        cache
            .apply_listeners(&response(&snap, ResourceType::Listener, "1"))
            .is_empty()
    );
    let eds = cache.eds_names();
    assert_eq!(
        eds.iter().collect::<Vec<_>>(),
        vec![&format!("{}_cluster", host("alpha"))]
    );
    assert!(!cache.state().synced, "EDS not seen yet");
    assert!(
        cache
            .apply_endpoints(&response(&snap, ResourceType::Endpoint, "1"), &eds)
            .is_empty()
    );
    let state = cache.state();
    assert!(state.synced);

    let alpha = cfg.service(&host("alpha")).unwrap();
    let bravo = cfg.service(&host("bravo")).unwrap();
    let r = state.route((alpha.vip, 8443).into()).expect("alpha routes");
    assert_eq!(r.chain.name, host("alpha"));
    assert_eq!(r.chain.stat_prefix, host("alpha"));
    let up = r.cluster.expect("alpha's cluster");
    assert_eq!(up.name, format!("{}_cluster", host("alpha")));
    assert_eq!(up.discovery, Discovery::Eds);
    assert_eq!(up.connect_timeout, Duration::from_secs(5));
    let tls = up.tls.as_ref().expect("IstioMtls originates TLS");
    assert_eq!(tls.sni, format!("outbound_.8443_._.{}", host("alpha")));
    assert_eq!(tls.alpn, ["istio-peer-exchange", "istio"]);
    assert_eq!(tls.cert_secret, "default");
    assert_eq!(tls.validation_secret, "spiffe://local.domain");
    assert_eq!(
        tls.server_ids,
        ServerIdMatch::Exact(vec!["spiffe://local.domain/ns/demo/sa/alpha".into()])
    );
    let eps: Vec<(String, u16, u32, u32)> = up
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.port, e.priority, e.weight))
        .collect();
    assert_eq!(
        eps,
        vec![
            ("10.0.0.1".into(), 15443, 0, 1),
            ("10.0.0.2".into(), 443, 1, 1)
        ]
    );

    // bravo: a hostname gateway, so STRICT_DNS with inline endpoints, raw TCP.
    let b = state
        .route((bravo.vip, 9443).into())
        .unwrap()
        .cluster
        .unwrap();
    assert_eq!(b.discovery, Discovery::StrictDns);
    assert!(b.tls.is_none());
    assert_eq!(
        b.endpoints[0].address,
        GatewayAddress::Hostname("gw.example.com".into())
    );

    // A loopback port no service has: the passthrough chain (no port, 127/8) to the
    // ORIGINAL_DST cluster. A service's port on another VIP: chains name that port, none
    // matches, and Envoy does not fall back to port-less chains.
    let p = state.route((alpha.vip, 1234).into()).unwrap();
    assert_eq!(p.chain.cluster, crate::resources::PASSTHROUGH_CLUSTER);
    assert_eq!(p.cluster.unwrap().discovery, Discovery::OriginalDst);
    assert!(state.route((bravo.vip, 8443).into()).is_none());

    let mut vips = state.vips();
    vips.sort();
    let mut want: Vec<SocketAddr> = vec![(alpha.vip, 8443).into(), (bravo.vip, 9443).into()];
    want.sort();
    assert_eq!(vips, want);

    assert_eq!(state.resolve(&host("ALPHA")), Some(alpha.vip));
    assert_eq!(
        state.resolve(&format!("{}.", host("bravo"))),
        Some(bravo.vip)
    );
    let table: Vec<(String, Ipv4Addr)> = state
        .dns_table()
        .into_iter()
        .map(|(h, v)| (h.to_string(), v))
        .collect();
    assert_eq!(
        table,
        vec![(host("alpha"), alpha.vip), (host("bravo"), bravo.vip)]
    );
    let dns = state.dns.as_ref().unwrap();
    assert_eq!(
        dns.address,
        "127.0.0.1:15053".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(dns.ttl, Duration::from_secs(30));

    // What the proxy's /config_dump shows.
    let dump = serde_json::to_value(&*state.clusters[&up.name]).unwrap();
    assert_eq!(
        dump["tls"]["sni"],
        format!("outbound_.8443_._.{}", host("alpha"))
    );
    let whole = serde_json::to_string(&state).unwrap();
    assert!(whole.contains("\"prefixes\":[\""), "{whole}");
}

#[test]
fn a_rejected_resource_keeps_its_last_good_version_and_the_rest_applies() {
    let snap = build(&standard(), 1);
    let mut cache = Cache::default();
    cache.apply_clusters(&response(&snap, ResourceType::Cluster, "1"));
    cache.apply_listeners(&response(&snap, ResourceType::Listener, "1"));
    let eds = cache.eds_names();
    cache.apply_endpoints(&response(&snap, ResourceType::Endpoint, "1"), &eds);
    let before = cache.state();
    let alpha_name = format!("{}_cluster", host("alpha"));

    // CDS v2: alpha with an unsupported lb_policy, bravo dropped, a new good cluster.
    let mut bad: Cluster = snap
        .of(ResourceType::Cluster)
        .get(&alpha_name)
        .unwrap()
        .decode()
        .unwrap();
    bad.lb_policy = LbPolicy::Maglev as i32;
    let new = Cluster {
        name: "new".into(),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "new".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = DiscoveryResponse {
        type_url: ResourceType::Cluster.type_url().into(),
        version_info: "2".into(),
        resources: vec![any_of(&bad), any_of(&new)],
        ..Default::default()
    };
    let errors = cache.apply_clusters(&resp);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].resource_name(), alpha_name);
    assert_eq!(errors[0].field(), "lb_policy");
    let s = cache.state();
    assert!(Arc::ptr_eq(
        &s.clusters[&alpha_name],
        &before.clusters[&alpha_name]
    ));
    assert_eq!(s.clusters["new"].connect_timeout, Duration::from_secs(1));
    assert!(
        !s.clusters
            .contains_key(&format!("{}_cluster", host("bravo")))
    );
    assert!(s.synced, "alpha's endpoints are still known");

    // LDS v2: the outbound listener gains a server_names match: refused, the old one
    // keeps routing; the dns listener (changed) applies.
    let mut l: Listener = snap
        .of(ResourceType::Listener)
        .get("outbound")
        .unwrap()
        .decode()
        .unwrap();
    l.filter_chains[1]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .server_names = vec!["x".into()];
    let mut dns: Listener = snap
        .of(ResourceType::Listener)
        .get("dns")
        .unwrap()
        .decode()
        .unwrap();
    dns.address = Some(envoy_types::pb::envoy::config::core::v3::Address {
        address: Some(
            envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                envoy_types::pb::envoy::config::core::v3::SocketAddress {
                    protocol: 1,
                    address: "127.0.0.1".into(),
                    port_specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(5353),
                    ),
                    ..Default::default()
                },
            ),
        ),
    });
    let resp = DiscoveryResponse {
        type_url: ResourceType::Listener.type_url().into(),
        version_info: "2".into(),
        resources: vec![any_of(&l), any_of(&dns)],
        ..Default::default()
    };
    let errors = cache.apply_listeners(&resp);
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "listener \"outbound\": filter_chains[1].filter_chain_match.server_names is not supported by ferry proxy"
    );
    let s = cache.state();
    assert_eq!(s.outbound, before.outbound);
    assert_eq!(s.dns.as_ref().unwrap().address.port(), 5353);

    // EDS: a bad assignment keeps alpha's endpoints.
    let mut cla: ClusterLoadAssignment = snap
        .of(ResourceType::Endpoint)
        .get(&alpha_name)
        .unwrap()
        .decode()
        .unwrap();
    cla.endpoints[0].lb_endpoints[0].host_identifier = None;
    let resp = DiscoveryResponse {
        type_url: ResourceType::Endpoint.type_url().into(),
        resources: vec![any_of(&cla)],
        ..Default::default()
    };
    let errors = cache.apply_endpoints(&resp, &cache.eds_names());
    assert_eq!(errors.len(), 1);
    assert_eq!(
        cache.state().clusters[&alpha_name].endpoints,
        before.clusters[&alpha_name].endpoints
    );

    // The next good full state replaces everything, removals included.
    cache.apply_listeners(&DiscoveryResponse {
        type_url: ResourceType::Listener.type_url().into(),
        ..Default::default()
    });
    assert!(cache.state().outbound.is_none());
}

#[test]
fn backoff_grows_exponentially_with_jitter_and_is_capped() {
    let cfg = AdsClientConfig::new("http://127.0.0.1:1");
    assert_eq!(
        (cfg.node_id.as_str(), cfg.node_cluster.as_str()),
        ("node", "cluster")
    );
    for attempt in 1..40 {
        let d = backoff(&cfg, attempt);
        let full = cfg
            .initial_backoff
            .saturating_mul(1 << (attempt - 1).min(20))
            .min(cfg.max_backoff);
        assert!(
            d >= full / 2 && d <= full,
            "attempt {attempt}: {d:?} vs {full:?}"
        );
    }
    assert!(backoff(&cfg, 1) <= Duration::from_millis(100));
    assert!(backoff(&cfg, 30) <= cfg.max_backoff);
}

#[test]
fn a_resource_that_does_not_decode_is_named_in_the_nack() {
    let garbage = Any {
        type_url: crate::type_url::CLUSTER.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let wrapped = Any {
        type_url: crate::type_url::RESOURCE.into(),
        value: PbResource {
            name: "wrapped_cluster".into(),
            resource: Some(garbage.clone()),
            ..Default::default()
        }
        .encode_to_vec(),
    };
    let resp = DiscoveryResponse {
        type_url: crate::type_url::CLUSTER.into(),
        resources: vec![garbage, wrapped],
        ..Default::default()
    };
    let errors = Cache::default().apply_clusters(&resp);
    let names: Vec<&str> = errors.iter().map(|e| e.resource_name()).collect();
    assert_eq!(
        names,
        ["#0 of envoy.config.cluster.v3.Cluster", "wrapped_cluster"]
    );
    let nack = ack_or_nack(
        &mut TypeState::default(),
        ResourceType::Cluster,
        None,
        &resp,
        errors,
    );
    let message = nack.error_detail.unwrap().message;
    assert!(message.contains("wrapped_cluster"), "{message}");
    assert!(!message.contains("resource \"\""), "{message}");
}

/// The real server serves a snapshot with an unsupported outbound listener: the client
/// NACKs it (the server counts it), publishes the rest, exports the last NACK, and applies
/// the fixed listener when it comes.
#[tokio::test]
async fn nack_round_trip_with_the_real_server() {
    let cfg = standard();
    let good = build(&cfg, 1);
    let all = |s: &Snapshot, t: ResourceType| -> Vec<Resource> {
        s.of(t).resources.values().map(|r| (**r).clone()).collect()
    };
    let mut bad_l: Listener = good
        .of(ResourceType::Listener)
        .get("outbound")
        .unwrap()
        .decode()
        .unwrap();
    bad_l.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .transport_protocol = "tls".into();
    let mut listeners = vec![Resource::new("outbound".into(), &bad_l, "bad").unwrap()];
    listeners.extend(
        all(&good, ResourceType::Listener)
            .into_iter()
            .filter(|r| r.name == "dns"),
    );
    let bad = Snapshot::from_resources(
        2,
        [
            all(&good, ResourceType::Cluster),
            all(&good, ResourceType::Endpoint),
            listeners,
        ],
    );
    let (tx, rx) = watch::channel(Arc::new(bad));
    let stop = CancellationToken::new();
    let server = crate::server::XdsServer::new(rx, stop.clone());
    let metrics = server.metrics();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(server.serve_on(l));

    let client = AdsClient::start(AdsClientConfig::new(format!("http://{addr}")), stop.clone());
    let mut nack = client.last_nack();
    let msg = tokio::time::timeout(Duration::from_secs(10), nack.wait_for(|n| n.is_some()))
        .await
        .expect("a NACK")
        .unwrap()
        .clone()
        .unwrap();
    assert!(msg.starts_with("LDS version"), "{msg}");
    assert!(
        msg.contains("listener \"outbound\": filter_chains[0].filter_chain_match.transport_protocol is not supported by ferry proxy"),
        "{msg}"
    );
    let state = tokio::time::timeout(Duration::from_secs(10), client.wait_synced())
        .await
        .unwrap();
    assert!(state.outbound.is_none(), "never had a good outbound");
    assert!(state.dns.is_some());
    assert_eq!(state.clusters.len(), 3);
    let mut tries = 0;
    while metrics.nacks(ResourceType::Listener) == 0 && tries < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tries += 1;
    }
    assert_eq!(metrics.nacks(ResourceType::Listener), 1);

    // The control plane fixes it: the next version applies.
    tx.send_replace(Arc::new(build(&cfg, 3)));
    let mut states = client.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        states.wait_for(|s| s.outbound.is_some()),
    )
    .await
    .expect("the fixed listener applies")
    .unwrap();
    stop.cancel();
}
