//! TLS between a node and the root's node-attestation API, SPIFFE style.
//!
//! The root serves with an X.509-SVID for `spiffe://<td>/ferry/node-attestation` that its
//! own CA issues (re-issued at half-life), so there is no extra certificate to manage. A
//! node trusts that server only when the chain leads to a root in `ca.upstreamBundle` and
//! the leaf's single URI SAN is exactly that ID; SPIFFE certificates carry no DNS name, so
//! the host in `ca.upstream` is used to connect but not to verify.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use registry::spiffe::{SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{AttestError, SERVER_ID_PATH};
use crate::Authority;

/// How long each serving SVID lives.
const SERVING_TTL: Duration = Duration::from_secs(3600);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID the root's node-attestation endpoint presents in `td`.
pub fn server_id(td: &TrustDomain) -> Result<SpiffeId, AttestError> {
    td.id(SERVER_ID_PATH)
        .map_err(|e| AttestError::Config(e.to_string()))
}

/// Serves the current SVID of the endpoint, issuing a new one when half its life is gone.
#[derive(Debug)]
struct SvidResolver {
    authority: Arc<Authority>,
    id: SpiffeId,
    current: Mutex<Option<(Arc<CertifiedKey>, SystemTime)>>,
}

impl SvidResolver {
    fn fresh(&self) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
        let svid = self
            .authority
            .issue_x509_svid(&self.id, SERVING_TTL)
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.clone()));
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| e.to_string())?;
        let chain = svid
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let life = svid
            .not_after
            .duration_since(svid.not_before)
            .unwrap_or_default();
        Ok((
            Arc::new(CertifiedKey::new(chain, signing)),
            svid.not_before + life / 2,
        ))
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, renew)) = cur.as_ref()
            && SystemTime::now() < *renew
        {
            return Some(Arc::clone(k));
        }
        match self.fresh() {
            Ok((k, renew)) => {
                *cur = Some((Arc::clone(&k), renew));
                Some(k)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot issue the node-attestation endpoint's SVID");
                cur.as_ref().map(|(k, _)| Arc::clone(k))
            }
        }
    }
}

/// The root's TLS server config: an SVID from `authority`, no client certificates (nodes
/// prove themselves with their TPM), HTTP/2.
pub fn server_config(authority: Arc<Authority>) -> Result<Arc<rustls::ServerConfig>, AttestError> {
    let id = server_id(authority.trust_domain())?;
    let resolver = SvidResolver {
        authority,
        id,
        current: Mutex::new(None),
    };
    // Issue once now, so that a CA that cannot issue fails at start and not per handshake.
    let first = resolver
        .fresh()
        .map_err(|e| AttestError::Config(format!("cannot issue the endpoint's SVID: {e}")))?;
    *resolver
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(first);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AttestError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A node's TLS client config: accepts only the root's endpoint of `td` under `roots`.
pub fn client_config(
    td: &TrustDomain,
    roots: &[Vec<u8>],
) -> Result<Arc<rustls::ClientConfig>, AttestError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(CertificateDer::from(r.clone())).map_err(|e| {
            AttestError::Config(format!("bad certificate in ca.upstreamBundle: {e}"))
        })?;
    }
    if store.is_empty() {
        return Err(AttestError::Config(
            "ca.upstreamBundle holds no certificate".into(),
        ));
    }
    let verifier = SpiffeServerVerifier {
        roots: store,
        expected: server_id(td)?.to_string(),
        provider: provider(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AttestError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Verifies the root's endpoint: chain to a trusted root, then the exact SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: String,
    provider: Arc<CryptoProvider>,
}

/// The URI SANs of a certificate.
fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ids = uri_sans(end_entity);
        if ids != [self.expected.clone()] {
            return Err(rustls::Error::General(format!(
                "the server's SPIFFE ID is {ids:?}, expected {} (is ca.upstream the trust domain's root?)",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
