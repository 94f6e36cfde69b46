//! Envoy's Secret Discovery Service on the Workload API socket, as SPIRE serves it:
//! `default` or a SPIFFE ID name a TLS certificate; `ROOTCA` (own bundle), `ALL` (own and
//! federated) or `spiffe://<td>` name a validation context using Envoy's SPIFFE certificate
//! validator (plain `trusted_ca` when the node metadata sets
//! `disable_spiffe_cert_validation`). Certificates are inline PEM.

use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::{DataSource, Node, TypedExtensionConfig};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::{Any, value};
use prost::Message;
use registry::spiffe::TrustDomain;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::attestor::Caller;
use crate::core::{Core, instant_of};
use crate::state::{Bundle, Snapshot};

/// The type URL of SDS resources.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// Node metadata key that asks for plain `trusted_ca` validation contexts.
pub const DISABLE_SPIFFE_VALIDATION: &str = "disable_spiffe_cert_validation";

/// The SDS service.
#[derive(Debug, Clone)]
pub struct Sds {
    core: Arc<Core>,
}

impl Sds {
    /// A service over the shared core.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn inline(pem: String) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(pem.into_bytes())),
        ..DataSource::default()
    })
}

fn bundle_pem(b: &Bundle) -> String {
    b.x509
        .iter()
        .map(|d| attest::x509::pem_encode("CERTIFICATE", d))
        .collect()
}

fn validation(name: &str, bundles: &[(TrustDomain, &Bundle)], plain: bool) -> Secret {
    let ctx = if plain {
        CertificateValidationContext {
            trusted_ca: inline(bundles.iter().map(|(_, b)| bundle_pem(b)).collect()),
            ..CertificateValidationContext::default()
        }
    } else {
        let cfg = SpiffeCertValidatorConfig {
            trust_domains: bundles
                .iter()
                .map(|(td, b)| spiffe_cert_validator_config::TrustDomain {
                    name: td.as_str().to_owned(),
                    trust_bundle: inline(bundle_pem(b)),
                    ..Default::default()
                })
                .collect(),
            ..SpiffeCertValidatorConfig::default()
        };
        CertificateValidationContext {
            custom_validator_config: Some(TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.to_owned(),
                typed_config: Some(Any {
                    type_url: SPIFFE_VALIDATOR_TYPE.to_owned(),
                    value: cfg.encode_to_vec(),
                }),
            }),
            ..CertificateValidationContext::default()
        }
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(ctx)),
    }
}

fn disables_spiffe(node: &Node) -> bool {
    node.metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION))
        .and_then(|v| v.kind.as_ref())
        .is_some_and(|k| matches!(k, value::Kind::BoolValue(true)))
}

/// The requested secrets for `caller` (unknown names are left out, as Envoy expects), and
/// when they next change by SVID rotation.
fn secrets(
    core: &Core,
    snap: &Snapshot,
    caller: &Caller,
    names: &[String],
    plain: bool,
) -> Result<(Vec<Any>, SystemTime), Status> {
    let (granted, next) = core.granted(snap, caller)?;
    let all = snap.all_bundles();
    let own = (snap.trust_domain.clone(), &snap.own);
    let default_names: Vec<String>;
    let names = if names.is_empty() {
        // Wildcard: every identity and every bundle.
        default_names = granted
            .iter()
            .map(|g| g.entry.spiffe_id.to_string())
            .chain(all.keys().map(TrustDomain::id_string))
            .collect();
        &default_names
    } else {
        names
    };
    let mut out = Vec::new();
    for name in names {
        let tls = |g: &crate::core::Granted| Secret {
            name: name.clone(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(g.svid.chain_pem()),
                private_key: inline(g.svid.key_pem()),
                ..TlsCertificate::default()
            })),
        };
        let s = match name.as_str() {
            "default" => granted.first().map(tls),
            "ROOTCA" => Some(validation(name, std::slice::from_ref(&own), plain)),
            "ALL" => {
                let v: Vec<(TrustDomain, &Bundle)> =
                    all.iter().map(|(k, v)| (k.clone(), *v)).collect();
                Some(validation(name, &v, plain))
            }
            n => match all.iter().find(|(td, _)| td.id_string() == n) {
                Some((td, b)) => Some(validation(name, &[(td.clone(), *b)], plain)),
                None => granted
                    .iter()
                    .find(|g| g.entry.spiffe_id.to_string() == n)
                    .map(tls),
            },
        };
        match s {
            Some(s) => out.push(Any {
                type_url: SECRET_TYPE.to_owned(),
                value: s.encode_to_vec(),
            }),
            None => tracing::debug!(name = %name, "SDS: unknown secret name for this caller"),
        }
    }
    Ok((out, next))
}

fn version_of(resources: &[Any]) -> String {
    let mut h = Sha256::new();
    for r in resources {
        h.update(&r.value);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "delta SDS is not supported; use StreamSecrets (state of the world)",
        ))
    }

    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = self.core.caller(&request)?;
        let mut inbound = request.into_inner();
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut snap_rx = core.snapshot.clone();
            let mut names: Option<Vec<String>> = None;
            let mut plain = false;
            let (mut last_version, mut last_nonce, mut nonce) =
                (String::new(), String::new(), 0u64);
            let mut next: Option<SystemTime> = None;
            loop {
                let mut force = false;
                let deadline = next.map(instant_of);
                tokio::select! {
                    _ = core.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if let Some(node) = &req.node {
                                plain = disables_spiffe(node);
                            }
                            if !req.type_url.is_empty() && req.type_url != SECRET_TYPE {
                                let _ = tx.send(Err(Status::invalid_argument(format!(
                                    "SDS serves {SECRET_TYPE}, not {}", req.type_url
                                )))).await;
                                return;
                            }
                            if !req.response_nonce.is_empty() && req.response_nonce != last_nonce {
                                continue; // answers an older response: superseded
                            }
                            if let Some(e) = &req.error_detail {
                                tracing::warn!(version = %req.version_info, error = %e.message, "Envoy rejected (NACKed) SDS secrets");
                            }
                            if names.as_ref() == Some(&req.resource_names) {
                                continue; // ACK (or NACK) with nothing new asked
                            }
                            names = Some(req.resource_names);
                            force = true;
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(error = %e, "SDS stream ended");
                            return;
                        }
                    },
                    r = snap_rx.changed() => if r.is_err() { return },
                    _ = async { match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    } } => {}
                }
                let Some(ns) = &names else { continue };
                let snap = snap_rx.borrow_and_update().clone();
                match secrets(&core, &snap, &caller, ns, plain) {
                    Ok((resources, n)) => {
                        next = Some(n);
                        let version = version_of(&resources);
                        if force || version != last_version {
                            nonce += 1;
                            last_nonce = nonce.to_string();
                            last_version = version.clone();
                            tracing::debug!(names = ?ns, %version, "SDS push");
                            let resp = DiscoveryResponse {
                                version_info: version,
                                resources,
                                type_url: SECRET_TYPE.to_owned(),
                                nonce: last_nonce.clone(),
                                ..DiscoveryResponse::default()
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = self.core.caller(&request)?;
        let req = request.into_inner();
        let plain = req.node.as_ref().is_some_and(disables_spiffe);
        let snap = self.core.snapshot.borrow().clone();
        let (resources, _) = secrets(&self.core, &snap, &caller, &req.resource_names, plain)?;
        Ok(Response::new(DiscoveryResponse {
            version_info: version_of(&resources),
            resources,
            type_url: SECRET_TYPE.to_owned(),
            nonce: "1".to_owned(),
            ..DiscoveryResponse::default()
        }))
    }
}
