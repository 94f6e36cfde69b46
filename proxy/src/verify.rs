//! SPIFFE verification of TLS peers for rustls: the chain must lead to the bundle of the
//! peer's trust domain, and the leaf must carry exactly one URI SAN, a SPIFFE ID (the
//! X509-SVID rules, protocols.md §7). SVIDs carry no DNS name, so there is no hostname
//! check: the identity check is the URI SAN against what the cluster accepts.
//!
//! Bundles are read from a [`Bundles`] source at verification time, so one rustls config
//! lives as long as the cluster it serves while bundle rotations and federation changes
//! apply to the next handshake. The parsed root stores are cached per bundle (keyed by the
//! bundle's `Arc`, which the source replaces on every change), so a handshake does not
//! re-parse certificates.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use spiffe::{SpiffeId, X509Bundle};
use xds::client::model::ServerIdMatch;

/// Why a peer certificate was refused, carried inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))` so handshake errors
/// name the identity or trust domain at fault. `Debug` prints the message, because rustls
/// formats `CertificateError::Other` with `Debug`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// An X509-SVID has exactly one URI SAN.
    #[error("peer certificate has {count} URI SANs, an X509-SVID has exactly one")]
    UriSanCount {
        /// URI SANs found.
        count: usize,
    },
    /// The URI SAN is not a SPIFFE ID.
    #[error("peer URI SAN {uri:?} is not a SPIFFE ID")]
    NotSpiffe {
        /// The SAN.
        uri: String,
    },
    /// The peer's trust domain has no bundle in the Workload API's bundle set.
    #[error(
        "no bundle for trust domain {trust_domain} (presented by {id}); is it federated with this trust domain?"
    )]
    NoBundle {
        /// The trust domain.
        trust_domain: String,
        /// The peer's SPIFFE ID.
        id: String,
    },
    /// The server is in another trust domain than the validation context names.
    #[error("server presented {id}, but the validation context trusts only {expected}")]
    WrongTrustDomain {
        /// The server's SPIFFE ID.
        id: String,
        /// The trust domain the cluster validates against.
        expected: String,
    },
    /// The server's SPIFFE ID is not one the cluster accepts.
    #[error("server presented {presented}, expected {expected}")]
    UnexpectedId {
        /// The server's SPIFFE ID.
        presented: String,
        /// `one of [...]` or `an ID starting with ...`.
        expected: String,
    },
}

impl fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// Where verifiers get trust bundles: the Workload API source in production, a fixed set
/// in tests.
pub trait Bundles: fmt::Debug + Send + Sync {
    /// The X.509 bundle of `trust_domain` (a bare name, `example.org`).
    fn bundle(&self, trust_domain: &str) -> Option<Arc<X509Bundle>>;
    /// This workload's own trust domain (that of its default SVID), for `ROOTCA`.
    fn own_trust_domain(&self) -> Option<String>;
}

/// Which bundle a server certificate is verified against: the `validation_secret` of an
/// Istio cluster (protocols.md §7 SDS names).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Validation {
    /// `spiffe://<td>`: that trust domain's bundle only.
    TrustDomain(String),
    /// `ROOTCA`: the workload's own trust domain.
    Own,
    /// `ALL`: the bundle of whatever trust domain the server is in.
    All,
}

impl Validation {
    /// Parses an SDS validation context name; `None` for names ferry does not serve.
    pub fn parse(secret: &str) -> Option<Validation> {
        match secret {
            "ROOTCA" => Some(Validation::Own),
            "ALL" => Some(Validation::All),
            s => {
                let td = s.strip_prefix("spiffe://")?;
                (!td.is_empty() && !td.contains('/'))
                    .then(|| Validation::TrustDomain(td.to_owned()))
            }
        }
    }
}

/// The URI SANs of a DER certificate (empty when it does not parse).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID of a peer's leaf certificate, for access logs (`None` unless exactly one
/// URI SAN that is a SPIFFE ID).
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Option<String> {
    spiffe_id_of(certs.first()?).ok().map(|id| id.to_string())
}

/// The one SPIFFE ID of a leaf, or why not.
fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, VerifyError> {
    let sans = uri_sans(der);
    let [uri] = sans.as_slice() else {
        return Err(VerifyError::UriSanCount { count: sans.len() });
    };
    SpiffeId::new(uri).map_err(|_| VerifyError::NotSpiffe { uri: uri.clone() })
}

/// Parsed root stores, one per bundle `Arc` the source handed out.
#[derive(Debug, Default)]
struct RootCache(Mutex<HashMap<String, CachedRoots>>);

/// A bundle and the root store parsed from it.
type CachedRoots = (Arc<X509Bundle>, Arc<RootCertStore>);

/// Webpki client verifiers per trust domain, with the bundle they were built from.
type ClientVerifiers = Mutex<HashMap<String, (Arc<X509Bundle>, Arc<dyn ClientCertVerifier>)>>;

impl RootCache {
    fn roots(&self, td: &str, bundle: &Arc<X509Bundle>) -> Arc<RootCertStore> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((b, roots)) = map.get(td)
            && Arc::ptr_eq(b, bundle)
        {
            return roots.clone();
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(
            bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec())),
        );
        let roots = Arc::new(roots);
        map.insert(td.to_owned(), (bundle.clone(), roots.clone()));
        roots
    }
}

/// Verifies an Istio server the way Istio's client does: chain to the bundle named by the
/// cluster's validation context, then the server's SPIFFE ID against the accepted ones.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: Arc<dyn Bundles>,
    validation: Validation,
    server_ids: ServerIdMatch,
    provider: Arc<CryptoProvider>,
    roots: RootCache,
}

impl SpiffeServerVerifier {
    /// A verifier reading `bundles` at each handshake.
    pub fn new(
        bundles: Arc<dyn Bundles>,
        validation: Validation,
        server_ids: ServerIdMatch,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        SpiffeServerVerifier {
            bundles,
            validation,
            server_ids,
            provider,
            roots: RootCache::default(),
        }
    }

    fn expected(&self) -> String {
        match &self.server_ids {
            ServerIdMatch::Exact(ids) => format!("one of [{}]", ids.join(", ")),
            ServerIdMatch::Prefix(p) => format!("an ID starting with {p}"),
        }
    }
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
        let id = spiffe_id_of(end_entity)?;
        let td = id.trust_domain_name().to_owned();
        let bundle_td = match &self.validation {
            Validation::TrustDomain(t) => t.clone(),
            Validation::Own => self.bundles.own_trust_domain().unwrap_or_default(),
            Validation::All => td.clone(),
        };
        if bundle_td != td {
            return Err(VerifyError::WrongTrustDomain {
                id: id.to_string(),
                expected: bundle_td,
            }
            .into());
        }
        let Some(bundle) = self.bundles.bundle(&td) else {
            return Err(VerifyError::NoBundle {
                trust_domain: td,
                id: id.to_string(),
            }
            .into());
        };
        let roots = self.roots.roots(&td, &bundle);
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if !self.server_ids.accepts(&id.to_string()) {
            return Err(VerifyError::UnexpectedId {
                presented: id.to_string(),
                expected: self.expected(),
            }
            .into());
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies an inbound client: a certificate is required, and it must chain to the bundle
/// of its own trust domain, own or federated (Istio's server accepts any SPIFFE ID of a
/// trusted domain; authorization is a later, separate step).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Arc<dyn Bundles>,
    provider: Arc<CryptoProvider>,
    /// One webpki client verifier per bundle `Arc` (it checks the chain and clientAuth EKU).
    cache: ClientVerifiers,
}

impl SpiffeClientVerifier {
    /// A verifier reading `bundles` at each handshake.
    pub fn new(bundles: Arc<dyn Bundles>, provider: Arc<CryptoProvider>) -> Self {
        SpiffeClientVerifier {
            bundles,
            provider,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn webpki_for(
        &self,
        td: &str,
        bundle: &Arc<X509Bundle>,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let mut map = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((b, v)) = map.get(td)
            && Arc::ptr_eq(b, bundle)
        {
            return Ok(v.clone());
        }
        let roots = RootCache::default().roots(td, bundle);
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("bundle of {td}: {e}")))?;
        map.insert(td.to_owned(), (bundle.clone(), v.clone()));
        Ok(v)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Bundles change at runtime; an empty list lets the client send its SVID.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = spiffe_id_of(end_entity)?;
        let td = id.trust_domain_name();
        let Some(bundle) = self.bundles.bundle(td) else {
            return Err(VerifyError::NoBundle {
                trust_domain: td.to_owned(),
                id: id.to_string(),
            }
            .into());
        };
        self.webpki_for(td, &bundle)?
            .verify_client_cert(end_entity, intermediates, now)
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names() {
        assert_eq!(Validation::parse("ROOTCA"), Some(Validation::Own));
        assert_eq!(Validation::parse("ALL"), Some(Validation::All));
        assert_eq!(
            Validation::parse("spiffe://local.domain"),
            Some(Validation::TrustDomain("local.domain".into()))
        );
        assert_eq!(Validation::parse("spiffe://td/path"), None);
        assert_eq!(Validation::parse("spiffe://"), None);
        assert_eq!(Validation::parse("default"), None);
    }

    #[test]
    fn ids_of_certificates() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://example.org/a").unwrap(),
        )];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        assert_eq!(
            peer_spiffe_id(std::slice::from_ref(&der)).as_deref(),
            Some("spiffe://example.org/a")
        );
        assert_eq!(peer_spiffe_id(&[]), None);

        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://example.org/b").unwrap(),
        ));
        let two = params.self_signed(&key).unwrap();
        assert_eq!(
            spiffe_id_of(two.der()),
            Err(VerifyError::UriSanCount { count: 2 })
        );
        assert_eq!(peer_spiffe_id(&[two.der().clone()]), None);

        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("https://example.org/a").unwrap(),
        )];
        let web = params.self_signed(&key).unwrap();
        assert!(matches!(
            spiffe_id_of(web.der()),
            Err(VerifyError::NotSpiffe { .. })
        ));
    }

    #[test]
    fn errors_become_invalid_certificate() {
        let e: rustls::Error = VerifyError::UnexpectedId {
            presented: "spiffe://x/y".into(),
            expected: "one of [spiffe://x/z]".into(),
        }
        .into();
        assert!(matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::Other(_))
        ));
        assert!(
            e.to_string()
                .contains("server presented spiffe://x/y, expected one of [spiffe://x/z]"),
            "{e}"
        );
    }
}
