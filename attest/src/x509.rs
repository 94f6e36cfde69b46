//! X.509 certificates exactly as the SPIFFE X.509-SVID spec asks: built with rcgen, then
//! checked with x509-parser (an independent parser) so a profile mistake cannot ship.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use registry::spiffe::{SpiffeId, TrustDomain};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{Error, Result};
use crate::signer::{RcgenKey, Signer};

/// How far in the past a certificate's NotBefore is set, to tolerate clock skew.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// A CA certificate (root or intermediate) with the facts rotation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCert {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Start of validity (second precision, as in the certificate).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The serial number, lowercase hex (as Envoy's `/certs` prints it).
    pub serial: String,
}

impl CaCert {
    /// Parses a CA certificate and checks it is one (`cA=true`, `keyCertSign`).
    pub fn from_der(der: Vec<u8>) -> Result<Self> {
        let (not_before, not_after, serial) = {
            let cert = parse(&der, "CA")?;
            check_ca_profile(&cert)?;
            validity(&cert)
        };
        Ok(Self {
            der,
            not_before,
            not_after,
            serial,
        })
    }

    /// The certificate as PEM.
    pub fn pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    /// The certificate's public key as raw bytes (for EC keys the SEC1 point, the form
    /// [`Signer::public_key_raw`] returns), so a loaded key can be checked against it.
    pub fn public_key_raw(&self) -> Result<Vec<u8>> {
        let cert = parse(&self.der, "CA")?;
        Ok(cert.public_key().subject_public_key.data.to_vec())
    }

    /// SHA-256 of the DER, lowercase hex: what operators compare out of band to know which
    /// root they trust (`openssl x509 -outform der | sha256sum`).
    pub fn sha256_fingerprint(&self) -> String {
        Sha256::digest(&self.der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Parses PEM holding exactly this kind of certificate.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let ders = pem_decode_all(pem, "CERTIFICATE");
        match <[Vec<u8>; 1]>::try_from(ders) {
            Ok([der]) => Self::from_der(der),
            Err(v) => Err(Error::BadCertificate {
                what: "CA PEM".into(),
                reason: format!("expected exactly one certificate, found {}", v.len()),
            }),
        }
    }
}

/// A CA certificate together with its key: something that can issue.
#[derive(Debug)]
pub(crate) struct CaSigner {
    pub cert: CaCert,
    issuer: Issuer<'static, RcgenKey>,
}

impl CaSigner {
    pub(crate) fn new(cert: CaCert, key: Arc<dyn Signer>) -> Result<Self> {
        let issuer = Issuer::from_ca_cert_der(&cert.der.clone().into(), RcgenKey(key)).map_err(
            |source| Error::Build {
                what: "issuer",
                source,
            },
        )?;
        Ok(Self { cert, issuer })
    }
}

/// An X.509-SVID with its private key, ready to hand to a workload.
#[derive(Clone)]
pub struct X509Svid {
    /// The identity in the single URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER (secret).
    pub key_pkcs8: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity (the requested TTL, capped by the issuing CA's expiry).
    pub not_after: SystemTime,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    /// The chain as concatenated DER (the Workload API's `x509_svid` field).
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.concat()
    }

    /// The chain as PEM (Envoy's `certificate_chain`).
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The private key as PKCS#8 PEM (Envoy's `private_key`).
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.key_pkcs8)
    }
}

fn to_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&b)
}

fn uri_san(s: &str) -> Result<SanType> {
    rcgen::string::Ia5String::try_from(s.to_owned())
        .map(SanType::URI)
        .map_err(|e| Error::Build {
            what: "URI SAN",
            source: e,
        })
}

/// Which CA certificate to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaKind {
    Root,
    Intermediate,
    /// A short-lived issuing CA below the intermediate (see [`crate::issuing`]).
    Issuing,
}

/// Builds a CA certificate for `subject_key`: self-signed for a root, signed by `issuer`
/// for an intermediate. Valid from `now - BACKDATE` for `ttl`, capped by the issuer.
/// `path_len` is how many CA certificates may follow this one down to a leaf (root: 1, or
/// 2 with an issuing CA below the intermediate; verifiers such as webpki enforce it).
pub(crate) fn build_ca(
    kind: CaKind,
    path_len: u8,
    td: &TrustDomain,
    subject_key: &Arc<dyn Signer>,
    issuer: Option<&CaSigner>,
    now: SystemTime,
    ttl: Duration,
) -> Result<CaCert> {
    let what = match kind {
        CaKind::Root => "root",
        CaKind::Intermediate => "intermediate",
        CaKind::Issuing => "issuing",
    };
    let mut not_after = now + ttl;
    if let Some(i) = issuer {
        not_after = not_after.min(i.cert.not_after);
    }
    let mut params = CertificateParams::default();
    let serial = random_serial();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    // A distinct CN per generation keeps issuer lookup by name unambiguous for verifiers
    // that hold an old and a new CA at the same time.
    let short: String = serial
        .to_bytes()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(DnType::CommonName, format!("ferry {what} CA {td} {short}"));
    params.distinguished_name = dn;
    params.serial_number = Some(serial);
    params.not_before = to_time(now - BACKDATE);
    params.not_after = to_time(not_after);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params.subject_alt_names = vec![uri_san(&td.id_string())?];
    params.use_authority_key_identifier_extension = kind != CaKind::Root;
    let cert = match issuer {
        None => params.self_signed(&RcgenKey(subject_key.clone())),
        Some(i) => params.signed_by(&RcgenKey(subject_key.clone()), &i.issuer),
    }
    .map_err(|source| Error::Build { what, source })?;
    CaCert::from_der(cert.der().to_vec())
}

/// A public key without its private half: what the root certifies for a node whose CA key
/// lives in that node's TPM.
struct PublicOnly<'a>(&'a [u8]);

impl rcgen::PublicKeyData for PublicOnly<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Builds a node CA certificate: the ECDSA P-256 key `subject_public` (SEC1, held in the
/// node's TPM) as a CA one level below `issuer` (a root), allowing one more CA below it
/// (the node's in-memory issuing CA). The first attestation selector (the EK hash) is the
/// subject's organizational unit, so an operator reading the certificate sees which TPM
/// it was issued to.
pub(crate) fn build_node_ca(
    td: &TrustDomain,
    subject_public: &[u8],
    selectors: &[String],
    issuer: &CaSigner,
    now: SystemTime,
    ttl: Duration,
) -> Result<CaCert> {
    let not_after = (now + ttl).min(issuer.cert.not_after);
    let mut params = CertificateParams::default();
    let serial = random_serial();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    // A DN holds one value per attribute type here: the first selector (the EK hash).
    if let Some(s) = selectors.first() {
        dn.push(DnType::OrganizationalUnitName, s.as_str());
    }
    let short: String = serial
        .to_bytes()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(DnType::CommonName, format!("ferry node CA {td} {short}"));
    params.distinguished_name = dn;
    params.serial_number = Some(serial);
    params.not_before = to_time(now - BACKDATE);
    params.not_after = to_time(not_after);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params.subject_alt_names = vec![uri_san(&td.id_string())?];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&PublicOnly(subject_public), &issuer.issuer)
        .map_err(|source| Error::Build {
            what: "node CA",
            source,
        })?;
    CaCert::from_der(cert.der().to_vec())
}

/// The BasicConstraints pathLenConstraint of a CA certificate (`None`: unlimited).
pub(crate) fn path_len(der: &[u8]) -> Result<Option<u32>> {
    let cert = parse(der, "CA")?;
    Ok(cert
        .basic_constraints()
        .ok()
        .flatten()
        .and_then(|b| b.value.path_len_constraint))
}

/// Issues an X.509-SVID for `id` with a fresh P-256 key, signed by `issuer`, whose own
/// chain up to the root (excluded) is `issuer_chain` (the issuer's certificate first).
pub(crate) fn build_svid(
    id: &SpiffeId,
    issuer: &CaSigner,
    issuer_chain: &[Vec<u8>],
    now: SystemTime,
    ttl: Duration,
) -> Result<X509Svid> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::key("generate"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CountryName, "US");
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    params.not_before = to_time(now - BACKDATE);
    params.not_after = to_time((now + ttl).min(issuer.cert.not_after));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![uri_san(&id.to_string())?];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer.issuer)
        .map_err(|source| Error::Build {
            what: "X.509-SVID",
            source,
        })?;
    let der = cert.der().to_vec();
    let (not_before, not_after, serial) = validity(&parse(&der, "X.509-SVID")?);
    let mut chain = Vec::with_capacity(1 + issuer_chain.len());
    chain.push(der);
    chain.extend(issuer_chain.iter().cloned());
    Ok(X509Svid {
        spiffe_id: id.clone(),
        chain,
        key_pkcs8: key.serialize_der(),
        not_before,
        not_after,
        serial,
    })
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Error::BadCertificate {
            what: what.into(),
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(Error::BadCertificate {
            what: what.into(),
            reason: e.to_string(),
        }),
    }
}

fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime, String) {
    let ts = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let v = cert.validity();
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (
        ts(v.not_before.timestamp()),
        ts(v.not_after.timestamp()),
        serial,
    )
}

fn bad(what: &str, reason: impl Into<String>) -> Error {
    Error::BadCertificate {
        what: what.into(),
        reason: reason.into(),
    }
}

fn check_ca_profile(cert: &X509Certificate<'_>) -> Result<()> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| bad("CA", e.to_string()))?
        .ok_or_else(|| bad("CA", "no BasicConstraints"))?;
    if !bc.value.ca {
        return Err(bad("CA", "BasicConstraints cA is false"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| bad("CA", e.to_string()))?
        .ok_or_else(|| bad("CA", "no KeyUsage"))?;
    if !ku.value.key_cert_sign() {
        return Err(bad("CA", "KeyUsage lacks keyCertSign"));
    }
    Ok(())
}

/// Checks a leaf against the SPIFFE X.509-SVID profile and returns its SPIFFE ID: exactly
/// one URI SAN, `cA=false`, critical KeyUsage with `digitalSignature` and neither
/// `keyCertSign` nor `cRLSign`, EKU serverAuth + clientAuth.
pub fn check_svid_profile(der: &[u8]) -> Result<SpiffeId> {
    const W: &str = "X.509-SVID";
    let cert = parse(der, W)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| bad(W, e.to_string()))?
        .ok_or_else(|| bad(W, "no BasicConstraints"))?;
    if bc.value.ca {
        return Err(bad(W, "leaf has cA=true"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| bad(W, e.to_string()))?
        .ok_or_else(|| bad(W, "no KeyUsage"))?;
    if !ku.critical {
        return Err(bad(W, "KeyUsage is not critical"));
    }
    if !ku.value.digital_signature() || ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(bad(
            W,
            "KeyUsage must have digitalSignature and no keyCertSign/cRLSign",
        ));
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| bad(W, e.to_string()))?
        .ok_or_else(|| bad(W, "no ExtendedKeyUsage"))?;
    if !eku.value.server_auth || !eku.value.client_auth {
        return Err(bad(W, "EKU must include serverAuth and clientAuth"));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(W, e.to_string()))?
        .ok_or_else(|| bad(W, "no SubjectAltName"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|e| bad(W, format!("URI SAN: {e}"))),
        _ => Err(bad(
            W,
            format!("expected exactly one URI SAN, found {}", uris.len()),
        )),
    }
}

/// Verifies that `chain` (leaf first, then intermediates) chains by signature to one of
/// `roots`, and that every certificate is valid at `now`. This is what a SPIFFE client
/// does with an SVID and its trust domain's bundle.
pub fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], now: SystemTime) -> Result<()> {
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let certs = chain
        .iter()
        .map(|d| parse(d, "chain"))
        .collect::<Result<Vec<_>>>()?;
    let anchors = roots
        .iter()
        .map(|d| parse(d, "bundle"))
        .collect::<Result<Vec<_>>>()?;
    let valid_now = |c: &X509Certificate<'_>| {
        let v = c.validity();
        let nb = u64::try_from(v.not_before.timestamp()).unwrap_or(0);
        let na = u64::try_from(v.not_after.timestamp()).unwrap_or(0);
        nb <= now_s && now_s <= na
    };
    let Some(first) = certs.first() else {
        return Err(bad("chain", "empty"));
    };
    if !valid_now(first) {
        return Err(bad("chain", "leaf not valid now"));
    }
    for pair in certs.windows(2) {
        let (child, parent) = (&pair[0], &pair[1]);
        if !valid_now(parent) || child.issuer() != parent.subject() {
            return Err(bad("chain", "intermediate not valid now or not the issuer"));
        }
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|e| bad("chain", format!("signature: {e}")))?;
    }
    let last = certs.last().unwrap_or(first);
    let ok = anchors.iter().any(|root| {
        valid_now(root)
            && last.issuer() == root.subject()
            && last.verify_signature(Some(root.public_key())).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(bad("chain", "does not chain to any root in the bundle"))
    }
}

/// PEM-encodes one DER blob.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decodes every PEM block with `label` in `text` (others and garbage are skipped).
pub fn pem_decode_all(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(&begin) {
        let after = &rest[b + begin.len()..];
        let Some(e) = after.find(&end) else { break };
        let body: String = after[..e].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[e + end.len()..];
    }
    out
}
