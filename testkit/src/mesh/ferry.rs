//! ferry's own processes in a topology: spawn them with their logs kept, build `ferry
//! proxy` command lines, read `ferry::access` lines.

// Test harness: a failed setup is a test failure, loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::Error;

/// The tracing target of ferry's per-connection access-log lines.
pub const FERRY_ACCESS_TARGET: &str = "ferry::access";

/// A child process under test (`ferry agent`, `ferry proxy`) with stdout and stderr in a
/// log file, killed when dropped: the log outlives a crash so a failed assertion can show
/// it.
pub struct Spawned {
    name: String,
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Spawned {
    /// Starts `program args` with `envs` (on top of the inherited environment), logging
    /// to `<log_dir>/<name>.log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Self, Error> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(Error::io(format!("create {name}.log")))?;
        let err = out.try_clone().map_err(Error::io("dup log file"))?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("spawn {name}: {}", program.display())))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, Error> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
                .map_err(|e| Error::Unexpected(format!("SIGTERM {}: {e}", self.name)))?;
        }
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| Error::Timeout {
                what: format!("{} to exit after SIGTERM", self.name),
                timeout,
            })?
            .map_err(Error::io(format!("wait for {}", self.name)))
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log, headed by its name (for assertion messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- {} log (last {n} lines) ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// Its access-log lines (those naming [`FERRY_ACCESS_TARGET`]).
    pub fn access_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(FERRY_ACCESS_TARGET))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until an access-log line satisfies `pred` and returns it.
    pub async fn wait_access(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.access_lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("a matching access-log line from {}", self.name),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `GET admin/ready` answers 200; fails at once if the process exits.
    pub async fn wait_ready(&mut self, admin: SocketAddr, timeout: Duration) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Unexpected(format!(
                    "{} exited ({status}) before it was ready\n{}",
                    self.name,
                    self.log_tail(40)
                )));
            }
            if crate::http::get(admin, "/ready")
                .await
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Unexpected(format!(
                    "{} not ready on http://{admin}/ready after {timeout:?}\n{}",
                    self.name,
                    self.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// A `FederatedService` document (starting with `---`) for `<name>.demo.<agent's trust
/// domain>`: the agent's own trust domain (no annotation), server identity
/// `/ns/demo/sa/<name>`, one east-west gateway at `gateway`.
pub fn own_domain_service(name: &str, port: u16, tls_mode: &str, gateway: SocketAddr) -> String {
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  name: {name}\n  namespace: demo\n  port: {port}\n  exportedTrustDomains: [client.domain]\n  spiffeIDPaths: [/ns/demo/sa/{name}]\n  tlsMode: {tls_mode}\n  gateways:\n    - type: istio-eastwestgateway\n      port: {}\n      ip: {}\n",
        gateway.port(),
        gateway.ip()
    )
}

/// The command line of `ferry proxy` for a test: Workload API socket given, admin and
/// capture listener on free loopback ports, DNS off; more flags with [`ProxyCmd::arg`].
#[derive(Debug, Clone)]
pub struct ProxyCmd {
    /// `--admin`.
    pub admin: SocketAddr,
    /// `--outbound` (the capture listener).
    pub outbound: SocketAddr,
    args: Vec<String>,
}

impl ProxyCmd {
    /// `ferry proxy --workload-api unix://<socket> --admin .. --outbound .. --dns off`.
    pub fn new(workload_socket: &Path) -> Self {
        let admin: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        let outbound: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        let args = [
            "proxy".to_owned(),
            "--workload-api".to_owned(),
            format!("unix://{}", workload_socket.display()),
            "--admin".to_owned(),
            admin.to_string(),
            "--outbound".to_owned(),
            outbound.to_string(),
            "--dns".to_owned(),
            "off".to_owned(),
        ];
        Self {
            admin,
            outbound,
            args: args.into(),
        }
    }

    /// One more `--flag value`.
    pub fn arg(mut self, flag: &str, value: impl std::fmt::Display) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_string());
        self
    }

    /// One more bare `--flag`.
    pub fn flag(mut self, flag: &str) -> Self {
        self.args.push(flag.to_owned());
        self
    }

    /// The arguments, starting with `proxy`.
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

/// Whether an access-log line's `peer_meta=` (the peer's metadata-exchange fields) names
/// `what`.
pub fn meta_mentions(line: &str, what: &str) -> bool {
    line.split_once("peer_meta=")
        .is_some_and(|(_, m)| m.contains(what))
}

/// Retries `attempt` every 250 ms for 30 s (listeners, xDS and SDS settle after start),
/// then panics with `what`, the last error and `logs()`.
pub async fn retry<T, Fut>(
    what: &str,
    logs: impl Fn() -> String,
    mut attempt: impl FnMut() -> Fut,
) -> T
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e}\n{}", logs()),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The value of ` key=` in a tracing text line: a quoted value up to the next `"` (an
/// escaped quote inside ends it early), else up to the next space; `None` if absent.
pub fn log_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').map_or_else(
        || rest.split(' ').next().unwrap_or(rest),
        |q| q.split('"').next().unwrap_or(q),
    );
    Some(rest)
}

/// One zone run by `ferry agent` (spawned from the `ferry` binary under test): xDS on a
/// free loopback port, the Workload API at `<dir>/agent.sock`, the given registration
/// entries and FederatedService documents; its proxies are spawned beside it and log
/// into the same dir.
pub struct FerryZone {
    /// The `ferry` binary.
    pub ferry: std::path::PathBuf,
    /// Config, socket, CA state and logs.
    pub dir: crate::TempDir,
    /// The agent's config file.
    pub config: std::path::PathBuf,
    /// The agent's xDS address.
    pub xds: SocketAddr,
    /// The Workload API socket.
    pub socket: std::path::PathBuf,
    /// The agent process.
    pub agent: Spawned,
}

impl FerryZone {
    /// Writes the config (`trust_domain`, `listen.outbound` = `outbound`, DNS on a free
    /// port, `entries`, then `services` verbatim), starts `ferry agent` and waits for its
    /// xDS port and Workload API socket.
    pub async fn start(
        ferry: &Path,
        dir: crate::TempDir,
        trust_domain: &str,
        outbound: SocketAddr,
        entries: &[crate::config::Entry<'_>],
        services: &str,
    ) -> Self {
        let xds: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        let dns: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        let mut doc = crate::config::AgentDoc::in_dir(trust_domain, dir.path())
            .listen("xds", xds)
            .listen("outbound", outbound)
            .listen("dns", dns)
            .ca("svidTtl", "1h");
        for e in entries {
            doc = doc.entry(e);
        }
        let config = dir.path().join("ferry.yaml");
        std::fs::write(&config, doc.raw(services).render()).unwrap();
        let agent = Spawned::start(
            "agent",
            ferry,
            &[
                "agent".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            &[],
            dir.path(),
        )
        .unwrap();
        let socket = dir.path().join("agent.sock");
        let ready = Duration::from_secs(30);
        crate::wait_for_port(xds, ready)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
        crate::wait_until("the Workload API socket", ready, || {
            let s = socket.clone();
            async move { s.exists() }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
        Self {
            ferry: ferry.to_owned(),
            dir,
            config,
            xds,
            socket,
            agent,
        }
    }

    /// The VIP the agent allocated to `host`, from `ferry config vips --json`.
    pub fn vip(&self, host: &str) -> std::net::IpAddr {
        let out = std::process::Command::new(&self.ferry)
            .args(["config", "vips", "--json", "--config"])
            .arg(&self.config)
            .output()
            .expect("run ferry config vips");
        let vips: std::collections::BTreeMap<String, String> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| {
                panic!(
                    "ferry config vips --json: {e}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        vips.get(host)
            .unwrap_or_else(|| panic!("no VIP for {host} in {vips:?}"))
            .parse()
            .expect("a VIP is an IP address")
    }

    /// A copy of the ferry binary in the zone's dir, so that a `unix:path:` selector can
    /// give a second ferry process (the server-side proxy) another identity.
    pub fn ferry_copy(&self, name: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        if !p.exists() {
            std::fs::copy(&self.ferry, &p).expect("copy the ferry binary");
        }
        p
    }

    /// Spawns `bin` (a ferry binary) with `cmd` as `name` and waits for its `/ready`.
    pub async fn proxy(&self, name: &str, bin: &Path, cmd: &ProxyCmd) -> Spawned {
        let mut p = Spawned::start(name, bin, cmd.args(), &[], self.dir.path()).unwrap();
        p.wait_ready(cmd.admin, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.agent.log_tail(20)));
        p
    }

    /// The client-side proxy: xDS from the agent, `--bind-vips`, workload `client` in
    /// namespace `demo` (so its metadata names it).
    pub async fn outbound_proxy(&self) -> Spawned {
        let cmd = ProxyCmd::new(&self.socket)
            .arg("--xds", format!("http://{}", self.xds))
            .flag("--bind-vips")
            .arg("--node-id", "client-node")
            .arg("--workload-name", "client")
            .arg("--namespace", "demo")
            .arg("--cluster-id", "client-cluster")
            .arg("--label", "app=client");
        self.proxy("ferry-outbound", &self.ferry, &cmd).await
    }

    /// The server-side proxy run from `bin`: `--inbound` in front of `app`, no xDS,
    /// workload `server` in namespace `demo`.
    pub async fn inbound_proxy(&self, bin: &Path, inbound: SocketAddr, app: SocketAddr) -> Spawned {
        let cmd = ProxyCmd::new(&self.socket)
            .arg("--inbound", inbound)
            .arg("--inbound-app", app)
            .arg("--node-id", "server-node")
            .arg("--workload-name", "server")
            .arg("--namespace", "demo")
            .arg("--cluster-id", "server-cluster")
            .arg("--label", "app=server");
        self.proxy("ferry-inbound", bin, &cmd).await
    }
}
