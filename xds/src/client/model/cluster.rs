//! CDS and EDS: a `Cluster` becomes an [`Upstream`] (discovery, connect timeout, Istio TLS
//! origination), a `ClusterLoadAssignment` becomes its [`GatewayEndpoint`]s.

use std::net::IpAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
    transport_socket::ConfigType,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, UpstreamTlsContext, common_tls_context::ValidationContextType,
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use prost::Message;
use serde::Serialize;

use super::{Ctx, ResourceError, ResourceKind, message_name};
use registry::config::GatewayAddress;
use registry::hostname::Hostname;

/// Envoy's default `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The TLS transport socket.
const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// The message a TLS transport socket carries for upstream connections.
const UPSTREAM_TLS_CONTEXT: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The plaintext transport socket (Envoy's default).
const RAW_BUFFER_SOCKET: &str = "envoy.transport_sockets.raw_buffer";

/// How a cluster finds its endpoints (Envoy's `Cluster.type`): the proxy needs it to know
/// whether to wait for EDS, resolve hostnames itself, or dial the original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Discovery {
    /// Endpoints come from EDS over the same ADS stream.
    Eds,
    /// Endpoints are inline IP addresses.
    Static,
    /// Endpoints are inline; hostnames are resolved and every address used.
    StrictDns,
    /// Endpoints are inline; hostnames are resolved and the first address used.
    LogicalDns,
    /// Connect to the connection's original destination (passthrough).
    OriginalDst,
}

/// The parameters of an Istio mTLS origination, from the cluster's `UpstreamTlsContext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// Accepted server identities (the cluster's URI SAN matchers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// One endpoint to dial (a remote gateway, for ferry's own control plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayEndpoint {
    /// Its address (a hostname is resolved by the dialer).
    pub address: GatewayAddress,
    /// Its port.
    pub port: u16,
    /// 0 is preferred; higher priorities are fallbacks (ferry: east-west 0, ingress 1).
    pub priority: u32,
    /// Load-balancing weight within its priority (default 1).
    pub weight: u32,
}

/// A cluster as the proxy dials it: what CDS says plus, once EDS delivered them, its
/// endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// The cluster name (ferry: `<hostname>_cluster`).
    pub name: String,
    /// How endpoints are found.
    pub discovery: Discovery,
    /// TCP connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// `Some` when the cluster originates (Istio) mTLS; `None` for raw TCP.
    pub tls: Option<IstioTls>,
    /// Sorted by priority; empty for `OriginalDst` and for EDS clusters not yet answered.
    pub endpoints: Vec<GatewayEndpoint>,
}

impl Upstream {
    /// The EDS resource name of an EDS cluster (`eds_cluster_config.service_name`, else
    /// the cluster name); `None` for other discovery types.
    pub fn eds_resource_name(c: &Cluster) -> Option<String> {
        let eds = matches!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
        );
        eds.then(|| {
            c.eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone())
        })
    }
}

impl TryFrom<&Cluster> for Upstream {
    type Error = ResourceError;

    fn try_from(c: &Cluster) -> Result<Self, ResourceError> {
        let cx = Ctx::new(ResourceKind::Cluster, &c.name);
        let discovery = match c.cluster_discovery_type {
            None => Discovery::Static,
            Some(ClusterDiscoveryType::Type(t)) => match DiscoveryType::try_from(t) {
                Ok(DiscoveryType::Static) => Discovery::Static,
                Ok(DiscoveryType::StrictDns) => Discovery::StrictDns,
                Ok(DiscoveryType::LogicalDns) => Discovery::LogicalDns,
                Ok(DiscoveryType::Eds) => Discovery::Eds,
                Ok(DiscoveryType::OriginalDst) => Discovery::OriginalDst,
                Err(_) => return Err(cx.unsupported("type", format!("value {t}"))),
            },
            Some(ClusterDiscoveryType::ClusterType(ref ct)) => {
                return Err(cx.unsupported("cluster_type", ct.name.clone()));
            }
        };
        lb_policy(cx, c, discovery)?;
        if !c.transport_socket_matches.is_empty() {
            return Err(cx.unsupported("transport_socket_matches", ""));
        }
        let connect_timeout = match &c.connect_timeout {
            Some(d) => cx.duration("connect_timeout", d)?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let tls = transport_socket(cx, c)?;
        let endpoints = match discovery {
            Discovery::Eds => {
                eds_source(cx, c)?;
                Vec::new()
            }
            Discovery::OriginalDst => Vec::new(),
            Discovery::Static | Discovery::StrictDns | Discovery::LogicalDns => {
                let cla = c
                    .load_assignment
                    .as_ref()
                    .ok_or_else(|| cx.invalid("load_assignment", "absent on a non-EDS cluster"))?;
                let eps = endpoints(cx, "load_assignment.", cla)?;
                if discovery == Discovery::Static
                    && let Some(e) = eps
                        .iter()
                        .find(|e| matches!(e.address, GatewayAddress::Hostname(_)))
                {
                    return Err(cx.invalid(
                        "load_assignment.endpoints.lb_endpoints.endpoint.address",
                        format!("{} is not an IP address on a STATIC cluster", e.address),
                    ));
                }
                eps
            }
        };
        Ok(Upstream {
            name: c.name.clone(),
            discovery,
            connect_timeout,
            tls,
            endpoints,
        })
    }
}

fn lb_policy(cx: Ctx<'_>, c: &Cluster, discovery: Discovery) -> Result<(), ResourceError> {
    if c.load_balancing_policy.is_some() {
        return Err(cx.unsupported("load_balancing_policy", "use lb_policy"));
    }
    match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin | LbPolicy::LeastRequest | LbPolicy::Random) => Ok(()),
        Ok(LbPolicy::ClusterProvided) if discovery == Discovery::OriginalDst => Ok(()),
        Ok(p) => Err(cx.unsupported("lb_policy", p.as_str_name())),
        Err(_) => Err(cx.unsupported("lb_policy", format!("value {}", c.lb_policy))),
    }
}

/// EDS must come over the same ADS stream (`ads`, `self`, or left unset).
fn eds_source(cx: Ctx<'_>, c: &Cluster) -> Result<(), ResourceError> {
    let spec = c
        .eds_cluster_config
        .as_ref()
        .and_then(|e| e.eds_config.as_ref())
        .and_then(|s| s.config_source_specifier.as_ref());
    match spec {
        None | Some(ConfigSourceSpecifier::Ads(_)) | Some(ConfigSourceSpecifier::Self_(_)) => {
            Ok(())
        }
        Some(other) => Err(cx.unsupported(
            "eds_cluster_config.eds_config",
            format!("{} (only ads is)", config_source_kind(other)),
        )),
    }
}

// Deprecated Envoy fields are read on purpose: a control plane may still send them, and
// ferry must honour or refuse them rather than ignore them.
#[allow(deprecated)]
fn config_source_kind(s: &ConfigSourceSpecifier) -> &'static str {
    match s {
        ConfigSourceSpecifier::Path(_) => "path",
        ConfigSourceSpecifier::PathConfigSource(_) => "path_config_source",
        ConfigSourceSpecifier::ApiConfigSource(_) => "api_config_source",
        ConfigSourceSpecifier::Ads(_) => "ads",
        ConfigSourceSpecifier::Self_(_) => "self",
    }
}

/// `None` for raw TCP, the TLS parameters for an `UpstreamTlsContext`.
fn transport_socket(cx: Ctx<'_>, c: &Cluster) -> Result<Option<IstioTls>, ResourceError> {
    let Some(ts) = &c.transport_socket else {
        return Ok(None);
    };
    let any = ts
        .config_type
        .as_ref()
        .map(|ConfigType::TypedConfig(any)| any);
    let type_name = any.map(|a| message_name(&a.type_url)).unwrap_or_default();
    let tls_type = UPSTREAM_TLS_CONTEXT;
    if type_name == tls_type || (ts.name == TLS_SOCKET && any.is_some()) {
        let Some(any) = any.filter(|_| type_name == tls_type) else {
            return Err(cx.unsupported("transport_socket.typed_config", type_name.to_owned()));
        };
        let tls = UpstreamTlsContext::decode(any.value.as_slice())
            .map_err(|e| cx.invalid("transport_socket.typed_config", e.to_string()))?;
        return istio_tls(cx, tls).map(Some);
    }
    if ts.name == RAW_BUFFER_SOCKET || type_name.ends_with(".RawBuffer") {
        return Ok(None);
    }
    let what = if ts.name.is_empty() {
        type_name
    } else {
        ts.name.as_str()
    };
    Err(cx.unsupported("transport_socket", what.to_owned()))
}

const TLS: &str = "transport_socket.typed_config.common_tls_context";

// Deprecated Envoy fields are read on purpose: a control plane may still send them, and
// ferry must honour or refuse them rather than ignore them.
#[allow(deprecated)]
fn istio_tls(cx: Ctx<'_>, tls: UpstreamTlsContext) -> Result<IstioTls, ResourceError> {
    let common = tls
        .common_tls_context
        .ok_or_else(|| cx.invalid(TLS, "absent"))?;
    if !common.tls_certificates.is_empty() {
        return Err(cx.unsupported(
            format!("{TLS}.tls_certificates"),
            "inline certificates; use tls_certificate_sds_secret_configs",
        ));
    }
    if common.tls_certificate_provider_instance.is_some()
        || common
            .tls_certificate_certificate_provider_instance
            .is_some()
        || common.tls_certificate_certificate_provider.is_some()
    {
        return Err(cx.unsupported(
            format!("{TLS}.tls_certificate_provider_instance"),
            "use tls_certificate_sds_secret_configs",
        ));
    }
    let cert_secret = common
        .tls_certificate_sds_secret_configs
        .first()
        .map(|s| s.name.clone())
        .ok_or_else(|| cx.invalid(format!("{TLS}.tls_certificate_sds_secret_configs"), "empty"))?;
    let (validation_secret, default) = match common.validation_context_type {
        Some(ValidationContextType::CombinedValidationContext(cv)) => {
            let secret = cv.validation_context_sds_secret_config.ok_or_else(|| {
                cx.invalid(
                    format!(
                        "{TLS}.combined_validation_context.validation_context_sds_secret_config"
                    ),
                    "absent",
                )
            })?;
            (
                secret.name,
                cv.default_validation_context.unwrap_or_default(),
            )
        }
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            (s.name, CertificateValidationContext::default())
        }
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err(cx.unsupported(
                format!("{TLS}.validation_context"),
                "inline trust; use an SDS validation context",
            ));
        }
        Some(ValidationContextType::ValidationContextCertificateProvider(_))
        | Some(ValidationContextType::ValidationContextCertificateProviderInstance(_)) => {
            return Err(cx.unsupported(
                format!("{TLS}.validation_context_certificate_provider"),
                "use an SDS validation context",
            ));
        }
        None => return Err(cx.invalid(format!("{TLS}.validation_context_type"), "absent")),
    };
    let server_ids = server_ids(cx, default)?;
    Ok(IstioTls {
        sni: tls.sni,
        alpn: common.alpn_protocols,
        cert_secret,
        validation_secret,
        server_ids,
    })
}

/// The URI SAN matchers of the default validation context (typed, or the deprecated
/// untyped list, which Envoy applies to every SAN type).
// Deprecated Envoy fields are read on purpose: a control plane may still send them, and
// ferry must honour or refuse them rather than ignore them.
#[allow(deprecated)]
fn server_ids(
    cx: Ctx<'_>,
    v: CertificateValidationContext,
) -> Result<ServerIdMatch, ResourceError> {
    let field = format!("{TLS}.combined_validation_context.default_validation_context");
    if v.trusted_ca.is_some() {
        return Err(cx.unsupported(format!("{field}.trusted_ca"), "inline trust; use SDS"));
    }
    if v.custom_validator_config.is_some() {
        return Err(cx.unsupported(format!("{field}.custom_validator_config"), ""));
    }
    let mut matchers: Vec<(String, StringMatcher)> = Vec::new();
    for (i, san) in v.match_typed_subject_alt_names.into_iter().enumerate() {
        let f = format!("{field}.match_typed_subject_alt_names[{i}]");
        if san.san_type != SanType::Uri as i32 {
            let t = SanType::try_from(san.san_type).map_or("unknown", |t| t.as_str_name());
            return Err(cx.unsupported(format!("{f}.san_type"), format!("{t}; only URI is")));
        }
        let m = san
            .matcher
            .ok_or_else(|| cx.invalid(format!("{f}.matcher"), "absent"))?;
        matchers.push((format!("{f}.matcher"), m));
    }
    for (i, m) in v.match_subject_alt_names.into_iter().enumerate() {
        matchers.push((format!("{field}.match_subject_alt_names[{i}]"), m));
    }
    let mut exact = Vec::new();
    let mut prefix = None;
    for (f, m) in matchers {
        if m.ignore_case {
            return Err(cx.unsupported(format!("{f}.ignore_case"), ""));
        }
        match m.match_pattern {
            Some(MatchPattern::Exact(s)) if prefix.is_none() => exact.push(s),
            Some(MatchPattern::Prefix(p)) if exact.is_empty() && prefix.is_none() => {
                prefix = Some(p);
            }
            Some(MatchPattern::Exact(_) | MatchPattern::Prefix(_)) => {
                return Err(
                    cx.unsupported(f, "a mix of exact and prefix matchers, or several prefixes")
                );
            }
            Some(MatchPattern::Suffix(_)) => return Err(cx.unsupported(format!("{f}.suffix"), "")),
            Some(MatchPattern::SafeRegex(_)) => {
                return Err(cx.unsupported(format!("{f}.safe_regex"), ""));
            }
            Some(MatchPattern::Contains(_)) => {
                return Err(cx.unsupported(format!("{f}.contains"), ""));
            }
            Some(MatchPattern::Custom(_)) => return Err(cx.unsupported(format!("{f}.custom"), "")),
            None => return Err(cx.invalid(f, "no pattern")),
        }
    }
    match (exact.is_empty(), prefix) {
        (false, _) => Ok(ServerIdMatch::Exact(exact)),
        (true, Some(p)) => Ok(ServerIdMatch::Prefix(p)),
        (true, None) => Err(cx.invalid(
            format!("{field}.match_typed_subject_alt_names"),
            "no server identity to check",
        )),
    }
}

/// The endpoints of one `ClusterLoadAssignment` (EDS), for the cluster(s) naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoints {
    /// The EDS resource name (`cluster_name`).
    pub cluster: String,
    /// Sorted by priority.
    pub endpoints: Vec<GatewayEndpoint>,
}

impl TryFrom<&ClusterLoadAssignment> for Endpoints {
    type Error = ResourceError;

    fn try_from(cla: &ClusterLoadAssignment) -> Result<Self, ResourceError> {
        let cx = Ctx::new(ResourceKind::Endpoints, &cla.cluster_name);
        Ok(Endpoints {
            cluster: cla.cluster_name.clone(),
            endpoints: endpoints(cx, "", cla)?,
        })
    }
}

/// Every `LbEndpoint`, with its locality's priority, sorted by priority (stable).
fn endpoints(
    cx: Ctx<'_>,
    at: &str,
    cla: &ClusterLoadAssignment,
) -> Result<Vec<GatewayEndpoint>, ResourceError> {
    if !cla.named_endpoints.is_empty() {
        return Err(cx.unsupported(format!("{at}named_endpoints"), ""));
    }
    let mut out = Vec::new();
    for (li, loc) in cla.endpoints.iter().enumerate() {
        for (ei, ep) in loc.lb_endpoints.iter().enumerate() {
            let f = format!("{at}endpoints[{li}].lb_endpoints[{ei}]");
            let e = match &ep.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
                Some(lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return Err(cx.unsupported(format!("{f}.endpoint_name"), ""));
                }
                None => return Err(cx.invalid(format!("{f}.endpoint"), "absent")),
            };
            if !e.additional_addresses.is_empty() {
                return Err(cx.unsupported(format!("{f}.endpoint.additional_addresses"), ""));
            }
            let sa = match e.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(sa)) => sa,
                Some(address::Address::Pipe(p)) => {
                    return Err(
                        cx.unsupported(format!("{f}.endpoint.address.pipe"), p.path.clone())
                    );
                }
                Some(address::Address::EnvoyInternalAddress(_)) => {
                    return Err(
                        cx.unsupported(format!("{f}.endpoint.address.envoy_internal_address"), "")
                    );
                }
                None => return Err(cx.invalid(format!("{f}.endpoint.address"), "absent")),
            };
            let port = match &sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => {
                    u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                        cx.invalid(format!("{f}.endpoint.address.port_value"), p.to_string())
                    })?
                }
                Some(PortSpecifier::NamedPort(n)) => {
                    return Err(
                        cx.unsupported(format!("{f}.endpoint.address.named_port"), n.clone())
                    );
                }
                None => {
                    return Err(cx.invalid(format!("{f}.endpoint.address.port_value"), "absent"));
                }
            };
            let address = match sa.address.parse::<IpAddr>() {
                Ok(ip) => GatewayAddress::Ip(ip),
                Err(_) if !sa.address.is_empty() => {
                    GatewayAddress::Hostname(Hostname::parse(&sa.address).map_err(|e| {
                        cx.invalid(format!("{f}.endpoint.address.address"), e.to_string())
                    })?)
                }
                Err(_) => return Err(cx.invalid(format!("{f}.endpoint.address.address"), "empty")),
            };
            out.push(GatewayEndpoint {
                address,
                port,
                priority: loc.priority,
                weight: ep.load_balancing_weight.as_ref().map_or(1, |w| w.value),
            });
        }
    }
    out.sort_by_key(|e| e.priority);
    Ok(out)
}
