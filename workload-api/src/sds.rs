//! Envoy's Secret Discovery Service on the Workload API socket, as SPIRE serves it:
//! `default` or a SPIFFE ID name a TLS certificate; `ROOTCA` (own bundle), `ALL` (own and
//! federated) or `spiffe://<td>` name a validation context using Envoy's SPIFFE certificate
//! validator (plain `trusted_ca` when the node metadata sets
//! `disable_spiffe_cert_validation`). Certificates are inline PEM.
//!
//! The SotW protocol (nonces, ACK/NACK/stale detection, metrics, the per-stream span and
//! the open-streams gauge) is the one ADS uses: [`xds::server::StreamCore`]. Requested names
//! are deduplicated and capped at [`xds::server::MAX_NAMES_PER_REQUEST`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use tracing::Instrument;
use xds::server::{
    Exchange, Reply, StreamCore, Verdict, XdsMetrics, check_names, stream_span, unique_names,
};

use crate::attestor::Caller;
use crate::core::{Core, instant_of};
use crate::peer::PeerInfo;
use crate::state::{Bundle, Snapshot};

/// The short name of SDS in logs and metric labels.
const SDS: &str = "SDS";
/// The stream variant label of SDS streams in `xds_streams`.
const VARIANT: &str = "sds";
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
    metrics: Arc<XdsMetrics>,
    next_stream: Arc<AtomicU64>,
}

impl Sds {
    /// A service over the shared core, counting into its own xDS metrics.
    pub fn new(core: Arc<Core>) -> Self {
        Self::with_metrics(core, Arc::default())
    }

    /// A service counting into `metrics` (e.g. the xDS server's, so one registry shows
    /// `xds_streams{variant="sds"}` and `xds_nacks_total{type="SDS"}` beside ADS).
    pub fn with_metrics(core: Arc<Core>, metrics: Arc<XdsMetrics>) -> Self {
        Self {
            core,
            metrics,
            next_stream: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The metrics SDS streams count into (open streams, responses, ACKs, NACKs).
    pub fn metrics(&self) -> Arc<XdsMetrics> {
        self.metrics.clone()
    }
}

/// How the peer of an SDS call shows in its stream's span: the TCP address, or the Unix
/// socket peer's pid and uid.
fn peer_of<T>(req: &Request<T>) -> String {
    let info = req.extensions().get::<crate::endpoint::PeerInfo>();
    match (
        info.and_then(|p| p.remote),
        info.and_then(|p| p.cred.as_ref()),
    ) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(c)) => format!("pid={} uid={}", c.pid, c.uid),
        (None, None) => "unknown".to_owned(),
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
async fn secrets(
    core: &Core,
    snap: &Snapshot,
    caller: &Caller,
    names: &[String],
    plain: bool,
) -> Result<(Vec<Any>, SystemTime), Status> {
    // Each distinct name once: `default` asked 200,000 times is one secret, not 381 MB.
    let names = unique_names(names)?;
    let (granted, next) = core.grant(snap, caller).await?;
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
        default_names.iter().map(String::as_str).collect()
    } else {
        names
    };
    let mut out = Vec::new();
    for name in names {
        let tls = |g: &crate::core::Granted| Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(g.svid.chain_pem()),
                private_key: inline(g.svid.key_pem()),
                ..TlsCertificate::default()
            })),
        };
        let s = match name {
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
                type_url: xds::type_url::SECRET.to_owned(),
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
        let peer = Core::peer(&request);
        let snap = self.core.snapshot.borrow().clone();
        let caller = self.core.attest(&peer, &snap).await?;
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let span = stream_span(VARIANT, id, &peer_of(&request));
        let stream = StreamCore::new(self.metrics.clone(), VARIANT, id, span.clone());
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            core: self.core.clone(),
            peer,
            caller,
            stream,
            exchange: Exchange::default(),
            names: None,
            plain: false,
            tx,
        };
        tokio::spawn(session.run(request.into_inner()).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let peer = Core::peer(&request);
        let snap = self.core.snapshot.borrow().clone();
        let caller = self.core.attest(&peer, &snap).await?;
        let req = request.into_inner();
        let plain = req.node.as_ref().is_some_and(disables_spiffe);
        if let Err(e) = check_names(req.resource_names.len()) {
            self.metrics.oversized();
            tracing::warn!(count = e.count, "SDS: FetchSecrets names too many secrets");
            return Err(e.into());
        }
        let (resources, _) =
            secrets(&self.core, &snap, &caller, &req.resource_names, plain).await?;
        self.metrics.response(SDS);
        Ok(Response::new(DiscoveryResponse {
            version_info: version_of(&resources),
            resources,
            type_url: xds::type_url::SECRET.to_owned(),
            nonce: "1".to_owned(),
            ..DiscoveryResponse::default()
        }))
    }
}

/// One `StreamSecrets` stream: the xDS stream core plus what SDS serves from.
struct Session {
    core: Arc<Core>,
    /// The connection's peer: attested again at every push (exec, hand-over, exit).
    peer: PeerInfo,
    caller: Caller,
    /// Nonces, ACK/NACK detection, metrics, span, gauge: shared with ADS.
    stream: StreamCore,
    exchange: Exchange,
    /// The subscription (distinct names, in request order); `None` until the first request.
    names: Option<Vec<String>>,
    /// The node asked for plain `trusted_ca` validation contexts.
    plain: bool,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

/// What a request asks of the session.
enum Step {
    /// Nothing to send (stale, or an ACK/NACK repeating the subscription).
    Idle,
    /// The subscription changed: answer it even if the secrets did not.
    Answer,
    /// End the stream.
    Stop,
}

impl Session {
    /// Serves the stream until the client leaves, the stream fails or ferry shuts down.
    /// Pushes on a subscription change, a state change (rotation, new bundles) and at the
    /// next SVID rotation deadline.
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>) {
        tracing::debug!("SDS: stream opened");
        let mut snap_rx = self.core.snapshot.clone();
        let mut next: Option<SystemTime> = None;
        loop {
            let deadline = next.map(instant_of);
            let force = tokio::select! {
                _ = self.core.shutdown.cancelled() => break,
                _ = self.tx.closed() => break,
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => match self.on_request(req).await {
                        Step::Idle => continue,
                        Step::Answer => true,
                        Step::Stop => break,
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "SDS: stream ended");
                        break;
                    }
                },
                r = snap_rx.changed() => if r.is_err() { break } else { false },
                _ = async { match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                } } => false,
            };
            let snap = snap_rx.borrow_and_update().clone();
            match self.push(&snap, force).await {
                Ok(Some(n)) => next = Some(n),
                Ok(None) => {}
                Err(()) => break,
            }
        }
        tracing::debug!(node = %self.stream.node(), "SDS: stream closed");
    }

    /// Applies one request: node settings, type check, cap, nonce verdict, subscription.
    async fn on_request(&mut self, req: DiscoveryRequest) -> Step {
        if let Some(node) = &req.node {
            self.plain = disables_spiffe(node);
        }
        self.stream.set_node(req.node.as_ref());
        if !req.type_url.is_empty() && req.type_url != xds::type_url::SECRET {
            let status = Status::invalid_argument(format!(
                "SDS serves {}, not {}",
                xds::type_url::SECRET,
                req.type_url
            ));
            let _ = self.tx.send(Err(status)).await;
            return Step::Stop;
        }
        let names = match unique_names(&req.resource_names) {
            Ok(n) => n,
            Err(e) => {
                let status = self.stream.oversized(SDS, e);
                let _ = self.tx.send(Err(status)).await;
                return Step::Stop;
            }
        };
        let reply = Reply {
            nonce: &req.response_nonce,
            version: &req.version_info,
            error: req.error_detail.as_ref(),
        };
        if self.stream.verdict(SDS, &self.exchange, reply) == Verdict::Stale {
            return Step::Idle;
        }
        // A NACK's names are still the subscription (xDS): a change applies either way.
        if let Some(current) = &self.names
            && current.len() == names.len()
            && current.iter().zip(&names).all(|(a, b)| a == b)
        {
            return Step::Idle;
        }
        self.names = Some(names.into_iter().map(str::to_owned).collect());
        Step::Answer
    }

    /// Sends the subscribed secrets if they changed since the last response (or `force`).
    /// Returns when they next change by rotation; `Err` when the stream must end.
    async fn push(&mut self, snap: &Arc<Snapshot>, force: bool) -> Result<Option<SystemTime>, ()> {
        let Some(names) = &self.names else {
            return Ok(None);
        };
        self.caller = match self.core.attest(&self.peer, snap).await {
            Ok(c) => c,
            Err(status) => {
                let _ = self.tx.send(Err(status)).await;
                return Err(());
            }
        };
        match secrets(&self.core, snap, &self.caller, names, self.plain).await {
            Ok((resources, next)) => {
                let version = version_of(&resources);
                if force || self.exchange.version() != Some(version.as_str()) {
                    let nonce = self.stream.respond(SDS, &mut self.exchange, &version);
                    tracing::debug!(names = ?names, %version, "SDS push");
                    let resp = DiscoveryResponse {
                        version_info: version,
                        resources,
                        type_url: xds::type_url::SECRET.to_owned(),
                        nonce,
                        ..DiscoveryResponse::default()
                    };
                    self.tx.send(Ok(resp)).await.map_err(|_| ())?;
                }
                Ok(Some(next))
            }
            Err(status) => {
                let _ = self.tx.send(Err(status)).await;
                Err(())
            }
        }
    }
}
