//! ferry's certificate authority for one trust domain.
//!
//! - [`signer`]: the [`Signer`] / [`KeyStore`] abstraction; the software backend keeps
//!   ECDSA P-256 keys as 0600 PEM files. A TPM backend plugs in here without touching
//!   issuance.
//! - [`x509`]: CA certificates and X.509-SVIDs built to the SPIFFE profile (rcgen), checked
//!   with an independent parser (x509-parser), plus chain verification.
//! - [`jwt`]: ES256 JWT-SVIDs and JWKS bundles.
//! - [`ca`]: the [`Authority`]: root + intermediate + JWT keys, SPIRE-style rotation,
//!   persistence under `ca.stateDir`.
//! - [`node_attest`]: TPM node attestation between the trust domain's root (verifier, no
//!   TPM needed) and TPM-backed nodes, over gRPC and TLS.
//! - `private_dir`: how every file under `ca.stateDir` is read and written so that another
//!   local user can neither plant, redirect nor read it.

#![forbid(unsafe_code)]

pub mod ca;
pub mod error;
pub mod hierarchy;
pub mod issuing;
pub mod jwt;
pub mod node_attest;
mod private_dir;
pub mod signer;
pub mod tpm;
pub mod x509;

pub use ca::{Authority, AuthorityConfig, Hierarchy, Upstream, UpstreamCa};
pub use error::{Error, Insecure, JwtError, Result};
pub use issuing::IssuanceMode;
pub use jwt::{Claims, JwtBundle, JwtSvid};
pub use signer::{KeyStore, Signer, SoftwareKeyStore, SoftwareSigner};
pub use x509::{CaCert, X509Svid, check_svid_profile, verify_chain};
