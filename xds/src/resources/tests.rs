//! Translation rules, one test each, decoding what was built.

use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address::Protocol};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter, listener_filter};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::DnsFilterConfig;
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::dns_filter_config::server_context_config::ConfigSource;
use prost::Message;

use super::*;
use crate::client::{Endpoints, ServerIdMatch, Upstream};
use registry::config::{GatewayAddress, parse};

const AGENT: &str = "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\nlisten:\n  outbound: 0.0.0.0:10000\n  dns: 127.0.0.1:15053\n";

fn svc(name: &str, tls: &str, ids: bool, gateways: &str) -> String {
    let ids = if ids {
        format!("  spiffeIDPaths: [/ns/demo/sa/{name}]\n")
    } else {
        String::new()
    };
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations:\n    ferry.dev/trust-domain: local.domain\nspec:\n  name: {name}\n  namespace: demo\n  port: 8443\n  exportedTrustDomains: [client.domain]\n{ids}  tlsMode: {tls}\n  gateways:\n{gateways}"
    )
}

const EW_INGRESS: &str = "    - type: istio-ingressgateway\n      port: 443\n      ip: 10.0.0.2\n    - type: istio-eastwestgateway\n      port: 15443\n      ip: 10.0.0.1\n";
const HOSTNAME_GW: &str =
    "    - type: istio-eastwestgateway\n      port: 15443\n      hostname: gw.example.com\n";

fn config(src: &str) -> Config {
    match parse(src, Path::new("t.yaml"), Path::new("/nonexistent")) {
        Ok(l) => l.config,
        Err(e) => panic!("{e}"),
    }
}

fn standard() -> Config {
    config(&format!(
        "{AGENT}{}{}{}",
        svc("istio", "IstioMtls", true, EW_INGRESS),
        svc("anytd", "IstioMtls", false, EW_INGRESS),
        svc("plain", "Mtls", true, HOSTNAME_GW),
    ))
}

fn decode<M: Message + Default>(r: &Resource) -> M {
    r.decode().unwrap()
}

fn cluster_of(snap: &Snapshot, name: &str) -> Cluster {
    decode(
        snap.of(ResourceType::Cluster)
            .get(&format!("{name}.demo.local.domain_cluster"))
            .unwrap(),
    )
}

#[test]
fn type_urls_round_trip_and_unknown_ones_are_explained() {
    for t in ResourceType::ALL {
        assert_eq!(t.type_url().parse::<ResourceType>(), Ok(t));
    }
    let e = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
        .parse::<ResourceType>()
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("RouteConfiguration") && msg.contains("does not serve"),
        "{msg}"
    );
}

#[test]
fn ip_gateways_make_an_eds_cluster_over_ads() {
    let c = cluster_of(&build(&standard(), 1), "istio");
    assert_eq!(c.name, "istio.demo.local.domain_cluster");
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
    );
    assert!(c.eds_cluster_config.unwrap().eds_config.is_some());
    assert!(c.load_assignment.is_none());
    assert_eq!(c.connect_timeout.unwrap().seconds, 5);
    // Istio's wide-open circuit breakers, not Envoy's 1,024-connection default.
    let t = &c.circuit_breakers.unwrap().thresholds[0];
    for limit in [
        &t.max_connections,
        &t.max_pending_requests,
        &t.max_requests,
        &t.max_retries,
    ] {
        assert_eq!(limit.as_ref().map(|v| v.value), Some(u32::MAX));
    }
}

#[test]
fn hostname_gateways_make_a_strict_dns_cluster_with_inline_endpoints() {
    let c = cluster_of(&build(&standard(), 1), "plain");
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
    );
    let eps = Endpoints::try_from(c.load_assignment.as_ref().unwrap()).unwrap();
    assert_eq!(
        eps.endpoints[0].address,
        GatewayAddress::Hostname("gw.example.com".into())
    );
    // Mtls: raw TCP, no TLS origination.
    assert!(c.transport_socket.is_none());
}

#[test]
fn istio_mtls_cluster_carries_sni_alpn_sds_and_exact_sans() {
    let snap = build(&standard(), 1);
    let info = Upstream::try_from(&cluster_of(&snap, "istio")).unwrap();
    assert_eq!(info.name, "istio.demo.local.domain_cluster");
    let Some(tls) = info.tls else {
        panic!("not istio")
    };
    assert_eq!(tls.sni, "outbound_.8443_._.istio.demo.local.domain");
    assert_eq!(tls.alpn, vec!["istio-peer-exchange", "istio"]);
    assert_eq!(tls.cert_secret, "default");
    assert_eq!(tls.validation_secret, "spiffe://local.domain");
    assert_eq!(
        tls.server_ids,
        ServerIdMatch::Exact(vec!["spiffe://local.domain/ns/demo/sa/istio".into()])
    );
    // The SDS source is the bootstrap's sds-grpc cluster.
    let c = cluster_of(&snap, "istio");
    let raw = format!("{:?}", c.transport_socket.unwrap());
    assert!(raw.contains("envoy.transport_sockets.tls"), "{raw}");
    let tls_any = cluster_of(&snap, "istio").transport_socket.unwrap();
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = tls_any.config_type
    else {
        panic!()
    };
    let ctx =
        envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext::decode(
            any.value.as_slice(),
        )
        .unwrap();
    assert!(format!("{ctx:?}").contains("sds-grpc"));
}

#[test]
fn istio_mtls_without_spiffe_id_paths_accepts_the_trust_domain() {
    let info = Upstream::try_from(&cluster_of(&build(&standard(), 1), "anytd")).unwrap();
    let Some(tls) = info.tls else { panic!() };
    assert_eq!(
        tls.server_ids,
        ServerIdMatch::Prefix("spiffe://local.domain/".into())
    );
    assert!(tls.server_ids.accepts("spiffe://local.domain/ns/x/sa/y"));
    assert!(!tls.server_ids.accepts("spiffe://other.domain/ns/x/sa/y"));
}

#[test]
fn cluster_metadata_names_hostname_port_vip_and_mode() {
    let cfg = standard();
    let snap = build(&cfg, 1);
    let c = cluster_of(&snap, "plain");
    let s = cfg.service("plain.demo.local.domain").unwrap();
    let m = c.metadata.as_ref();
    assert_eq!(
        meta::get_string(m, meta::VIP),
        Some(s.vip.to_string().as_str())
    );
    assert_eq!(meta::get_number(m, meta::PORT), Some(8443.0));
    assert_eq!(meta::get_string(m, meta::TLS_MODE), Some("Mtls"));
    // Mtls: raw TCP, as the ADS client sees it too.
    assert_eq!(Upstream::try_from(&c).unwrap().tls, None);
}

#[test]
fn endpoints_put_east_west_at_priority_0_and_ingress_at_1() {
    let snap = build(&standard(), 1);
    let cla: ClusterLoadAssignment = decode(
        snap.of(ResourceType::Endpoint)
            .get("istio.demo.local.domain_cluster")
            .unwrap(),
    );
    assert_eq!(cla.cluster_name, "istio.demo.local.domain_cluster");
    let eps = Endpoints::try_from(&cla).unwrap().endpoints;
    assert_eq!(eps.len(), 2);
    assert_eq!((eps[0].priority, eps[0].port, eps[0].weight), (0, 15443, 1));
    assert_eq!((eps[1].priority, eps[1].port, eps[1].weight), (1, 443, 1));
    assert_eq!(
        eps[0].address,
        GatewayAddress::Ip("10.0.0.1".parse().unwrap())
    );
}

fn listener(snap: &Snapshot, name: &str) -> Option<Listener> {
    snap.of(ResourceType::Listener).get(name).map(|r| decode(r))
}

#[test]
fn outbound_listener_has_one_chain_per_vip_and_port_and_no_default() {
    let cfg = standard();
    let l = listener(&build(&cfg, 1), OUTBOUND_LISTENER).unwrap();
    assert!(l.default_filter_chain.is_none());
    assert_eq!(l.listener_filters.len(), 1);
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.original_dst"
    );
    assert!(matches!(
        l.listener_filters[0].config_type,
        Some(listener_filter::ConfigType::TypedConfig(_))
    ));
    let Some(address::Address::SocketAddress(sa)) = l.address.unwrap().address else {
        panic!()
    };
    assert_eq!(sa.address, "0.0.0.0");
    assert_eq!(l.filter_chains.len(), cfg.services.len());
    for (chain, s) in l.filter_chains.iter().zip(&cfg.services) {
        let m = chain.filter_chain_match.as_ref().unwrap();
        assert_eq!(m.destination_port.as_ref().unwrap().value, 8443);
        assert_eq!(m.prefix_ranges.len(), 1);
        assert_eq!(m.prefix_ranges[0].address_prefix, s.vip.to_string());
        assert_eq!(m.prefix_ranges[0].prefix_len.as_ref().unwrap().value, 32);
        let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else {
            panic!()
        };
        let tcp = TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            tcp.cluster_specifier,
            Some(ClusterSpecifier::Cluster(s.cluster_name()))
        );
    }
}

#[test]
fn no_services_means_no_outbound_listener_but_a_dns_listener() {
    let snap = build(&config(AGENT), 1);
    assert!(listener(&snap, OUTBOUND_LISTENER).is_none());
    assert!(listener(&snap, DNS_LISTENER).is_some());
    assert!(snap.of(ResourceType::Cluster).resources.is_empty());
}

#[test]
fn passthrough_adds_a_loopback_chain_and_an_original_dst_cluster() {
    let cfg = config(&format!(
        "{}  outboundPassthrough: true\n{}",
        AGENT,
        svc("plain", "Mtls", true, HOSTNAME_GW)
    ));
    let snap = build(&cfg, 1);
    let l = listener(&snap, OUTBOUND_LISTENER).unwrap();
    let last = l.filter_chains.last().unwrap();
    assert_eq!(last.name, "passthrough");
    let m = last.filter_chain_match.as_ref().unwrap();
    assert!(m.destination_port.is_none());
    assert_eq!(m.prefix_ranges[0].address_prefix, "127.0.0.0");
    let c: Cluster = decode(
        snap.of(ResourceType::Cluster)
            .get(PASSTHROUGH_CLUSTER)
            .unwrap(),
    );
    assert_eq!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32
        ))
    );
}

#[test]
fn dns_listener_maps_every_hostname_to_its_vip_over_udp() {
    let cfg = standard();
    let l = listener(&build(&cfg, 1), DNS_LISTENER).unwrap();
    let Some(address::Address::SocketAddress(sa)) = l.address.unwrap().address else {
        panic!()
    };
    assert_eq!(sa.protocol, Protocol::Udp as i32);
    assert_eq!(sa.address, "127.0.0.1");
    assert_eq!(l.listener_filters[0].name, "envoy.filters.udp.dns_filter");
    let Some(listener_filter::ConfigType::TypedConfig(any)) = &l.listener_filters[0].config_type
    else {
        panic!()
    };
    let f = DnsFilterConfig::decode(any.value.as_slice()).unwrap();
    assert!(f.client_config.is_some(), "other names resolve upstream");
    let Some(ConfigSource::InlineDnsTable(table)) = f.server_config.unwrap().config_source else {
        panic!()
    };
    assert_eq!(table.virtual_domains.len(), cfg.services.len());
    for (d, s) in table.virtual_domains.iter().zip(&cfg.services) {
        assert_eq!(d.name, s.hostname.as_str());
        let dbg = format!("{:?}", d.endpoint);
        assert!(dbg.contains(&s.vip.to_string()), "{dbg}");
    }
}

#[test]
fn dns_listener_resolves_other_names_through_the_configured_upstreams() {
    use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
    let decode = |cfg: &Config| {
        let l = listener(&build(cfg, 1), DNS_LISTENER).unwrap();
        let Some(listener_filter::ConfigType::TypedConfig(any)) =
            &l.listener_filters[0].config_type
        else {
            panic!()
        };
        DnsFilterConfig::decode(any.value.as_slice())
            .unwrap()
            .client_config
            .unwrap()
            .typed_dns_resolver_config
    };
    assert!(
        decode(&standard()).is_none(),
        "no upstreams: Envoy's default (resolv.conf)"
    );
    let with = config(&format!(
        "{AGENT}dns:\n  upstreams: [\"127.0.0.53\", \"127.0.0.54:5353\"]\n"
    ));
    let ext = decode(&with).unwrap();
    assert_eq!(ext.name, "envoy.network.dns_resolver.cares");
    let cares = CaresDnsResolverConfig::decode(ext.typed_config.unwrap().value.as_slice()).unwrap();
    let got: Vec<String> = cares
        .resolvers
        .iter()
        .map(|a| match &a.address {
            Some(address::Address::SocketAddress(sa)) => {
                format!("{}:{:?}", sa.address, sa.port_specifier)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        [
            "127.0.0.53:Some(PortValue(53))",
            "127.0.0.54:Some(PortValue(5353))"
        ]
    );
    assert!(!cares.use_resolvers_as_fallback);
    // The listener's version follows the upstreams.
    let a = build(&standard(), 1);
    let b = build(&with, 1);
    assert_ne!(
        a.of(ResourceType::Listener)
            .get(DNS_LISTENER)
            .unwrap()
            .version,
        b.of(ResourceType::Listener)
            .get(DNS_LISTENER)
            .unwrap()
            .version
    );
}

#[test]
fn versions_are_stable_and_change_only_with_their_inputs() {
    let a = build(&standard(), 1);
    let b = build(&standard(), 2);
    assert_eq!(a.types, b.types, "same config, same resources and versions");

    let moved = config(&format!(
        "{AGENT}{}{}{}",
        svc("istio", "IstioMtls", true, HOSTNAME_GW),
        svc("anytd", "IstioMtls", false, EW_INGRESS),
        svc("plain", "Mtls", true, HOSTNAME_GW),
    ));
    let c = build(&moved, 3);
    let name = |n: &str| format!("{n}.demo.local.domain_cluster");
    // An EDS cluster does not change when only its IP gateways change.
    let ips = config(&format!(
        "{AGENT}{}{}{}",
        svc(
            "istio",
            "IstioMtls",
            true,
            &EW_INGRESS.replace("10.0.0.1", "10.9.9.9")
        ),
        svc("anytd", "IstioMtls", false, EW_INGRESS),
        svc("plain", "Mtls", true, HOSTNAME_GW),
    ));
    let d = build(&ips, 4);
    assert_eq!(a.of(ResourceType::Cluster), d.of(ResourceType::Cluster));
    assert_ne!(
        a.of(ResourceType::Endpoint)
            .get(&name("istio"))
            .unwrap()
            .version,
        d.of(ResourceType::Endpoint)
            .get(&name("istio"))
            .unwrap()
            .version
    );
    for t in [ResourceType::Cluster, ResourceType::Endpoint] {
        assert_ne!(
            a.of(t).get(&name("istio")).unwrap().version,
            c.of(t).get(&name("istio")).unwrap().version
        );
        for other in ["anytd", "plain"] {
            assert_eq!(
                a.of(t).get(&name(other)).unwrap().version,
                c.of(t).get(&name(other)).unwrap().version
            );
        }
        assert_ne!(a.of(t).version, c.of(t).version);
    }
    // Gateways are not part of the listeners.
    assert_eq!(a.of(ResourceType::Listener), c.of(ResourceType::Listener));
}

#[test]
fn incremental_build_reuses_unchanged_services_and_lists_changes() {
    let a_cfg = standard();
    let a = build(&a_cfg, 1);
    let moved = config(&format!(
        "{AGENT}{}{}{}",
        svc(
            "istio",
            "IstioMtls",
            true,
            &EW_INGRESS.replace("10.0.0.1", "10.9.9.9")
        ),
        svc("anytd", "IstioMtls", false, EW_INGRESS),
        svc("plain", "Mtls", true, HOSTNAME_GW),
    ));
    let b = build_from(&moved, Some((&a_cfg, &a)), 2);
    assert_eq!(
        b.types,
        build(&moved, 2).types,
        "same result as a full build"
    );
    let istio = "istio.demo.local.domain_cluster".to_owned();
    assert_eq!(
        b.changed_since(1, ResourceType::Endpoint),
        Some(std::slice::from_ref(&istio))
    );
    assert_eq!(b.changed_since(1, ResourceType::Cluster), Some(&[][..]));
    assert_eq!(b.changed_since(1, ResourceType::Listener), Some(&[][..]));
    assert!(b.changed_since(0, ResourceType::Endpoint).is_none());
    let plain = "plain.demo.local.domain_cluster";
    assert!(Arc::ptr_eq(
        a.of(ResourceType::Cluster).get(plain).unwrap(),
        b.of(ResourceType::Cluster).get(plain).unwrap()
    ));
    // Removing a service lists it as changed.
    let fewer = config(&format!(
        "{AGENT}{}",
        svc("plain", "Mtls", true, HOSTNAME_GW)
    ));
    let c = build_from(&fewer, Some((&moved, &b)), 3);
    let gone = c.changed_since(2, ResourceType::Cluster).unwrap();
    assert_eq!(gone.len(), 2);
    assert!(gone.contains(&istio));
}

#[test]
fn inputs_that_do_not_serialise_give_an_error_not_a_version() {
    struct Unserialisable;
    impl Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }
    let c = Cluster::default();
    let e = Resource::new("x".into(), &c, &Unserialisable).unwrap_err();
    assert_eq!(e.name, "x");
    assert!(e.to_string().contains("left out"), "{e}");
}

#[test]
fn resources_decode_from_their_single_encoded_copy() {
    let snap = build(&standard(), 1);
    let r = snap
        .of(ResourceType::Cluster)
        .get("plain.demo.local.domain_cluster")
        .unwrap();
    assert_eq!(r.any().unwrap().type_url, crate::type_url::CLUSTER);
    let c: Cluster = r.decode().unwrap();
    assert_eq!(c.name, r.name);
}
