//! A hostile local user against the 0666 Workload API socket: connection floods (own uid,
//! and an unregistered uid 65534 through `setpriv`), connections that never send the HTTP/2
//! preface, and garbage. The agent must close what is over the limit at once, close silent
//! connections after the handshake timeout, and keep serving everyone else.
//!
//! The cross-uid test needs root, `setpriv` and `python3`; under CI=true missing ones fail.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use registry::config::ConfigWatcher;
use spiffe::WorkloadApiClient;
use testkit::workload::{Entry, config_yaml, my_uid, open_authority};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use workload_api::WorkloadApiServer;
use workload_api::limits::{ConnStats, ConnectionLimits};

const T: Duration = Duration::from_secs(20);

struct Running {
    socket: PathBuf,
    stats: Arc<ConnStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), workload_api::Error>>,
    _watcher: ConfigWatcher,
}

impl Running {
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(T, self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// A server granting `spiffe://example.org/me` to this test's uid, with `limits`.
async fn start(dir: &Path, limits: ConnectionLimits) -> Running {
    let yaml = config_yaml(
        dir,
        "1h",
        &[Entry {
            id: "spiffe://example.org/me",
            selectors: vec![format!("unix:uid:{}", my_uid())],
            hint: None,
        }],
        &[],
    );
    let config = dir.join("ferry.yaml");
    std::fs::write(&config, yaml).unwrap();
    let watcher = ConfigWatcher::start(&config).await.unwrap();
    let shutdown = CancellationToken::new();
    let server = WorkloadApiServer::start(
        watcher.subscribe(),
        open_authority(&watcher.current()),
        shutdown.clone(),
    )
    .unwrap()
    .with_limits(limits);
    let stats = server.stats();
    Running {
        socket: dir.join("agent.sock"),
        stats,
        shutdown,
        task: tokio::spawn(server.serve()),
        _watcher: watcher,
    }
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    ConnStats::get(c)
}

/// What the server does to a connection that sends nothing: `(bytes it wrote, closed)`
/// after `wait` (closed = EOF or reset).
async fn fate(s: &mut UnixStream, wait: Duration) -> (usize, bool) {
    let mut got = 0;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got += n,
        }
    }
}

async fn fetch_ok(endpoint: &str) {
    let client = tokio::time::timeout(T, WorkloadApiClient::connect_to(endpoint))
        .await
        .expect("connects in time")
        .unwrap();
    let svid = tokio::time::timeout(T, client.fetch_x509_svid())
        .await
        .expect("served in time")
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/me");
}

#[tokio::test]
async fn connections_over_the_per_uid_limit_are_closed_at_once() {
    let d = testkit::tempdir().unwrap();
    let limits = ConnectionLimits {
        max_connections_per_peer: 8,
        handshake_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    };
    let agent = start(d.path(), limits).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(UnixStream::connect(&agent.socket).await.unwrap());
    }
    testkit::wait_until("20 connections seen", T, || async {
        get(&agent.stats.accepted) + get(&agent.stats.rejected_over_limit) >= 20
    })
    .await
    .unwrap();
    assert_eq!(get(&agent.stats.accepted), 8);
    assert_eq!(get(&agent.stats.rejected_over_limit), 12);
    // Admitted: the server's SETTINGS and nothing else (the handshake timeout is 60 s).
    // Refused: closed without a byte.
    let fates =
        futures::future::join_all(held.iter_mut().map(|s| fate(s, Duration::from_secs(2)))).await;
    let (mut admitted, mut refused) = (0, 0);
    for f in fates {
        match f {
            (n, false) if n > 0 => admitted += 1,
            (0, true) => refused += 1,
            other => panic!("unexpected fate {other:?}"),
        }
    }
    assert_eq!((admitted, refused), (8, 12));
    // Closing them frees the quota: the same uid is served again.
    drop(held);
    let ep = agent.endpoint();
    testkit::wait_until("served again once the connections closed", T, || async {
        match WorkloadApiClient::connect_to(ep.as_str()).await {
            Ok(c) => c.fetch_x509_svid().await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn silent_and_garbage_connections_are_closed_and_clients_are_not() {
    let d = testkit::tempdir().unwrap();
    let limits = ConnectionLimits {
        handshake_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    let agent = start(d.path(), limits).await;
    // No preface: closed after the 1 s handshake timeout (20 s is a generous bound).
    let mut silent = UnixStream::connect(&agent.socket).await.unwrap();
    let (_, closed) = fate(&mut silent, T).await;
    assert!(closed, "silent connection still open after {T:?}");
    assert_eq!(get(&agent.stats.handshake_timeouts), 1);
    // HTTP/1 on an HTTP/2 socket: closed at once.
    let mut garbage = UnixStream::connect(&agent.socket).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (_, closed) = fate(&mut garbage, T).await;
    assert!(closed);
    assert!(get(&agent.stats.protocol_errors) >= 1);
    // A real client idle past the handshake timeout keeps its connection and stream.
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    client.fetch_x509_svid().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tokio::time::timeout(T, client.fetch_x509_svid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(get(&agent.stats.handshake_timeouts), 1);
    agent.stop().await;
}

/// The system Python (a user-local one, e.g. under /root, is not executable by 65534).
const PYTHON: &str = "/usr/bin/python3";

/// Runs `python3 hold_connections.py` as uid/gid 65534 through `setpriv`.
fn hold_as_nobody(socket: &Path, n: usize, hold_s: u32) -> tokio::process::Child {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/hold_connections.py");
    tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PYTHON])
        .arg(script)
        .arg(socket)
        .arg(n.to_string())
        .arg(hold_s.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn setpriv python3")
}

fn have(cmd: &str) -> bool {
    std::process::Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn an_unregistered_uid_flooding_the_socket_does_not_starve_a_registered_one() {
    if !testkit::require("root (to act as uid 65534)", testkit::is_root())
        || !testkit::require("setpriv (util-linux)", have("setpriv"))
        || !testkit::require(PYTHON, have(PYTHON))
    {
        return;
    }
    // Other uids must reach the socket inside the temp dir.
    let d = testkit::shared_tempdir();
    let limits = ConnectionLimits {
        max_connections_per_peer: 16,
        handshake_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    };
    let agent = start(d.path(), limits).await;
    let mut child = hold_as_nobody(&agent.socket, 64, 8);
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        T,
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await
    .expect("helper opens its connections in time")
    .unwrap();
    assert_eq!(line.trim(), r#"{"opened": 64}"#);
    testkit::wait_until("64 connections seen", T, || async {
        get(&agent.stats.accepted) + get(&agent.stats.rejected_over_limit) >= 64
    })
    .await
    .unwrap();
    // While uid 65534 holds its 16 and is refused the rest, this uid is served.
    fetch_ok(&agent.endpoint()).await;
    assert_eq!(get(&agent.stats.rejected_over_limit), 48);
    line.clear();
    tokio::time::timeout(
        T,
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await
    .expect("helper reports in time")
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["closed"], 48, "{v}");
    assert_eq!(v["data"], 16, "{v}");
    child.wait().await.unwrap();
    agent.stop().await;
}
