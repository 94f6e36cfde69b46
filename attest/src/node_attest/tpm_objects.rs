//! The verifier's view of the TPM structures a node sends: public areas (TPMT_PUBLIC), the
//! Certify attestation (TPMS_ATTEST) and its signature (TPMT_SIGNATURE).
//!
//! Bytes from the network stay in [`ObjectPublic`] form (parsed *and* the exact bytes)
//! because a TPM object's Name is the hash of its marshalled public area: the verifier
//! computes Names from the bytes, and refuses an encoding that does not marshal back to
//! the same bytes (so what was checked is what was named).

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use rsa::BigUint;
use sha2::{Digest as _, Sha256};
use tss_esapi::constants::tss::{TPM2_GENERATED_VALUE, TPM2_ST_ATTEST_CERTIFY};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Attest, AttestInfo, EccScheme, Public, Signature, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::Rejection;

/// TPM_ALG_SHA256, the nameAlg prefix of every Name this verifier accepts.
const TPM_ALG_SHA256: u16 = 0x000b;

/// A public area as received: parsed, with the exact bytes it was parsed from.
#[derive(Debug, Clone)]
pub struct ObjectPublic {
    /// The parsed TPMT_PUBLIC.
    pub public: Public,
    /// The TPM Name: `nameAlg || SHA-256(TPMT_PUBLIC)`.
    pub name: Vec<u8>,
}

impl ObjectPublic {
    /// Parses a marshalled TPMT_PUBLIC (`what` names it in rejections). Only SHA-256
    /// nameAlgs are accepted.
    pub fn parse(bytes: &[u8], what: &'static str) -> Result<Self, Rejection> {
        let bad = |reason: String| Rejection::Malformed { what, reason };
        let public = Public::unmarshall(bytes).map_err(|e| bad(e.to_string()))?;
        let again = public.marshall().map_err(|e| bad(e.to_string()))?;
        if again != bytes {
            return Err(bad("not a canonical TPMT_PUBLIC encoding".into()));
        }
        if public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
            return Err(bad(format!(
                "nameAlg {:?}, only SHA-256 is supported",
                public.name_hashing_algorithm()
            )));
        }
        let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&Sha256::digest(bytes));
        Ok(Self { public, name })
    }
}

/// Checks that `ek` is an EK made from the TCG default RSA 2048 template (restricted
/// decryption, AES-128-CFB, SHA-256) whose key is `cert_key` (the EK certificate's), and
/// returns that key for MakeCredential.
pub fn check_ek(
    ek: &ObjectPublic,
    cert_modulus: &[u8],
    cert_exponent: &[u8],
) -> Result<rsa::RsaPublicKey, Rejection> {
    let unsupported = |r: &str| Rejection::UnsupportedEk(r.to_owned());
    let Public::Rsa {
        object_attributes: a,
        parameters,
        unique,
        ..
    } = &ek.public
    else {
        return Err(unsupported(
            "not an RSA EK (ferry verifies the RSA 2048 EK at NV 0x01c00002)",
        ));
    };
    if !(a.fixed_tpm() && a.fixed_parent() && a.restricted() && a.decrypt()) || a.sign_encrypt() {
        return Err(unsupported(
            "not a restricted decryption key bound to its TPM (fixedTPM, fixedParent, restricted, decrypt)",
        ));
    }
    if parameters.symmetric_definition_object() != SymmetricDefinitionObject::AES_128_CFB
        || parameters.key_bits() != RsaKeyBits::Rsa2048
    {
        return Err(unsupported(
            "not the TCG default RSA 2048 / AES-128-CFB template",
        ));
    }
    let strip = |v: &[u8]| -> Vec<u8> { v.iter().copied().skip_while(|b| *b == 0).collect() };
    let exp = match parameters.exponent().value() {
        0 => 65537u32.to_be_bytes().to_vec(),
        e => e.to_be_bytes().to_vec(),
    };
    if strip(unique.value()) != strip(cert_modulus) || strip(&exp) != strip(cert_exponent) {
        return Err(Rejection::EkMismatch);
    }
    rsa::RsaPublicKey::new(
        BigUint::from_bytes_be(unique.value()),
        BigUint::from_bytes_be(&exp),
    )
    .map_err(|e| unsupported(&e.to_string()))
}

/// The object attributes every key in an attestation must have: the private part was
/// generated in the TPM and can never leave it.
fn bound_to_tpm(p: &Public) -> Result<(), String> {
    let a = p.object_attributes();
    for (ok, what) in [
        (a.fixed_tpm(), "fixedTPM"),
        (a.fixed_parent(), "fixedParent"),
        (a.sensitive_data_origin(), "sensitiveDataOrigin"),
    ] {
        if !ok {
            return Err(format!(
                "lacks {what} (its private key could exist outside the TPM)"
            ));
        }
    }
    Ok(())
}

/// The SEC1 point of an ECC P-256 public area.
fn p256_point(p: &Public) -> Option<Vec<u8>> {
    crate::tpm::keys::ecc_point(p)
}

/// Checks that the AK is a restricted ECC P-256 ECDSA signing key bound to its TPM (so it
/// signs only TPM-generated structures) and returns its verifying key.
pub fn check_ak(ak: &ObjectPublic) -> Result<p256::ecdsa::VerifyingKey, Rejection> {
    let bad = |r: String| Rejection::BadAk(r);
    bound_to_tpm(&ak.public).map_err(bad)?;
    let a = ak.public.object_attributes();
    if !(a.restricted() && a.sign_encrypt()) || a.decrypt() {
        return Err(bad(
            "is not a restricted signing key (it could sign forged attestations)".into(),
        ));
    }
    let Public::Ecc { parameters, .. } = &ak.public else {
        return Err(bad("is not an ECC P-256 key".into()));
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(bad("is not on NIST P-256".into()));
    }
    let point = p256_point(&ak.public).ok_or_else(|| bad("has no P-256 point".into()))?;
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).map_err(|e| bad(e.to_string()))
}

/// Checks that the key to become the node CA is an unrestricted ECC P-256 ECDSA signing
/// key (not a decryption key) bound to its TPM, and returns its SEC1 point.
pub fn check_ca_key(key: &ObjectPublic) -> Result<Vec<u8>, Rejection> {
    let bad = |r: String| Rejection::BadCaKey(r);
    bound_to_tpm(&key.public).map_err(bad)?;
    let a = key.public.object_attributes();
    if !a.sign_encrypt() {
        return Err(bad("is not a signing key".into()));
    }
    if a.decrypt() {
        return Err(bad(
            "is also a decryption key (a CA key must only sign)".into()
        ));
    }
    let Public::Ecc { parameters, .. } = &key.public else {
        return Err(bad("is not an ECC key".into()));
    };
    if parameters.ecc_curve() != EccCurve::NistP256
        || !matches!(
            parameters.ecc_scheme(),
            EccScheme::EcDsa(_) | EccScheme::Null
        )
    {
        return Err(bad("is not an ECDSA P-256 key".into()));
    }
    p256_point(&key.public).ok_or_else(|| bad("has no P-256 point".into()))
}

/// Verifies a TPM2_Certify result: `attest` (TPMS_ATTEST bytes) is TPM-generated, of type
/// ATTEST_CERTIFY, carries `nonce` as extraData, certifies the object named
/// `certified_name`, and `signature` over it verifies with `ak`.
pub fn verify_certify(
    attest: &[u8],
    signature: &[u8],
    ak: &p256::ecdsa::VerifyingKey,
    nonce: &[u8],
    certified_name: &[u8],
) -> Result<(), Rejection> {
    let bad = |r: &str| Rejection::BadCertify(r.to_owned());
    // Signature first: nothing in an unsigned structure is worth parsing further.
    let sig = Signature::unmarshall(signature).map_err(|e| Rejection::Malformed {
        what: "Certify signature",
        reason: e.to_string(),
    })?;
    let Signature::EcDsa(ecc) = sig else {
        return Err(bad("the signature is not ECDSA"));
    };
    if ecc.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err(bad("the signature is not over SHA-256"));
    }
    let scalar = |v: &[u8]| -> Option<p256::FieldBytes> {
        let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        if v.len() > 32 {
            return None;
        }
        let mut out = p256::FieldBytes::default();
        out[32 - v.len()..].copy_from_slice(&v);
        Some(out)
    };
    let (Some(r), Some(s)) = (
        scalar(ecc.signature_r().value()),
        scalar(ecc.signature_s().value()),
    ) else {
        return Err(bad("r or s is not a P-256 scalar"));
    };
    let sig = p256::ecdsa::Signature::from_scalars(r, s)
        .map_err(|_| bad("r or s is not a P-256 scalar"))?;
    ak.verify_prehash(&Sha256::digest(attest), &sig)
        .map_err(|_| bad("the signature does not verify with the attestation key"))?;

    if attest.len() < 6 || attest[..4] != TPM2_GENERATED_VALUE.to_be_bytes() {
        return Err(bad(
            "magic is not TPM_GENERATED_VALUE (not produced by a TPM)",
        ));
    }
    if attest[4..6] != TPM2_ST_ATTEST_CERTIFY.to_be_bytes() {
        return Err(bad("not a TPM2_Certify attestation"));
    }
    let parsed = Attest::unmarshall(attest).map_err(|e| Rejection::Malformed {
        what: "Certify attestation",
        reason: e.to_string(),
    })?;
    if parsed.extra_data().value() != nonce {
        return Err(bad(
            "extraData is not this challenge's nonce (stale or replayed attestation)",
        ));
    }
    let AttestInfo::Certify { info } = parsed.attested() else {
        return Err(bad("not a TPM2_Certify attestation"));
    };
    if info.name().value() != certified_name {
        return Err(bad("it certifies another object than the announced CA key"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::structures::{EccPoint, HashScheme, PublicBuilder, PublicEccParametersBuilder};

    use super::*;
    use crate::tpm::attestation::ak_template;
    use crate::tpm::keys::ca_key_template;

    fn bytes(p: &Public) -> Vec<u8> {
        p.marshall().unwrap()
    }

    fn ecc_key(fixed_tpm: bool, decrypt: bool) -> Public {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(fixed_tpm)
            .with_fixed_parent(fixed_tpm)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .with_decrypt(decrypt)
            .build()
            .unwrap();
        PublicBuilder::new()
            .with_public_algorithm(tss_esapi::interface_types::algorithm::PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_key_derivation_function_scheme(
                        tss_esapi::structures::KeyDerivationFunctionScheme::Null,
                    )
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_is_signing_key(true)
                    .with_is_decryption_key(decrypt)
                    .with_restricted(false)
                    .build()
                    .unwrap(),
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .unwrap()
    }

    #[test]
    fn names_hash_the_exact_bytes_and_trailing_bytes_are_refused() {
        let b = bytes(&ca_key_template().unwrap());
        let p = ObjectPublic::parse(&b, "k").unwrap();
        assert_eq!(p.name[..2], [0x00, 0x0b]);
        assert_eq!(p.name[2..], Sha256::digest(&b)[..]);
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            ObjectPublic::parse(&longer, "k"),
            Err(Rejection::Malformed { .. })
        ));
        assert!(ObjectPublic::parse(&b[..b.len() - 1], "k").is_err());
    }

    #[test]
    fn ca_keys_must_be_tpm_bound_sign_only_p256() {
        let ok = ObjectPublic::parse(&bytes(&ca_key_template().unwrap()), "k").unwrap();
        assert!(check_ca_key(&ok).is_ok());
        let movable = ObjectPublic::parse(&bytes(&ecc_key(false, false)), "k").unwrap();
        assert!(
            matches!(check_ca_key(&movable), Err(Rejection::BadCaKey(r)) if r.contains("lacks fixedTPM"))
        );
        // The AK template is restricted: fine as an AK, and an AK must be restricted.
        let ak = ObjectPublic::parse(&bytes(&ak_template().unwrap()), "ak").unwrap();
        assert!(matches!(check_ak(&ok), Err(Rejection::BadAk(r)) if r.contains("restricted")));
        // (its all-zero placeholder point is not on the curve: only a TPM fills it in)
        assert!(matches!(check_ak(&ak), Err(Rejection::BadAk(_))));
    }
}
