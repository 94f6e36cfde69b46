//! What the Workload API and SDS services share: the caller's attestation, the identities
//! its registration entries grant, and the SVIDs for them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use attest::{Authority, X509Svid};
use registry::config::RegistrationEntry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::attestor::{self, AttestError, Caller};
use crate::endpoint::PeerInfo;
use crate::state::{Snapshot, SvidCache};

/// The message a caller with no matching registration entry gets.
pub const NO_IDENTITY: &str = "no identity issued";

/// Shared by every service on the socket.
#[derive(Debug)]
pub struct Core {
    /// The CA.
    pub authority: Arc<Authority>,
    /// The current snapshot.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// X.509-SVIDs shared across streams.
    pub cache: SvidCache,
    /// Cancelled at shutdown: long-lived streams end so the server can stop.
    pub shutdown: CancellationToken,
}

/// One granted identity with its current X.509-SVID.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The registration entry.
    pub entry: RegistrationEntry,
    /// Its current SVID.
    pub svid: Arc<X509Svid>,
}

impl Core {
    /// Attests the caller of `req` from its connection's peer facts.
    pub fn caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let want_sha = self.snapshot.borrow().needs_sha256;
        attestor::attest(&peer, want_sha).map_err(|e| {
            tracing::warn!(error = %e, ?peer, "caller attestation failed");
            match e {
                AttestError::Unknown(_) | AttestError::Raced { .. } => {
                    Status::permission_denied(e.to_string())
                }
            }
        })
    }

    /// The entries whose selectors all match `caller`, in config order (the first is the
    /// default identity); `PermissionDenied` when there are none.
    pub fn entries<'a>(
        &self,
        snap: &'a Snapshot,
        caller: &Caller,
    ) -> Result<Vec<&'a RegistrationEntry>, Status> {
        let mut seen = std::collections::HashSet::new();
        let v: Vec<&RegistrationEntry> = snap
            .entries
            .iter()
            .filter(|e| caller.matches(&e.selectors))
            .filter(|e| seen.insert(e.spiffe_id.clone()))
            .collect();
        if v.is_empty() {
            tracing::info!(uid = caller.uid, pid = ?caller.pid, path = ?caller.path, "no registration entry matches the caller");
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        Ok(v)
    }

    /// The caller's identities with current X.509-SVIDs, and when the first of them is due
    /// for rotation.
    pub fn granted(
        &self,
        snap: &Snapshot,
        caller: &Caller,
    ) -> Result<(Vec<Granted>, SystemTime), Status> {
        let entries = self.entries(snap, caller)?;
        let mut next = SystemTime::now() + Duration::from_secs(3600);
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let ttl = e.ttl.unwrap_or(snap.svid_ttl);
            let (svid, rotate_at) =
                self.cache
                    .get(&self.authority, &e.spiffe_id, ttl)
                    .map_err(|err| {
                        tracing::error!(error = %err, id = %e.spiffe_id, "cannot issue X.509-SVID");
                        Status::unavailable(format!("cannot issue X.509-SVID: {err}"))
                    })?;
            next = next.min(rotate_at);
            out.push(Granted {
                entry: e.clone(),
                svid,
            });
        }
        Ok((out, next))
    }
}

/// The tokio instant of a wall-clock deadline (now if it has passed), plus a millisecond so
/// a wake-up never lands just before the deadline it waits for.
pub fn instant_of(t: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now()
        + t.duration_since(SystemTime::now()).unwrap_or_default()
        + Duration::from_millis(1)
}
