//! LDS: the `outbound` listener (filter chains matched on destination prefix and port, each
//! a `tcp_proxy` to one cluster) and the `dns` listener (the DNS filter's inline table).
//! Other listeners are not ferry's business (a control plane may send inbound listeners
//! meant for Envoy) and are ignored.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, address, socket_address::PortSpecifier, socket_address::Protocol,
};
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::data::dns::v3::dns_table::dns_endpoint::EndpointConfig;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::DnsFilterConfig;
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::dns_filter_config::server_context_config::ConfigSource;
use envoy_types::pb::google::protobuf::Any;
use ipnet::IpNet;
use prost::Message;
use serde::Serialize;

use super::{Ctx, ResourceError, ResourceKind, message_name};
use crate::resources::{DNS_LISTENER, OUTBOUND_LISTENER};
use registry::hostname::Hostname;

/// Envoy's `tcp_proxy.idle_timeout` when unset.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's DNS filter answer TTL when a virtual domain sets none.
const DEFAULT_DNS_TTL: Duration = Duration::from_secs(300);

/// Listener filters on the outbound listener: `(name, typed_config message)`. The
/// inspectors only feed matchers ferry refuses anyway, so they are harmless.
const OUTBOUND_LISTENER_FILTERS: [(&str, &str); 3] = [
    (
        "envoy.filters.listener.original_dst",
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    ),
    (
        "envoy.filters.listener.tls_inspector",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    ),
    (
        "envoy.filters.listener.http_inspector",
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    ),
];
const TCP_PROXY: (&str, &str) = (
    "envoy.filters.network.tcp_proxy",
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
);
const DNS_FILTER: (&str, &str) = (
    "envoy.filters.udp.dns_filter",
    "envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
);

/// The listener that captured outbound connections arrive on, and how each original
/// destination is routed: the proxy's whole routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundListener {
    /// The listener name (`outbound`).
    pub name: String,
    /// Where it listens (ferry: `0.0.0.0:10000`).
    pub address: SocketAddr,
    /// The filter chains, in the order the control plane sent them.
    pub chains: Vec<OutboundChain>,
    /// Envoy's `default_filter_chain`: used when no chain matches.
    pub default_chain: Option<OutboundChain>,
}

/// One filter chain: which original destinations it takes and the cluster it proxies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundChain {
    /// The chain name (ferry: the federated hostname).
    pub name: String,
    /// `filter_chain_match.prefix_ranges` (normalised); empty matches every address.
    pub prefixes: Vec<IpNet>,
    /// `filter_chain_match.destination_port`; `None` matches every port.
    pub port: Option<u16>,
    /// The `tcp_proxy` cluster.
    pub cluster: String,
    /// The `tcp_proxy` stat prefix (for metrics labels).
    pub stat_prefix: String,
    /// `tcp_proxy.idle_timeout` as Envoy applies it: 1 h when unset, `None` when set to 0
    /// (disabled).
    pub idle_timeout: Option<Duration>,
}

impl OutboundChain {
    /// The length of the longest prefix matching `ip` (-1 when the chain has no prefix
    /// and so matches any address), or `None` when it does not match.
    pub(crate) fn match_len(&self, ip: IpAddr) -> Option<i16> {
        if self.prefixes.is_empty() {
            return Some(-1);
        }
        self.prefixes
            .iter()
            .filter(|p| p.contains(&ip))
            .map(|p| i16::from(p.prefix_len()))
            .max()
    }
}

/// The DNS listener: the names the proxy's resolver answers itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsListener {
    /// The listener name (`dns`).
    pub name: String,
    /// Where it listens (UDP; ferry: `127.0.0.1:15053`).
    pub address: SocketAddr,
    /// The inline table, sorted by name, one entry per name.
    pub table: Vec<(Hostname, Vec<IpAddr>)>,
    /// Answer TTL (the smallest `answer_ttl` of the table; Envoy's 300 s when unset).
    pub ttl: Duration,
}

/// What an LDS resource means to ferry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LdsListener {
    /// The `outbound` listener.
    Outbound(OutboundListener),
    /// The `dns` listener.
    Dns(DnsListener),
    /// Any other listener: not ferry's (e.g. an inbound listener for Envoy).
    Ignored,
}

impl TryFrom<&Listener> for LdsListener {
    type Error = ResourceError;

    fn try_from(l: &Listener) -> Result<Self, ResourceError> {
        match l.name.as_str() {
            OUTBOUND_LISTENER => OutboundListener::try_from(l).map(LdsListener::Outbound),
            DNS_LISTENER => DnsListener::try_from(l).map(LdsListener::Dns),
            _ => Ok(LdsListener::Ignored),
        }
    }
}

/// Which known filter a listener or network filter is: by its typed config's message when
/// it has one (what Envoy goes by), else by its name.
fn is_filter(name: &str, typed: Option<&Any>, known: (&str, &str)) -> bool {
    match typed {
        Some(any) => message_name(&any.type_url) == known.1,
        None => name == known.0,
    }
}

fn listener_filter_config(f: &ListenerFilter) -> Option<&Any> {
    match &f.config_type {
        Some(listener_filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    }
}

fn socket_address(cx: Ctx<'_>, a: Option<&Address>) -> Result<(SocketAddr, i32), ResourceError> {
    let sa = match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(_) => return Err(cx.unsupported("address", "not a socket address")),
        None => return Err(cx.invalid("address", "absent")),
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| cx.invalid("address.socket_address.address", sa.address.clone()))?;
    let port = match &sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(*p)
            .map_err(|_| cx.invalid("address.socket_address.port_value", p.to_string()))?,
        Some(PortSpecifier::NamedPort(n)) => {
            return Err(cx.unsupported("address.socket_address.named_port", n.clone()));
        }
        None => return Err(cx.invalid("address.socket_address.port_value", "absent")),
    };
    Ok((SocketAddr::new(ip, port), sa.protocol))
}

impl TryFrom<&Listener> for OutboundListener {
    type Error = ResourceError;

    fn try_from(l: &Listener) -> Result<Self, ResourceError> {
        let cx = Ctx::new(ResourceKind::Listener, &l.name);
        let (address, protocol) = socket_address(cx, l.address.as_ref())?;
        if protocol != Protocol::Tcp as i32 {
            return Err(cx.invalid("address.socket_address.protocol", "UDP; outbound is TCP"));
        }
        if l.filter_chain_matcher.is_some() {
            return Err(cx.unsupported("filter_chain_matcher", "use filter_chain_match"));
        }
        if l.fcds_config.is_some() {
            return Err(cx.unsupported("fcds_config", ""));
        }
        if l.api_listener.is_some() {
            return Err(cx.unsupported("api_listener", ""));
        }
        for (i, f) in l.listener_filters.iter().enumerate() {
            let typed = listener_filter_config(f);
            if matches!(
                f.config_type,
                Some(listener_filter::ConfigType::ConfigDiscovery(_))
            ) {
                return Err(cx.unsupported(format!("listener_filters[{i}].config_discovery"), ""));
            }
            if !OUTBOUND_LISTENER_FILTERS
                .iter()
                .any(|k| is_filter(&f.name, typed, *k))
            {
                return Err(cx.unsupported(format!("listener_filters[{i}]"), f.name.clone()));
            }
        }
        let mut chains = Vec::with_capacity(l.filter_chains.len());
        let mut seen: HashMap<(Option<u16>, Option<IpNet>), usize> = HashMap::new();
        for (i, fc) in l.filter_chains.iter().enumerate() {
            let at = format!("filter_chains[{i}]");
            let chain = chain(cx, &at, fc)?;
            let keys: Vec<Option<IpNet>> = if chain.prefixes.is_empty() {
                vec![None]
            } else {
                chain.prefixes.iter().copied().map(Some).collect()
            };
            for k in keys {
                if let Some(j) = seen.insert((chain.port, k), i) {
                    return Err(cx.invalid(
                        format!("{at}.filter_chain_match"),
                        format!("the same match as filter_chains[{j}]; Envoy rejects this too"),
                    ));
                }
            }
            chains.push(chain);
        }
        let default_chain = l
            .default_filter_chain
            .as_ref()
            .map(|fc| chain(cx, "default_filter_chain", fc))
            .transpose()?;
        if chains.is_empty() && default_chain.is_none() {
            return Err(cx.invalid("filter_chains", "empty, and no default_filter_chain"));
        }
        Ok(OutboundListener {
            name: l.name.clone(),
            address,
            chains,
            default_chain,
        })
    }
}

/// Refuses every match criterion but destination port and prefix.
fn check_match(cx: Ctx<'_>, at: &str, m: &FilterChainMatch) -> Result<(), ResourceError> {
    let set = [
        ("server_names", !m.server_names.is_empty()),
        ("transport_protocol", !m.transport_protocol.is_empty()),
        ("application_protocols", !m.application_protocols.is_empty()),
        ("source_type", m.source_type != 0),
        ("source_prefix_ranges", !m.source_prefix_ranges.is_empty()),
        ("source_ports", !m.source_ports.is_empty()),
        (
            "direct_source_prefix_ranges",
            !m.direct_source_prefix_ranges.is_empty(),
        ),
        ("address_suffix", !m.address_suffix.is_empty()),
        ("suffix_len", m.suffix_len.is_some()),
    ];
    match set.iter().find(|(_, used)| *used) {
        Some((field, _)) => Err(cx.unsupported(format!("{at}.filter_chain_match.{field}"), "")),
        None => Ok(()),
    }
}

fn prefix(cx: Ctx<'_>, at: &str, r: &CidrRange) -> Result<IpNet, ResourceError> {
    let ip: IpAddr = r
        .address_prefix
        .parse()
        .map_err(|_| cx.invalid(format!("{at}.address_prefix"), r.address_prefix.clone()))?;
    let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
    u8::try_from(len)
        .ok()
        .and_then(|len| IpNet::new(ip, len).ok())
        .map(|n| n.trunc())
        .ok_or_else(|| cx.invalid(format!("{at}.prefix_len"), format!("{len} for {ip}")))
}

// Deprecated Envoy fields are read on purpose: a control plane may still send them, and
// ferry must honour or refuse them rather than ignore them.
#[allow(deprecated)]
fn chain(cx: Ctx<'_>, at: &str, fc: &FilterChain) -> Result<OutboundChain, ResourceError> {
    if fc.transport_socket.is_some() {
        return Err(cx.unsupported(
            format!("{at}.transport_socket"),
            "downstream TLS on the outbound listener",
        ));
    }
    if fc.use_proxy_proto.as_ref().is_some_and(|b| b.value) {
        return Err(cx.unsupported(format!("{at}.use_proxy_proto"), ""));
    }
    let m = fc.filter_chain_match.clone().unwrap_or_default();
    check_match(cx, at, &m)?;
    let port = m
        .destination_port
        .map(|p| {
            u16::try_from(p.value).map_err(|_| {
                cx.invalid(
                    format!("{at}.filter_chain_match.destination_port"),
                    p.value.to_string(),
                )
            })
        })
        .transpose()?;
    let mut prefixes = m
        .prefix_ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            prefix(
                cx,
                &format!("{at}.filter_chain_match.prefix_ranges[{i}]"),
                r,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Longest first, so the first hit in a chain is its best.
    prefixes.sort_by_key(|p| std::cmp::Reverse(p.prefix_len()));
    prefixes.dedup();
    let (last, rest) = fc
        .filters
        .split_last()
        .ok_or_else(|| cx.invalid(format!("{at}.filters"), "empty; expected a tcp_proxy"))?;
    if let Some((i, f)) = rest.iter().enumerate().next() {
        return Err(cx.unsupported(
            format!("{at}.filters[{i}]"),
            format!("{} (only a single {} is)", f.name, TCP_PROXY.0),
        ));
    }
    let filters_at = format!("{at}.filters[{}]", rest.len());
    let typed = match &last.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => Some(any),
        Some(filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(cx.unsupported(format!("{filters_at}.config_discovery"), ""));
        }
        None => None,
    };
    let any = match typed {
        Some(any) if is_filter(&last.name, Some(any), TCP_PROXY) => any,
        _ => {
            return Err(cx.unsupported(
                filters_at,
                format!("{} (only {} is)", last.name, TCP_PROXY.0),
            ));
        }
    };
    let tp = TcpProxy::decode(any.value.as_slice())
        .map_err(|e| cx.invalid(format!("{filters_at}.typed_config"), e.to_string()))?;
    let tp_at = format!("{filters_at}.typed_config");
    if tp.on_demand.is_some() {
        return Err(cx.unsupported(format!("{tp_at}.on_demand"), ""));
    }
    if tp.tunneling_config.is_some() {
        return Err(cx.unsupported(format!("{tp_at}.tunneling_config"), ""));
    }
    let cluster = match tp.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => c,
        Some(ClusterSpecifier::WeightedClusters(_)) => {
            return Err(cx.unsupported(format!("{tp_at}.weighted_clusters"), ""));
        }
        _ => return Err(cx.invalid(format!("{tp_at}.cluster"), "absent")),
    };
    let idle_timeout = match &tp.idle_timeout {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(d) => Some(cx.duration(&format!("{tp_at}.idle_timeout"), d)?).filter(|d| !d.is_zero()),
    };
    Ok(OutboundChain {
        name: fc.name.clone(),
        prefixes,
        port,
        cluster,
        stat_prefix: tp.stat_prefix,
        idle_timeout,
    })
}

impl TryFrom<&Listener> for DnsListener {
    type Error = ResourceError;

    fn try_from(l: &Listener) -> Result<Self, ResourceError> {
        let cx = Ctx::new(ResourceKind::Listener, &l.name);
        let (address, protocol) = socket_address(cx, l.address.as_ref())?;
        if protocol != Protocol::Udp as i32 {
            return Err(cx.invalid(
                "address.socket_address.protocol",
                "TCP; the DNS filter listens on UDP",
            ));
        }
        let mut config = None;
        for (i, f) in l.listener_filters.iter().enumerate() {
            let typed = listener_filter_config(f);
            match typed {
                Some(any) if is_filter(&f.name, typed, DNS_FILTER) && config.is_none() => {
                    config = Some((i, any));
                }
                _ => return Err(cx.unsupported(format!("listener_filters[{i}]"), f.name.clone())),
            }
        }
        let Some((i, any)) = config else {
            return Err(cx.invalid(
                "listener_filters",
                format!("no {} with a typed_config", DNS_FILTER.0),
            ));
        };
        let at = format!("listener_filters[{i}].typed_config");
        let dns = DnsFilterConfig::decode(any.value.as_slice())
            .map_err(|e| cx.invalid(at.clone(), e.to_string()))?;
        let source = dns.server_config.and_then(|s| s.config_source);
        let table = match source {
            Some(ConfigSource::InlineDnsTable(t)) => t,
            Some(ConfigSource::ExternalDnsTable(_)) => {
                return Err(cx.unsupported(
                    format!("{at}.server_config.external_dns_table"),
                    "use inline_dns_table",
                ));
            }
            None => return Err(cx.invalid(format!("{at}.server_config"), "absent")),
        };
        let mut entries: Vec<(Hostname, Vec<IpAddr>)> = Vec::new();
        let mut ttl: Option<Duration> = None;
        for (j, d) in table.virtual_domains.iter().enumerate() {
            let vd = format!("{at}.server_config.inline_dns_table.virtual_domains[{j}]");
            let name = Hostname::parse(&d.name)
                .map_err(|e| cx.invalid(format!("{vd}.name"), e.to_string()))?;
            let ips = match d.endpoint.as_ref().and_then(|e| e.endpoint_config.as_ref()) {
                Some(EndpointConfig::AddressList(list)) => list
                    .address
                    .iter()
                    .map(|a| {
                        a.parse::<IpAddr>().map_err(|_| {
                            cx.invalid(format!("{vd}.endpoint.address_list"), a.clone())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Some(EndpointConfig::ClusterName(c)) => {
                    return Err(cx.unsupported(format!("{vd}.endpoint.cluster_name"), c.clone()));
                }
                Some(EndpointConfig::ServiceList(_)) => {
                    return Err(cx.unsupported(format!("{vd}.endpoint.service_list"), ""));
                }
                None => return Err(cx.invalid(format!("{vd}.endpoint"), "absent")),
            };
            if let Some(t) = &d.answer_ttl {
                let t = cx.duration(&format!("{vd}.answer_ttl"), t)?;
                ttl = Some(ttl.map_or(t, |old| old.min(t)));
            }
            entries.push((name, ips));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut merged: Vec<(Hostname, Vec<IpAddr>)> = Vec::with_capacity(entries.len());
        for (name, ips) in entries {
            match merged.last_mut() {
                Some((last, all)) if *last == name => {
                    for ip in ips {
                        if !all.contains(&ip) {
                            all.push(ip);
                        }
                    }
                }
                _ => merged.push((name, ips)),
            }
        }
        Ok(DnsListener {
            name: l.name.clone(),
            address,
            table: merged,
            ttl: ttl.unwrap_or(DEFAULT_DNS_TTL),
        })
    }
}
