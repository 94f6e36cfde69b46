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
use crate::peer::PeerInfo;
use crate::state::{Snapshot, SvidCache, SvidError};

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
    /// The peer facts of `req`'s connection (empty when the transport recorded none, which
    /// then attests as nobody).
    pub fn peer<T>(req: &tonic::Request<T>) -> PeerInfo {
        req.extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default()
    }

    /// Attests `peer` against `snap`'s registration entries, on the blocking pool (`/proc`
    /// reads, user/group lookups and executable hashing block). Call it again for each
    /// snapshot: entries decide what is looked up, and the connection's binding to its
    /// process is re-checked every time.
    pub async fn attest(&self, peer: &PeerInfo, snap: &Arc<Snapshot>) -> Result<Caller, Status> {
        let (p, s) = (peer.clone(), snap.clone());
        let res = tokio::task::spawn_blocking(move || attestor::attest(&p, &s.entries))
            .await
            .map_err(|e| Status::unavailable(format!("attestation task failed: {e}")))?;
        res.map_err(|e| attest_status(&e, peer))
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
            tracing::info!(path = ?caller.path, "no registration entry matches the caller");
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        Ok(v)
    }

    /// The caller's identities with current X.509-SVIDs, and when the first of them is due
    /// for rotation. Signing, when due, runs on the blocking pool.
    pub async fn grant(
        &self,
        snap: &Snapshot,
        caller: &Caller,
    ) -> Result<(Vec<Granted>, SystemTime), Status> {
        let entries = self.entries(snap, caller)?;
        let mut next = SystemTime::now() + Duration::from_secs(3600);
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let ttl = e.ttl.unwrap_or(snap.svid_ttl);
            let (svid, rotate_at) = self
                .cache
                .get(&self.authority, &e.spiffe_id, ttl)
                .await
                .map_err(|err| issue_status(&err, e))?;
            next = next.min(rotate_at);
            out.push(Granted {
                entry: e.clone(),
                svid,
            });
        }
        Ok((out, next))
    }
}

fn attest_status(e: &AttestError, peer: &PeerInfo) -> Status {
    tracing::warn!(error = %e, ?peer, "caller attestation failed");
    match e {
        AttestError::Unknown(_) | AttestError::Raced { .. } | AttestError::Unbound(_) => {
            Status::permission_denied(e.to_string())
        }
    }
}

fn issue_status(err: &SvidError, e: &RegistrationEntry) -> Status {
    tracing::error!(error = %err, id = %e.spiffe_id, "cannot issue X.509-SVID");
    Status::unavailable(format!("cannot issue X.509-SVID: {err}"))
}

/// The tokio instant of a wall-clock deadline (now if it has passed), plus a millisecond so
/// a wake-up never lands just before the deadline it waits for.
pub fn instant_of(t: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now()
        + t.duration_since(SystemTime::now()).unwrap_or_default()
        + Duration::from_millis(1)
}
