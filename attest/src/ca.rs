//! The trust domain's CA: a self-signed root, an issuing intermediate and JWT signing keys,
//! each rotated SPIRE-style (the next one is prepared and published at 1/2 of the current
//! one's lifetime, and takes over at 5/6), persisted under `ca.stateDir` so that bundles and
//! identities survive a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use registry::spiffe::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
pub use crate::hierarchy::{Hierarchy, Upstream, UpstreamCa};
use crate::issuing::{IssuanceMode, IssuingLayer};
use crate::jwt::{self, JwtBundle, JwtKey, JwtSvid};
use crate::private_dir::{PrivateDir, Secrecy};
use crate::signer::{KeyStore, Signer, SoftwareKeyStore};
use crate::x509::{self, CaCert, CaKind, CaSigner, X509Svid};

/// The state file's name inside `ca.stateDir`.
pub const STATE_FILE: &str = "ca-state.json";
/// The root lives this many times longer than an intermediate (`ca.caTtl`).
pub const ROOT_TTL_FACTOR: u32 = 10;

/// What the CA needs to know. The agent's wiring builds it from its config; the CA itself
/// does not read config files.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityConfig {
    /// The trust domain every certificate is for.
    pub trust_domain: TrustDomain,
    /// Where certificates and key files are kept.
    pub state_dir: PathBuf,
    /// Lifetime of the root.
    pub root_ttl: Duration,
    /// Lifetime of intermediates and of JWT signing keys.
    pub ca_ttl: Duration,
}

impl AuthorityConfig {
    /// Settings for `trust_domain` with state in `state_dir`: intermediates and JWT keys live
    /// `ca_ttl` (SPIRE's `ca_ttl`), the root [`ROOT_TTL_FACTOR`] times as long.
    pub fn new(trust_domain: TrustDomain, state_dir: PathBuf, ca_ttl: Duration) -> Self {
        Self {
            trust_domain,
            state_dir,
            root_ttl: ca_ttl * ROOT_TTL_FACTOR,
            ca_ttl,
        }
    }

    /// The software key store of this state dir (`<stateDir>/keys`).
    pub fn software_keys(&self) -> Arc<dyn KeyStore> {
        Arc::new(SoftwareKeyStore::new(self.state_dir.join("keys")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    /// Published in bundles, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Published until it expires, no longer signing.
    Retired,
}

/// One generation of a rotating key: its window, status and what it signs as.
#[derive(Debug, Clone)]
struct Gen<T> {
    key: String,
    status: Status,
    not_before: SystemTime,
    not_after: SystemTime,
    v: T,
}

impl<T> Gen<T> {
    fn at(&self, num: u32, den: u32) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * num / den
    }
}

/// One step of SPIRE's schedule over a list of generations. Returns (changed, keys to delete).
fn step<T>(
    list: &mut Vec<Gen<T>>,
    now: SystemTime,
    mut make: impl FnMut(Status) -> Result<Gen<T>>,
) -> Result<(bool, Vec<String>)> {
    let mut removed = Vec::new();
    list.retain(|g| {
        let keep = g.not_after > now;
        if !keep {
            removed.push(g.key.clone());
        }
        keep
    });
    let mut changed = !removed.is_empty();
    let prepared = list.iter().position(|g| g.status == Status::Prepared);
    match list.iter().position(|g| g.status == Status::Active) {
        None => {
            match prepared {
                Some(p) => list[p].status = Status::Active,
                None => list.push(make(Status::Active)?),
            }
            changed = true;
        }
        Some(a) if now >= list[a].at(5, 6) => {
            list[a].status = Status::Retired;
            match prepared {
                Some(p) => list[p].status = Status::Active,
                // Missed the preparation window (e.g. the agent was down): rotate at once.
                None => list.push(make(Status::Active)?),
            }
            changed = true;
        }
        Some(a) if now >= list[a].at(1, 2) && prepared.is_none() => {
            list.push(make(Status::Prepared)?);
            changed = true;
        }
        Some(_) => {}
    }
    Ok((changed, removed))
}

fn next_event<T>(list: &[Gen<T>]) -> Option<SystemTime> {
    let prepared = list.iter().any(|g| g.status == Status::Prepared);
    list.iter()
        .map(|g| match g.status {
            Status::Active if prepared => g.at(5, 6).min(g.not_after),
            Status::Active => g.at(1, 2),
            _ => g.not_after,
        })
        .min()
}

#[derive(Debug, Default, Clone)]
struct State {
    roots: Vec<Gen<Arc<CaSigner>>>,
    intermediates: Vec<Gen<Arc<CaSigner>>>,
    jwt: Vec<Gen<JwtKey>>,
    /// With [`Hierarchy::Node`]: the roots the upstream returned with the node CA.
    upstream_roots: Vec<CaCert>,
}

/// The trust domain's certificate authority. Cheap to share (`Arc`). Issuance takes the
/// read lock only to clone an `Arc` and signs after releasing it; rotation prepares the next
/// state (key generation, signing, file writes) holding no lock readers need, then takes the
/// write lock only to swap it in.
#[derive(Debug)]
pub struct Authority {
    cfg: AuthorityConfig,
    keys: Arc<dyn KeyStore>,
    state: RwLock<State>,
    /// Serialises rotations (one writer of `state`); readers never take it.
    rotating: Mutex<()>,
    changes: watch::Sender<u64>,
    /// With [`IssuanceMode::IssuingCa`]: the in-memory issuing CA below the intermediate.
    issuing: Option<IssuingLayer>,
    hierarchy: Hierarchy,
}

/// Persisted form of the CA (no secrets: keys are in the key store).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Persisted {
    version: u32,
    trust_domain: String,
    roots: Vec<PersistedCa>,
    intermediates: Vec<PersistedCa>,
    jwt_keys: Vec<PersistedJwt>,
    /// A node's upstream roots (PEM); absent for a CA that is its own root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    upstream_roots: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PersistedCa {
    key: String,
    status: Status,
    cert_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PersistedJwt {
    key: String,
    status: Status,
    kid: String,
    not_before: u64,
    not_after: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn key_name(prefix: &str) -> String {
    let r: [u8; 8] = rand::random();
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

impl Authority {
    /// Loads the CA from `cfg.state_dir`, or creates a new root when there is none, then
    /// applies any rotation that fell due while the agent was down, and logs the SHA-256
    /// fingerprint of every published root.
    ///
    /// Refuses state another local user could have planted, swapped or read
    /// ([`Error::InsecureState`]: wrong owner, writable by group/other, key readable by
    /// group/other, symlinks) and keys that are not their certificate's
    /// ([`Error::KeyMismatch`]). Blocking: call it before the servers start or from
    /// `spawn_blocking`.
    pub fn open(cfg: AuthorityConfig, keys: Arc<dyn KeyStore>) -> Result<Arc<Self>> {
        Self::open_with_mode(cfg, keys, IssuanceMode::Direct)
    }

    /// [`open`](Self::open), choosing how SVIDs are signed: by the intermediate itself, or
    /// (for a slow key such as a TPM's) by a short-lived in-memory issuing CA that the
    /// intermediate certifies. Use one mode per `ca.stateDir`: the CA levels a root allows
    /// below it are fixed when the root is created.
    pub fn open_with_mode(
        cfg: AuthorityConfig,
        keys: Arc<dyn KeyStore>,
        mode: IssuanceMode,
    ) -> Result<Arc<Self>> {
        Self::open_in(cfg, keys, mode, Hierarchy::Standalone)
    }

    /// [`open_with_mode`](Self::open_with_mode) at a given place in the trust domain's
    /// hierarchy. A node ([`Hierarchy::Node`]) certifies its first intermediate through its
    /// upstream here, so this fails when the upstream refuses or cannot be reached.
    pub fn open_in(
        cfg: AuthorityConfig,
        keys: Arc<dyn KeyStore>,
        mode: IssuanceMode,
        hierarchy: Hierarchy,
    ) -> Result<Arc<Self>> {
        let state = Self::load(&cfg, keys.as_ref())?;
        if matches!(hierarchy, Hierarchy::Node(_)) && !state.roots.is_empty() {
            return Err(Error::CorruptState {
                path: cfg.state_dir.join(STATE_FILE),
                reason: "it holds a root CA of its own, but ca.role: node takes its roots from the upstream (use a fresh ca.stateDir for a node)".into(),
            });
        }
        let created = state.roots.is_empty() && state.intermediates.is_empty();
        let auth = Arc::new(Self {
            cfg,
            keys,
            state: RwLock::new(state),
            rotating: Mutex::new(()),
            changes: watch::channel(0).0,
            issuing: IssuingLayer::for_mode(mode),
            hierarchy,
        });
        auth.rotate(SystemTime::now())?;
        if created && matches!(auth.hierarchy, Hierarchy::Node(_)) {
            tracing::info!(trust_domain = %auth.cfg.trust_domain, dir = %auth.cfg.state_dir.display(), "node CA certified by the upstream after TPM attestation");
        } else if created {
            tracing::info!(trust_domain = %auth.cfg.trust_domain, dir = %auth.cfg.state_dir.display(), "created a new trust domain root CA");
        } else {
            tracing::info!(trust_domain = %auth.cfg.trust_domain, dir = %auth.cfg.state_dir.display(), "loaded CA state");
        }
        // Operators compare this with the fingerprint of the root they distributed.
        for g in &auth.read().roots {
            tracing::info!(
                trust_domain = %auth.cfg.trust_domain,
                sha256 = %g.v.cert.sha256_fingerprint(),
                serial = %g.v.cert.serial,
                status = ?g.status,
                "root CA certificate"
            );
        }
        Ok(auth)
    }

    /// The trust domain this CA issues in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn state_path(&self) -> PathBuf {
        self.cfg.state_dir.join(STATE_FILE)
    }

    fn load(cfg: &AuthorityConfig, keys: &dyn KeyStore) -> Result<State> {
        let dir = PrivateDir::open_or_create(&cfg.state_dir)?;
        let path = dir.path_of(STATE_FILE);
        let Some(text) = dir.read(STATE_FILE, Secrecy::Public)? else {
            return Ok(State::default());
        };
        let corrupt = |reason: String| Error::CorruptState {
            path: path.clone(),
            reason,
        };
        let p: Persisted = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if p.version != 1 {
            return Err(corrupt(format!("unknown version {}", p.version)));
        }
        if p.trust_domain != cfg.trust_domain.as_str() {
            return Err(Error::TrustDomainMismatch {
                path: cfg.state_dir.clone(),
                stored: p.trust_domain,
                configured: cfg.trust_domain.to_string(),
            });
        }
        // A key that is not its certificate's would sign SVIDs and tokens that fail against
        // this CA's own bundle: refuse it here, naming both files.
        let mismatch = |what: &'static str, serial: &str, key: &str| Error::KeyMismatch {
            what,
            serial: serial.to_owned(),
            key: keys.describe(key),
            state: path.clone(),
        };
        let ca = |what: &'static str, list: Vec<PersistedCa>| -> Result<Vec<Gen<Arc<CaSigner>>>> {
            list.into_iter()
                .map(|c| {
                    let cert = CaCert::from_pem(&c.cert_pem)?;
                    let signer = keys.load(&c.key)?;
                    if cert.public_key_raw()? != signer.public_key_raw() {
                        return Err(mismatch(what, &cert.serial, &c.key));
                    }
                    Ok(Gen {
                        status: c.status,
                        not_before: cert.not_before,
                        not_after: cert.not_after,
                        v: Arc::new(CaSigner::new(cert, signer)?),
                        key: c.key,
                    })
                })
                .collect()
        };
        let jwt = p
            .jwt_keys
            .into_iter()
            .map(|j| {
                let nb = UNIX_EPOCH + Duration::from_secs(j.not_before);
                let na = UNIX_EPOCH + Duration::from_secs(j.not_after);
                let signer = keys.load(&j.key)?;
                if jwt::kid_for(signer.public_key_raw()) != j.kid {
                    return Err(mismatch("JWT", &j.kid, &j.key));
                }
                Ok(Gen {
                    v: JwtKey {
                        kid: j.kid,
                        signer,
                        not_before: nb,
                        not_after: na,
                    },
                    key: j.key,
                    status: j.status,
                    not_before: nb,
                    not_after: na,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let upstream_roots = p
            .upstream_roots
            .iter()
            .map(|pem| CaCert::from_pem(pem))
            .collect::<Result<Vec<_>>>()?;
        Ok(State {
            roots: ca("root", p.roots)?,
            intermediates: ca("intermediate", p.intermediates)?,
            jwt,
            upstream_roots,
        })
    }

    fn persist(&self, st: &State) -> Result<()> {
        let ca = |list: &[Gen<Arc<CaSigner>>]| {
            list.iter()
                .map(|g| PersistedCa {
                    key: g.key.clone(),
                    status: g.status,
                    cert_pem: g.v.cert.pem(),
                })
                .collect()
        };
        let p = Persisted {
            version: 1,
            trust_domain: self.cfg.trust_domain.to_string(),
            roots: ca(&st.roots),
            intermediates: ca(&st.intermediates),
            jwt_keys: st
                .jwt
                .iter()
                .map(|g| PersistedJwt {
                    key: g.key.clone(),
                    status: g.status,
                    kid: g.v.kid.clone(),
                    not_before: unix(g.not_before),
                    not_after: unix(g.not_after),
                })
                .collect(),
            upstream_roots: st.upstream_roots.iter().map(CaCert::pem).collect(),
        };
        let json = serde_json::to_vec_pretty(&p).map_err(|e| Error::CorruptState {
            path: self.state_path(),
            reason: e.to_string(),
        })?;
        PrivateDir::open_or_create(&self.cfg.state_dir)?.write(STATE_FILE, &json)
    }

    /// Applies every rotation step due at `now` (create, prepare, activate, drop expired),
    /// persists, and notifies subscribers. Returns whether anything changed.
    ///
    /// Blocking (key generation, signing, file writes): async callers use
    /// `spawn_blocking`, as [`run`](Self::run) does. The next state is built on a copy while
    /// readers keep issuing from the current one; the write lock is held only to swap it in.
    pub fn rotate(&self, now: SystemTime) -> Result<bool> {
        let _one_writer = self.rotating.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = self.read().clone();
        let mut created = Vec::new();
        let planned = self
            .prepare(&mut next, now, &mut created)
            .and_then(|(changed, removed)| {
                if changed {
                    self.persist(&next)?;
                }
                Ok((changed, removed))
            });
        let (changed, removed) = match planned {
            Ok(p) => p,
            Err(e) => {
                // Keys made for a state that was never saved would be orphans.
                for k in &created {
                    if let Err(e) = self.keys.remove(k) {
                        tracing::warn!(key = %k, error = %e, "cannot delete unused CA key");
                    }
                }
                return Err(e);
            }
        };
        if !changed {
            return Ok(false);
        }
        *self.write() = next;
        for k in &removed {
            if let Err(e) = self.keys.remove(k) {
                tracing::warn!(key = %k, error = %e, "cannot delete expired CA key");
            }
        }
        self.changes.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Steps every list of `st` to `now`, generating and certifying new keys as needed.
    /// Holds no lock; names every key it generates in `created`. Returns (changed, keys of
    /// expired generations to delete once the new state is saved).
    fn prepare(
        &self,
        st: &mut State,
        now: SystemTime,
        created: &mut Vec<String>,
    ) -> Result<(bool, Vec<String>)> {
        let td = &self.cfg.trust_domain;
        let keys = &self.keys;
        let State {
            roots,
            intermediates,
            jwt,
            upstream_roots,
        } = st;
        let mut generate = |prefix: &str| -> Result<(String, Arc<dyn Signer>)> {
            let key = key_name(prefix);
            let signer = keys.generate(&key)?;
            created.push(key.clone());
            Ok((key, signer))
        };

        // An issuing CA below the intermediate adds one CA level to every chain; a trust
        // domain root also allows node CAs with their issuing CAs below it.
        let extra = u8::from(self.issuing.is_some());
        let root_len = match self.hierarchy {
            Hierarchy::Root => (1 + extra).max(2),
            _ => 1 + extra,
        };
        let ca_ttl = self.cfg.ca_ttl;
        let (c1, r1, c2, r2) = if let Hierarchy::Node(upstream) = &self.hierarchy {
            let (c2, r2) = step(intermediates, now, |status| {
                let (key, signer) = generate("int")?;
                let got = upstream.certify(&key, &signer, ca_ttl)?;
                if got.node_ca.public_key_raw()? != signer.public_key_raw() {
                    return Err(Error::BadCertificate {
                        what: format!("node CA {}", got.node_ca.serial),
                        reason: "the upstream certified another key than ours".into(),
                    });
                }
                tracing::info!(serial = %got.node_ca.serial, ?status, roots = got.roots.len(), "new node CA certified by the upstream");
                *upstream_roots = got.roots;
                new_ca_gen(key, status, got.node_ca, signer)
            })?;
            (false, Vec::new(), c2, r2)
        } else {
            let root_ttl = self.cfg.root_ttl;
            let (c1, r1) = step(roots, now, |status| {
                let (key, signer) = generate("root")?;
                let cert =
                    x509::build_ca(CaKind::Root, root_len, td, &signer, None, now, root_ttl)?;
                tracing::info!(serial = %cert.serial, sha256 = %cert.sha256_fingerprint(), ?status, "new root CA (published in the bundle before it signs)");
                new_ca_gen(key, status, cert, signer)
            })?;
            let active_root = roots
                .iter()
                .find(|g| g.status == Status::Active)
                .map(|g| g.v.clone())
                .ok_or(Error::NoAuthority { what: "root" })?;
            let (c2, r2) = step(intermediates, now, |status| {
                let (key, signer) = generate("int")?;
                let cert = x509::build_ca(
                    CaKind::Intermediate,
                    extra,
                    td,
                    &signer,
                    Some(&active_root),
                    now,
                    ca_ttl,
                )?;
                tracing::info!(serial = %cert.serial, ?status, "new intermediate CA");
                new_ca_gen(key, status, cert, signer)
            })?;
            (c1, r1, c2, r2)
        };
        let (c3, r3) = step(jwt, now, |status| {
            let (key, signer) = generate("jwt")?;
            let kid = jwt::kid_for(signer.public_key_raw());
            let (nb, na) = (now, now + ca_ttl);
            tracing::info!(%kid, ?status, "new JWT signing key");
            Ok(Gen {
                key,
                status,
                not_before: nb,
                not_after: na,
                v: JwtKey {
                    kid,
                    signer,
                    not_before: nb,
                    not_after: na,
                },
            })
        })?;
        let removed = r1.into_iter().chain(r2).chain(r3).collect();
        Ok((c1 || c2 || c3, removed))
    }

    /// When [`rotate`](Self::rotate) next has something to do.
    pub fn next_rotation(&self) -> SystemTime {
        let st = self.read();
        [
            next_event(&st.roots),
            next_event(&st.intermediates),
            next_event(&st.jwt),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(SystemTime::now)
    }

    /// Runs rotation on schedule until `shutdown`; a failed step is logged and retried.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let wait = self
                .next_rotation()
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .clamp(Duration::from_millis(50), Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            // Key generation, signing (tens of ms per signature on a TPM) and file writes
            // block: keep them off the async workers.
            let me = Arc::clone(&self);
            let failed =
                match tokio::task::spawn_blocking(move || me.rotate(SystemTime::now())).await {
                    Ok(Ok(_)) => false,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "CA rotation failed; retrying in 5s");
                        true
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "CA rotation task died; retrying in 5s");
                        true
                    }
                };
            if failed {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }

    /// A receiver whose value changes whenever bundles or active keys change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The X.509 bundle: every root that is published (prepared, active, retired but
    /// unexpired), oldest first, DER.
    pub fn x509_authorities(&self) -> Vec<Vec<u8>> {
        let st = self.read();
        if matches!(self.hierarchy, Hierarchy::Node(_)) {
            return st.upstream_roots.iter().map(|c| c.der.clone()).collect();
        }
        st.roots.iter().map(|g| g.v.cert.der.clone()).collect()
    }

    /// Signs a node CA certificate for `public_key` (SEC1 P-256, a key in a node's TPM
    /// that attestation verified) with the active root, valid for at most `ttl`, recording
    /// `selectors` in its subject. Returns it with the current roots (the node's bundle).
    /// Only a [`Hierarchy::Root`] CA does this: its roots leave room for a node CA and the
    /// node's issuing CA. Blocking when the root key is in a TPM.
    pub fn sign_node_ca(
        &self,
        public_key: &[u8],
        selectors: &[String],
        ttl: Duration,
    ) -> Result<(CaCert, Vec<Vec<u8>>)> {
        let root = self
            .read()
            .roots
            .iter()
            .find(|g| g.status == Status::Active)
            .map(|g| g.v.clone())
            .ok_or(Error::NoAuthority { what: "root" })?;
        if !matches!(self.hierarchy, Hierarchy::Root)
            || x509::path_len(&root.cert.der)?.is_some_and(|n| n < 2)
        {
            return Err(Error::BadCertificate {
                what: format!("root {}", root.cert.serial),
                reason: "it cannot certify node CAs: only a ca.role: root CA does, and its root must allow two CA levels below it (a root created before ca.role: root allows fewer; start from a fresh ca.stateDir)".into(),
            });
        }
        let cert = x509::build_node_ca(
            &self.cfg.trust_domain,
            public_key,
            selectors,
            &root,
            SystemTime::now(),
            ttl,
        )?;
        Ok((cert, self.x509_authorities()))
    }

    /// The JWT bundle: every published JWT signing key.
    pub fn jwt_bundle(&self) -> JwtBundle {
        let mut b = JwtBundle::default();
        for g in &self.read().jwt {
            b.insert(g.v.kid.clone(), g.v.signer.public_key_raw().to_vec());
        }
        b
    }

    /// The serial of the intermediate that signs SVIDs now (an SVID cache compares it to
    /// re-issue after a CA rotation).
    pub fn active_issuer_serial(&self) -> Option<String> {
        self.read()
            .intermediates
            .iter()
            .find(|g| g.status == Status::Active)
            .map(|g| g.v.cert.serial.clone())
    }

    /// Issues an X.509-SVID for `id` valid for `ttl` (capped by the intermediate's expiry).
    pub fn issue_x509_svid(&self, id: &SpiffeId, ttl: Duration) -> Result<X509Svid> {
        if id.trust_domain() != &self.cfg.trust_domain {
            return Err(Error::BadCertificate {
                what: id.to_string(),
                reason: format!("not in trust domain {}", self.cfg.trust_domain),
            });
        }
        let issuer = self
            .read()
            .intermediates
            .iter()
            .find(|g| g.status == Status::Active)
            .map(|g| g.v.clone())
            .ok_or(Error::NoAuthority { what: "X.509" })?;
        let now = SystemTime::now();
        if let Some(layer) = &self.issuing {
            let (signer, chain) = layer.issuer(&self.cfg.trust_domain, &issuer, now)?;
            return x509::build_svid(id, &signer, &chain, now, ttl);
        }
        let chain = [issuer.cert.der.clone()];
        x509::build_svid(id, &issuer, &chain, now, ttl)
    }

    /// Issues a JWT-SVID for `id` and `audience` valid for `ttl` (capped by the key).
    pub fn issue_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid> {
        let key = self
            .read()
            .jwt
            .iter()
            .find(|g| g.status == Status::Active)
            .map(|g| g.v.clone())
            .ok_or(Error::NoAuthority { what: "JWT" })?;
        jwt::sign(&key, id, audience, SystemTime::now(), ttl)
    }

    /// The state directory (for logs and docs).
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}

fn new_ca_gen(
    key: String,
    status: Status,
    cert: CaCert,
    signer: Arc<dyn Signer>,
) -> Result<Gen<Arc<CaSigner>>> {
    Ok(Gen {
        key,
        status,
        not_before: cert.not_before,
        not_after: cert.not_after,
        v: Arc::new(CaSigner::new(cert, signer)?),
    })
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
