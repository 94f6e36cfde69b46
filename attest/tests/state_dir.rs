//! Issue 9, "the control plane holds against hostile local users": `ca.stateDir` is not
//! trusted blindly. Tests that act as another user (uid 65534) need root: they fail under
//! `CI=true` without it and are skipped elsewhere.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attest::{Authority, AuthorityConfig, Error, Insecure, SoftwareSigner};
use nix::unistd::{Gid, Uid, chown, geteuid};
use registry::spiffe::TrustDomain;
use sha2::{Digest, Sha256};

const NOBODY: u32 = 65534;

fn settings(dir: &Path) -> AuthorityConfig {
    AuthorityConfig::new(
        TrustDomain::parse("example.org").unwrap(),
        dir.to_owned(),
        Duration::from_secs(3600),
    )
}

fn open(dir: &Path) -> Result<Arc<Authority>, Error> {
    let s = settings(dir);
    let keys = s.software_keys();
    Authority::open(s, keys)
}

/// A state dir with a fully initialised CA (root, intermediate, JWT key).
fn initialised() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    drop(open(&state).unwrap());
    (d, state)
}

/// The key file of the first generation of `list` (`roots`, `intermediates`, `jwtKeys`).
fn key_file(state: &Path, list: &str) -> PathBuf {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("ca-state.json")).unwrap()).unwrap();
    let key = json[list][0]["key"].as_str().unwrap();
    state.join("keys").join(format!("{key}.key.pem"))
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn give_to(p: &Path, uid: u32) {
    chown(p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid))).unwrap();
}

fn insecure(r: Result<Arc<Authority>, Error>) -> (PathBuf, Insecure, String) {
    match r {
        Err(e @ Error::InsecureState { .. }) => {
            let msg = e.to_string();
            let Error::InsecureState { path, problem } = e else {
                unreachable!()
            };
            (path, problem, msg)
        }
        Err(e) => panic!("expected InsecureState, got {e}"),
        Ok(_) => panic!("the CA opened an unsafe state dir"),
    }
}

#[test]
fn state_dir_created_by_another_user_is_refused() {
    if !testkit::require("root", testkit::is_root()) {
        return;
    }
    let (_d, state) = initialised();
    // Another user made this CA (and can read its root key).
    for p in [state.join("keys"), state.join("ca-state.json")] {
        give_to(&p, NOBODY);
    }
    for k in std::fs::read_dir(state.join("keys")).unwrap() {
        give_to(&k.unwrap().path(), NOBODY);
    }
    give_to(&state, NOBODY);
    let (path, problem, msg) = insecure(open(&state));
    assert_eq!(path, state);
    assert_eq!(
        problem,
        Insecure::WrongOwner {
            owner: NOBODY,
            expected: 0
        }
    );
    assert!(msg.contains("owned by uid 65534, expected 0"), "{msg}");
    assert!(msg.contains("chown it"), "{msg}");
    assert!(msg.contains(&state.display().to_string()), "{msg}");
}

#[test]
fn keys_dir_or_key_file_of_another_user_is_refused() {
    if !testkit::require("root", testkit::is_root()) {
        return;
    }
    let (_d, state) = initialised();
    let keys = state.join("keys");
    give_to(&keys, NOBODY);
    let (path, problem, _) = insecure(open(&state));
    assert_eq!(
        (path, problem),
        (
            keys.clone(),
            Insecure::WrongOwner {
                owner: NOBODY,
                expected: 0
            }
        )
    );
    give_to(&keys, 0);

    let root_key = key_file(&state, "roots");
    give_to(&root_key, NOBODY);
    let (path, problem, _) = insecure(open(&state));
    assert_eq!(
        (path, problem),
        (
            root_key,
            Insecure::WrongOwner {
                owner: NOBODY,
                expected: 0
            }
        )
    );
}

#[test]
fn state_dir_or_keys_dir_writable_by_others_is_refused() {
    let (_d, state) = initialised();
    chmod(&state, 0o777);
    let (path, problem, msg) = insecure(open(&state));
    assert_eq!(
        (path, problem),
        (state.clone(), Insecure::WritableByOthers { mode: 0o777 })
    );
    assert!(msg.contains("chmod go-w"), "{msg}");
    chmod(&state, 0o755);
    chmod(&state.join("keys"), 0o770);
    let (path, problem, _) = insecure(open(&state));
    assert_eq!(
        (path, problem),
        (
            state.join("keys"),
            Insecure::WritableByOthers { mode: 0o770 }
        )
    );
    // A 0755 state dir (what older versions created) with a 0700 keys dir is fine.
    chmod(&state.join("keys"), 0o700);
    open(&state).unwrap();
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let (_d, state) = initialised();
    let k = key_file(&state, "intermediates");
    chmod(&k, 0o640);
    let (path, problem, _) = insecure(open(&state));
    assert_eq!(
        (path, problem),
        (k.clone(), Insecure::ReadableByOthers { mode: 0o640 })
    );
    // The state file holds no secret: readable is fine, writable by others is not.
    chmod(&k, 0o600);
    chmod(&state.join("ca-state.json"), 0o644);
    open(&state).unwrap();
    chmod(&state.join("ca-state.json"), 0o666);
    let (path, _, _) = insecure(open(&state));
    assert_eq!(path, state.join("ca-state.json"));
}

#[test]
fn symlinked_state_file_or_key_is_not_followed() {
    let (d, state) = initialised();
    let elsewhere = d.path().join("elsewhere.json");
    std::fs::rename(state.join("ca-state.json"), &elsewhere).unwrap();
    symlink(&elsewhere, state.join("ca-state.json")).unwrap();
    let (path, problem, _) = insecure(open(&state));
    assert_eq!(
        (path, problem),
        (state.join("ca-state.json"), Insecure::Symlink)
    );
    std::fs::remove_file(state.join("ca-state.json")).unwrap();
    std::fs::rename(&elsewhere, state.join("ca-state.json")).unwrap();

    let k = key_file(&state, "roots");
    let moved = d.path().join("root.key.pem");
    std::fs::rename(&k, &moved).unwrap();
    symlink(&moved, &k).unwrap();
    let (path, problem, _) = insecure(open(&state));
    assert_eq!((path, problem), (k, Insecure::Symlink));
}

#[test]
fn symlinked_state_dir_is_refused() {
    let (d, state) = initialised();
    let link = d.path().join("link");
    symlink(&state, &link).unwrap();
    let (path, problem, msg) = insecure(open(&link));
    assert_eq!((path, problem), (link, Insecure::Symlink));
    assert!(msg.contains("real directory"), "{msg}");
}

#[test]
fn planted_temp_file_symlink_is_never_written_through() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let victim = d.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // The temp names older versions used, planted as links to a file the agent may write.
    symlink(&victim, state.join("ca-state.tmp")).unwrap();
    symlink(&victim, state.join("ca-state.json.tmp")).unwrap();
    let ca = open(&state).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let meta = std::fs::symlink_metadata(state.join("ca-state.json")).unwrap();
    assert!(meta.file_type().is_file(), "state file is a regular file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Rotation rewrites it the same way.
    ca.rotate(std::time::SystemTime::now() + Duration::from_secs(2000))
        .unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

#[test]
fn missing_state_dirs_are_created_0700_and_leave_no_temp_files() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("a/b/state");
    drop(open(&state).unwrap());
    for dir in [d.path().join("a"), state.clone(), state.join("keys")] {
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{}", dir.display());
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), geteuid().as_raw());
    }
    let names = |p: &Path| -> Vec<String> {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    for p in [state.clone(), state.join("keys")] {
        for n in names(&p) {
            assert!(!n.ends_with(".tmp"), "leftover temp file {n}");
        }
    }
    for k in names(&state.join("keys")) {
        let m = std::fs::metadata(state.join("keys").join(&k)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{k}");
    }
}

/// Replaces a key file's content with a fresh, unrelated key (owner and mode unchanged).
fn swap_key(path: &Path) {
    let other = SoftwareSigner::generate().unwrap();
    std::fs::write(path, other.to_pem()).unwrap();
}

#[test]
fn root_or_intermediate_key_not_matching_its_certificate_is_refused() {
    for (list, what) in [("roots", "root"), ("intermediates", "intermediate")] {
        let (_d, state) = initialised();
        let k = key_file(&state, list);
        swap_key(&k);
        match open(&state) {
            Err(e @ Error::KeyMismatch { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&k.display().to_string()), "{msg}");
                assert!(
                    msg.contains(&state.join("ca-state.json").display().to_string()),
                    "{msg}"
                );
                let Error::KeyMismatch { what: w, .. } = e else {
                    unreachable!()
                };
                assert_eq!(w, what);
            }
            Err(e) => panic!("{what}: expected KeyMismatch, got {e}"),
            Ok(_) => panic!("{what}: a CA whose key is not its certificate's opened"),
        }
    }
}

#[test]
fn jwt_key_not_matching_its_kid_is_refused() {
    let (_d, state) = initialised();
    swap_key(&key_file(&state, "jwtKeys"));
    assert!(matches!(
        open(&state),
        Err(Error::KeyMismatch { what: "JWT", .. })
    ));
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn root_fingerprint_is_logged_at_load() {
    let (_d, state) = initialised();
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let ca = tracing::subscriber::with_default(subscriber, || open(&state).unwrap());
    let root = &ca.x509_authorities()[0];
    let want: String = Sha256::digest(root)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains(&format!("sha256={want}")), "{text}");
}
