//! The node's side of the exchange over the network: [`TpmUpstream`] is the
//! [`Upstream`] a `ca.role: node` CA uses. For each new node CA key it connects to the
//! root's endpoint (TLS trusted only under `ca.upstreamBundle`), sends the TPM's evidence,
//! answers the challenge with the TPM, and checks the node CA it gets back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use registry::spiffe::TrustDomain;
use rustls::pki_types::ServerName;
use tonic::Code;
use tonic::codegen::http::Uri;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::ek_chain::read_pem_certs;
use super::grpc::proto;
use super::grpc::proto::node_attestation_client::NodeAttestationClient;
use super::{AttestError, Challenge};
use crate::ca::{Upstream, UpstreamCa};
use crate::signer::Signer;
use crate::tpm::{TpmKeyStore, TpmSigner, attestation};
use crate::x509::CaCert;

/// How long one attestation may take end to end (TPM work included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The trust domain's root, reached by TPM node attestation.
#[derive(Debug, Clone)]
pub struct TpmUpstream {
    url: String,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    keys: TpmKeyStore,
}

/// Error text with its sources (tonic's transport errors say little at the top level).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl TpmUpstream {
    /// The root at `url` (`https://host:port`) of `td`, trusted under the roots in the PEM
    /// file `bundle`; node CA keys are looked up in `keys`.
    pub fn new(
        url: &str,
        td: &TrustDomain,
        bundle: &Path,
        keys: TpmKeyStore,
    ) -> Result<Self, AttestError> {
        let bad = |r: &str| AttestError::Config(format!("ca.upstream {url:?}: {r}"));
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must be https://host:port"));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let roots = read_pem_certs(bundle)?;
        let tls = super::tls::client_config(td, &roots)?;
        Ok(Self {
            url: url.to_owned(),
            host,
            port,
            tls,
            keys,
        })
    }

    async fn connect(
        &self,
    ) -> Result<NodeAttestationClient<tonic::transport::Channel>, AttestError> {
        let unreachable = |reason: String| AttestError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| unreachable(format!("bad host name: {e}")))?;
        let (tls, host, port) = (Arc::clone(&self.tls), self.host.clone(), self.port);
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, host, name) = (Arc::clone(&tls), host.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        // The URI only names the authority for HTTP/2; the connector does the dialling.
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}:{port}", self.host))
                .map_err(|e| unreachable(chain(&e)))?
                .connect_timeout(Duration::from_secs(10))
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(connector)
                .await
                .map_err(|e| unreachable(chain(&e)))?;
        Ok(NodeAttestationClient::new(channel))
    }

    fn status(&self, s: tonic::Status) -> AttestError {
        match s.code() {
            Code::PermissionDenied | Code::InvalidArgument | Code::Internal => {
                AttestError::Refused {
                    url: self.url.clone(),
                    reason: s.message().to_owned(),
                }
            }
            _ => AttestError::Unreachable {
                url: self.url.clone(),
                reason: format!("{}: {}", s.code(), s.message()),
            },
        }
    }

    /// Attests `key`'s TPM to the root and returns the node CA it certified for `key`.
    pub async fn attest(&self, key: &TpmSigner, ttl: Duration) -> Result<UpstreamCa, AttestError> {
        use tracing::Instrument as _;
        let span = tracing::info_span!("node_attest", upstream = %self.url);
        self.attest_inner(key, ttl).instrument(span).await
    }

    async fn attest_inner(
        &self,
        key: &TpmSigner,
        ttl: Duration,
    ) -> Result<UpstreamCa, AttestError> {
        let mut client = self.connect().await?;
        let k = key.clone();
        let evidence = tokio::task::spawn_blocking(move || attestation::evidence(&k, ttl))
            .await
            .map_err(|e| AttestError::Config(format!("TPM task failed: {e}")))??;
        let challenge: Challenge = client
            .begin(proto::BeginRequest::from(evidence))
            .await
            .map_err(|s| self.status(s))?
            .into_inner()
            .into();
        let k = key.clone();
        let answer = tokio::task::spawn_blocking(move || attestation::answer(&k, &challenge))
            .await
            .map_err(|e| AttestError::Config(format!("TPM task failed: {e}")))??;
        let got = client
            .complete(proto::Answer::from(answer))
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let ca = self.check(key, got)?;
        tracing::info!(serial = %ca.node_ca.serial, "node CA certified by the root after TPM attestation");
        Ok(ca)
    }

    /// Checks the root's answer: a CA certificate for our key, signed by one of the roots
    /// it sent (which came over the TLS channel trusted under `ca.upstreamBundle`).
    fn check(&self, key: &TpmSigner, got: proto::NodeCa) -> Result<UpstreamCa, AttestError> {
        let bad = |reason: String| AttestError::BadResponse {
            url: self.url.clone(),
            reason,
        };
        let node_ca = CaCert::from_der(got.certificate).map_err(|e| bad(e.to_string()))?;
        if node_ca.public_key_raw().map_err(|e| bad(e.to_string()))? != key.public_key_raw() {
            return Err(bad(
                "the node CA certifies another key than our TPM key".into()
            ));
        }
        let roots = got
            .roots
            .into_iter()
            .map(CaCert::from_der)
            .collect::<crate::Result<Vec<_>>>()
            .map_err(|e| bad(e.to_string()))?;
        let (_, leaf) = X509Certificate::from_der(&node_ca.der).map_err(|e| bad(e.to_string()))?;
        let signed = roots.iter().any(|r| {
            X509Certificate::from_der(&r.der)
                .is_ok_and(|(_, root)| leaf.verify_signature(Some(root.public_key())).is_ok())
        });
        if !signed {
            return Err(bad("no root it sent signed the node CA".into()));
        }
        Ok(UpstreamCa { node_ca, roots })
    }
}

impl Upstream for TpmUpstream {
    fn certify(
        &self,
        key_name: &str,
        _key: &Arc<dyn Signer>,
        ttl: Duration,
    ) -> crate::Result<UpstreamCa> {
        let key = self.keys.load_tpm(key_name)?;
        // Rotation calls this from the blocking pool, `ferry ca init` from plain code: a
        // runtime of its own on a scoped thread works from either.
        let res = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| AttestError::Config(format!("cannot start a runtime: {e}")))?;
                rt.block_on(self.attest(&key, ttl))
            })
            .join()
        });
        match res {
            Ok(r) => Ok(r?),
            Err(_) => Err(AttestError::Config("the attestation thread panicked".into()).into()),
        }
    }
}
