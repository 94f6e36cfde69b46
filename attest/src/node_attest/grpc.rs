//! The root's node-attestation gRPC API (`proto/node_attestation.proto`) over TLS: the
//! wire form of [`Evidence`], [`Challenge`] and [`Answer`], the service that runs the
//! [`Verifier`] and signs node CAs with the root's [`Authority`], and its TLS listener.
//!
//! A refusal is `PERMISSION_DENIED` with the [`super::Rejection`] text, so the node's
//! error (and log) says exactly which check failed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status};

use super::{Answer, Challenge, Evidence, Verifier};
use crate::Authority;

/// The generated protobuf types and gRPC stubs.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("ferry.nodeattestation.v1");
}

use proto::node_attestation_server::{NodeAttestation, NodeAttestationServer};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl From<proto::BeginRequest> for Evidence {
    fn from(r: proto::BeginRequest) -> Self {
        Self {
            ek_certificate: r.ek_certificate,
            ek_public: r.ek_public,
            ak_public: r.ak_public,
            ca_key_public: r.ca_key_public,
            ttl: Duration::from_secs(r.ttl_seconds),
        }
    }
}

impl From<Evidence> for proto::BeginRequest {
    fn from(e: Evidence) -> Self {
        Self {
            ek_certificate: e.ek_certificate,
            ek_public: e.ek_public,
            ak_public: e.ak_public,
            ca_key_public: e.ca_key_public,
            ttl_seconds: e.ttl.as_secs(),
        }
    }
}

impl From<Challenge> for proto::Challenge {
    fn from(c: Challenge) -> Self {
        Self {
            session: c.session,
            nonce: c.nonce,
            credential_blob: c.credential_blob,
            encrypted_secret: c.encrypted_secret,
        }
    }
}

impl From<proto::Challenge> for Challenge {
    fn from(c: proto::Challenge) -> Self {
        Self {
            session: c.session,
            nonce: c.nonce,
            credential_blob: c.credential_blob,
            encrypted_secret: c.encrypted_secret,
        }
    }
}

impl From<proto::Answer> for Answer {
    fn from(a: proto::Answer) -> Self {
        Self {
            session: a.session,
            activated_secret: a.activated_secret,
            certify_info: a.certify_info,
            certify_signature: a.certify_signature,
        }
    }
}

impl From<Answer> for proto::Answer {
    fn from(a: Answer) -> Self {
        Self {
            session: a.session,
            activated_secret: a.activated_secret,
            certify_info: a.certify_info,
            certify_signature: a.certify_signature,
        }
    }
}

/// The service: verifies nodes and has the root sign their node CAs.
#[derive(Debug, Clone)]
pub struct NodeAttestationService {
    verifier: Arc<Verifier>,
    authority: Arc<Authority>,
    max_ttl: Duration,
}

impl NodeAttestationService {
    /// A service verifying with `verifier` and signing with `authority` (a
    /// [`crate::Hierarchy::Root`] CA) node CAs living at most `max_ttl`.
    pub fn new(verifier: Arc<Verifier>, authority: Arc<Authority>, max_ttl: Duration) -> Self {
        Self {
            verifier,
            authority,
            max_ttl,
        }
    }
}

fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The gRPC status of a refusal: malformed input is the caller's bug, a full verifier is
/// worth a retry, everything else is a verdict.
fn status(e: &super::Rejection) -> Status {
    match e {
        super::Rejection::Malformed { .. } => Status::invalid_argument(e.to_string()),
        super::Rejection::Busy(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    }
}

fn panicked(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("node attestation task failed: {e}"))
}

#[tonic::async_trait]
impl NodeAttestation for NodeAttestationService {
    async fn begin(
        &self,
        req: Request<proto::BeginRequest>,
    ) -> Result<Response<proto::Challenge>, Status> {
        let peer = peer(&req);
        let evidence = Evidence::from(req.into_inner());
        let v = Arc::clone(&self.verifier);
        // RSA encryption and certificate checks: keep them off the async workers.
        let challenge = tokio::task::spawn_blocking(move || v.begin(&peer, &evidence))
            .await
            .map_err(panicked)?
            .map_err(|e| status(&e))?;
        Ok(Response::new(challenge.into()))
    }

    async fn complete(
        &self,
        req: Request<proto::Answer>,
    ) -> Result<Response<proto::NodeCa>, Status> {
        let peer = peer(&req);
        let answer = Answer::from(req.into_inner());
        let (v, ca, max) = (
            Arc::clone(&self.verifier),
            Arc::clone(&self.authority),
            self.max_ttl,
        );
        // Signing blocks when the root key is in a TPM.
        let res = tokio::task::spawn_blocking(move || {
            let attested = v.complete(&peer, &answer).map_err(|e| status(&e))?;
            let ttl = attested.ttl.min(max).max(Duration::from_secs(60));
            match ca.sign_node_ca(&attested.ca_key, &attested.selectors, ttl) {
                Ok((cert, roots)) => {
                    v.accepted(&peer, &attested, &cert.serial);
                    Ok(proto::NodeCa {
                        certificate: cert.der,
                        roots,
                        selectors: attested.selectors,
                    })
                }
                Err(e) => {
                    v.failed(&peer, &attested, &e.to_string());
                    Err(Status::internal(format!("cannot sign the node CA: {e}")))
                }
            }
        })
        .await
        .map_err(panicked)??;
        Ok(Response::new(res))
    }
}

/// A TLS connection with the TCP peer facts tonic exposes as `remote_addr`.
struct TlsIo {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `service` on `listener` with TLS from `tls` until `shutdown`. Handshakes run
/// in their own tasks, so a slow client holds up no one else.
pub async fn serve(
    listener: TcpListener,
    service: NodeAttestationService,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsIo>>(64);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "node attestation: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let info = tcp.connect_info();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx.send(Ok(TlsIo { inner, info })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "node attestation: TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, "node attestation: TLS handshake timed out")
                    }
                }
            });
        }
    });
    tonic::transport::Server::builder()
        .add_service(NodeAttestationServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            shutdown.cancelled_owned(),
        )
        .await
}
