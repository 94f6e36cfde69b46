//! What ferry's data plane (proxy and DNS) needs from xDS, as plain domain types decoded
//! from Envoy protobuf with `TryFrom`: the data path never touches protobuf.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, transport_socket::ConfigType,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    UpstreamTlsContext, common_tls_context::ValidationContextType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use prost::Message;

use crate::resources::meta;
use registry::config::{GatewayAddress, TlsMode};
use registry::hostname::Hostname;

/// Why a resource from the server could not be used. The resource is rejected (NACKed)
/// alone; the others in the same response still apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// The `Any` did not decode as the expected message.
    #[error("resource {name:?} does not decode as {expected}: {reason}")]
    Decode {
        /// The resource name, if known.
        name: String,
        /// The message type expected.
        expected: &'static str,
        /// The protobuf error.
        reason: String,
    },
    /// A field ferry needs is missing or malformed.
    #[error(
        "cluster {cluster:?}: {field} is missing or invalid ({detail}); is the xDS server a ferry agent?"
    )]
    Field {
        /// The cluster.
        cluster: String,
        /// The field, e.g. `filter_metadata.ferry.vip`.
        field: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// How the client side carries a connection, with what it needs to do so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Forward the application's own TLS bytes untouched.
    Passthrough,
    /// Originate Istio mTLS.
    IstioMtls(IstioTls),
}

/// The parameters of an Istio mTLS origination, from the cluster's `UpstreamTlsContext`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioTls {
    /// SNI, `outbound_.<port>_._.<hostname>`.
    pub sni: String,
    /// ALPN offered, in order.
    pub alpn: Vec<String>,
    /// SDS name of the client certificate (`default`).
    pub cert_secret: String,
    /// SDS name of the validation context (`spiffe://<server trust domain>`).
    pub validation_secret: String,
    /// Which server SPIFFE IDs are accepted.
    pub server_ids: ServerIdMatch,
}

/// Accepted server identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdMatch {
    /// Exactly these URI SANs.
    Exact(Vec<String>),
    /// Any URI SAN with this prefix (`spiffe://<td>/`).
    Prefix(String),
}

impl ServerIdMatch {
    /// Whether a peer certificate's URI SAN is acceptable.
    pub fn accepts(&self, uri: &str) -> bool {
        match self {
            ServerIdMatch::Exact(ids) => ids.iter().any(|i| i == uri),
            ServerIdMatch::Prefix(p) => uri.starts_with(p.as_str()),
        }
    }
}

/// One remote gateway to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEndpoint {
    /// Its address (a hostname is resolved by the dialer).
    pub address: GatewayAddress,
    /// Its port.
    pub port: u16,
    /// 0 is preferred (east-west), 1 is the fallback (ingress).
    pub priority: u32,
    /// Load-balancing weight.
    pub weight: u32,
}

/// A cluster as decoded from CDS (endpoints come separately unless inline).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterInfo {
    /// `H_cluster`.
    pub name: String,
    /// The federated hostname.
    pub hostname: String,
    /// The service port.
    pub port: u16,
    /// The loopback VIP.
    pub vip: Ipv4Addr,
    /// The CRD's tls mode.
    pub tls_mode: TlsMode,
    /// How to carry connections.
    pub transport: Transport,
    /// `Some` for DNS clusters (endpoints inline), `None` for EDS clusters.
    pub inline_endpoints: Option<Vec<GatewayEndpoint>>,
}

impl ClusterInfo {
    /// Whether the endpoints come from EDS.
    pub fn uses_eds(&self) -> bool {
        self.inline_endpoints.is_none()
    }
}

/// A service as the data plane sees it: cluster facts plus current endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteService {
    /// The cluster.
    pub cluster: ClusterInfo,
    /// The gateways, by priority (east-west first).
    pub endpoints: Vec<GatewayEndpoint>,
}

impl RemoteService {
    /// `VIP:port`: the original destination that selects this service.
    pub fn destination(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster.vip, self.cluster.port)
    }

    /// The endpoints of the best (lowest) priority that has any.
    pub fn preferred_endpoints(&self) -> &[GatewayEndpoint] {
        let Some(best) = self.endpoints.iter().map(|e| e.priority).min() else {
            return &[];
        };
        let start = self.endpoints.iter().position(|e| e.priority == best);
        let end = self.endpoints.iter().rposition(|e| e.priority == best);
        match (start, end) {
            (Some(s), Some(e)) => &self.endpoints[s..=e],
            _ => &[],
        }
    }
}

/// Everything the data plane reads: one immutable value per update.
#[derive(Debug, Clone, Default)]
pub struct XdsState {
    /// Services by federated hostname.
    pub services: BTreeMap<String, Arc<RemoteService>>,
    by_destination: HashMap<SocketAddrV4, Arc<RemoteService>>,
    /// True once clusters and the endpoints of every EDS cluster have arrived at least once.
    pub synced: bool,
    /// How many updates built this state (0 = nothing received yet).
    pub updates: u64,
}

impl XdsState {
    /// Builds the indexes.
    pub fn new(services: Vec<RemoteService>, synced: bool, updates: u64) -> Self {
        let mut by_name = BTreeMap::new();
        let mut by_destination = HashMap::new();
        for s in services {
            let s = Arc::new(s);
            by_destination.insert(s.destination(), s.clone());
            by_name.insert(s.cluster.hostname.clone(), s);
        }
        XdsState {
            services: by_name,
            by_destination,
            synced,
            updates,
        }
    }

    /// The service a captured connection to `dst` (its original destination) is for.
    pub fn by_destination(&self, dst: SocketAddr) -> Option<&Arc<RemoteService>> {
        match dst {
            SocketAddr::V4(v4) => self.by_destination.get(&v4),
            SocketAddr::V6(_) => None,
        }
    }

    /// The VIP of a federated hostname (case-insensitive, trailing dot allowed): what the
    /// DNS resolver answers.
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        self.services
            .get(Hostname::new(name).as_str())
            .map(|s| s.cluster.vip)
    }
}

fn field(cluster: &str, field: &'static str, detail: impl Into<String>) -> ResourceError {
    ResourceError::Field {
        cluster: cluster.to_owned(),
        field,
        detail: detail.into(),
    }
}

impl TryFrom<&Cluster> for ClusterInfo {
    type Error = ResourceError;

    fn try_from(c: &Cluster) -> Result<Self, ResourceError> {
        let name = c.name.clone();
        let m = c.metadata.as_ref();
        let hostname = meta::get_string(m, meta::HOSTNAME)
            .ok_or_else(|| field(&name, "filter_metadata.ferry.hostname", "absent"))?
            .to_owned();
        let port = meta::get_number(m, meta::PORT)
            .filter(|p| p.fract() == 0.0 && *p >= 1.0 && *p <= 65535.0)
            .ok_or_else(|| field(&name, "filter_metadata.ferry.port", "not a port number"))?
            as u16;
        let vip = meta::get_string(m, meta::VIP)
            .and_then(|v| v.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| field(&name, "filter_metadata.ferry.vip", "not an IPv4 address"))?;
        let tls_mode = meta::get_string(m, meta::TLS_MODE)
            .unwrap_or_default()
            .parse::<TlsMode>()
            .map_err(|e| field(&name, "filter_metadata.ferry.tlsMode", e.to_string()))?;
        let transport = match tls_mode {
            TlsMode::Mtls => Transport::Passthrough,
            TlsMode::IstioMtls => Transport::IstioMtls(istio_tls(&name, c)?),
        };
        let dns = matches!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(t))
                if t == DiscoveryType::StrictDns as i32 || t == DiscoveryType::LogicalDns as i32
        );
        let inline_endpoints = if dns {
            let cla = c
                .load_assignment
                .as_ref()
                .ok_or_else(|| field(&name, "load_assignment", "absent on a DNS cluster"))?;
            Some(Endpoints::try_from(cla)?.endpoints)
        } else {
            None
        };
        Ok(ClusterInfo {
            name,
            hostname,
            port,
            vip,
            tls_mode,
            transport,
            inline_endpoints,
        })
    }
}

fn istio_tls(name: &str, c: &Cluster) -> Result<IstioTls, ResourceError> {
    let ts = c
        .transport_socket
        .as_ref()
        .ok_or_else(|| field(name, "transport_socket", "absent on an IstioMtls cluster"))?;
    let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
        return Err(field(name, "transport_socket", "no typed_config"));
    };
    let tls = UpstreamTlsContext::decode(any.value.as_slice())
        .map_err(|e| field(name, "transport_socket", e.to_string()))?;
    let common = tls
        .common_tls_context
        .ok_or_else(|| field(name, "common_tls_context", "absent"))?;
    let cert_secret = common
        .tls_certificate_sds_secret_configs
        .first()
        .map(|s| s.name.clone())
        .ok_or_else(|| field(name, "tls_certificate_sds_secret_configs", "empty"))?;
    let Some(ValidationContextType::CombinedValidationContext(cv)) = common.validation_context_type
    else {
        return Err(field(
            name,
            "combined_validation_context",
            "absent or another kind",
        ));
    };
    let validation_secret = cv
        .validation_context_sds_secret_config
        .map(|s| s.name)
        .ok_or_else(|| field(name, "validation_context_sds_secret_config", "absent"))?;
    let mut exact = Vec::new();
    let mut prefix = None;
    for san in cv
        .default_validation_context
        .map(|d| d.match_typed_subject_alt_names)
        .unwrap_or_default()
    {
        match san.matcher.and_then(|m| m.match_pattern) {
            Some(MatchPattern::Exact(s)) => exact.push(s),
            Some(MatchPattern::Prefix(p)) => prefix = Some(p),
            other => {
                return Err(field(
                    name,
                    "match_typed_subject_alt_names",
                    format!("unsupported matcher {other:?}"),
                ));
            }
        }
    }
    let server_ids = match (exact.is_empty(), prefix) {
        (false, _) => ServerIdMatch::Exact(exact),
        (true, Some(p)) => ServerIdMatch::Prefix(p),
        (true, None) => {
            return Err(field(
                name,
                "match_typed_subject_alt_names",
                "no server identity to check",
            ));
        }
    };
    Ok(IstioTls {
        sni: tls.sni,
        alpn: common.alpn_protocols,
        cert_secret,
        validation_secret,
        server_ids,
    })
}

/// The endpoints of one `ClusterLoadAssignment`.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    /// The cluster they belong to.
    pub cluster: String,
    /// Sorted by priority.
    pub endpoints: Vec<GatewayEndpoint>,
}

impl TryFrom<&ClusterLoadAssignment> for Endpoints {
    type Error = ResourceError;

    fn try_from(cla: &ClusterLoadAssignment) -> Result<Self, ResourceError> {
        let name = &cla.cluster_name;
        let mut endpoints = Vec::new();
        for loc in &cla.endpoints {
            for ep in &loc.lb_endpoints {
                let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier else {
                    return Err(field(name, "lb_endpoints.endpoint", "absent"));
                };
                let Some(address::Address::SocketAddress(sa)) =
                    e.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    return Err(field(name, "endpoint.address", "not a socket address"));
                };
                let port = match sa.port_specifier {
                    Some(PortSpecifier::PortValue(p)) => u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| field(name, "endpoint.port_value", p.to_string()))?,
                    _ => return Err(field(name, "endpoint.port_value", "absent")),
                };
                let address = match sa.address.parse::<IpAddr>() {
                    Ok(ip) => GatewayAddress::Ip(ip),
                    Err(_) if !sa.address.is_empty() => GatewayAddress::Hostname(
                        Hostname::parse(&sa.address)
                            .map_err(|e| field(name, "endpoint.address", e.to_string()))?,
                    ),
                    Err(_) => return Err(field(name, "endpoint.address", "empty")),
                };
                endpoints.push(GatewayEndpoint {
                    address,
                    port,
                    priority: loc.priority,
                    weight: ep.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                });
            }
        }
        endpoints.sort_by_key(|e| e.priority);
        Ok(Endpoints {
            cluster: name.clone(),
            endpoints,
        })
    }
}
