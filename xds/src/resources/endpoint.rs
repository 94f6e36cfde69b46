//! EDS: one `ClusterLoadAssignment` named `H_cluster` per imported service, one
//! `LbEndpoint` per gateway: east-west gateways at priority 0, ingress gateways at
//! priority 1, equal weights. A gateway given by hostname keeps the hostname as its
//! address, which is what an EDS-only client such as cofide-sdk-go dials (Envoy never reads
//! these: it gets a STRICT_DNS cluster with the endpoints inline instead).

use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, address, socket_address::PortSpecifier, socket_address::Protocol,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::{Resource, VersionError, meta};
use registry::config::{FederatedService, GatewayAddress, GatewayType};

/// Every gateway's load-balancing weight (the CRD has no weight field).
pub const GATEWAY_WEIGHT: u32 = 1;
/// Endpoint metadata key (in the `ferry` namespace): the gateway type.
pub const GATEWAY_TYPE_KEY: &str = "gatewayType";

/// The priority of a gateway kind: east-west preferred, ingress as fallback.
pub fn priority(kind: GatewayType) -> u32 {
    match kind {
        GatewayType::EastWest => 0,
        GatewayType::Ingress => 1,
    }
}

/// A TCP socket address (IP literal or hostname).
pub(super) fn tcp_address(address: String, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: Protocol::Tcp as i32,
            address,
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The load assignment message for `svc` (also inlined into STRICT_DNS clusters).
pub fn assignment(svc: &FederatedService) -> ClusterLoadAssignment {
    let mut by_priority: Vec<LocalityLbEndpoints> = Vec::new();
    for kind in [GatewayType::EastWest, GatewayType::Ingress] {
        let lb_endpoints: Vec<LbEndpoint> = svc
            .gateways
            .iter()
            .filter(|g| g.kind == kind)
            .map(|g| {
                let host = match &g.address {
                    GatewayAddress::Hostname(h) => h.to_string(),
                    GatewayAddress::Ip(ip) => ip.to_string(),
                };
                LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(tcp_address(host.clone(), g.port)),
                        hostname: match &g.address {
                            GatewayAddress::Hostname(_) => host,
                            GatewayAddress::Ip(_) => String::new(),
                        },
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value {
                        value: GATEWAY_WEIGHT,
                    }),
                    metadata: Some(meta::ferry([(
                        GATEWAY_TYPE_KEY,
                        meta::string(kind.to_string()),
                    )])),
                    ..Default::default()
                }
            })
            .collect();
        if !lb_endpoints.is_empty() {
            by_priority.push(LocalityLbEndpoints {
                lb_endpoints,
                priority: priority(kind),
                ..Default::default()
            });
        }
    }
    ClusterLoadAssignment {
        cluster_name: svc.cluster_name(),
        endpoints: by_priority,
        ..Default::default()
    }
}

/// The EDS resource for `svc`.
pub fn load_assignment(svc: &FederatedService) -> Result<Resource, VersionError> {
    Resource::new(
        svc.cluster_name(),
        &assignment(svc),
        &("endpoints", &svc.cluster_name(), &svc.gateways),
    )
}
