//! Is this EK certificate from a TPM manufacturer the root trusts?
//!
//! The configured manufacturer CA certificates (`ca.nodeAttestation.manufacturerCas`) are
//! trust anchors: an EK certificate is accepted when one of them (matched by subject, then
//! by signature) signed it and both are within their validity. Configure the CA that
//! issues EK certificates (for swtpm: its local CA's issuer certificate), optionally with
//! its root. EK certificates often carry critical extensions path validators reject (a
//! critical SAN with a directory name, TPM specification attributes), so the chain is
//! checked with x509-parser's signature verification rather than a web PKI validator.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::{AttestError, Rejection};

/// The manufacturer CAs an EK certificate must chain to, DER.
#[derive(Debug, Clone, Default)]
pub struct ManufacturerCas {
    certs: Vec<Vec<u8>>,
}

/// What the verifier learns from a trusted EK certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkIdentity {
    /// SHA-256 of the EK's SubjectPublicKeyInfo DER, lowercase hex: the node's stable
    /// identity (`tpm:ek-pubhash:<this>`).
    pub pubhash: String,
    /// The EK certificate's issuer DN (the manufacturer CA).
    pub issuer: String,
    /// The RSA modulus, big-endian.
    pub modulus: Vec<u8>,
    /// The RSA public exponent, big-endian.
    pub exponent: Vec<u8>,
}

impl ManufacturerCas {
    /// Anchors from DER certificates.
    pub fn from_der(certs: Vec<Vec<u8>>) -> Self {
        Self { certs }
    }

    /// Anchors from PEM files (each may hold several certificates); a file without any, or
    /// one that cannot be read, is an error naming it.
    pub fn from_pem_files(paths: &[PathBuf]) -> Result<Self, AttestError> {
        let mut certs = Vec::new();
        for p in paths {
            let n = certs.len();
            certs.extend(read_pem_certs(p)?);
            if certs.len() == n {
                return Err(AttestError::Config(format!(
                    "manufacturer CA file {} holds no PEM certificate",
                    p.display()
                )));
            }
        }
        Ok(Self { certs })
    }

    /// The anchors, DER.
    pub fn ders(&self) -> &[Vec<u8>] {
        &self.certs
    }

    /// How many anchors there are.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether there are none (then no node can attest).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// Checks `ek_der` at `now` and returns the EK's identity and RSA key.
    pub fn verify(&self, ek_der: &[u8], now: SystemTime) -> Result<EkIdentity, Rejection> {
        let (_, ek) = X509Certificate::from_der(ek_der).map_err(|e| Rejection::Malformed {
            what: "EK certificate",
            reason: e.to_string(),
        })?;
        let untrusted = |r: String| Rejection::UntrustedEk(r);
        let at = x509_parser::time::ASN1Time::from_timestamp(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0),
        )
        .map_err(|e| untrusted(e.to_string()))?;
        if !ek.validity().is_valid_at(at) {
            return Err(untrusted(format!(
                "it is not valid now (valid {} to {})",
                ek.validity().not_before,
                ek.validity().not_after
            )));
        }
        let mut signed_by = None;
        for der in &self.certs {
            let Ok((_, ca)) = X509Certificate::from_der(der) else {
                continue;
            };
            if ca.subject().as_raw() != ek.issuer().as_raw() {
                continue;
            }
            if ek.verify_signature(Some(ca.public_key())).is_ok() {
                signed_by = Some(ca);
                break;
            }
        }
        let Some(ca) = signed_by else {
            return Err(untrusted(format!(
                "no configured manufacturer CA ({} certificates) signed it (its issuer is {:?})",
                self.certs.len(),
                ek.issuer().to_string()
            )));
        };
        if !ca.validity().is_valid_at(at) {
            return Err(untrusted(format!(
                "its issuer {:?} is not valid now",
                ca.subject().to_string()
            )));
        }
        if ca
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| !b.value.ca)
        {
            return Err(untrusted(format!(
                "its issuer {:?} is not a CA",
                ca.subject().to_string()
            )));
        }
        let spki = ek.public_key();
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(Rejection::UnsupportedEk(
                "the EK certificate's key is not RSA".into(),
            ));
        };
        Ok(EkIdentity {
            pubhash: hex(&Sha256::digest(spki.raw)),
            issuer: ek.issuer().to_string(),
            modulus: rsa.modulus.to_vec(),
            exponent: rsa.exponent.to_vec(),
        })
    }
}

/// Lowercase hex.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every certificate in a PEM file, DER.
pub(crate) fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, AttestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AttestError::Config(format!("cannot read {}: {e}", path.display())))?;
    Ok(crate::x509::pem_decode_all(&text, "CERTIFICATE"))
}
