//! The one error type of the `attest` crate.

use std::path::PathBuf;

/// Everything that can go wrong in the CA: key storage, certificate building, JWT handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file under the CA state directory could not be read or written.
    #[error("CA state {}: {action}: {source} (check that ca.stateDir exists, is writable by ferry and not full)", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`read`, `write`, `create dir`, ...).
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA state directory holds something this version cannot use.
    #[error("CA state {} is unusable: {reason} (move the directory away to start a new trust domain root; existing clients will then need the new bundle)", path.display())]
    CorruptState {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored CA belongs to another trust domain than the config names.
    #[error("CA state in {} is for trust domain {stored:?}, but the config says {configured:?} (use another ca.stateDir per trust domain)", path.display())]
    TrustDomainMismatch {
        /// The state directory.
        path: PathBuf,
        /// The trust domain the state was created for.
        stored: String,
        /// The configured trust domain.
        configured: String,
    },
    /// Generating or using a key failed.
    #[error("key operation {op} failed: {reason}")]
    Key {
        /// The operation (`generate`, `sign`, `load`).
        op: &'static str,
        /// The underlying error text.
        reason: String,
    },
    /// rcgen refused to build a certificate.
    #[error("cannot build {what} certificate: {source}")]
    Build {
        /// Which certificate (`root`, `intermediate`, `X.509-SVID`).
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A certificate we built or loaded does not parse or breaks the SPIFFE profile.
    #[error("certificate {what} is invalid: {reason}")]
    BadCertificate {
        /// Which certificate.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// No authority can sign right now (all expired): the CA must rotate first.
    #[error("no active {what} authority (the CA has not been initialised or all keys expired)")]
    NoAuthority {
        /// `X.509` or `JWT`.
        what: &'static str,
    },
    /// A directory or file under `ca.stateDir` could have been planted, swapped or read by
    /// another local user, so the CA refuses to trust (or write) it.
    #[error("CA state {}: {problem} ({})", path.display(), problem.hint())]
    InsecureState {
        /// The offending directory or file.
        path: PathBuf,
        /// What is wrong with it.
        problem: Insecure,
    },
    /// A stored CA key is not the key of its certificate: everything it signed would fail to
    /// verify against this CA's own bundle.
    #[error("CA key {key} does not match the public key of the {what} certificate (serial {serial}) in {} (restore the key file that belongs to this certificate, or move ca.stateDir away to start a new root; clients will then need the new bundle)", state.display())]
    KeyMismatch {
        /// Which certificate (`root`, `intermediate`, `JWT`).
        what: &'static str,
        /// The certificate's serial (for JWT keys: the stored `kid`).
        serial: String,
        /// Where the key lives (the key file for the software store).
        key: String,
        /// The state file naming the certificate.
        state: PathBuf,
    },
    /// A JWT-SVID could not be issued or failed validation.
    #[error("JWT-SVID {0}")]
    Jwt(#[from] JwtError),
    /// The TPM behind `ca.backend: tpm` failed (the error names its TCTI).
    #[error(transparent)]
    Tpm(#[from] crate::tpm::TpmError),
    /// Node attestation with the trust domain's root failed (`ca.role: node`).
    #[error(transparent)]
    Attestation(#[from] crate::node_attest::AttestError),
}

/// Why a path under `ca.stateDir` is not trusted. Each names one check of
/// [`Error::InsecureState`] and comes with what the operator can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Insecure {
    /// Not owned by the effective uid the agent runs as: another user made it (and may
    /// hold or have swapped its keys).
    #[error("owned by uid {owner}, expected {expected}")]
    WrongOwner {
        /// The owner found.
        owner: u32,
        /// The agent's effective uid.
        expected: u32,
    },
    /// Group or others may write it, so they could plant or replace files.
    #[error("mode {mode:04o} lets group or others write it")]
    WritableByOthers {
        /// The permission bits found.
        mode: u32,
    },
    /// A private key that group or others may read.
    #[error("mode {mode:04o} lets group or others read this private key")]
    ReadableByOthers {
        /// The permission bits found.
        mode: u32,
    },
    /// A symbolic link, which the CA never follows inside its state.
    #[error("is a symbolic link")]
    Symlink,
    /// Neither a directory nor a regular file where one was expected.
    #[error("is not a {expected}")]
    WrongType {
        /// `directory` or `regular file`.
        expected: &'static str,
    },
}

impl Insecure {
    /// What the operator can do about it (printed with the error).
    pub fn hint(&self) -> &'static str {
        match self {
            Insecure::WrongOwner { .. } => {
                "chown it to the user ferry runs as or choose another ca.stateDir; a CA another user created may have keys that user knows"
            }
            Insecure::WritableByOthers { .. } => "chmod go-w it or choose another ca.stateDir",
            Insecure::ReadableByOthers { .. } => {
                "chmod 600 it; if others may have read it, move ca.stateDir away to start a new root"
            }
            Insecure::Symlink => {
                "ferry follows no symlinks in its CA state: point ca.stateDir at the real directory and remove the link"
            }
            Insecure::WrongType { .. } => "remove it or choose another ca.stateDir",
        }
    }
}

/// Why a JWT-SVID was rejected (each is a distinct, matchable reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, or not JSON inside.
    #[error("is malformed: {0}")]
    Malformed(String),
    /// The header's `alg` is not one we verify.
    #[error("uses unsupported algorithm {0:?} (ferry signs and verifies ES256)")]
    UnsupportedAlgorithm(String),
    /// The header has no `kid`.
    #[error("has no key id (kid) in its header")]
    MissingKeyId,
    /// The `typ` header is present but not `JWT`/`JOSE`.
    #[error("has unsupported typ {0:?}")]
    BadType(String),
    /// No bundle has a key with this `kid`.
    #[error("is signed by unknown key {kid:?} of trust domain {trust_domain}")]
    UnknownKey {
        /// The key id from the header.
        kid: String,
        /// The trust domain of `sub`.
        trust_domain: String,
    },
    /// We hold no JWT bundle for the token's trust domain.
    #[error("is from trust domain {0} for which no JWT bundle is known")]
    UnknownTrustDomain(String),
    /// The signature does not verify.
    #[error("signature is invalid")]
    BadSignature,
    /// A required claim is absent or has the wrong type.
    #[error("claim {0} is missing or invalid")]
    BadClaim(&'static str),
    /// `exp` is in the past.
    #[error("has expired")]
    Expired,
    /// The audience asked for is not in `aud`.
    #[error("audience {expected:?} is not in the token's aud {actual:?}")]
    WrongAudience {
        /// The audience the validator asked for.
        expected: String,
        /// The token's audiences.
        actual: Vec<String>,
    },
    /// Issuance was asked without any audience.
    #[error("needs at least one audience")]
    NoAudience,
    /// The header's `crit` lists extensions that must be understood; ferry understands none,
    /// so RFC 7515 §4.1.11 makes the token invalid.
    #[error("marks header parameters {0:?} as critical (crit), which ferry does not understand")]
    CriticalHeader(Vec<String>),
    /// `nbf` is later than now plus the clock leeway.
    #[error(
        "is not valid before {not_before} (now {now}, leeway {leeway_secs} s; check the issuer's clock)"
    )]
    NotYetValid {
        /// The token's `nbf`, Unix seconds.
        not_before: u64,
        /// The validator's clock, Unix seconds.
        now: u64,
        /// The tolerated skew.
        leeway_secs: u64,
    },
    /// `iat` is later than now plus the clock leeway: the issuer's clock or the token is wrong.
    #[error(
        "was issued in the future at {issued_at} (now {now}, leeway {leeway_secs} s; check the issuer's clock)"
    )]
    IssuedInFuture {
        /// The token's `iat`, Unix seconds.
        issued_at: u64,
        /// The validator's clock, Unix seconds.
        now: u64,
        /// The tolerated skew.
        leeway_secs: u64,
    },
}

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            path,
            action,
            source,
        }
    }

    pub(crate) fn key(op: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
        move |e| Error::Key {
            op,
            reason: e.to_string(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
