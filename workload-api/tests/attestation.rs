//! Caller attestation against hostile local processes (issues 8 and 9): `unix:sha256` is
//! computed only for candidate entries and never for huge executables; a connection is
//! bound to the process that opened it (no exec, no hand-over, no exit); and
//! ValidateJWTSVID needs an identity.
//!
//! The caller is a Python process (often a copy of the interpreter, so each test has its
//! own executable inode) that connects to the agent and forks an accomplice relaying the
//! test's gRPC client onto that connection, so the agent sees the Python process as the
//! peer (`SO_PEERCRED` is fixed at connect) while the test makes the calls.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::workload::Entry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use workload_api::attestor::{self, DigestStats};
use workload_api::proto::{ValidateJwtsvidRequest, X509svidRequest};

const PYTHON: &str = "/usr/bin/python3.11";

/// Connects to the agent, then forks: the child (the accomplice) relays a local socket
/// the test's gRPC client connects to onto that connection; the parent (the pid the agent
/// sees) does what `mode` says once the test sends a byte: `hold` (keep running),
/// `close` (close its copy, keep running), `exit`, `exec-keep:PATH` (exec PATH keeping
/// the connection open).
const CALLER_PY: &str = r#"
import os, socket, sys, threading, time
agent, ctl_path, relay_path, mode = sys.argv[1:5]
h = socket.socket(socket.AF_UNIX); h.connect(ctl_path)
a = socket.socket(socket.AF_UNIX); a.connect(agent)
l = socket.socket(socket.AF_UNIX); l.bind(relay_path); l.listen(1)
if os.fork() == 0:
    c, _ = l.accept()
    def pump(src, dst):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        os._exit(0)
    threading.Thread(target=pump, args=(a, c), daemon=True).start()
    pump(c, a)
l.close()
h.send(b"r")
h.recv(1)
if mode == "close":
    a.close(); h.send(b"k"); time.sleep(60)
elif mode == "exit":
    a.close(); os._exit(0)
elif mode.startswith("exec-keep:"):
    target = mode.split(":", 1)[1]
    os.set_inheritable(a.fileno(), True)
    os.execv(target, [target, "-c", "import time; time.sleep(60)"])
time.sleep(60)
"#;

/// A Python caller connected to the agent, reachable through its relay.
struct Caller {
    child: Child,
    ctl: tokio::net::UnixStream,
    client: testkit::workload::RawClient,
}

impl Drop for Caller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_caller(
    agent: &testkit::workload::Agent,
    exe: &Path,
    mode: &str,
    uid: Option<u32>,
) -> Caller {
    // Sockets of callers that may run as another user: a world-writable (sticky) dir.
    let dir = agent.dir.join("callers");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let n = rand_id();
    let ctl_path = dir.join(format!("ctl-{n}.sock"));
    let relay_path = dir.join(format!("relay-{n}.sock"));
    let l = tokio::net::UnixListener::bind(&ctl_path).unwrap();
    std::fs::set_permissions(
        &ctl_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut cmd = Command::new(exe);
    cmd.arg("-c")
        .arg(CALLER_PY)
        .arg(&agent.socket)
        .arg(&ctl_path)
        .arg(&relay_path)
        .arg(mode)
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid);
    }
    let child = cmd.spawn().unwrap();
    let (mut ctl, _) = tokio::time::timeout(Duration::from_secs(20), l.accept())
        .await
        .expect("the caller connects back")
        .unwrap();
    let mut ready = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(20), ctl.read_exact(&mut ready))
        .await
        .expect("the caller is ready")
        .unwrap();
    // The relay serves one connection: one client (one HTTP/2 connection) per caller.
    let client =
        testkit::workload::raw_client_at(&format!("unix://{}", relay_path.display()), true).await;
    Caller { child, ctl, client }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Caller {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tells the Python side to carry out its mode.
    async fn go(&mut self) {
        self.ctl.write_all(b"g").await.unwrap();
    }

    async fn fetch(&mut self) -> Result<String, tonic::Status> {
        let mut s = self
            .client
            .fetch_x509svid(X509svidRequest {})
            .await?
            .into_inner();
        let m = s.message().await?.expect("one message");
        Ok(m.svids[0].spiffe_id.clone())
    }
}

/// A private copy of the Python interpreter (its own inode), optionally grown (sparse) to
/// `size` bytes: trailing bytes do not change how an ELF file runs.
fn python_copy(dir: &Path, name: &str, size: Option<u64>) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(PYTHON, &p).unwrap();
    if let Some(size) = size {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    p
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A PermissionDenied whose message says `why`.
fn assert_denied(err: &tonic::Status, why: &str) {
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(why), "{err:?}");
}

/// `unix:uid:<the test's uid>`.
fn my_uid_selector() -> String {
    format!("unix:uid:{}", testkit::workload::my_uid())
}

async fn agent_with(dir: &Path, entries: &[Entry<'_>]) -> testkit::workload::Agent {
    let yaml = testkit::workload::config_yaml(dir, "1h", entries, &[]);
    let agent = testkit::workload::start(dir, &yaml).await;
    testkit::wait_until("agent socket", Duration::from_secs(10), || {
        let s = agent.socket.clone();
        async move { s.exists() }
    })
    .await
    .unwrap();
    agent
}

async fn wait_exe(pid: u32, exe: &Path) {
    let exe = exe.to_owned();
    testkit::wait_until("the caller execs", Duration::from_secs(10), || {
        let exe = exe.clone();
        async move { std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe) }
    })
    .await
    .unwrap();
}

// ---- unix:sha256 (issue 8) ----

/// An entry `unix:uid:<other> + unix:sha256:…` must not make the agent hash the
/// executable of a caller whose uid does not match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_is_not_computed_when_the_uid_does_not_match() {
    let d = testkit::shared_tempdir();
    let py = python_copy(d.path(), "py-other-uid", None);
    let hash = sha256_hex(&py);
    let other = testkit::workload::my_uid() + 1;
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/hashed",
            [format!("unix:uid:{other}"), format!("unix:sha256:{hash}")],
        )],
    )
    .await;
    let mut caller = start_caller(&agent, &py, "hold", None).await;
    let err = caller.fetch().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        attestor::digest_stats(&py),
        None,
        "the executable of a caller whose uid matches no entry was looked at"
    );
    drop(caller);
    agent.stop().await;
}

/// A candidate entry does hash (once per file version: the second call hits the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_matches_and_is_hashed_once() {
    let d = testkit::shared_tempdir();
    let py = python_copy(d.path(), "py-hashed", None);
    let hash = sha256_hex(&py);
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/hashed",
            [my_uid_selector(), format!("unix:sha256:{hash}")],
        )],
    )
    .await;
    let mut caller = start_caller(&agent, &py, "hold", None).await;
    assert_eq!(caller.fetch().await.unwrap(), "spiffe://example.org/hashed");
    let mut again = start_caller(&agent, &py, "hold", None).await;
    assert_eq!(again.fetch().await.unwrap(), "spiffe://example.org/hashed");
    assert_eq!(
        attestor::digest_stats(&py),
        Some(DigestStats {
            hashes: 1,
            too_large: false
        })
    );
    drop((caller, again));
    agent.stop().await;
}

/// An 8 GiB (sparse) executable is over the cap: not hashed, the call is answered at once
/// (before: every request hashed it on an async worker, stalling the runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executable_over_the_cap_is_not_hashed() {
    let d = testkit::shared_tempdir();
    let big = python_copy(d.path(), "py-big", Some(8 << 30));
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/big",
            [
                my_uid_selector(),
                format!("unix:sha256:{}", "ab".repeat(32)),
            ],
        )],
    )
    .await;
    let mut caller = start_caller(&agent, &big, "hold", None).await;
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(3), caller.fetch()).await;
    let err = res
        .expect("answered within 3 s: the 8 GiB file was not hashed")
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "{err:?} after {:?}",
        t.elapsed()
    );
    assert_eq!(
        attestor::digest_stats(&big),
        Some(DigestStats {
            hashes: 0,
            too_large: true
        })
    );
    drop(caller);
    agent.stop().await;
}

// ---- binding the connection to its process (issue 9) ----

/// A process running an untrusted program connects, then execs the trusted program (the
/// one `unix:path` names) keeping the connection open; its accomplice (the test) uses the
/// connection. The agent must not hand out the trusted identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_after_connect_is_refused() {
    let d = testkit::shared_tempdir();
    let untrusted = python_copy(d.path(), "py-untrusted", None);
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/trusted",
            [my_uid_selector(), format!("unix:path:{PYTHON}")],
        )],
    )
    .await;
    let mut caller = start_caller(&agent, &untrusted, &format!("exec-keep:{PYTHON}"), None).await;
    // Before the exec: the untrusted program has no identity (and the agent has seen it).
    let err = caller.fetch().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    caller.go().await;
    wait_exe(caller.pid(), Path::new(PYTHON)).await;
    let err = caller
        .fetch()
        .await
        .expect_err("trusted identity after exec");
    assert_denied(&err, "executed another program");
    drop(caller);
    agent.stop().await;
}

/// The trusted program connects and hands the connection to another process, closing its
/// own copy: the pid no longer holds the socket, so it no longer vouches for the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_to_another_process_is_refused() {
    let d = testkit::shared_tempdir();
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/trusted",
            [my_uid_selector(), format!("unix:path:{PYTHON}")],
        )],
    )
    .await;
    let mut caller = start_caller(&agent, Path::new(PYTHON), "close", None).await;
    caller.go().await;
    let mut ack = [0u8; 1];
    caller.ctl.read_exact(&mut ack).await.unwrap();
    let err = caller.fetch().await.expect_err("identity after hand-over");
    assert_denied(&err, "no longer holds");
    drop(caller);
    agent.stop().await;
}

/// The process that connected is gone: its pid vouches for nothing (it may be reused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_process_exited_is_refused() {
    let d = testkit::shared_tempdir();
    let agent = agent_with(
        d.path(),
        &[Entry::new("spiffe://example.org/uid", [my_uid_selector()])],
    )
    .await;
    let mut caller = start_caller(&agent, Path::new(PYTHON), "exit", None).await;
    caller.go().await;
    let status = tokio::task::block_in_place(|| caller.child.wait().unwrap());
    assert!(status.success());
    let err = caller
        .fetch()
        .await
        .expect_err("identity of an exited process");
    assert_denied(&err, "has exited");
    drop(caller);
    agent.stop().await;
}

/// As root: a caller running as another user (nobody) with an executable that some
/// `unix:uid:<root>` + `unix:sha256` entry names is neither hashed nor granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_executable_is_not_hashed() {
    if !testkit::require("root", testkit::is_root()) {
        return;
    }
    let d = testkit::shared_tempdir();
    let py = python_copy(d.path(), "py-nobody", None);
    let hash = sha256_hex(&py);
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/root-only",
            ["unix:uid:0".to_owned(), format!("unix:sha256:{hash}")],
        )],
    )
    .await;
    std::fs::set_permissions(
        &agent.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let mut caller = start_caller(&agent, &py, "hold", Some(65534)).await;
    let err = caller.fetch().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(attestor::digest_stats(&py), None);
    drop(caller);
    agent.stop().await;
}

// ---- ValidateJWTSVID (issue 9, 4) ----

/// Least privilege: a caller without a registration entry cannot use the agent as a
/// JWT-SVID validation oracle; a registered caller can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwtsvid_needs_an_identity() {
    let d = testkit::shared_tempdir();
    let me = testkit::workload::my_uid();
    let agent = agent_with(
        d.path(),
        &[Entry::new(
            "spiffe://example.org/other",
            [format!("unix:uid:{}", me + 1)],
        )],
    )
    .await;
    let id = registry::spiffe::SpiffeId::parse("spiffe://example.org/other").unwrap();
    let jwt = agent
        .authority
        .issue_jwt_svid(&id, &["aud".to_owned()], Duration::from_secs(300))
        .unwrap();
    let req = || ValidateJwtsvidRequest {
        audience: "aud".to_owned(),
        svid: jwt.token.clone(),
    };
    let mut c = testkit::workload::raw_client(&agent, true).await;
    let err = c.validate_jwtsvid(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    agent.stop().await;

    // The same token, validated by a registered caller.
    let d2 = testkit::shared_tempdir();
    let agent = agent_with(
        d2.path(),
        &[Entry::new(
            "spiffe://example.org/me",
            [format!("unix:uid:{me}")],
        )],
    )
    .await;
    let jwt2 = agent
        .authority
        .issue_jwt_svid(&id, &["aud".to_owned()], Duration::from_secs(300))
        .unwrap();
    let mut c = testkit::workload::raw_client(&agent, true).await;
    let ok = c
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "aud".to_owned(),
            svid: jwt2.token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/other");
    agent.stop().await;
}
