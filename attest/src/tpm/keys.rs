//! CA keys that live in a TPM, behind the same [`Signer`] / [`KeyStore`] traits as the
//! software keys, so issuance code does not know the difference.
//!
//! Each key is an ECC P-256 signing key created by TPM2_Create under the owner storage
//! primary with `fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign`: its
//! private part never exists outside this TPM. What ferry stores (`<dir>/<name>.tpmkey`,
//! 0600 like every file in the CA state) is the TPM-wrapped blob — useless on any other
//! TPM — and the public area, from which the key is reloaded after a restart.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rcgen::{PKCS_ECDSA_P256_SHA256, SignatureAlgorithm};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::{Tpm, TpmError, TpmThread};
use crate::error::{Error, Result};
use crate::private_dir::{PrivateDir, Secrecy};
use crate::signer::{KeyStore, Signer};

/// The template of every CA key: ECC P-256, ECDSA with SHA-256, sign-only, unrestricted
/// (it signs X.509 TBS digests, not TPM-generated structures), bound to this TPM and
/// parent, generated inside the TPM.
pub fn ca_key_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The SEC1 uncompressed point (`04 || x || y`) of an ECC P-256 public area.
pub fn ecc_point(public: &Public) -> Option<Vec<u8>> {
    let Public::Ecc { unique, .. } = public else {
        return None;
    };
    let (x, y) = (unique.x().value(), unique.y().value());
    if x.len() > 32 || y.len() > 32 {
        return None;
    }
    let mut raw = vec![0u8; 65];
    raw[0] = 4;
    raw[1 + 32 - x.len()..33].copy_from_slice(x);
    raw[33 + 32 - y.len()..].copy_from_slice(y);
    Some(raw)
}

/// The persisted form of a TPM key: the TPM-wrapped private blob and the public area
/// (TPMT_PUBLIC), both base64. Not secret outside this TPM, still kept 0600.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Blob {
    version: u32,
    /// Which parent the blob is wrapped for.
    parent: String,
    public: String,
    private: String,
}

const PARENT: &str = "owner-ecc-p256-srk";

/// Distinguishes signer instances for the TPM thread's loaded-key cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A CA key inside a TPM. Signing runs TPM2_Sign on the TPM thread (loading the key
/// under the storage primary first when it is not the cached one); the caller blocks.
/// Clones share the key (cheap).
#[derive(Clone)]
pub struct TpmSigner {
    tpm: Arc<Tpm>,
    key: Arc<LoadableKey>,
    raw: Vec<u8>,
}

/// What the TPM thread needs to (re)load a key: shared with jobs sent to that thread.
#[derive(Debug)]
pub(crate) struct LoadableKey {
    id: u64,
    name: String,
    public: Public,
    private: Private,
}

impl fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmSigner")
            .field("tcti", &self.tpm.tcti())
            .field("key", &self.key.name)
            .finish_non_exhaustive()
    }
}

impl TpmSigner {
    fn new(tpm: Arc<Tpm>, name: &str, public: Public, private: Private) -> Result<Self> {
        let raw = ecc_point(&public).ok_or_else(|| TpmError::BadObject {
            tcti: tpm.tcti().to_owned(),
            what: format!("key {name}"),
            reason: "not an ECC P-256 key".into(),
        })?;
        Ok(Self {
            tpm,
            key: Arc::new(LoadableKey {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                name: name.to_owned(),
                public,
                private,
            }),
            raw,
        })
    }

    /// The key's public area as the TPM holds it (what an attestation certifies).
    pub fn public_area(&self) -> &Public {
        &self.key.public
    }

    /// The TPM-wrapped private blob (loadable only under this TPM's storage primary).
    pub fn private_blob(&self) -> &Private {
        &self.key.private
    }

    /// The SHA-256 of the SEC1 public key, hex: how `ferry attest info` names a key so an
    /// operator can match it with the node CA certificate.
    pub fn public_key_sha256(&self) -> String {
        Sha256::digest(&self.raw)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The TPM this key lives in.
    pub fn tpm(&self) -> &Arc<Tpm> {
        &self.tpm
    }

    /// The key as the TPM thread loads it.
    pub(crate) fn loadable(&self) -> Arc<LoadableKey> {
        Arc::clone(&self.key)
    }

    fn sign_digest(&self, digest: Vec<u8>) -> std::result::Result<Vec<u8>, TpmError> {
        let me = Arc::clone(&self.key);
        self.tpm.call(move |st| me.sign(st, digest))?
    }
}

impl LoadableKey {
    /// Loads this key into the TPM (or reuses the cached handle) on the TPM thread.
    pub(crate) fn handle(&self, st: &mut TpmThread) -> std::result::Result<KeyHandle, TpmError> {
        if let Some((id, h)) = st.loaded
            && id == self.id
        {
            return Ok(h);
        }
        if let Some((_, h)) = st.loaded.take() {
            let _ = st.ctx.flush_context(ObjectHandle::from(h));
        }
        let parent = st.primary()?;
        let (private, public) = (self.private.clone(), self.public.clone());
        let h = st
            .ctx
            .execute_with_nullauth_session(|c| c.load(parent, private, public))
            .map_err(st.err("load a CA key (TPM2_Load)"))?;
        st.loaded = Some((self.id, h));
        Ok(h)
    }

    fn sign(&self, st: &mut TpmThread, digest: Vec<u8>) -> std::result::Result<Vec<u8>, TpmError> {
        {
            let h = self.handle(st)?;
            let digest = Digest::try_from(digest).map_err(st.err("wrap the digest"))?;
            let ticket = TPMT_TK_HASHCHECK {
                tag: TPM2_ST_HASHCHECK,
                hierarchy: TPM2_RH_NULL,
                digest: Default::default(),
            }
            .try_into()
            .map_err(st.err("build a null hashcheck ticket"))?;
            let sig = st
                .ctx
                .execute_with_nullauth_session(|c| c.sign(h, digest, SignatureScheme::Null, ticket))
                .map_err(st.err("sign (TPM2_Sign)"))?;
            let bad = |reason: String| TpmError::BadObject {
                tcti: st.tcti().to_owned(),
                what: format!("signature by key {}", self.name),
                reason,
            };
            let Signature::EcDsa(ecc) = sig else {
                return Err(bad("not an ECDSA signature".into()));
            };
            der_signature(ecc.signature_r().value(), ecc.signature_s().value())
                .ok_or_else(|| bad("r or s is not a P-256 scalar".into()))
        }
    }
}

/// The ASN.1 DER `ECDSA-Sig-Value` (what X.509 carries) for big-endian `r` and `s`.
fn der_signature(r: &[u8], s: &[u8]) -> Option<Vec<u8>> {
    let pad = |v: &[u8]| -> Option<p256::FieldBytes> {
        let v = &v[v
            .len()
            .saturating_sub(32)
            .min(v.iter().take_while(|b| **b == 0).count())..];
        if v.len() > 32 {
            return None;
        }
        let mut out = p256::FieldBytes::default();
        out[32 - v.len()..].copy_from_slice(v);
        Some(out)
    };
    let sig = p256::ecdsa::Signature::from_scalars(pad(r)?, pad(s)?).ok()?;
    Some(sig.to_der().as_bytes().to_vec())
}

impl Signer for TpmSigner {
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }

    fn public_key_raw(&self) -> &[u8] {
        &self.raw
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let digest = Sha256::digest(msg).to_vec();
        // On a multi-threaded runtime worker, let the runtime move other tasks away while
        // the TPM works; elsewhere (spawn_blocking, plain threads) just block.
        let in_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let res = if in_worker {
            tokio::task::block_in_place(|| self.sign_digest(digest))
        } else {
            self.sign_digest(digest)
        };
        Ok(res?)
    }
}

/// CA keys in a TPM, their blobs as `<dir>/<name>.tpmkey`.
#[derive(Debug, Clone)]
pub struct TpmKeyStore {
    tpm: Arc<Tpm>,
    dir: PathBuf,
}

impl TpmKeyStore {
    /// A store whose keys live in `tpm` and whose blobs live in `dir` (created 0700).
    pub fn new(tpm: Arc<Tpm>, dir: impl Into<PathBuf>) -> Self {
        Self {
            tpm,
            dir: dir.into(),
        }
    }

    /// The TPM behind this store.
    pub fn tpm(&self) -> &Arc<Tpm> {
        &self.tpm
    }

    fn file(&self, name: &str) -> Result<String> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::CorruptState {
                path: self.dir.clone(),
                reason: format!("key name {name:?} is not [A-Za-z0-9-]+"),
            });
        }
        Ok(format!("{name}.tpmkey"))
    }

    /// Creates a key in the TPM and returns its signer without persisting it.
    pub fn create(&self, name: &str) -> Result<TpmSigner> {
        let template = ca_key_template().map_err(|e| TpmError::Command {
            tcti: self.tpm.tcti().to_owned(),
            op: "build the CA key template",
            reason: e.to_string(),
            hint: None,
        })?;
        self.create_from_template(name, template)
    }

    /// Creates an ECC P-256 key from `template` rather than [`ca_key_template`], without
    /// persisting it. The CA never does this; it exists so that attestation can be shown
    /// to refuse keys with other attributes (e.g. without `fixedTPM`), with a real TPM.
    pub fn create_from_template(&self, name: &str, template: Public) -> Result<TpmSigner> {
        let (public, private) = self.tpm.call(move |st| {
            let parent = st.primary()?;
            let out = st
                .ctx
                .execute_with_nullauth_session(|c| {
                    c.create(parent, template, None, None, None, None)
                })
                .map_err(st.err("create a CA key (TPM2_Create)"))?;
            Ok::<_, TpmError>((out.out_public, out.out_private))
        })??;
        TpmSigner::new(Arc::clone(&self.tpm), name, public, private)
    }

    /// Loads the signer stored under `name`, with its concrete type (for attestation, which
    /// needs the public area).
    pub fn load_tpm(&self, name: &str) -> Result<TpmSigner> {
        let file = self.file(name)?;
        let dir = PrivateDir::open_or_create(&self.dir)?;
        let path = dir.path_of(&file);
        let corrupt = |reason: String| Error::CorruptState {
            path: path.clone(),
            reason,
        };
        let bytes = dir
            .read(&file, Secrecy::Secret)?
            .ok_or_else(|| corrupt("the TPM key blob named by the CA state is missing".into()))?;
        let blob: Blob = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if blob.version != 1 || blob.parent != PARENT {
            return Err(corrupt(format!(
                "unknown blob version {} / parent {:?}",
                blob.version, blob.parent
            )));
        }
        let decode = |s: &str| B64.decode(s).map_err(|e| corrupt(e.to_string()));
        let public =
            Public::unmarshall(&decode(&blob.public)?).map_err(|e| corrupt(e.to_string()))?;
        let private =
            Private::try_from(decode(&blob.private)?).map_err(|e| corrupt(e.to_string()))?;
        let signer = TpmSigner::new(Arc::clone(&self.tpm), name, public, private)?;
        // Load once now, so a blob from another TPM (or a cleared owner hierarchy) fails at
        // start-up, naming the file, and not at the first signature.
        let probe = signer.loadable();
        self.tpm
            .call(move |st| probe.handle(st).map(|_| ()))?
            .map_err(|e| {
                corrupt(format!(
                    "{e}; the blob belongs to another TPM or the owner hierarchy was cleared"
                ))
            })?;
        Ok(signer)
    }

    /// Whether a key blob named `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.file(name)
            .map(|f| self.dir.join(f).is_file())
            .unwrap_or(false)
    }
}

impl KeyStore for TpmKeyStore {
    fn generate(&self, name: &str) -> Result<Arc<dyn Signer>> {
        let file = self.file(name)?;
        let signer = self.create(name)?;
        let marshalled = signer
            .key
            .public
            .marshall()
            .map_err(|e| TpmError::BadObject {
                tcti: self.tpm.tcti().to_owned(),
                what: format!("key {name}"),
                reason: e.to_string(),
            })?;
        let blob = Blob {
            version: 1,
            parent: PARENT.into(),
            public: B64.encode(marshalled),
            private: B64.encode(signer.key.private.value()),
        };
        let json = serde_json::to_vec_pretty(&blob).map_err(|e| Error::CorruptState {
            path: self.dir.join(&file),
            reason: e.to_string(),
        })?;
        PrivateDir::open_or_create(&self.dir)?.write(&file, &json)?;
        Ok(Arc::new(signer))
    }

    fn load(&self, name: &str) -> Result<Arc<dyn Signer>> {
        Ok(Arc::new(self.load_tpm(name)?))
    }

    fn remove(&self, name: &str) -> Result<()> {
        // Deleting the blob is enough: the key exists nowhere else (it is not persistent).
        let file = self.file(name)?;
        PrivateDir::open_or_create(&self.dir)?.remove(&file)
    }

    fn describe(&self, name: &str) -> String {
        match self.file(name) {
            Ok(f) => format!(
                "TPM key (TCTI {}) blob {}",
                self.tpm.tcti(),
                self.dir.join(f).display()
            ),
            Err(_) => name.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_signature_pads_and_strips() {
        let mut r = vec![0u8; 33];
        r[32] = 7;
        let der = der_signature(&r, &[9]).unwrap();
        let sig = p256::ecdsa::Signature::from_der(&der).unwrap();
        assert_eq!(sig.r().to_bytes()[31], 7);
        assert_eq!(sig.s().to_bytes()[31], 9);
        assert!(der_signature(&[1u8; 33], &[1]).is_none());
    }
}
