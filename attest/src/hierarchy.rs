//! Where a CA sits in its trust domain: its own root (standalone), the trust domain's root
//! that certifies TPM nodes, or a node whose intermediate an upstream certifies. Kept apart
//! from the rotation logic in [`crate::ca`], which only asks "who signs my next
//! intermediate, and what is my bundle".

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::signer::Signer;
use crate::x509::CaCert;

/// Where this CA sits in its trust domain's hierarchy.
#[derive(Debug, Clone, Default)]
pub enum Hierarchy {
    /// Its own root, signing only its own intermediates (the default).
    #[default]
    Standalone,
    /// The trust domain's root: also certifies node CAs ([`crate::Authority::sign_node_ca`]), so
    /// its roots allow two CA levels below them (node CA, issuing CA).
    Root,
    /// A node: no root of its own; each intermediate (node CA) is certified by `upstream`
    /// and the bundle is the upstream's roots.
    Node(Arc<dyn Upstream>),
}

/// Whoever certifies a node's intermediates: for ferry, the trust domain's root reached by
/// TPM node attestation ([`crate::node_attest::client`]). Blocking: called from rotation,
/// which runs on the blocking pool.
pub trait Upstream: Send + Sync + std::fmt::Debug {
    /// Certifies `key` (named `key_name` in the CA's key store) as a node CA living at most
    /// `ttl`, and returns that certificate with the trust domain's current roots.
    fn certify(&self, key_name: &str, key: &Arc<dyn Signer>, ttl: Duration) -> Result<UpstreamCa>;
}

/// What an [`Upstream`] returns.
#[derive(Debug, Clone)]
pub struct UpstreamCa {
    /// The node CA certificate for the key that was certified.
    pub node_ca: CaCert,
    /// The trust domain's roots (the node's X.509 bundle).
    pub roots: Vec<CaCert>,
}
