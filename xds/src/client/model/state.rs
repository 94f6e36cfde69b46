//! The state the data plane reads: one immutable [`XdsState`] per update, with the
//! lookups the proxy and the resolver make on every connection and query.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::{DnsListener, OutboundChain, OutboundListener, Upstream};
use registry::hostname::Hostname;

/// Everything the data plane reads: one immutable value per update, published in an
/// `Arc` so readers never wait on the writer. Serializes as the proxy's `/config_dump`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct XdsState {
    /// The `outbound` listener: how original destinations are routed.
    pub outbound: Option<OutboundListener>,
    /// Clusters by name, endpoints filled in.
    #[serde(serialize_with = "serialize_clusters")]
    pub clusters: BTreeMap<String, Arc<Upstream>>,
    /// The `dns` listener: the names the resolver answers itself.
    pub dns: Option<DnsListener>,
    /// CDS and LDS have arrived, and every EDS cluster's endpoints at least once.
    pub synced: bool,
    /// How many updates built this state (0 = nothing received yet).
    pub updates: u64,
}

/// `Arc<T>` serializes only with serde's `rc` feature; serialize the targets instead.
fn serialize_clusters<S: Serializer>(
    clusters: &BTreeMap<String, Arc<Upstream>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(clusters.iter().map(|(k, v)| (k, &**v)))
}

/// Where a captured connection goes: the filter chain that matched its original
/// destination and that chain's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// The matching chain (or the listener's default chain).
    pub chain: &'a OutboundChain,
    /// The chain's cluster; `None` when CDS does not (yet) have it, which Envoy answers
    /// by closing the connection.
    pub cluster: Option<&'a Arc<Upstream>>,
}

impl XdsState {
    /// Routes a captured connection by its original destination with Envoy's filter
    /// chain match order for the fields ferry supports: chains with `dst`'s exact
    /// `destination_port` if any chain has it, else chains without a port; among those
    /// the longest matching prefix (a chain without prefixes matches anything, below any
    /// prefix); else the default chain. Envoy does not backtrack: when chains name the
    /// port but none matches the address, port-less chains are not tried. IPv4-mapped
    /// IPv6 destinations match IPv4 prefixes. No allocation.
    pub fn route(&self, dst: SocketAddr) -> Option<Route<'_>> {
        let listener = self.outbound.as_ref()?;
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let port = Some(dst.port());
        let wanted = if listener.chains.iter().any(|c| c.port == port) {
            port
        } else {
            None
        };
        let mut best: Option<(i16, &OutboundChain)> = None;
        for c in listener.chains.iter().filter(|c| c.port == wanted) {
            if let Some(len) = c.match_len(ip)
                && best.is_none_or(|(b, _)| len > b)
            {
                best = Some((len, c));
            }
        }
        let chain = best.map(|(_, c)| c).or(listener.default_chain.as_ref())?;
        Some(Route {
            chain,
            cluster: self.clusters.get(&chain.cluster),
        })
    }

    /// The cluster with this name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.clusters.get(name)
    }

    /// The service VIPs: `(address, port)` of every chain matching exactly one host
    /// prefix (/32 or /128) and a destination port. What `--bind-vips` binds, so that
    /// connections reach the proxy without capture rules.
    pub fn vips(&self) -> Vec<SocketAddr> {
        let Some(l) = &self.outbound else {
            return Vec::new();
        };
        l.chains
            .iter()
            .filter_map(|c| match (c.prefixes.as_slice(), c.port) {
                ([p], Some(port)) if p.prefix_len() == p.max_prefix_len() => {
                    Some(SocketAddr::new(p.addr(), port))
                }
                _ => None,
            })
            .collect()
    }

    /// The first IPv4 address the `dns` listener's table gives `name` (case-insensitive,
    /// trailing dot allowed).
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        let table = &self.dns.as_ref()?.table;
        let key = Hostname::new(name);
        // Linear: the table is small and this is not on the data path (`ferry dns` builds
        // its own index from `dns_table`).
        table
            .iter()
            .find(|(h, _)| *h == key)
            .and_then(|(_, ips)| first_v4(ips))
    }

    /// Every name of the `dns` listener's table that has an IPv4 address, with its
    /// first one: what `ferry dns` serves.
    pub fn dns_table(&self) -> Vec<(Hostname, Ipv4Addr)> {
        let Some(dns) = &self.dns else {
            return Vec::new();
        };
        dns.table
            .iter()
            .filter_map(|(h, ips)| first_v4(ips).map(|v4| (h.clone(), v4)))
            .collect()
    }
}

fn first_v4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}
