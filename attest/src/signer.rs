//! Keys behind the CA. Issuance code only ever sees a [`Signer`], so a key that lives in a
//! TPM (a later backend) plugs in by implementing [`Signer`] and [`KeyStore`] without any
//! change to how certificates or JWTs are built.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};

use crate::error::{Error, Result};

/// A private key that can sign, wherever it lives. ECDSA signers return ASN.1 DER
/// signatures (the X.509 encoding); JWT code converts them to the fixed JOSE form.
pub trait Signer: Send + Sync + fmt::Debug {
    /// The signature algorithm (ferry uses ECDSA P-256 with SHA-256 by default).
    fn algorithm(&self) -> &'static SignatureAlgorithm;
    /// The raw public key: for ECDSA the SEC1 uncompressed point (`04 || x || y`).
    fn public_key_raw(&self) -> &[u8];
    /// Signs `msg` (the signer hashes it as its algorithm says).
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>>;
}

/// Creates, reloads and deletes named CA keys. The software store keeps PEM files (0600);
/// a TPM store would keep wrapped key blobs instead.
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Generates a new key under `name`, persists it, and returns its signer.
    fn generate(&self, name: &str) -> Result<Arc<dyn Signer>>;
    /// Loads the key stored under `name`.
    fn load(&self, name: &str) -> Result<Arc<dyn Signer>>;
    /// Deletes the key stored under `name` (used once its certificate has expired).
    fn remove(&self, name: &str) -> Result<()>;
}

/// An in-memory ECDSA key (ring, through rcgen): the default CA backend and the form of
/// every workload (leaf) key.
pub struct SoftwareSigner {
    key: KeyPair,
}

impl fmt::Debug for SoftwareSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("SoftwareSigner")
            .field("alg", self.key.algorithm())
            .finish_non_exhaustive()
    }
}

impl SoftwareSigner {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(Error::key("generate"))?;
        Ok(Self { key })
    }

    /// Loads a PKCS#8 PEM key.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(pem).map_err(Error::key("load"))?;
        Ok(Self { key })
    }

    /// The key as PKCS#8 PEM (secret: write it only to 0600 files).
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The key as PKCS#8 DER (secret).
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }
}

impl Signer for SoftwareSigner {
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.key.algorithm()
    }

    fn public_key_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        self.key.sign(msg).map_err(Error::key("sign"))
    }
}

/// Lets rcgen sign certificates with any [`Signer`].
#[derive(Debug, Clone)]
pub(crate) struct RcgenKey(pub Arc<dyn Signer>);

impl PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key_raw()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|e| {
            tracing::error!(error = %e, "CA signer failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Keys as PEM files `<dir>/<name>.key.pem`, mode 0600, in a 0700 directory.
#[derive(Debug, Clone)]
pub struct SoftwareKeyStore {
    dir: PathBuf,
}

impl SoftwareKeyStore {
    /// A store in `dir` (created 0700 on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::CorruptState {
                path: self.dir.clone(),
                reason: format!("key name {name:?} is not [A-Za-z0-9-]+"),
            });
        }
        Ok(self.dir.join(format!("{name}.key.pem")))
    }
}

impl KeyStore for SoftwareKeyStore {
    fn generate(&self, name: &str) -> Result<Arc<dyn Signer>> {
        let path = self.path(name)?;
        let signer = SoftwareSigner::generate()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(Error::io(&self.dir, "create key directory"))?;
        write_private(&path, signer.to_pem().as_bytes())?;
        Ok(Arc::new(signer))
    }

    fn load(&self, name: &str) -> Result<Arc<dyn Signer>> {
        let path = self.path(name)?;
        let pem = fs::read_to_string(&path).map_err(Error::io(&path, "read key"))?;
        let signer = SoftwareSigner::from_pem(&pem).map_err(|e| Error::CorruptState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(signer))
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, "remove key")(e)),
        }
    }
}

/// Writes `data` to `path` atomically (temp file + rename) with mode 0600 from the start,
/// so a secret is never readable by others, not even for a moment.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io(&tmp, "create"))?;
    f.write_all(data).map_err(Error::io(&tmp, "write"))?;
    f.sync_all().map_err(Error::io(&tmp, "sync"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(Error::io(path, "rename into place"))
}
