//! TPM2_MakeCredential in software: what lets the verifier, which has no TPM, check that
//! an attestation key lives in the same TPM as an endorsement key.
//!
//! TPM 2.0 Part 1 §24 (Credential Protection) with the RSA secret sharing of Part 1 §B.10.4:
//!
//! - a random `seed` (one digest of the EK's nameAlg) is RSA-OAEP encrypted to the EK with
//!   the label `"IDENTITY\0"` and the EK's nameAlg as hash: the *encrypted secret*;
//! - `symKey = KDFa(nameAlg, seed, "STORAGE", name(AK), "", 128)` encrypts the credential,
//!   marshalled as a TPM2B_DIGEST, with AES-128-CFB and a zero IV: `encIdentity`;
//! - `hmacKey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)` and
//!   `outerHMAC = HMAC(hmacKey, encIdentity || name(AK))`;
//! - the *credential blob* (TPM2B_ID_OBJECT contents) is `TPM2B_DIGEST(outerHMAC) ||
//!   encIdentity`.
//!
//! Only a TPM holding the EK's private key recovers the seed, and it releases the
//! credential only when the object named in the HMAC (the AK) is loaded in it
//! (TPM2_ActivateCredential). No well-kept Rust crate does this without a TPM (tss-esapi
//! calls the TPM; the TPM-less crates need OpenSSL), so it is written here on RustCrypto
//! primitives, and the swtpm tests check it against a real TPM2_ActivateCredential.
//!
//! Only SHA-256 EKs with AES-128-CFB (the TCG default RSA 2048 template, "low range") are
//! supported; [`crate::node_attest::tpm_objects`] checks that before calling here.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rsa::{Oaep, RsaPublicKey};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;
type Aes128CfbEnc = cfb_mode::Encryptor<aes::Aes128>;

/// The output of [`make_credential`], as TPM2_ActivateCredential takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialChallenge {
    /// TPM2B_ID_OBJECT contents (integrity HMAC and encrypted credential).
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents (the OAEP-encrypted seed).
    pub encrypted_secret: Vec<u8>,
}

/// Why a credential could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// RSA-OAEP encryption to the EK failed (e.g. a modulus too small for the seed).
    #[error("cannot encrypt the seed to the EK: {0}")]
    Encrypt(String),
    /// The credential does not fit a TPM2B_DIGEST (at most 64 bytes).
    #[error("credential of {0} bytes is longer than a TPM digest")]
    TooLong(usize),
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode with HMAC-SHA256): `bits` of
/// key material from `key`, `label` (a terminating zero is added when missing), and the
/// two context values.
pub fn kdfa_sha256(
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let bytes = usize::try_from(bits.div_ceil(8)).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        // HMAC accepts keys of any length: new_from_slice cannot fail.
        let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        if label.last() != Some(&0) {
            mac.update(&[0]);
        }
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// TPM2_MakeCredential for an RSA EK (SHA-256 nameAlg, AES-128-CFB): protects `credential`
/// so that only the TPM holding `ek` with the object named `object_name` loaded can
/// recover it. Each call draws a fresh seed.
pub fn make_credential(
    ek: &RsaPublicKey,
    object_name: &[u8],
    credential: &[u8],
) -> Result<CredentialChallenge, CredentialError> {
    if credential.len() > 64 {
        return Err(CredentialError::TooLong(credential.len()));
    }
    let seed: [u8; 32] = rand::random();
    let seed = &seed;
    let encrypted_secret = ek
        .encrypt(
            &mut SystemRng,
            Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            seed,
        )
        .map_err(|e| CredentialError::Encrypt(e.to_string()))?;

    let sym_key = kdfa_sha256(seed, b"STORAGE", object_name, &[], 128);
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    // credential.len() <= 64 (checked above)
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    let Ok(cipher) = Aes128CfbEnc::new_from_slices(&sym_key, &[0u8; 16]) else {
        return Err(CredentialError::Encrypt("AES key setup".into()));
    };
    cipher.encrypt(&mut enc_identity);

    let hmac_key = kdfa_sha256(seed, b"INTEGRITY", &[], &[], 256);
    let Ok(mut mac) = HmacSha256::new_from_slice(&hmac_key) else {
        return Err(CredentialError::Encrypt("HMAC key setup".into()));
    };
    mac.update(&enc_identity);
    mac.update(object_name);
    let outer = mac.finalize().into_bytes();

    let mut credential_blob = Vec::with_capacity(2 + outer.len() + enc_identity.len());
    credential_blob.extend_from_slice(&(outer.len() as u16).to_be_bytes());
    credential_blob.extend_from_slice(&outer);
    credential_blob.extend_from_slice(&enc_identity);
    Ok(CredentialChallenge {
        credential_blob,
        encrypted_secret,
    })
}

/// The thread-local CSPRNG of `rand` 0.9 behind the `rand_core` 0.6 traits that `rsa` 0.9
/// asks for (OAEP padding randomness).
struct SystemRng;

impl rsa::rand_core::RngCore for SystemRng {
    fn next_u32(&mut self) -> u32 {
        rand::random()
    }

    fn next_u64(&mut self) -> u64 {
        rand::random()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand::Rng::fill(&mut rand::rng(), dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for SystemRng {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_is_counter_mode_hmac_with_a_zero_terminated_label() {
        // One block: HMAC(key, 00000001 || "STORAGE" 00 || u || v || 00000080), truncated.
        let got = kdfa_sha256(b"k", b"STORAGE", b"u", b"v", 128);
        let mut mac = HmacSha256::new_from_slice(b"k").unwrap();
        mac.update(&[0, 0, 0, 1]);
        mac.update(b"STORAGE\0uv");
        mac.update(&[0, 0, 0, 128]);
        assert_eq!(got, mac.finalize().into_bytes()[..16]);
        // An explicit terminator is not doubled; longer outputs take more blocks.
        assert_eq!(
            kdfa_sha256(b"k", b"STORAGE\0", b"u", b"v", 128),
            got,
            "label terminator"
        );
        let long = kdfa_sha256(b"k", b"INTEGRITY", &[], &[], 384);
        assert_eq!(long.len(), 48);
    }
}
