//! rustls as a SPIFFE workload: SVIDs and bundles from the Workload API, a client that
//! checks the server's SPIFFE ID, and one-shot HTTP GETs over TLS or plain TCP.

// Test harness: a failed setup is a test failure, loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                out.push((*u).to_owned());
            }
        }
    }
    out
}

/// A certificate chain (leaf first) and its key, as rustls wants them.
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// An X509-SVID from the `spiffe` crate.
    pub fn from_svid(svid: &spiffe::X509Svid) -> Self {
        Self {
            chain: svid
                .cert_chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                svid.private_key().as_bytes().to_vec(),
            )),
        }
    }
}

/// The SVID for `id` from `ctx` (panics, naming what it has, when absent).
pub fn svid(ctx: &spiffe::X509Context, id: &str) -> Identity {
    let s = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == id)
        .unwrap_or_else(|| {
            let have: Vec<String> = ctx
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect();
            panic!("no SVID {id} in the X.509 context (have {have:?})")
        });
    Identity::from_svid(s)
}

/// The roots of `trust_domain`'s bundle in `ctx`.
pub fn roots(ctx: &spiffe::X509Context, trust_domain: &str) -> RootCertStore {
    let td = spiffe::TrustDomain::new(trust_domain).expect("trust domain");
    let bundle = ctx
        .bundle_set()
        .get(&td)
        .unwrap_or_else(|| panic!("no bundle for {trust_domain} in the X.509 context"));
    let mut roots = RootCertStore::empty();
    for a in bundle.authorities() {
        roots
            .add(CertificateDer::from(a.as_bytes().to_vec()))
            .expect("bundle authority parses");
    }
    roots
}

/// Fetches the X.509 context from a Workload API endpoint (`unix:///...`).
pub async fn fetch_context(endpoint: &str) -> spiffe::X509Context {
    let client = spiffe::WorkloadApiClient::connect_to(endpoint.to_owned())
        .await
        .expect("connect to the Workload API");
    client
        .fetch_x509_context()
        .await
        .expect("fetch the X.509 context")
}

/// A server verifier for SPIFFE peers: the chain must lead to `roots` and the leaf's URI
/// SAN must equal `expected_id` (SPIFFE certificates carry no DNS name, so webpki's name
/// check cannot be used).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected_id: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ids = uri_sans(end_entity);
        if ids != [self.expected_id.clone()] {
            return Err(rustls::Error::General(format!(
                "server SPIFFE ID {ids:?}, expected {}",
                self.expected_id
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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

/// A rustls client config that presents `identity` (if any), accepts only a server whose
/// SPIFFE ID is `expected_server_id` under `roots`, and offers `alpn`.
pub fn client_config(
    identity: Option<Identity>,
    roots: RootCertStore,
    expected_server_id: &str,
    alpn: &[&str],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected_id: expected_server_id.to_owned(),
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// The result of [`tls_get`].
#[derive(Debug, Clone)]
pub struct TlsResponse {
    /// The whole HTTP response (head and body) as text.
    pub text: String,
    /// The negotiated ALPN, if any.
    pub alpn: Option<String>,
}

/// Connects to `addr`, handshakes with SNI `sni` under `cfg`, sends `GET /` and reads the
/// response to the end (10 s at most). An error names the step that failed.
pub async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<TlsResponse, Error> {
    let step = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connect {addr}")))?;
        let name = ServerName::try_from(sni.to_owned())
            .map_err(|e| Error::Unexpected(format!("SNI {sni:?}: {e}")))?;
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(Error::io(format!("TLS handshake with {addr} (SNI {sni})")))?;
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        tls.write_all(
            format!("GET / HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(Error::io("write request over TLS"))?;
        let mut buf = Vec::new();
        // A peer that closes without close_notify still gave us its bytes.
        match tls.read_to_end(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(Error::io("read response over TLS")(e)),
        }
        if buf.is_empty() {
            return Err(Error::Unexpected(format!(
                "{addr} closed the TLS connection without a response"
            )));
        }
        Ok(TlsResponse {
            text: String::from_utf8_lossy(&buf).into_owned(),
            alpn,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("an HTTP response over TLS from {addr}"),
            timeout: Duration::from_secs(10),
        })?
}

/// Sends a plain `GET /` to `addr` with `host` as the Host header and returns the whole
/// response as text (10 s at most).
pub async fn plain_get(addr: SocketAddr, host: &str) -> Result<String, Error> {
    let step = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connect {addr}")))?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(Error::io(format!("write to {addr}")))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(Error::io(format!("read from {addr}")))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("an HTTP response from {addr}"),
            timeout: Duration::from_secs(10),
        })?
}
