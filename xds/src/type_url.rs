//! The xDS type URLs ferry speaks, in one place: the server, the ADS client and SDS (in
//! `workload-api`) compare against these constants instead of spelling the strings out.

/// CDS: `envoy.config.cluster.v3.Cluster`.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// LDS: `envoy.config.listener.v3.Listener`.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// SDS: `envoy.extensions.transport_sockets.tls.v3.Secret`.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The `envoy.service.discovery.v3.Resource` wrapper a SotW server may pack a resource in
/// (it carries the resource's name, which a bare `Any` does not).
pub const RESOURCE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// The short name of a type URL, as used in logs and metric labels (`CDS`, `EDS`, `LDS`,
/// `SDS`); `None` for a type ferry does not speak.
pub fn short(type_url: &str) -> Option<&'static str> {
    match type_url {
        CLUSTER => Some("CDS"),
        ENDPOINT => Some("EDS"),
        LISTENER => Some("LDS"),
        SECRET => Some("SDS"),
        _ => None,
    }
}

/// The message name of a type URL (what follows the last `/`).
pub fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use prost::Name;

    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;

    #[test]
    fn constants_match_the_generated_messages() {
        assert_eq!(CLUSTER, Cluster::type_url());
        assert_eq!(ENDPOINT, ClusterLoadAssignment::type_url());
        assert_eq!(LISTENER, Listener::type_url());
        assert_eq!(SECRET, Secret::type_url());
        assert_eq!(RESOURCE, Resource::type_url());
        assert_eq!(message_name(CLUSTER), "envoy.config.cluster.v3.Cluster");
        assert_eq!(short(SECRET), Some("SDS"));
    }
}
