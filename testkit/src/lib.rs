//! Shared harness for ferry's integration tests: every helper that more than one test
//! needs lives here (real peers such as stock Envoy, free ports, temp dirs, waiting for a
//! port or a log line), so tests stay about behaviour.
//!
//! Prerequisites: when `CI=true`, a missing peer (Envoy, root, a Debian tool) fails the
//! test through [`require`]; outside CI it skips with a message.

pub mod config;
pub mod dns;
pub mod envoy;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod tpm;
pub mod workload;
pub mod xds_agent;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use tempfile::{TempDir, tempdir};

/// Errors from the harness, with enough context to debug a failed test.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spawned process or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A peer answered something unexpected.
    #[error("{0}")]
    Unexpected(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The workspace root (where `Cargo.toml`, `.venv/` and `examples/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// True when running under CI (`CI=true`), where missing prerequisites are failures.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks a prerequisite. Returns `true` when it is present. When absent: under CI this
/// panics (a missing peer must fail the build, never pass silently); elsewhere it prints
/// why the test is skipped and returns `false`.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if in_ci() {
        panic!("prerequisite missing under CI=true: {what} (run ./test.sh, which installs it)");
    }
    eprintln!(
        "SKIP: prerequisite missing: {what} (./test.sh installs it; CI=true makes this a failure)"
    );
    false
}

/// True when the tests run as root (needed for network namespaces and capture rules).
pub fn is_root() -> bool {
    // /proc/self/status has "Uid:\t<real>\t<effective>...".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A temp dir that other uids can traverse (0755), for tests that run a child process as
/// another user against a socket inside it.
pub fn shared_tempdir() -> TempDir {
    let d = tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap_or_else(|e| panic!("cannot chmod 0755 {}: {e}", d.path().display()));
    d
}

/// A port free a moment ago, for TCP and UDP, on every address (so `127.0.0.1:P`,
/// another 127/8 address or `0.0.0.0:P` can all take it).
///
/// Ports come from 20000-32767, below the kernel's ephemeral range (32768-60999 by
/// default), walked by a process-wide cursor from a per-process offset: a port from
/// `bind(:0)` is an ephemeral one, which any outgoing connection may take before the child
/// process meant to listen on it binds it (under the benches' connection churn that
/// happened), and two tests of one process could be handed the same one.
///
/// Free for UDP as well: a DNS server binds both, and a port another process holds for
/// UDP only (Envoy's `dns_filter` of a bench still exiting) is not free.
pub fn free_port() -> u16 {
    let free = |p: u16| {
        TcpListener::bind(("0.0.0.0", p)).is_ok()
            && std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok()
    };
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (BASE + (offset + i) % SPAN) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free port in {BASE}-{}", BASE + SPAN - 1)
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<(), Error> {
    wait_until(&format!("a listener on {addr}"), timeout, || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
}

/// Waits until the file at `path` contains `needle` (for log lines of spawned processes).
pub async fn wait_for_log(
    path: &std::path::Path,
    needle: &str,
    timeout: Duration,
) -> Result<(), Error> {
    wait_until(
        &format!("{needle:?} in {}", path.display()),
        timeout,
        || async move {
            tokio::fs::read_to_string(path)
                .await
                .is_ok_and(|s| s.contains(needle))
        },
    )
    .await
}
