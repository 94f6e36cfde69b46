//! The short-lived issuing CA between a slow CA key and the SVIDs.
//!
//! A TPM signs a few to a few dozen ECDSA signatures per second; a node with many
//! workloads rotating short SVIDs needs more. So by default the TPM-held intermediate (the
//! node CA) certifies an issuing CA whose software key exists only in this process's
//! memory (never on disk), and that key signs SVIDs: one TPM signature per issuing-CA
//! lifetime instead of one per SVID. Chains become leaf -> issuing CA -> node CA -> root.
//!
//! Invariants: the issuing CA is replaced when half its life has passed or when the
//! intermediate that certified it is no longer the active one, so every SVID gets at least
//! half an issuing lifetime and is always signed under the current intermediate. It is not
//! in any bundle (chains carry it), so, unlike roots, it needs no publication before use.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use registry::spiffe::TrustDomain;

use crate::error::Result;
use crate::signer::{Signer, SoftwareSigner};
use crate::x509::{self, CaKind, CaSigner};

/// How X.509-SVIDs are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuanceMode {
    /// The intermediate (with `ca.backend: tpm`, the TPM's node CA key) signs every SVID.
    Direct,
    /// The intermediate certifies an in-memory issuing CA living `ttl` that signs SVIDs.
    IssuingCa {
        /// Lifetime of each issuing CA (capped by the intermediate's).
        ttl: Duration,
    },
}

struct Current {
    parent_serial: String,
    signer: Arc<CaSigner>,
    chain: Vec<Vec<u8>>,
    renew_at: SystemTime,
}

/// The current issuing CA, replaced on demand.
pub(crate) struct IssuingLayer {
    ttl: Duration,
    current: Mutex<Option<Current>>,
}

impl std::fmt::Debug for IssuingLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingLayer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl IssuingLayer {
    /// The layer `mode` asks for, if any.
    pub(crate) fn for_mode(mode: IssuanceMode) -> Option<Self> {
        match mode {
            IssuanceMode::Direct => None,
            IssuanceMode::IssuingCa { ttl } => Some(Self {
                ttl,
                current: Mutex::new(None),
            }),
        }
    }

    /// The issuing CA to sign with at `now` under `parent`, and its chain up to the root
    /// (excluded). Builds a new one (one signature by `parent`, which blocks on a TPM) when
    /// the current one is past half its life or was certified by another intermediate.
    /// Concurrent callers wait for that one build rather than each building their own.
    pub(crate) fn issuer(
        &self,
        td: &TrustDomain,
        parent: &Arc<CaSigner>,
        now: SystemTime,
    ) -> Result<(Arc<CaSigner>, Vec<Vec<u8>>)> {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cur.as_ref()
            && c.parent_serial == parent.cert.serial
            && now < c.renew_at
        {
            return Ok((Arc::clone(&c.signer), c.chain.clone()));
        }
        let key: Arc<dyn Signer> = Arc::new(SoftwareSigner::generate()?);
        let cert = x509::build_ca(CaKind::Issuing, 0, td, &key, Some(parent), now, self.ttl)?;
        let life = cert
            .not_after
            .duration_since(now)
            .unwrap_or_default()
            .max(Duration::from_secs(2));
        let renew_at = now + life / 2;
        tracing::info!(serial = %cert.serial, parent = %parent.cert.serial, ttl = ?life, "new in-memory issuing CA");
        let chain = vec![cert.der.clone(), parent.cert.der.clone()];
        let signer = Arc::new(CaSigner::new(cert, key)?);
        *cur = Some(Current {
            parent_serial: parent.cert.serial.clone(),
            signer: Arc::clone(&signer),
            chain: chain.clone(),
            renew_at,
        });
        Ok((signer, chain))
    }
}
