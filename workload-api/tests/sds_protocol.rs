//! SDS protocol details on the Workload API socket, with envoy-types' generated client:
//! no security header needed, version/nonce, ACKs produce no new response, stale nonces
//! are ignored, a rotation is pushed, unknown names are left out, Delta is Unimplemented.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use testkit::workload::{Entry, config_yaml, my_uid, start};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use workload_api::sds::SPIFFE_VALIDATOR;
use xds::type_url::SECRET as SECRET_TYPE;

fn inline(d: &envoy_types::pb::envoy::config::core::v3::DataSource) -> String {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    match &d.specifier {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn stream_secrets_versions_acks_and_pushes_rotation() {
    let (_d, agent, mut client) = sds_client("4s").await;

    let (tx, rx) = mpsc::channel(8);
    tx.send(req(
        &["default", "spiffe://example.org/sds", "ROOTCA", "nope"],
        "",
        "",
    ))
    .await
    .unwrap();
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .expect("no security header needed for SDS")
        .into_inner();
    let r1 = responses.message().await.unwrap().unwrap();
    assert_eq!(r1.type_url, SECRET_TYPE);
    assert!(!r1.version_info.is_empty() && !r1.nonce.is_empty());
    let secrets: Vec<Secret> = r1
        .resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect();
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["default", "spiffe://example.org/sds", "ROOTCA"],
        "unknown name left out"
    );
    match &secrets[0].r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            let chain = t.certificate_chain.as_ref().unwrap();
            let key = t.private_key.as_ref().unwrap();
            assert!(inline(chain).starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(inline(key).starts_with("-----BEGIN PRIVATE KEY-----"));
        }
        other => panic!("expected a TLS certificate, got {other:?}"),
    }
    match &secrets[2].r#type {
        Some(secret::Type::ValidationContext(v)) => {
            assert_eq!(
                v.custom_validator_config.as_ref().unwrap().name,
                SPIFFE_VALIDATOR
            );
        }
        other => panic!("expected a validation context, got {other:?}"),
    }

    // A stale nonce is ignored; an ACK of the latest asks nothing new: no response to either
    // before the next rotation (which is ~2 s away, so wait less than that).
    tx.send(req(&["default"], &r1.version_info, "stale"))
        .await
        .unwrap();
    tx.send(req(
        &["default", "spiffe://example.org/sds", "ROOTCA", "nope"],
        &r1.version_info,
        &r1.nonce,
    ))
    .await
    .unwrap();
    // The rotation then arrives with a new version and nonce.
    let r2 = tokio::time::timeout(Duration::from_secs(20), responses.message())
        .await
        .expect("rotation pushed")
        .unwrap()
        .unwrap();
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    assert_eq!(
        r2.resources.len(),
        3,
        "same names as the ACKed request, not the stale one"
    );

    // Changing the names gets an immediate answer for the new set.
    tx.send(req(&["ALL"], &r2.version_info, &r2.nonce))
        .await
        .unwrap();
    let r3 = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r3.resources.len(), 1);

    // FetchSecrets works too; DeltaSecrets is Unimplemented.
    let f = client
        .fetch_secrets(req(&["default"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.resources.len(), 1);
    let delta = client
        .delta_secrets(tokio_stream::iter(vec![DeltaDiscoveryRequest::default()]))
        .await;
    assert_eq!(delta.unwrap_err().code(), tonic::Code::Unimplemented);
    drop(tx);
    agent.stop().await;
}

/// A running agent with one entry for this uid (X.509-SVIDs living `svid_ttl`), and an SDS
/// client to it.
async fn sds_client(
    svid_ttl: &str,
) -> (
    testkit::TempDir,
    testkit::workload::Agent,
    SecretDiscoveryServiceClient<tonic::transport::Channel>,
) {
    let d = testkit::tempdir().unwrap();
    let yaml = config_yaml(
        d.path(),
        svid_ttl,
        &[Entry {
            id: "spiffe://example.org/sds",
            selectors: vec![format!("unix:uid:{}", my_uid())],
            hint: None,
        }],
        &[],
    );
    let agent = start(d.path(), &yaml).await;
    let ep = spiffe::transport::Endpoint::parse(&agent.endpoint()).unwrap();
    let channel = spiffe::transport::connect(&ep).await.unwrap();
    (d, agent, SecretDiscoveryServiceClient::new(channel))
}

#[tokio::test]
async fn fetch_secrets_deduplicates_and_caps_names() {
    let (_d, agent, mut client) = sds_client("1h").await;
    let names = ["default", "ROOTCA", "default", "default", "ROOTCA"];
    let f = client
        .fetch_secrets(req(&names, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.resources.len(), 2, "each distinct name once");

    // 200,000 times `default` used to build a 381 MB response; now it is refused.
    let many = vec!["default"; 200_000];
    let err = client
        .fetch_secrets(req(&many, "", ""))
        .await
        .expect_err("over the cap");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("16384"), "{}", err.message());
    agent.stop().await;
}

#[tokio::test]
async fn stream_secrets_deduplicates_caps_and_answers_a_reconnect() {
    let (_d, agent, mut client) = sds_client("1h").await;
    // A reconnecting Envoy may carry the nonce of its previous stream: still answered.
    let (tx, rx) = mpsc::channel(8);
    tx.send(req(&["default", "default", "ROOTCA"], "v0", "41"))
        .await
        .unwrap();
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("the first request is answered")
        .unwrap()
        .unwrap();
    assert_eq!(r1.resources.len(), 2, "duplicates left out");

    // A NACK that changes the names is still the subscription.
    let mut nack = req(&["ROOTCA"], "", &r1.nonce);
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 3,
        message: "test rejects".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    let r2 = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r2.resources.len(), 1);

    // Over the cap: the stream ends with InvalidArgument naming it.
    let many = vec!["default"; 20_000];
    tx.send(req(&many, &r2.version_info, &r2.nonce))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .expect_err("the stream ends");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("16384"), "{}", err.message());
    drop(tx);
    agent.stop().await;
}
