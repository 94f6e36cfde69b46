//! Decoding rules and the reader/backoff helpers.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

use super::*;

#[test]
fn a_cluster_without_ferry_metadata_is_rejected_with_the_field() {
    let c = Cluster {
        name: "foreign".into(),
        ..Default::default()
    };
    let e = ClusterInfo::try_from(&c).unwrap_err();
    assert!(
        matches!(&e, ResourceError::Field { cluster, field, .. } if cluster == "foreign" && field.contains("hostname")),
        "{e}"
    );
    assert!(e.to_string().contains("ferry agent"), "{e}");
}

#[test]
fn an_endpoint_without_a_port_is_rejected() {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
    };
    let cla = ClusterLoadAssignment {
        cluster_name: "x_cluster".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.0.0.1".into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = Endpoints::try_from(&cla).unwrap_err();
    assert!(e.to_string().contains("port"), "{e}");
}

#[test]
fn backoff_grows_exponentially_with_jitter_and_is_capped() {
    let cfg = AdsClientConfig::new("http://127.0.0.1:1");
    for attempt in 1..40 {
        let d = backoff(&cfg, attempt);
        let full = cfg
            .initial_backoff
            .saturating_mul(1 << (attempt - 1).min(20))
            .min(cfg.max_backoff);
        assert!(
            d >= full / 2 && d <= full,
            "attempt {attempt}: {d:?} vs {full:?}"
        );
    }
    assert!(backoff(&cfg, 1) <= Duration::from_millis(100));
    assert!(backoff(&cfg, 30) <= cfg.max_backoff);
}

#[test]
fn state_indexes_by_destination_and_name() {
    let cfg = registry::config::parse(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\n---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: s\n  namespace: demo\nspec:\n  name: s\n  namespace: demo\n  port: 8443\n  exportedTrustDomains: [client.domain]\n  tlsMode: Mtls\n  gateways:\n    - type: istio-eastwestgateway\n      port: 15443\n      ip: 10.0.0.1\n",
        std::path::Path::new("t.yaml"),
        std::path::Path::new("/"),
    )
    .unwrap()
    .config;
    let snap = crate::resources::build(&cfg, 1);
    let c: Cluster = snap
        .of(ResourceType::Cluster)
        .get("s.demo.client.domain_cluster")
        .unwrap()
        .decode()
        .unwrap();
    let info = ClusterInfo::try_from(&c).unwrap();
    let cla: ClusterLoadAssignment = snap
        .of(ResourceType::Endpoint)
        .get("s.demo.client.domain_cluster")
        .unwrap()
        .decode()
        .unwrap();
    let eps = Endpoints::try_from(&cla).unwrap().endpoints;
    let vip = info.vip;
    let state = XdsState::new(
        vec![RemoteService {
            cluster: info,
            endpoints: eps,
        }],
        true,
        1,
    );
    assert_eq!(state.resolve("S.demo.client.domain."), Some(vip));
    assert_eq!(state.resolve("nope.demo.client.domain"), None);
    let s = state.by_destination((vip, 8443).into()).unwrap();
    assert_eq!(s.preferred_endpoints().len(), 1);
    assert!(state.by_destination((vip, 8444).into()).is_none());

    let (tx, rx) = watch::channel(Arc::new(XdsState::default()));
    let mut reader = StateReader::new(rx);
    assert!(reader.current().services.is_empty());
    tx.send_replace(Arc::new(state));
    assert_eq!(reader.current().services.len(), 1);
}

#[test]
fn a_resource_that_does_not_decode_is_named_in_the_nack() {
    use envoy_types::pb::envoy::service::discovery::v3::Resource as PbResource;
    let garbage = Any {
        type_url: crate::type_url::CLUSTER.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let wrapped = Any {
        type_url: crate::type_url::RESOURCE.into(),
        value: PbResource {
            name: "wrapped_cluster".into(),
            resource: Some(garbage.clone()),
            ..Default::default()
        }
        .encode_to_vec(),
    };
    let resp = DiscoveryResponse {
        type_url: crate::type_url::CLUSTER.into(),
        resources: vec![garbage, wrapped],
        ..Default::default()
    };
    let errors = apply_clusters(&mut Cache::default(), &resp);
    let names: Vec<String> = errors
        .iter()
        .map(|e| match e {
            ResourceError::Decode { name, .. } => name.clone(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        names,
        ["#0 of envoy.config.cluster.v3.Cluster", "wrapped_cluster"]
    );
    let nack = ack_or_nack(
        &mut TypeState::default(),
        ResourceType::Cluster,
        None,
        &resp,
        errors,
    );
    let message = nack.error_detail.unwrap().message;
    assert!(message.contains("wrapped_cluster"), "{message}");
    assert!(!message.contains("resource \"\""), "{message}");
}
