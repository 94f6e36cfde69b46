//! What every stream reads: one [`Snapshot`] (registration entries, own and federated
//! bundles) kept current by a single task, plus the shared X.509-SVID cache. Streams wait
//! on the snapshot's watch channel, so registration, CA and bundle-file changes reach them
//! all at once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use attest::{Authority, JwtBundle, X509Svid};
use base64::Engine;
use registry::bundle::BundleFormat;
use registry::config::{Config, RegistrationEntry};
use registry::file_watch::FileWatch;
use registry::spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// One trust domain's published keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    /// X.509 authorities, DER.
    pub x509: Vec<Vec<u8>>,
    /// JWT authorities.
    pub jwt: JwtBundle,
}

/// Everything a response is built from, at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Our trust domain.
    pub trust_domain: TrustDomain,
    /// Registration entries, in config order (the first match is the default SVID).
    pub entries: Vec<RegistrationEntry>,
    /// Default X.509-SVID lifetime.
    pub svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub jwt_svid_ttl: Duration,
    /// Our own bundle.
    pub own: Bundle,
    /// Federated trust domains' bundles (from `trustBundles` files).
    pub federated: BTreeMap<TrustDomain, Bundle>,
    /// Serial of the CA intermediate signing SVIDs now: when it changes (CA rotation),
    /// every stream re-issues and pushes even if the bundle did not change.
    pub issuer: Option<String>,
}

impl Snapshot {
    /// Every bundle, own first, keyed by trust domain.
    pub fn all_bundles(&self) -> BTreeMap<TrustDomain, &Bundle> {
        let mut m: BTreeMap<TrustDomain, &Bundle> =
            self.federated.iter().map(|(k, v)| (k.clone(), v)).collect();
        m.insert(self.trust_domain.clone(), &self.own);
        m
    }

    /// JWT bundles of every trust domain (for validation).
    pub fn jwt_bundles(&self) -> BTreeMap<TrustDomain, JwtBundle> {
        self.all_bundles()
            .into_iter()
            .map(|(k, v)| (k, v.jwt.clone()))
            .collect()
    }
}

/// Builds the snapshot for `config`. A federated bundle that cannot be read or parsed now
/// (a transient `EMFILE`, a half-written file) keeps its value from `prev`: a trust domain
/// is never dropped, nor flapped, by a failed read; it only disappears when the config
/// stops naming it. Blocking (reads files): runs on the blocking pool.
fn build(config: &Config, authority: &Authority, prev: Option<&Snapshot>) -> Snapshot {
    let agent = &config.agent;
    let mut federated = BTreeMap::new();
    for (td, src) in &agent.trust_bundles {
        if *td == agent.trust_domain {
            continue;
        }
        match load_bundle(td, &src.file) {
            Ok(b) => {
                federated.insert(td.clone(), b);
            }
            Err(e) => match prev.and_then(|p| p.federated.get(td)) {
                Some(last) => {
                    tracing::warn!(error = %e, "federated bundle unreadable; keeping its last good value");
                    federated.insert(td.clone(), last.clone());
                }
                None => tracing::warn!(error = %e, "federated bundle not loaded; keeping it out"),
            },
        }
    }
    Snapshot {
        trust_domain: agent.trust_domain.clone(),
        entries: agent.registration_entries.clone(),
        svid_ttl: agent.ca.svid_ttl,
        jwt_svid_ttl: agent.ca.jwt_svid_ttl,
        own: Bundle {
            x509: authority.x509_authorities(),
            jwt: authority.jwt_bundle(),
        },
        federated,
        issuer: authority.active_issuer_serial(),
    }
}

/// Reads a bundle file: PEM certificates, or a SPIFFE bundle (JWKS whose `x509-svid` keys
/// carry `x5c` and whose `jwt-svid` keys verify JWTs).
pub fn load_bundle(td: &TrustDomain, path: &std::path::Path) -> Result<Bundle, Error> {
    let err = |reason: String| Error::Bundle {
        trust_domain: td.to_string(),
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if registry::bundle::detect(&bytes).map_err(|e| err(e.to_string()))? == BundleFormat::Pem {
        let x509 = attest::x509::pem_decode_all(&String::from_utf8_lossy(&bytes), "CERTIFICATE");
        if x509.is_empty() {
            return Err(err("no parseable CERTIFICATE block".to_owned()));
        }
        return Ok(Bundle {
            x509,
            jwt: JwtBundle::default(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let mut x509 = Vec::new();
    for k in v
        .get("keys")
        .and_then(|k| k.as_array())
        .into_iter()
        .flatten()
    {
        if k.get("use").and_then(|u| u.as_str()) == Some("x509-svid") {
            for c in k
                .get("x5c")
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(der) = c
                    .as_str()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                {
                    x509.push(der);
                }
            }
        }
    }
    let jwt = JwtBundle::from_jwks(&bytes).map_err(|e| err(e.to_string()))?;
    Ok(Bundle { x509, jwt })
}

/// Starts the task that keeps the snapshot current: it rebuilds on a config change, a CA
/// change (rotation) or a change of content of any federated bundle file (a reader's open
/// is not a change: see [`FileWatch`]). File reads run on the blocking pool.
pub fn start(
    mut config: watch::Receiver<Arc<Config>>,
    authority: Arc<Authority>,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<Snapshot>> {
    let first = build(&config.borrow_and_update(), &authority, None);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut ca = authority.subscribe();
        let mut files: Option<FileWatch> = None;
        loop {
            let cfg = config.borrow_and_update().clone();
            let prev = tx.borrow().clone();
            let watching: Vec<PathBuf> = files
                .as_ref()
                .map(|f| f.files().map(PathBuf::from).collect())
                .unwrap_or_default();
            let (auth, old) = (authority.clone(), files.take());
            let Ok((snap, watch)) = tokio::task::spawn_blocking(move || {
                // Watch first, then read: an edit between the two is still seen.
                let wanted = bundle_files(&cfg);
                let watch = if wanted == watching {
                    old
                } else {
                    FileWatch::new(wanted)
                        .inspect_err(|e| tracing::warn!(error = %e, "cannot watch trust bundle files; changes need a config reload"))
                        .ok()
                };
                (build(&cfg, &auth, Some(&prev)), watch)
            })
            .await
            else {
                break;
            };
            files = watch;
            tx.send_if_modified(|cur| {
                if **cur == snap {
                    false
                } else {
                    *cur = Arc::new(snap);
                    true
                }
            });
            let bundle_change = async {
                match files.as_mut() {
                    Some(f) => f.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = config.changed() => if r.is_err() { break },
                r = ca.changed() => if r.is_err() { break },
                Some(_) = bundle_change => {}
            }
        }
    });
    rx
}

/// The federated bundle files a config names, sorted and deduplicated.
fn bundle_files(config: &Config) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = config
        .agent
        .trust_bundles
        .iter()
        .filter(|(td, _)| **td != config.agent.trust_domain)
        .map(|(_, b)| b.file.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

#[derive(Debug, Clone)]
struct Cached {
    svid: Arc<X509Svid>,
    rotate_at: SystemTime,
    issuer: Option<String>,
}

impl Cached {
    fn new(svid: X509Svid, issuer: Option<String>, now: SystemTime) -> Self {
        let life = svid.not_after.duration_since(now).unwrap_or_default();
        let jitter: f64 = rand::random_range(0.9..1.1);
        tracing::debug!(id = %svid.spiffe_id, serial = %svid.serial, ?life, "issued X.509-SVID");
        Cached {
            svid: Arc::new(svid),
            rotate_at: now + life.mul_f64(0.5 * jitter),
            issuer,
        }
    }

    /// The SVID while it is not due for rotation and its issuer is still the active one.
    fn fresh(
        &self,
        now: SystemTime,
        issuer: &Option<String>,
    ) -> Option<(Arc<X509Svid>, SystemTime)> {
        (now < self.rotate_at && self.issuer == *issuer)
            .then(|| (self.svid.clone(), self.rotate_at))
    }
}

/// Why the cache could not hand out an X.509-SVID.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The CA refused or failed to sign.
    #[error(transparent)]
    Issue(#[from] attest::Error),
    /// The blocking task that signs panicked or was cancelled (shutdown).
    #[error("X.509-SVID signing task did not complete: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One identity's current SVID. Its async lock is held across signing, so concurrent
/// misses for the same identity wait for one signature instead of each making one.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// X.509-SVIDs shared by every stream for the same identity, re-issued at half-life
/// (+/-10% jitter) or when the CA's issuing intermediate changes. The map's std lock is
/// only held to find a slot: signing (tens of ms with a TPM) never blocks other identities.
#[derive(Debug, Default)]
pub struct SvidCache {
    map: Mutex<HashMap<(SpiffeId, Duration), Slot>>,
}

impl SvidCache {
    fn slot(&self, id: &SpiffeId, ttl: Duration) -> Slot {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((id.clone(), ttl)).or_default().clone()
    }

    /// Identities no longer asked for (entry removed) must not pile up: drops expired ones
    /// nobody is using.
    fn sweep(&self, now: SystemTime) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, slot| match slot.try_lock() {
            Ok(c) => c.as_ref().is_some_and(|c| c.svid.not_after > now),
            Err(_) => true, // being signed right now
        });
    }

    /// The current SVID for `id` with lifetime `ttl`, issuing a new one (on the blocking
    /// pool) when due; returns it with the instant it should next be rotated.
    pub async fn get(
        &self,
        authority: &Arc<Authority>,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Arc<X509Svid>, SystemTime), SvidError> {
        let slot = self.slot(id, ttl);
        let mut cur = slot.lock().await;
        let now = SystemTime::now();
        let issuer = authority.active_issuer_serial();
        if let Some(hit) = cur.as_ref().and_then(|c| c.fresh(now, &issuer)) {
            return Ok(hit);
        }
        let (ca, sid) = (authority.clone(), id.clone());
        let svid = tokio::task::spawn_blocking(move || ca.issue_x509_svid(&sid, ttl)).await??;
        let c = Cached::new(svid, issuer, now);
        let out = (c.svid.clone(), c.rotate_at);
        *cur = Some(c);
        drop(cur);
        self.sweep(now);
        Ok(out)
    }

    /// Like [`SvidCache::get`] for callers off the async runtime (or not yet async): signs
    /// on the calling thread, without holding any lock meanwhile.
    pub fn get_blocking(
        &self,
        authority: &Authority,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Arc<X509Svid>, SystemTime), SvidError> {
        let slot = self.slot(id, ttl);
        let now = SystemTime::now();
        let issuer = authority.active_issuer_serial();
        if let Ok(cur) = slot.try_lock()
            && let Some(hit) = cur.as_ref().and_then(|c| c.fresh(now, &issuer))
        {
            return Ok(hit);
        }
        let c = Cached::new(authority.issue_x509_svid(id, ttl)?, issuer, now);
        let out = (c.svid.clone(), c.rotate_at);
        if let Ok(mut cur) = slot.try_lock() {
            *cur = Some(c);
        }
        self.sweep(now);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svids_are_shared_until_half_life_with_jitter() {
        let d = tempfile::tempdir().unwrap();
        let ca = Authority::open(
            attest::AuthorityConfig {
                trust_domain: TrustDomain::parse("example.org").unwrap(),
                state_dir: d.path().to_owned(),
                root_ttl: Duration::from_secs(36000),
                ca_ttl: Duration::from_secs(3600),
            },
            Arc::new(attest::SoftwareKeyStore::new(d.path().join("keys"))),
        )
        .unwrap();
        let cache = SvidCache::default();
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let ttl = Duration::from_secs(1000);
        for _ in 0..20 {
            let other = SpiffeId::parse(&format!("spiffe://example.org/{}", rand::random::<u32>()))
                .unwrap();
            let now = SystemTime::now();
            let (_, at) = cache.get_blocking(&ca, &other, ttl).unwrap();
            let half = at.duration_since(now).unwrap().as_secs_f64();
            assert!(
                (445.0..=551.0).contains(&half),
                "rotation at {half} s of 1000 s"
            );
        }
        let (a, _) = cache.get_blocking(&ca, &id, ttl).unwrap();
        let (b, _) = cache.get_blocking(&ca, &id, ttl).unwrap();
        assert_eq!(a.serial, b.serial, "shared until rotation");
        // A CA rotation (new intermediate) invalidates it.
        ca.rotate(SystemTime::now() + Duration::from_secs(3000))
            .unwrap();
        ca.rotate(SystemTime::now() + Duration::from_secs(3400))
            .unwrap();
        let (c, _) = cache.get_blocking(&ca, &id, ttl).unwrap();
        assert_ne!(a.serial, c.serial);
    }

    /// A key store whose signers take `delay` ms per signature (a TPM takes tens of ms)
    /// and count them.
    #[derive(Debug)]
    struct SlowKeys {
        inner: attest::SoftwareKeyStore,
        delay_ms: Arc<std::sync::atomic::AtomicU64>,
        signs: Arc<std::sync::atomic::AtomicU64>,
    }

    #[derive(Debug)]
    struct SlowSigner {
        inner: Arc<dyn attest::Signer>,
        delay_ms: Arc<std::sync::atomic::AtomicU64>,
        signs: Arc<std::sync::atomic::AtomicU64>,
    }

    impl attest::Signer for SlowSigner {
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            self.inner.algorithm()
        }
        fn public_key_raw(&self) -> &[u8] {
            self.inner.public_key_raw()
        }
        fn sign(&self, msg: &[u8]) -> attest::Result<Vec<u8>> {
            use std::sync::atomic::Ordering::Relaxed;
            self.signs.fetch_add(1, Relaxed);
            std::thread::sleep(Duration::from_millis(self.delay_ms.load(Relaxed)));
            self.inner.sign(msg)
        }
    }

    impl SlowKeys {
        fn wrap(&self, s: Arc<dyn attest::Signer>) -> Arc<dyn attest::Signer> {
            Arc::new(SlowSigner {
                inner: s,
                delay_ms: self.delay_ms.clone(),
                signs: self.signs.clone(),
            })
        }
    }

    impl attest::KeyStore for SlowKeys {
        fn generate(&self, name: &str) -> attest::Result<Arc<dyn attest::Signer>> {
            self.inner.generate(name).map(|s| self.wrap(s))
        }
        fn load(&self, name: &str) -> attest::Result<Arc<dyn attest::Signer>> {
            self.inner.load(name).map(|s| self.wrap(s))
        }
        fn remove(&self, name: &str) -> attest::Result<()> {
            self.inner.remove(name)
        }
    }

    fn slow_ca(
        dir: &std::path::Path,
    ) -> (
        Arc<Authority>,
        Arc<std::sync::atomic::AtomicU64>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let signs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ca = Authority::open(
            attest::AuthorityConfig {
                trust_domain: TrustDomain::parse("example.org").unwrap(),
                state_dir: dir.to_owned(),
                root_ttl: Duration::from_secs(36000),
                ca_ttl: Duration::from_secs(3600),
            },
            Arc::new(SlowKeys {
                inner: attest::SoftwareKeyStore::new(dir.join("keys")),
                delay_ms: delay_ms.clone(),
                signs: signs.clone(),
            }),
        )
        .unwrap();
        (ca, delay_ms, signs)
    }

    /// Issue 9 (3): a slow signature for one identity must not hold up a cache hit for
    /// another (the old cache signed under its std Mutex).
    #[test]
    fn a_slow_signature_does_not_block_other_identities() {
        use std::sync::atomic::Ordering::Relaxed;
        let d = tempfile::tempdir().unwrap();
        let (ca, delay_ms, _) = slow_ca(d.path());
        let cache = Arc::new(SvidCache::default());
        let ttl = Duration::from_secs(1000);
        let hot = SpiffeId::parse("spiffe://example.org/hot").unwrap();
        let cold = SpiffeId::parse("spiffe://example.org/cold").unwrap();
        cache.get_blocking(&ca, &hot, ttl).unwrap();
        delay_ms.store(1500, Relaxed);
        let signing = {
            let (cache, ca) = (cache.clone(), ca.clone());
            std::thread::spawn(move || cache.get_blocking(&ca, &cold, ttl).map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(200)); // the cold signature is under way
        let t = std::time::Instant::now();
        cache.get_blocking(&ca, &hot, ttl).unwrap();
        let waited = t.elapsed();
        signing.join().unwrap().unwrap();
        assert!(
            waited < Duration::from_millis(500),
            "a cached SVID waited {waited:?} for another identity's signature"
        );
    }

    /// Concurrent misses for one identity sign once, on the blocking pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_sign_once() {
        use std::sync::atomic::Ordering::Relaxed;
        let d = tempfile::tempdir().unwrap();
        let (ca, delay_ms, signs) = slow_ca(d.path());
        delay_ms.store(100, Relaxed);
        let before = signs.load(Relaxed);
        let cache = Arc::new(SvidCache::default());
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let ttl = Duration::from_secs(1000);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cache, ca, id) = (cache.clone(), ca.clone(), id.clone());
                tokio::spawn(async move {
                    cache
                        .get(&ca, &id, ttl)
                        .await
                        .map(|(s, _)| s.serial.clone())
                })
            })
            .collect();
        let mut serials = std::collections::HashSet::new();
        for t in tasks {
            serials.insert(t.await.unwrap().unwrap());
        }
        assert_eq!(serials.len(), 1, "one SVID shared by all");
        assert_eq!(
            signs.load(Relaxed) - before,
            1,
            "one signature for eight misses"
        );
    }
}
