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
use registry::config::{Config, RegistrationEntry, Selector};
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
    /// True when some entry uses `unix:sha256:` (attestation then hashes executables).
    pub needs_sha256: bool,
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
        needs_sha256: agent
            .registration_entries
            .iter()
            .any(|e| e.selectors.iter().any(|s| matches!(s, Selector::Sha256(_)))),
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

/// X.509-SVIDs shared by every stream for the same identity, re-issued at half-life
/// (+/-10% jitter) or when the CA's issuing intermediate changes.
#[derive(Debug, Default)]
pub struct SvidCache {
    map: Mutex<HashMap<(SpiffeId, Duration), Cached>>,
}

impl SvidCache {
    /// The current SVID for `id` with lifetime `ttl`, issuing a new one when due; returns it
    /// with the instant it should next be rotated.
    pub fn get(
        &self,
        authority: &Authority,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(Arc<X509Svid>, SystemTime), attest::Error> {
        let now = SystemTime::now();
        let issuer = authority.active_issuer_serial();
        let key = (id.clone(), ttl);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key)
            && now < c.rotate_at
            && c.issuer == issuer
        {
            return Ok((c.svid.clone(), c.rotate_at));
        }
        let svid = Arc::new(authority.issue_x509_svid(id, ttl)?);
        let life = svid.not_after.duration_since(now).unwrap_or_default();
        let jitter: f64 = rand::random_range(0.9..1.1);
        let rotate_at = now + life.mul_f64(0.5 * jitter);
        tracing::debug!(%id, serial = %svid.serial, ?life, "issued X.509-SVID");
        // Identities no longer asked for (entry removed) must not pile up: drop expired ones.
        map.retain(|_, c| c.svid.not_after > now);
        map.insert(
            key,
            Cached {
                svid: svid.clone(),
                rotate_at,
                issuer,
            },
        );
        Ok((svid, rotate_at))
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
            let (_, at) = cache.get(&ca, &other, ttl).unwrap();
            let half = at.duration_since(now).unwrap().as_secs_f64();
            assert!(
                (445.0..=551.0).contains(&half),
                "rotation at {half} s of 1000 s"
            );
        }
        let (a, _) = cache.get(&ca, &id, ttl).unwrap();
        let (b, _) = cache.get(&ca, &id, ttl).unwrap();
        assert_eq!(a.serial, b.serial, "shared until rotation");
        // A CA rotation (new intermediate) invalidates it.
        ca.rotate(SystemTime::now() + Duration::from_secs(3000))
            .unwrap();
        ca.rotate(SystemTime::now() + Duration::from_secs(3400))
            .unwrap();
        let (c, _) = cache.get(&ca, &id, ttl).unwrap();
        assert_ne!(a.serial, c.serial);
    }
}
