//! LDS: the `outbound` listener (original destination `VIP:port` -> the service's cluster)
//! and the `dns` listener (every federated hostname answers its VIP).

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, SocketAddress, TypedExtensionConfig, address,
    socket_address::PortSpecifier, socket_address::Protocol,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::data::dns::v3::DnsTable;
use envoy_types::pb::envoy::data::dns::v3::dns_table::{
    AddressList, DnsEndpoint, DnsVirtualDomain, dns_endpoint::EndpointConfig,
};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::DnsFilterConfig;
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::dns_filter_config::{
    ClientContextConfig, ServerContextConfig, server_context_config::ConfigSource,
};
use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use envoy_types::util::pack_any;
use serde::Serialize;

use super::cluster::CONNECT_TIMEOUT_SECS;
use super::endpoint::tcp_address;
use super::{Resource, VersionError};
use registry::config::Config;

/// The outbound listener's name.
pub const OUTBOUND_LISTENER: &str = "outbound";
/// The DNS listener's name.
pub const DNS_LISTENER: &str = "dns";
/// The cluster behind the optional loopback passthrough chain.
pub const PASSTHROUGH_CLUSTER: &str = "ferry_passthrough";
/// Listener filter recovering `SO_ORIGINAL_DST`.
pub const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";
/// Network filter proxying TCP to a cluster.
pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
/// UDP listener filter answering DNS.
pub const DNS_FILTER: &str = "envoy.filters.udp.dns_filter";
/// TTL of the DNS answers for federated names.
pub const DNS_ANSWER_TTL_SECS: i64 = 30;

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
    Filter {
        name: TCP_PROXY_FILTER.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
            stat_prefix: stat_prefix.to_owned(),
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_owned())),
            ..Default::default()
        }))),
    }
}

fn cidr(prefix: String, len: u32) -> CidrRange {
    CidrRange {
        address_prefix: prefix,
        prefix_len: Some(UInt32Value { value: len }),
    }
}

/// The inputs the outbound listener is built from (hashed into its version).
#[derive(Serialize)]
struct OutboundInputs<'a> {
    address: SocketAddr,
    passthrough: bool,
    chains: Vec<(&'a str, String, u16, String)>,
}

/// The `outbound` listener: one filter chain per service matching `V/32` and port `P`,
/// tcp_proxy to `H_cluster`; no default chain, so connections to anything else are closed
/// (plus, if enabled, a loopback passthrough chain). `None` when it would have no chain at
/// all, which Envoy rejects.
pub fn outbound_listener(config: &Config) -> Result<Option<Resource>, VersionError> {
    let listen = &config.agent.listen;
    let mut inputs = OutboundInputs {
        address: listen.outbound,
        passthrough: listen.outbound_passthrough,
        chains: Vec::new(),
    };
    let mut chains: Vec<FilterChain> = config
        .services
        .iter()
        .map(|svc| {
            let cluster = svc.cluster_name();
            inputs.chains.push((
                svc.hostname.as_str(),
                svc.vip.to_string(),
                svc.port,
                cluster.clone(),
            ));
            FilterChain {
                name: svc.hostname.to_string(),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: u32::from(svc.port),
                    }),
                    prefix_ranges: vec![cidr(svc.vip.to_string(), 32)],
                    ..Default::default()
                }),
                filters: vec![tcp_proxy(&svc.hostname, &cluster)],
                ..Default::default()
            }
        })
        .collect();
    if listen.outbound_passthrough {
        chains.push(FilterChain {
            name: "passthrough".to_owned(),
            filter_chain_match: Some(FilterChainMatch {
                prefix_ranges: vec![cidr("127.0.0.0".into(), 8), cidr("::1".into(), 128)],
                ..Default::default()
            }),
            filters: vec![tcp_proxy("passthrough", PASSTHROUGH_CLUSTER)],
            ..Default::default()
        });
    }
    if chains.is_empty() {
        return Ok(None);
    }
    let l = Listener {
        name: OUTBOUND_LISTENER.to_owned(),
        address: Some(tcp_address(
            listen.outbound.ip().to_string(),
            listen.outbound.port(),
        )),
        listener_filters: vec![ListenerFilter {
            name: ORIGINAL_DST_FILTER.to_owned(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                OriginalDst {},
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    };
    Resource::new(OUTBOUND_LISTENER.to_owned(), &l, &inputs).map(Some)
}

/// The ORIGINAL_DST cluster the passthrough chain forwards to.
pub fn passthrough_cluster() -> Result<Resource, VersionError> {
    let c = Cluster {
        name: PASSTHROUGH_CLUSTER.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(Duration {
            seconds: CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        ..Default::default()
    };
    Resource::new(PASSTHROUGH_CLUSTER.to_owned(), &c, PASSTHROUGH_CLUSTER)
}

/// c-ares pointed at `dns.upstreams`, or `None` (Envoy's default: the host's resolv.conf).
fn upstream_resolvers(upstreams: &[SocketAddr]) -> Option<TypedExtensionConfig> {
    if upstreams.is_empty() {
        return None;
    }
    let cares = CaresDnsResolverConfig {
        resolvers: upstreams
            .iter()
            .map(|u| Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    protocol: Protocol::Udp as i32,
                    address: u.ip().to_string(),
                    port_specifier: Some(PortSpecifier::PortValue(u32::from(u.port()))),
                    ..Default::default()
                })),
            })
            .collect(),
        use_resolvers_as_fallback: false,
        ..Default::default()
    };
    Some(TypedExtensionConfig {
        name: CARES_RESOLVER.to_owned(),
        typed_config: Some(pack_any(cares)),
    })
}

/// Envoy's c-ares DNS resolver extension.
const CARES_RESOLVER: &str = "envoy.network.dns_resolver.cares";

/// The `dns` listener: UDP on `listen.dns` with Envoy's DNS filter, an inline table mapping
/// every federated hostname to its VIP, and upstream resolution for every other name.
pub fn dns_listener(config: &Config) -> Result<Resource, VersionError> {
    let listen = config.agent.listen.dns;
    let table: Vec<(String, String)> = config
        .services
        .iter()
        .map(|s| (s.hostname.to_string(), s.vip.to_string()))
        .collect();
    let virtual_domains = table
        .iter()
        .map(|(name, vip)| DnsVirtualDomain {
            name: name.clone(),
            endpoint: Some(DnsEndpoint {
                endpoint_config: Some(EndpointConfig::AddressList(AddressList {
                    address: vec![vip.clone()],
                })),
            }),
            answer_ttl: Some(Duration {
                seconds: DNS_ANSWER_TTL_SECS,
                nanos: 0,
            }),
        })
        .collect();
    let filter = DnsFilterConfig {
        stat_prefix: "ferry_dns".to_owned(),
        server_config: Some(ServerContextConfig {
            config_source: Some(ConfigSource::InlineDnsTable(DnsTable {
                virtual_domains,
                ..Default::default()
            })),
        }),
        client_config: Some(ClientContextConfig {
            resolver_timeout: Some(Duration {
                seconds: 5,
                nanos: 0,
            }),
            max_pending_lookups: 256,
            typed_dns_resolver_config: upstream_resolvers(&config.agent.dns.upstreams),
            ..Default::default()
        }),
        case_insensitive: true,
        ..Default::default()
    };
    let l = Listener {
        name: DNS_LISTENER.to_owned(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                protocol: Protocol::Udp as i32,
                address: listen.ip().to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(listen.port()))),
                ..Default::default()
            })),
        }),
        listener_filters: vec![ListenerFilter {
            name: DNS_FILTER.to_owned(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(filter))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::new(
        DNS_LISTENER.to_owned(),
        &l,
        &(listen, &table, &config.agent.dns.upstreams),
    )
}
