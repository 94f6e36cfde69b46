//! Issue 8, "no blocking on the runtime": CA rotation generates keys, signs and writes files
//! without holding the lock issuance needs, and the rotation task does that work off the
//! async workers. A key store whose `generate` blocks until released stands in for a slow
//! (TPM) key.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use attest::{Authority, AuthorityConfig, KeyStore, Signer, SoftwareKeyStore};
use registry::spiffe::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(3);

struct Gate {
    entered: Sender<()>,
    release: Receiver<()>,
}

/// A software key store whose next `generate` (once armed) reports that it started and then
/// blocks until released (at most 10 s, so a broken build fails instead of hanging).
#[derive(Debug)]
struct GatedKeys {
    inner: SoftwareKeyStore,
    gate: Mutex<Option<Gate>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

impl GatedKeys {
    /// Arms the gate: returns (entered, release).
    fn arm(&self) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.gate.lock().unwrap() = Some(Gate {
            entered: entered_tx,
            release: release_rx,
        });
        (entered_rx, release_tx)
    }
}

impl KeyStore for GatedKeys {
    fn generate(&self, name: &str) -> attest::Result<Arc<dyn Signer>> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(g) = gate {
            let _ = g.entered.send(());
            let _ = g.release.recv_timeout(Duration::from_secs(10));
        }
        self.inner.generate(name)
    }

    fn load(&self, name: &str) -> attest::Result<Arc<dyn Signer>> {
        self.inner.load(name)
    }

    fn remove(&self, name: &str) -> attest::Result<()> {
        self.inner.remove(name)
    }
}

fn open(dir: &Path, ca_ttl: Duration) -> (Arc<Authority>, Arc<GatedKeys>) {
    let cfg = AuthorityConfig::new(
        TrustDomain::parse("example.org").unwrap(),
        dir.to_owned(),
        ca_ttl,
    );
    let keys = Arc::new(GatedKeys {
        inner: SoftwareKeyStore::new(dir.join("keys")),
        gate: Mutex::new(None),
    });
    let ca = Authority::open(cfg, keys.clone()).unwrap();
    (ca, keys)
}

#[test]
fn issuance_does_not_wait_while_rotation_generates_a_key() {
    let d = tempfile::tempdir().unwrap();
    let (ca, keys) = open(d.path(), Duration::from_secs(60));
    let (entered, release) = keys.arm();
    let t0 = SystemTime::now();
    // Past the intermediate's half-life: the next one is prepared (one key generated).
    let rotating = {
        let ca = ca.clone();
        std::thread::spawn(move || ca.rotate(t0 + Duration::from_secs(26)))
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("rotation reached key generation");
    let (done_tx, done_rx) = mpsc::channel();
    let reader = {
        let ca = ca.clone();
        std::thread::spawn(move || {
            let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
            let svid = ca.issue_x509_svid(&id, Duration::from_secs(60));
            let jwt = ca.issue_jwt_svid(&id, &["x".into()], Duration::from_secs(60));
            let bundle = ca.x509_authorities();
            let _ = done_tx.send((svid.is_ok(), jwt.is_ok(), bundle.len()));
        })
    };
    let during = done_rx.recv_timeout(PATIENCE);
    let _ = release.send(());
    assert!(rotating.join().unwrap().unwrap(), "rotation changed state");
    reader.join().unwrap();
    let during = during.expect("issuance blocked while rotation generated a key");
    assert_eq!(during, (true, true, 1));
    // The prepared intermediate was swapped in once ready.
    assert_eq!(ca.x509_authorities().len(), 1);
}

#[test]
fn rotation_task_keeps_key_generation_off_the_async_workers() {
    let d = tempfile::tempdir().unwrap();
    // Intermediates live 2 s from a NotBefore 10 s in the past: past half-life at once, so
    // the task's first rotation prepares the next one.
    let (ca, keys) = open(d.path(), Duration::from_secs(2));
    let (entered, release) = keys.arm();
    let token = CancellationToken::new();
    let (ping_tx, mut ping_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (pong_tx, pong_rx) = mpsc::channel();
    let runtime = {
        let (ca, token) = (ca.clone(), token.clone());
        std::thread::spawn(move || {
            // One worker: if rotation blocked it, nothing else could run.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let task = tokio::spawn(ca.run(token));
                while ping_rx.recv().await.is_some() {
                    let _ = pong_tx.send(());
                }
                let _ = task.await;
            });
        })
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the rotation task reached key generation");
    ping_tx.send(()).unwrap();
    let answered = pong_rx.recv_timeout(PATIENCE);
    let _ = release.send(());
    token.cancel();
    drop(ping_tx);
    runtime.join().unwrap();
    answered.expect("the async worker was blocked by rotation");
}
