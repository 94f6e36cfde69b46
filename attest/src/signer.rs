//! Keys behind the CA. Issuance code only ever sees a [`Signer`], so a key that lives in a
//! TPM (a later backend) plugs in by implementing [`Signer`] and [`KeyStore`] without any
//! change to how certificates or JWTs are built.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};

use crate::error::{Error, Result};
use crate::private_dir::{PrivateDir, Secrecy};

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
    /// Where the key `name` lives, for error messages that must tell an operator which file
    /// (or TPM handle) to look at.
    fn describe(&self, name: &str) -> String {
        name.to_owned()
    }
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

/// Keys as PEM files `<dir>/<name>.key.pem`, mode 0600, in a 0700 directory. Both are
/// checked on every use (owner, mode, no symlinks: the `private_dir` module) so that a key
/// another local user planted or can read is never used.
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

impl SoftwareKeyStore {
    fn file_name(&self, name: &str) -> Result<String> {
        let path = self.path(name)?;
        Ok(path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    }
}

impl KeyStore for SoftwareKeyStore {
    fn generate(&self, name: &str) -> Result<Arc<dyn Signer>> {
        let file = self.file_name(name)?;
        let dir = PrivateDir::open_or_create(&self.dir)?;
        let signer = SoftwareSigner::generate()?;
        dir.write(&file, signer.to_pem().as_bytes())?;
        Ok(Arc::new(signer))
    }

    fn load(&self, name: &str) -> Result<Arc<dyn Signer>> {
        let file = self.file_name(name)?;
        let dir = PrivateDir::open_or_create(&self.dir)?;
        let path = dir.path_of(&file);
        let pem = dir
            .read(&file, Secrecy::Secret)?
            .ok_or_else(|| Error::CorruptState {
                path: path.clone(),
                reason: "the key file named by the CA state is missing".into(),
            })?;
        let pem = String::from_utf8(pem).map_err(|_| Error::CorruptState {
            path: path.clone(),
            reason: "not a UTF-8 PEM file".into(),
        })?;
        let signer = SoftwareSigner::from_pem(&pem).map_err(|e| Error::CorruptState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(signer))
    }

    fn remove(&self, name: &str) -> Result<()> {
        let file = self.file_name(name)?;
        PrivateDir::open_or_create(&self.dir)?.remove(&file)
    }

    fn describe(&self, name: &str) -> String {
        self.path(name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| name.to_owned())
    }
}
