//! CDS: one `Cluster` named `H_cluster` per imported service.
//!
//! Gateways given as IPs: an EDS cluster over ADS (the endpoints come from the matching
//! `ClusterLoadAssignment`). Any gateway given by hostname: a STRICT_DNS cluster with the
//! same endpoints inline, so Envoy resolves the names itself. `IstioMtls` clusters
//! originate Istio mTLS (SNI, ALPN, SVID and trust bundle from SDS); `Mtls` clusters are
//! raw TCP, forwarding the client's own TLS.

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiConfigSource, ApiVersion, ConfigSource, GrpcService,
    TransportSocket, api_config_source::ApiType, config_source::ConfigSourceSpecifier,
    grpc_service::EnvoyGrpc, grpc_service::TargetSpecifier, transport_socket::ConfigType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    TlsParameters, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};

use super::{Resource, VersionError, endpoint, meta};
use registry::config::{FederatedService, GatewayAddress, ServerIdentity, TlsMode};

/// How long Envoy (and ferry's proxy) waits for a TCP connection to a gateway.
pub const CONNECT_TIMEOUT_SECS: i64 = 5;
/// The static cluster in the sidecar bootstrap that reaches the Workload API socket (SDS).
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The SDS secret holding the workload's own SVID (the first one).
pub const SDS_DEFAULT_CERT: &str = "default";
/// The ALPN list an Istio client offers on TCP clusters (protocols.md section 3).
pub const ISTIO_TCP_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];
/// The transport socket name for TLS.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// The `Cluster` for one service.
pub fn cluster(svc: &FederatedService) -> Result<Resource, VersionError> {
    let dns = svc
        .gateways
        .iter()
        .any(|g| matches!(g.address, GatewayAddress::Hostname(_)));
    let mut c = Cluster {
        name: svc.cluster_name(),
        connect_timeout: Some(Duration {
            seconds: CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        circuit_breakers: Some(unlimited()),
        metadata: Some(meta::ferry([
            (meta::HOSTNAME, meta::string(svc.hostname.as_str())),
            (meta::PORT, meta::number(f64::from(svc.port))),
            (meta::VIP, meta::string(svc.vip.to_string())),
            (meta::TLS_MODE, meta::string(svc.tls_mode.to_string())),
        ])),
        ..Default::default()
    };
    if dns {
        c.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
        c.dns_lookup_family = DnsLookupFamily::V4Preferred as i32;
        c.load_assignment = Some(endpoint::assignment(svc));
    } else {
        c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
        c.eds_cluster_config = Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        });
    }
    if svc.tls_mode == TlsMode::IstioMtls {
        c.transport_socket = Some(TransportSocket {
            name: TLS_TRANSPORT_SOCKET.to_owned(),
            config_type: Some(ConfigType::TypedConfig(envoy_types::util::pack_any(
                istio_tls(svc),
            ))),
        });
    }
    // The version covers what the cluster is built from: an EDS cluster does not depend on
    // the gateways (they travel in EDS), so a gateway change re-sends one EDS resource, not
    // the full CDS state.
    let inputs = ClusterInputs {
        hostname: &svc.hostname,
        port: svc.port,
        vip: svc.vip.to_string(),
        tls_mode: svc.tls_mode.to_string(),
        server_trust_domain: svc.server_trust_domain.as_str(),
        server_identity: &svc.server_identity,
        dns_gateways: dns.then_some(&svc.gateways),
    };
    Resource::new(svc.cluster_name(), &c, &inputs)
}

/// Circuit breakers wide open, as Istio sets them on every outbound cluster: Envoy's
/// defaults (1,024 connections, pending and active requests, 3 retries per cluster) would
/// reset a sidecar's 1,025th connection to one federated service. ferry's own proxy bounds
/// connections process-wide instead (`--max-connections`).
fn unlimited() -> CircuitBreakers {
    let max = Some(UInt32Value { value: u32::MAX });
    CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: max,
            max_pending_requests: max,
            max_requests: max,
            max_retries: max,
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What a cluster is built from (hashed into its version).
#[derive(serde::Serialize)]
struct ClusterInputs<'a> {
    hostname: &'a str,
    port: u16,
    vip: String,
    tls_mode: String,
    server_trust_domain: &'a str,
    server_identity: &'a registry::config::ServerIdentity,
    dns_gateways: Option<&'a Vec<registry::config::Gateway>>,
}

/// `ads: {}` with the v3 resource API.
pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// SDS over the bootstrap's `sds-grpc` pipe cluster.
fn sds(name: String) -> SdsSecretConfig {
    SdsSecretConfig {
        name,
        sds_config: Some(ConfigSource {
            resource_api_version: ApiVersion::V3 as i32,
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    set_node_on_first_message_only: true,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                            cluster_name: SDS_CLUSTER.to_owned(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

/// The Istio client TLS context: SNI `outbound_.P_._.H`, Istio TCP ALPN, our SVID from SDS
/// `default`, the server's bundle from SDS `spiffe://<server td>` plus SAN matchers.
pub fn istio_tls(svc: &FederatedService) -> UpstreamTlsContext {
    let sans = match &svc.server_identity {
        ServerIdentity::Exact(ids) => ids
            .iter()
            .map(|id| san_uri(MatchPattern::Exact(id.to_string())))
            .collect(),
        ServerIdentity::AnyInTrustDomain => vec![san_uri(MatchPattern::Prefix(format!(
            "{}/",
            svc.server_trust_domain.id_string()
        )))],
    };
    UpstreamTlsContext {
        sni: svc.istio_sni(),
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
                tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            alpn_protocols: ISTIO_TCP_ALPN.iter().map(|s| (*s).to_owned()).collect(),
            tls_certificate_sds_secret_configs: vec![sds(SDS_DEFAULT_CERT.to_owned())],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(svc
                        .server_trust_domain
                        .id_string())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn san_uri(pattern: MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(pattern),
            ignore_case: false,
        }),
        oid: String::new(),
    }
}
