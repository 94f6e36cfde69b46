//! TPM node attestation, SPIRE `tpm_devid` style: how the trust domain's root decides that
//! a node's CA key lives in a genuine TPM before it certifies that key as a node CA.
//!
//! The exchange (two gRPC calls over TLS, [`grpc`]):
//!
//! 1. **Begin** — the node ([`crate::tpm::attestation`]) sends its EK certificate (NV
//!    `0x01c00002`), its EK public area, a restricted signing attestation key (AK) and the
//!    public area of its CA key. The [`verifier::Verifier`] checks the EK certificate
//!    against the configured manufacturer CAs ([`ek_chain`]), that the EK public area is
//!    the certificate's key, and the AK's and CA key's attributes ([`tpm_objects`]); then
//!    it makes a credential for the AK's Name under the EK ([`credential`]) and sends it
//!    with a fresh nonce.
//! 2. **Complete** — the node's TPM recovers the credential (TPM2_ActivateCredential: only
//!    the TPM holding that EK, with that AK loaded, can) and certifies its CA key with the
//!    AK over the nonce (TPM2_Certify). The verifier checks the recovered secret, the
//!    Certify signature by that AK, the nonce (single use) and that the certified Name is
//!    the CA key's; the root then signs the node CA certificate (selectors such as
//!    `tpm:ek-pubhash:<sha256>`). Every outcome is written to an [`audit`] log.
//!
//! The verifier needs no TPM: everything on its side is software.

pub mod audit;
pub mod client;
pub mod credential;
pub mod ek_chain;
pub mod grpc;
pub mod tls;
pub mod tpm_objects;
pub mod verifier;

use std::time::Duration;

pub use audit::AuditLog;
pub use ek_chain::ManufacturerCas;
pub use verifier::{Attested, Verifier};

/// The SPIFFE ID path of the root's node-attestation endpoint: nodes accept the TLS server
/// only with this ID in their trust domain.
pub const SERVER_ID_PATH: &str = "/ferry/node-attestation";

/// What a node presents in Begin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The EK certificate, DER.
    pub ek_certificate: Vec<u8>,
    /// The EK public area (marshalled TPMT_PUBLIC).
    pub ek_public: Vec<u8>,
    /// The attestation key's public area (marshalled TPMT_PUBLIC).
    pub ak_public: Vec<u8>,
    /// The public area of the key to certify as the node CA (marshalled TPMT_PUBLIC).
    pub ca_key_public: Vec<u8>,
    /// The node CA lifetime the node asks for.
    pub ttl: Duration,
}

/// What the verifier answers to Begin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    /// Names this attempt; answered at most once.
    pub session: String,
    /// The qualifying data TPM2_Certify must include.
    pub nonce: Vec<u8>,
    /// TPM2B_ID_OBJECT contents for TPM2_ActivateCredential.
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents for TPM2_ActivateCredential.
    pub encrypted_secret: Vec<u8>,
}

/// What a node sends in Complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The session of the challenge this answers.
    pub session: String,
    /// What TPM2_ActivateCredential returned.
    pub activated_secret: Vec<u8>,
    /// TPM2_Certify's TPMS_ATTEST, marshalled.
    pub certify_info: Vec<u8>,
    /// TPM2_Certify's TPMT_SIGNATURE, marshalled.
    pub certify_signature: Vec<u8>,
}

/// Why the verifier refused a node. Each variant is one check, with the reason an operator
/// reads in the audit log and the node's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A structure does not parse.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// The EK certificate does not chain to a configured manufacturer CA (or is expired).
    #[error(
        "EK certificate is not trusted: {0} (ca.nodeAttestation.manufacturerCas must hold the CA that issued it)"
    )]
    UntrustedEk(String),
    /// The EK public area is not the EK certificate's key.
    #[error("the EK public area is not the key of the EK certificate")]
    EkMismatch,
    /// An EK this verifier cannot make credentials for.
    #[error("unsupported EK: {0}")]
    UnsupportedEk(String),
    /// The attestation key is unusable.
    #[error("attestation key {0}")]
    BadAk(String),
    /// The key to certify may not become a node CA.
    #[error("the key to certify {0}")]
    BadCaKey(String),
    /// No such challenge (never issued, or expired).
    #[error("challenge {0:?} is unknown or expired")]
    UnknownSession(String),
    /// The challenge was already answered: a replayed nonce.
    #[error("challenge {0:?} was already answered (replayed nonce)")]
    Replayed(String),
    /// The activated secret is not the credential: the AK is not in the TPM holding the EK.
    #[error(
        "credential activation failed: the answer is not the credential made for this EK and AK (the AK is not in the TPM that holds the EK)"
    )]
    ActivationMismatch,
    /// Too many challenges are waiting for answers; the node retries later.
    #[error("{0} attestations are already waiting for answers; retry later")]
    Busy(usize),
    /// The Certify attestation is not valid for this challenge.
    #[error("Certify attestation rejected: {0}")]
    BadCertify(String),
}

/// Why a node could not get its CA certified (the node side of the exchange).
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The upstream address or trust bundle is unusable.
    #[error("node attestation setup: {0}")]
    Config(String),
    /// The root could not be reached or the call failed in transport.
    #[error(
        "cannot reach the root's node-attestation API at {url}: {reason} (check ca.upstream, that the root runs with ca.role: root, and ca.upstreamBundle)"
    )]
    Unreachable {
        /// `ca.upstream`.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// The root refused this node.
    #[error("the root at {url} refused node attestation: {reason}")]
    Refused {
        /// `ca.upstream`.
        url: String,
        /// The root's reason (a [`Rejection`] text).
        reason: String,
    },
    /// The root answered with something a node must not accept.
    #[error("the root at {url} answered with an unusable node CA: {reason}")]
    BadResponse {
        /// `ca.upstream`.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The node's TPM failed.
    #[error(transparent)]
    Tpm(#[from] crate::tpm::TpmError),
}
