//! The `SpiffeWorkloadAPI` gRPC service (no proto package): X.509 and JWT SVIDs and
//! bundles for attested callers, with every stream message carrying the full state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use registry::config::RegistrationEntry;
use registry::spiffe::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::core::{Core, Granted, instant_of};
use crate::peer::PeerInfo;
use crate::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use crate::proto::*;
use crate::state::Snapshot;

/// The metadata key every Workload API call must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Rejects calls without `workload.spiffe.io: true` (`InvalidArgument`), as the SPIFFE
/// Workload API spec requires; this keeps browsers and SSRF-style proxies out.
#[allow(clippy::result_large_err)]
pub fn require_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    core: Arc<Core>,
    next_id: Arc<AtomicU64>,
}

impl WorkloadApi {
    /// A service over the shared core.
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The span every log line of one call (or stream) is written in: its id, the RPC and
    /// the peer, so no log line has to repeat them.
    fn span(&self, rpc: &'static str, peer: &PeerInfo) -> tracing::Span {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (pid, uid) = peer
            .cred
            .as_ref()
            .map_or((None, None), |c| (Some(c.pid), Some(c.uid)));
        let remote = peer.remote.map(|a| a.to_string());
        tracing::info_span!("workload_api", stream = id, rpc, pid, uid, remote)
    }
}

type Push<M> = ReceiverStream<Result<M, Status>>;
type Make<M> = dyn Fn(&Snapshot, &[Granted]) -> M + Send + Sync;

/// Attests `peer` against `snap` (re-checking its binding to the connection) and, when
/// `svids`, grants its X.509-SVIDs; else only checks it has an identity.
async fn evaluate(
    core: &Core,
    peer: &PeerInfo,
    snap: &Arc<Snapshot>,
    svids: bool,
) -> Result<(Vec<Granted>, Option<SystemTime>), Status> {
    let caller = core.attest(peer, snap).await?;
    if svids {
        let (granted, next) = core.grant(snap, &caller).await?;
        Ok((granted, Some(next)))
    } else {
        core.entries(snap, &caller)?;
        Ok((Vec::new(), None))
    }
}

/// Sends `make`'s message at once, then again whenever the snapshot changes or the
/// rotation deadline passes, skipping messages equal to the last one sent. The caller is
/// attested again at each of these (so a process that exec'd or handed its connection
/// over loses the stream). The first failure is returned as the RPC's status.
async fn push<M>(
    core: Arc<Core>,
    peer: PeerInfo,
    span: tracing::Span,
    svids: bool,
    make: Box<Make<M>>,
) -> Result<Response<Push<M>>, Status>
where
    M: PartialEq + Clone + Send + Sync + 'static,
{
    let mut snap_rx = core.snapshot.clone();
    let snap = snap_rx.borrow_and_update().clone();
    let (granted, mut next) = evaluate(&core, &peer, &snap, svids)
        .instrument(span.clone())
        .await?;
    let first = make(&snap, &granted);
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.send(Ok(first.clone())).await;
    let task = async move {
        let mut last = first;
        loop {
            let deadline = next.map(instant_of);
            tokio::select! {
                _ = core.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                r = snap_rx.changed() => if r.is_err() { return },
                _ = async { match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                } } => {}
            }
            let snap = snap_rx.borrow_and_update().clone();
            match evaluate(&core, &peer, &snap, svids).await {
                Ok((granted, n)) => {
                    next = n;
                    let msg = make(&snap, &granted);
                    if msg != last {
                        if tx.send(Ok(msg.clone())).await.is_err() {
                            return;
                        }
                        last = msg;
                    }
                }
                Err(status) => {
                    tracing::info!(code = ?status.code(), message = status.message(), "stream ends");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
    };
    tokio::spawn(task.instrument(span));
    Ok(Response::new(ReceiverStream::new(rx)))
}

fn td_key(td: &registry::spiffe::TrustDomain) -> String {
    td.id_string()
}

fn x509_bundles(snap: &Snapshot) -> HashMap<String, Vec<u8>> {
    snap.all_bundles()
        .into_iter()
        .filter(|(_, b)| !b.x509.is_empty())
        .map(|(td, b)| (td_key(&td), b.x509.concat()))
        .collect()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Push<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let peer = Core::peer(&request);
        let span = self.span("FetchX509SVID", &peer);
        push(
            self.core.clone(),
            peer,
            span,
            true,
            Box::new(|snap, granted| {
                let bundle = snap.own.x509.concat();
                let svids = granted
                    .iter()
                    .map(|g| X509svid {
                        spiffe_id: g.entry.spiffe_id.to_string(),
                        x509_svid: g.svid.chain_der(),
                        x509_svid_key: g.svid.key_pkcs8.clone(),
                        bundle: bundle.clone(),
                        hint: g.entry.hint.clone().unwrap_or_default(),
                    })
                    .collect();
                let mut federated = x509_bundles(snap);
                federated.remove(&td_key(&snap.trust_domain));
                X509svidResponse {
                    svids,
                    crl: vec![],
                    federated_bundles: federated,
                }
            }),
        )
        .await
    }

    type FetchX509BundlesStream = Push<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let peer = Core::peer(&request);
        let span = self.span("FetchX509Bundles", &peer);
        push(
            self.core.clone(),
            peer,
            span,
            false,
            Box::new(|snap, _| X509BundlesResponse {
                crl: vec![],
                bundles: x509_bundles(snap),
            }),
        )
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let peer = Core::peer(&request);
        let span = self.span("FetchJWTSVID", &peer);
        let req = request.into_inner();
        async move {
            let snap = self.core.snapshot.borrow().clone();
            let caller = self.core.attest(&peer, &snap).await?;
            if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            let mut entries = self.core.entries(&snap, &caller)?;
            if !req.spiffe_id.is_empty() {
                let want = SpiffeId::parse(&req.spiffe_id)
                    .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
                entries.retain(|e| e.spiffe_id == want);
                if entries.is_empty() {
                    return Err(Status::permission_denied(format!(
                        "no identity issued for {want}"
                    )));
                }
            }
            let entries: Vec<RegistrationEntry> = entries.into_iter().cloned().collect();
            let (authority, ttl) = (self.core.authority.clone(), snap.jwt_svid_ttl);
            // A JWT signature may take tens of ms (TPM): not on the async workers.
            let svids = tokio::task::spawn_blocking(move || {
                entries
                    .iter()
                    .map(|e| {
                        let jwt = authority.issue_jwt_svid(&e.spiffe_id, &req.audience, ttl)?;
                        Ok(Jwtsvid {
                            spiffe_id: e.spiffe_id.to_string(),
                            svid: jwt.token,
                            hint: e.hint.clone().unwrap_or_default(),
                        })
                    })
                    .collect::<Result<Vec<_>, attest::Error>>()
            })
            .await
            .map_err(|e| Status::unavailable(format!("JWT-SVID signing task failed: {e}")))?
            .map_err(|err| Status::unavailable(format!("cannot issue JWT-SVID: {err}")))?;
            Ok(Response::new(JwtsvidResponse { svids }))
        }
        .instrument(span)
        .await
    }

    type FetchJWTBundlesStream = Push<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let peer = Core::peer(&request);
        let span = self.span("FetchJWTBundles", &peer);
        push(
            self.core.clone(),
            peer,
            span,
            false,
            Box::new(|snap, _| {
                let bundles = snap
                    .all_bundles()
                    .into_iter()
                    .filter(|(_, b)| !b.jwt.is_empty())
                    .map(|(td, b)| (td_key(&td), b.jwt.to_jwks()))
                    .collect();
                JwtBundlesResponse { bundles }
            }),
        )
        .await
    }

    /// Least privilege, unlike SPIRE: only callers with a registration entry may validate
    /// (the same rule as FetchJWTBundles); the socket is open to every local user, and
    /// validation is an oracle for stolen tokens and their claims.
    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let peer = Core::peer(&request);
        let span = self.span("ValidateJWTSVID", &peer);
        let req = request.into_inner();
        async move {
            let snap = self.core.snapshot.borrow().clone();
            let caller = self.core.attest(&peer, &snap).await?;
            self.core.entries(&snap, &caller)?;
            if req.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if req.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let bundles = snap.jwt_bundles();
            let claims =
                attest::jwt::validate(&req.svid, &req.audience, &bundles, SystemTime::now())
                    .map_err(|e| Status::invalid_argument(format!("JWT-SVID {e}")))?;
            Ok(Response::new(ValidateJwtsvidResponse {
                spiffe_id: claims.spiffe_id.to_string(),
                claims: Some(to_struct(claims.all)),
            }))
        }
        .instrument(span)
        .await
    }

    type FetchWITSVIDStream = Push<WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(
            "WIT-SVIDs are not supported by ferry",
        ))
    }

    type FetchWITBundlesStream = Push<WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(
            "WIT bundles are not supported by ferry",
        ))
    }
}

fn to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
