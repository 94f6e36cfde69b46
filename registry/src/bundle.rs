//! What a trust bundle file holds. `trustBundles` files may be PEM certificates (what
//! `spire-server bundle show` prints by default) or a SPIFFE bundle (a JWKS whose
//! `x509-svid` keys carry `x5c` and whose `jwt-svid` keys verify JWT-SVIDs, what
//! `-format spiffe` prints). The config validator and the Workload API's bundle loader both
//! ask this one function, so they can never disagree about a file.

/// The two encodings a bundle file may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// One or more `-----BEGIN CERTIFICATE-----` blocks.
    Pem,
    /// A SPIFFE bundle: a JSON object with a `keys` array.
    Jwks,
}

/// Why bytes are not a bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("holds neither PEM certificates nor a SPIFFE bundle (JWKS with \"keys\")")]
pub struct NotABundle;

/// Tells PEM from JWKS by content (never by file name).
pub fn detect(bytes: &[u8]) -> Result<BundleFormat, NotABundle> {
    const PEM_CERT: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if bytes.windows(PEM_CERT.len()).any(|w| w == PEM_CERT) {
        return Ok(BundleFormat::Pem);
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v) if v.get("keys").is_some_and(|k| k.is_array()) => Ok(BundleFormat::Jwks),
        _ => Err(NotABundle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_pem_from_jwks_and_refuses_the_rest() {
        assert_eq!(
            detect(b"junk\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
            Ok(BundleFormat::Pem)
        );
        assert_eq!(detect(br#"{"keys": []}"#), Ok(BundleFormat::Jwks));
        assert_eq!(detect(br#"{"keys": {}}"#), Err(NotABundle));
        assert_eq!(detect(b""), Err(NotABundle));
        assert_eq!(detect(b"-----BEGIN PRIVATE KEY-----"), Err(NotABundle));
    }
}
