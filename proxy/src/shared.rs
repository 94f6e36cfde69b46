//! What every connection task reads: configuration, identity, metrics, outlier state,
//! and the tokens that stop accepting and force-close after the drain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::Outliers;
use crate::config::ProxyConfig;
use crate::identity::Identity;
use crate::metadata::{Env, MetadataSettings, own_metadata};
use crate::metrics::Metrics;
use crate::mx;

/// Shared by all listeners and connections of one proxy.
#[derive(Debug)]
pub struct Shared {
    /// What runs.
    pub config: ProxyConfig,
    /// SVIDs and bundles from the Workload API.
    pub identity: Identity,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Endpoint health, shared by every connection.
    pub outliers: Outliers,
    /// Cancelled when the drain time is over: open connections close.
    pub force_close: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Outbound connection slots.
    pub outbound_slots: Arc<Semaphore>,
    /// Inbound connection slots.
    pub inbound_slots: Arc<Semaphore>,
    own_frame: OwnFrame,
    next_id: AtomicU64,
}

impl Shared {
    /// Builds the shared state.
    pub fn new(
        config: ProxyConfig,
        identity: Identity,
        metrics: Arc<Metrics>,
        outliers: Outliers,
        metadata: MetadataSettings,
        env: Box<dyn Env + Send + Sync>,
    ) -> Self {
        let max = config.limits.max_connections;
        Shared {
            config,
            identity,
            metrics,
            outliers,
            force_close: CancellationToken::new(),
            tracker: TaskTracker::new(),
            outbound_slots: Arc::new(Semaphore::new(max)),
            inbound_slots: Arc::new(Semaphore::new(max)),
            own_frame: OwnFrame {
                settings: metadata,
                env,
                cached: Mutex::new(None),
            },
            next_id: AtomicU64::new(1),
        }
    }

    /// A fresh connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// ferry's metadata-exchange frame for the current SVID (rebuilt only when the SPIFFE
    /// ID changes, so connections share one buffer).
    pub fn own_frame(&self) -> Arc<[u8]> {
        self.own_frame.get(&self.identity)
    }
}

struct OwnFrame {
    settings: MetadataSettings,
    env: Box<dyn Env + Send + Sync>,
    cached: Mutex<Option<(String, Arc<[u8]>)>>,
}

impl std::fmt::Debug for OwnFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnFrame")
            .field("settings", &self.settings)
            .finish()
    }
}

impl OwnFrame {
    fn get(&self, identity: &Identity) -> Arc<[u8]> {
        let id = identity.spiffe_id().unwrap_or_default();
        let mut cached = match self.cached.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((cached_id, frame)) = cached.as_ref()
            && *cached_id == id
        {
            return frame.clone();
        }
        let meta = own_metadata(&self.settings, &id, self.env.as_ref());
        let frame: Arc<[u8]> = mx::encode_frame(&meta).into();
        *cached = Some((id, frame.clone()));
        frame
    }
}
