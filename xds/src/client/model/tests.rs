//! Decoding rules (one test per refusal, each naming its field) and Envoy's filter chain
//! match order.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, CustomClusterType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, Pipe, SocketAddress, TransportSocket, address,
    socket_address::PortSpecifier, socket_address::Protocol, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::data::dns::v3::DnsTable;
use envoy_types::pb::envoy::data::dns::v3::dns_table::{
    AddressList, DnsEndpoint, DnsVirtualDomain, dns_endpoint::EndpointConfig,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier, tcp_proxy::OnDemand, tcp_proxy::TunnelingConfig,
    tcp_proxy::WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::DnsFilterConfig;
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::dns_filter_config::{
    ServerContextConfig, server_context_config::ConfigSource,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    TlsCertificate, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;

use super::*;

/// Sets one field of a message under test.
type Set<M> = fn(&mut M);

fn tcp_proxy(cluster: &str) -> TcpProxy {
    TcpProxy {
        stat_prefix: cluster.into(),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    }
}

fn network_filter(name: &str, any: Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any)),
    }
}

fn chain_with(m: FilterChainMatch, tp: TcpProxy) -> FilterChain {
    FilterChain {
        name: "c".into(),
        filter_chain_match: Some(m),
        filters: vec![network_filter(
            "envoy.filters.network.tcp_proxy",
            pack_any(tp),
        )],
        ..Default::default()
    }
}

/// A chain matching `prefixes` (`"10.0.0.0/8"`) and `port`, proxying to `cluster`.
fn chain(prefixes: &[&str], port: Option<u32>, cluster: &str) -> FilterChain {
    let m = FilterChainMatch {
        destination_port: port.map(|value| UInt32Value { value }),
        prefix_ranges: prefixes
            .iter()
            .map(|p| {
                let (a, l) = p.split_once('/').unwrap();
                CidrRange {
                    address_prefix: a.into(),
                    prefix_len: Some(UInt32Value {
                        value: l.parse().unwrap(),
                    }),
                }
            })
            .collect(),
        ..Default::default()
    };
    let mut c = chain_with(m, tcp_proxy(cluster));
    c.name = cluster.into();
    c
}

fn socket(protocol: Protocol, ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: protocol as i32,
            address: ip.into(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn listener_filter(name: &str, any: Any) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any)),
        ..Default::default()
    }
}

fn outbound(chains: Vec<FilterChain>) -> Listener {
    use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
    Listener {
        name: "outbound".into(),
        address: Some(socket(Protocol::Tcp, "0.0.0.0", 10000)),
        listener_filters: vec![listener_filter(
            "envoy.filters.listener.original_dst",
            pack_any(OriginalDst {}),
        )],
        filter_chains: chains,
        ..Default::default()
    }
}

fn listener_err(l: &Listener) -> ResourceError {
    OutboundListener::try_from(l).expect_err("rejected")
}

#[track_caller]
fn assert_unsupported(e: &ResourceError, field: &str) {
    assert!(
        matches!(e, ResourceError::Unsupported { .. }),
        "not Unsupported: {e}"
    );
    assert_eq!(e.field(), field, "{e}");
    assert!(e.to_string().contains(field), "{e}");
    assert!(
        e.to_string().contains("is not supported by ferry proxy"),
        "{e}"
    );
}

#[test]
fn filter_chain_match_fields_other_than_port_and_prefix_are_refused_by_name() {
    let cases: Vec<(&str, Set<FilterChainMatch>)> = vec![
        ("server_names", |m| {
            m.server_names = vec!["a.example".into()]
        }),
        ("transport_protocol", |m| {
            m.transport_protocol = "tls".into()
        }),
        ("application_protocols", |m| {
            m.application_protocols = vec!["h2".into()]
        }),
        ("source_type", |m| m.source_type = 1),
        ("source_prefix_ranges", |m| {
            m.source_prefix_ranges = vec![CidrRange::default()]
        }),
        ("source_ports", |m| m.source_ports = vec![1]),
        ("direct_source_prefix_ranges", |m| {
            m.direct_source_prefix_ranges = vec![CidrRange::default()]
        }),
    ];
    for (field, set) in cases {
        let mut chains = vec![
            chain(&["10.0.0.1/32"], Some(80), "a"),
            chain(&["10.0.0.2/32"], Some(80), "b"),
            chain(&["10.0.0.3/32"], Some(80), "c"),
        ];
        set(chains[2].filter_chain_match.as_mut().unwrap());
        let e = listener_err(&outbound(chains));
        assert_unsupported(&e, &format!("filter_chains[2].filter_chain_match.{field}"));
        if field == "server_names" {
            assert_eq!(
                e.to_string(),
                "listener \"outbound\": filter_chains[2].filter_chain_match.server_names is not supported by ferry proxy"
            );
        }
    }
}

#[test]
fn network_filters_other_than_a_plain_tcp_proxy_are_refused() {
    let hcm = chain_with(FilterChainMatch::default(), tcp_proxy("x"));
    let mut hcm = hcm;
    hcm.filters = vec![network_filter(
        "envoy.filters.network.http_connection_manager",
        Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
            value: vec![],
        },
    )];
    let e = listener_err(&outbound(vec![hcm]));
    assert_unsupported(&e, "filter_chains[0].filters[0]");
    assert!(e.to_string().contains("http_connection_manager"), "{e}");

    let mut two = chain(&[], None, "x");
    two.filters.insert(
        0,
        network_filter("envoy.filters.network.rbac", Any::default()),
    );
    assert_unsupported(
        &listener_err(&outbound(vec![two])),
        "filter_chains[0].filters[0]",
    );

    let tp_cases: Vec<(&str, Set<TcpProxy>)> = vec![
        ("weighted_clusters", |t| {
            t.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(
                WeightedCluster::default(),
            ))
        }),
        ("on_demand", |t| t.on_demand = Some(OnDemand::default())),
        ("tunneling_config", |t| {
            t.tunneling_config = Some(TunnelingConfig::default())
        }),
    ];
    for (field, set) in tp_cases {
        let mut tp = tcp_proxy("x");
        set(&mut tp);
        let e = listener_err(&outbound(vec![chain_with(FilterChainMatch::default(), tp)]));
        assert_unsupported(
            &e,
            &format!("filter_chains[0].filters[0].typed_config.{field}"),
        );
    }
}

#[test]
fn listener_filters_chain_tls_and_matcher_trees_are_refused_inspectors_accepted() {
    use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
    let mut l = outbound(vec![chain(&["10.0.0.1/32"], Some(80), "a")]);
    l.listener_filters.push(listener_filter(
        "envoy.filters.listener.tls_inspector",
        pack_any(TlsInspector::default()),
    ));
    assert!(OutboundListener::try_from(&l).is_ok());
    l.listener_filters.push(listener_filter(
        "envoy.filters.listener.proxy_protocol",
        Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol".into(),
            value: vec![],
        },
    ));
    let e = listener_err(&l);
    assert_unsupported(&e, "listener_filters[2]");
    assert!(e.to_string().contains("proxy_protocol"), "{e}");

    let mut c = chain(&[], None, "a");
    c.transport_socket = Some(TransportSocket::default());
    assert_unsupported(
        &listener_err(&outbound(vec![c])),
        "filter_chains[0].transport_socket",
    );

    let mut l = outbound(vec![chain(&[], None, "a")]);
    l.filter_chain_matcher = Some(Default::default());
    assert_unsupported(&listener_err(&l), "filter_chain_matcher");
}

#[test]
fn two_chains_with_the_same_match_are_refused_like_envoy_does() {
    let l = outbound(vec![
        chain(&["10.0.0.1/32"], Some(80), "a"),
        chain(&["10.0.0.1/32"], Some(80), "b"),
    ]);
    let e = listener_err(&l);
    assert!(matches!(e, ResourceError::Invalid { .. }), "{e}");
    assert_eq!(e.field(), "filter_chains[1].filter_chain_match");
    assert!(e.to_string().contains("filter_chains[0]"), "{e}");
}

fn state_with(l: Listener) -> XdsState {
    let outbound = OutboundListener::try_from(&l).unwrap();
    let mut clusters = std::collections::BTreeMap::new();
    for name in ["a", "b", "c", "d", "default"] {
        clusters.insert(
            name.to_owned(),
            std::sync::Arc::new(Upstream {
                name: name.into(),
                discovery: Discovery::OriginalDst,
                connect_timeout: Duration::from_secs(5),
                tls: None,
                endpoints: vec![],
            }),
        );
    }
    XdsState {
        outbound: Some(outbound),
        clusters,
        ..Default::default()
    }
}

fn routed(s: &XdsState, dst: &str) -> Option<String> {
    let dst: SocketAddr = dst.parse().unwrap();
    s.route(dst).map(|r| r.chain.cluster.clone())
}

#[test]
fn route_follows_envoy_filter_chain_match_order() {
    let mut l = outbound(vec![
        chain(&["10.0.0.0/8"], Some(80), "a"),
        chain(&["10.1.0.0/16", "192.168.0.0/16"], Some(80), "b"),
        chain(&[], Some(80), "c"),
        chain(&["10.1.2.0/24"], None, "d"),
        chain(&["::1/128"], Some(80), "a6"),
    ]);
    let s = state_with(l.clone());
    // Longest prefix among the chains naming the port; no prefix matches last.
    assert_eq!(routed(&s, "10.1.2.3:80").as_deref(), Some("b"));
    assert_eq!(routed(&s, "10.2.0.1:80").as_deref(), Some("a"));
    assert_eq!(routed(&s, "192.168.1.1:80").as_deref(), Some("b"));
    assert_eq!(routed(&s, "11.0.0.1:80").as_deref(), Some("c"));
    // The port beats a longer prefix on a port-less chain...
    assert_eq!(routed(&s, "10.1.2.3:80").as_deref(), Some("b"));
    // ...and port-less chains serve other ports.
    assert_eq!(routed(&s, "10.1.2.3:81").as_deref(), Some("d"));
    assert_eq!(routed(&s, "10.9.9.9:81"), None);
    // IPv4-mapped IPv6 matches IPv4 prefixes; IPv6 its own.
    assert_eq!(routed(&s, "[::ffff:10.1.2.3]:80").as_deref(), Some("b"));
    assert_eq!(routed(&s, "[::1]:80").as_deref(), Some("a6"));
    assert_eq!(routed(&s, "[::2]:80").as_deref(), Some("c"));
    // A chain's cluster that CDS lacks: routed, no cluster.
    let r = s.route("[::1]:80".parse().unwrap()).unwrap();
    assert!(r.cluster.is_none());
    assert_eq!(
        s.route("10.0.0.1:80".parse().unwrap())
            .unwrap()
            .cluster
            .unwrap()
            .name,
        "a"
    );

    // No backtracking: chains name port 443, none matches the address -> default chain,
    // never the port-less chain.
    l.filter_chains = vec![
        chain(&["10.0.0.0/8"], Some(443), "a"),
        chain(&[], None, "d"),
    ];
    let s = state_with(l.clone());
    assert_eq!(routed(&s, "172.16.0.1:443"), None);
    let mut dflt = chain(&[], None, "default");
    dflt.filter_chain_match = None;
    l.default_filter_chain = Some(dflt);
    let s = state_with(l);
    assert_eq!(routed(&s, "172.16.0.1:443").as_deref(), Some("default"));
    assert_eq!(routed(&s, "10.0.0.1:443").as_deref(), Some("a"));
    assert_eq!(routed(&s, "172.16.0.1:1").as_deref(), Some("d"));
}

#[test]
fn vips_are_single_host_prefix_chains_with_a_port() {
    let s = state_with(outbound(vec![
        chain(&["127.240.0.1/32"], Some(8443), "a"),
        chain(&["127.240.0.2/32", "127.240.0.3/32"], Some(8443), "b"),
        chain(&["127.0.0.0/8"], None, "c"),
        chain(&["127.240.0.4/32"], None, "d"),
        chain(&["fd00::1/128"], Some(80), "e"),
    ]));
    let want: Vec<SocketAddr> = vec![
        "127.240.0.1:8443".parse().unwrap(),
        "[fd00::1]:80".parse().unwrap(),
    ];
    assert_eq!(s.vips(), want);
}

fn tls_cluster(ctx: UpstreamTlsContext) -> Cluster {
    Cluster {
        name: "t".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
        }),
        ..Default::default()
    }
}

fn istio_ctx(sans: Vec<SubjectAltNameMatcher>) -> UpstreamTlsContext {
    let sds = |n: &str| SdsSecretConfig {
        name: n.into(),
        sds_config: None,
    };
    UpstreamTlsContext {
        sni: "outbound_.8443_._.s.example".into(),
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["istio".into()],
            tls_certificate_sds_secret_configs: vec![sds("default")],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds("spiffe://td")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn san(t: SanType, p: MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: t as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        }),
        oid: String::new(),
    }
}

#[test]
fn cluster_refusals_name_the_field() {
    let uri_exact = || san(SanType::Uri, MatchPattern::Exact("spiffe://td/x".into()));
    let ok = Upstream::try_from(&tls_cluster(istio_ctx(vec![uri_exact()]))).unwrap();
    assert_eq!(ok.discovery, Discovery::Eds);
    assert_eq!(ok.connect_timeout, Duration::from_secs(5));
    let tls = ok.tls.unwrap();
    assert_eq!(tls.validation_secret, "spiffe://td");
    assert!(tls.server_ids.accepts("spiffe://td/x"));

    let tls_at = "transport_socket.typed_config.common_tls_context";
    let dvc = format!("{tls_at}.combined_validation_context.default_validation_context");
    let mut inline_cert = istio_ctx(vec![uri_exact()]);
    inline_cert
        .common_tls_context
        .as_mut()
        .unwrap()
        .tls_certificates = vec![TlsCertificate::default()];
    let mut inline_ca = istio_ctx(vec![uri_exact()]);
    inline_ca
        .common_tls_context
        .as_mut()
        .unwrap()
        .validation_context_type =
        Some(ValidationContextType::ValidationContext(Default::default()));
    let cases: Vec<(Cluster, String)> = vec![
        (
            tls_cluster(inline_cert),
            format!("{tls_at}.tls_certificates"),
        ),
        (
            tls_cluster(inline_ca),
            format!("{tls_at}.validation_context"),
        ),
        (
            tls_cluster(istio_ctx(vec![san(
                SanType::Dns,
                MatchPattern::Exact("a".into()),
            )])),
            format!("{dvc}.match_typed_subject_alt_names[0].san_type"),
        ),
        (
            tls_cluster(istio_ctx(vec![san(
                SanType::Uri,
                MatchPattern::Suffix("a".into()),
            )])),
            format!("{dvc}.match_typed_subject_alt_names[0].matcher.suffix"),
        ),
        (
            Cluster {
                transport_socket: Some(TransportSocket {
                    name: "envoy.transport_sockets.alts".into(),
                    config_type: None,
                }),
                ..tls_cluster(istio_ctx(vec![]))
            },
            "transport_socket".into(),
        ),
        (
            Cluster {
                lb_policy: LbPolicy::Maglev as i32,
                ..tls_cluster(istio_ctx(vec![uri_exact()]))
            },
            "lb_policy".into(),
        ),
        (
            Cluster {
                lb_policy: LbPolicy::ClusterProvided as i32,
                ..tls_cluster(istio_ctx(vec![uri_exact()]))
            },
            "lb_policy".into(),
        ),
        (
            Cluster {
                name: "t".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::ClusterType(
                    CustomClusterType {
                        name: "envoy.clusters.aggregate".into(),
                        typed_config: None,
                    },
                )),
                ..Default::default()
            },
            "cluster_type".into(),
        ),
    ];
    for (c, field) in cases {
        let e = Upstream::try_from(&c).expect_err(&field);
        assert_unsupported(&e, &field);
        assert!(e.to_string().starts_with("cluster \"t\": "), "{e}");
    }
    // A SAN matcher that checks nothing is invalid, not merely unsupported.
    let e = Upstream::try_from(&tls_cluster(istio_ctx(vec![]))).unwrap_err();
    assert!(matches!(e, ResourceError::Invalid { .. }), "{e}");

    // The passthrough cluster: ORIGINAL_DST with CLUSTER_PROVIDED, raw TCP.
    let od = Cluster {
        name: "pt".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.raw_buffer".into(),
            config_type: None,
        }),
        ..Default::default()
    };
    let u = Upstream::try_from(&od).unwrap();
    assert_eq!(
        (u.discovery, u.tls, u.endpoints.len()),
        (Discovery::OriginalDst, None, 0)
    );
}

fn cla_with(address: Option<address::Address>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: "x_cluster".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address { address }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn endpoints_that_are_pipes_or_have_no_port_are_refused() {
    let pipe = cla_with(Some(address::Address::Pipe(Pipe {
        path: "/run/x.sock".into(),
        mode: 0,
    })));
    let e = Endpoints::try_from(&pipe).unwrap_err();
    assert_unsupported(&e, "endpoints[0].lb_endpoints[0].endpoint.address.pipe");
    let no_port = cla_with(Some(address::Address::SocketAddress(SocketAddress {
        address: "10.0.0.1".into(),
        ..Default::default()
    })));
    let e = Endpoints::try_from(&no_port).unwrap_err();
    assert_eq!(
        e.field(),
        "endpoints[0].lb_endpoints[0].endpoint.address.port_value"
    );
    assert!(e.to_string().starts_with("endpoints \"x_cluster\""), "{e}");
    // Inline on a STRICT_DNS cluster, the path says so.
    let c = Cluster {
        name: "d".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32)),
        load_assignment: Some(pipe),
        ..Default::default()
    };
    let e = Upstream::try_from(&c).unwrap_err();
    assert_eq!(
        e.field(),
        "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe"
    );
}

fn dns_listener(domains: Vec<DnsVirtualDomain>, source: Option<ConfigSource>) -> Listener {
    let cfg = DnsFilterConfig {
        stat_prefix: "dns".into(),
        server_config: Some(ServerContextConfig {
            config_source: source.or(Some(ConfigSource::InlineDnsTable(DnsTable {
                virtual_domains: domains,
                ..Default::default()
            }))),
        }),
        ..Default::default()
    };
    Listener {
        name: "dns".into(),
        address: Some(socket(Protocol::Udp, "127.0.0.1", 15053)),
        listener_filters: vec![listener_filter(
            "envoy.filters.udp.dns_filter",
            pack_any(cfg),
        )],
        ..Default::default()
    }
}

fn domain(name: &str, endpoint: EndpointConfig, ttl: Option<i64>) -> DnsVirtualDomain {
    DnsVirtualDomain {
        name: name.into(),
        endpoint: Some(DnsEndpoint {
            endpoint_config: Some(endpoint),
        }),
        answer_ttl: ttl
            .map(|seconds| envoy_types::pb::google::protobuf::Duration { seconds, nanos: 0 }),
    }
}

fn addrs(a: &[&str]) -> EndpointConfig {
    EndpointConfig::AddressList(AddressList {
        address: a.iter().map(|s| (*s).to_owned()).collect(),
    })
}

#[test]
fn dns_listener_takes_the_inline_table_and_refuses_other_sources() {
    let l = dns_listener(
        vec![
            domain("B.example", addrs(&["fd00::1", "127.240.0.2"]), Some(30)),
            domain("a.example.", addrs(&["127.240.0.1"]), Some(10)),
            domain("v6.example", addrs(&["fd00::2"]), None),
        ],
        None,
    );
    let d = DnsListener::try_from(&l).unwrap();
    assert_eq!(d.address, "127.0.0.1:15053".parse::<SocketAddr>().unwrap());
    assert_eq!(d.ttl, Duration::from_secs(10));
    assert_eq!(d.table[0].0.as_str(), "a.example");
    let s = XdsState {
        dns: Some(d),
        ..Default::default()
    };
    assert_eq!(s.resolve("A.EXAMPLE."), Some([127, 240, 0, 1].into()));
    assert_eq!(s.resolve("b.example"), Some([127, 240, 0, 2].into()));
    assert_eq!(s.resolve("v6.example"), None);
    let table: Vec<(String, std::net::Ipv4Addr)> = s
        .dns_table()
        .into_iter()
        .map(|(h, v)| (h.to_string(), v))
        .collect();
    assert_eq!(
        table,
        vec![
            ("a.example".to_owned(), [127, 240, 0, 1].into()),
            ("b.example".to_owned(), [127, 240, 0, 2].into())
        ]
    );

    let at = "listener_filters[0].typed_config.server_config";
    let e = DnsListener::try_from(&dns_listener(
        vec![],
        Some(ConfigSource::ExternalDnsTable(Default::default())),
    ))
    .unwrap_err();
    assert_unsupported(&e, &format!("{at}.external_dns_table"));
    let e = DnsListener::try_from(&dns_listener(
        vec![domain(
            "c.example",
            EndpointConfig::ClusterName("c".into()),
            None,
        )],
        None,
    ))
    .unwrap_err();
    assert_unsupported(
        &e,
        &format!("{at}.inline_dns_table.virtual_domains[0].endpoint.cluster_name"),
    );
}

#[test]
fn other_listeners_are_ignored_not_refused() {
    let mut l = outbound(vec![chain(&[], None, "x")]);
    l.name = "virtualInbound".into();
    l.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .server_names = vec!["x".into()];
    assert_eq!(LdsListener::try_from(&l), Ok(LdsListener::Ignored));
}

#[test]
fn idle_timeout_follows_envoy_defaults() {
    let mut tp = tcp_proxy("x");
    let decode = |tp: TcpProxy| {
        OutboundListener::try_from(&outbound(vec![chain_with(FilterChainMatch::default(), tp)]))
            .unwrap()
            .chains[0]
            .idle_timeout
    };
    assert_eq!(decode(tp.clone()), Some(Duration::from_secs(3600)));
    tp.idle_timeout = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: 0,
        nanos: 0,
    });
    assert_eq!(decode(tp.clone()), None);
    tp.idle_timeout = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: 7,
        nanos: 0,
    });
    assert_eq!(decode(tp), Some(Duration::from_secs(7)));
}
