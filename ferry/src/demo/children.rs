//! The ferry processes the demo runs (`ferry agent` x2, `ferry gateway`, `ferry proxy`
//! x2), each a child of this process logging to a file in the demo dir; stopped with
//! SIGTERM (then killed) when the demo ends, however it ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::topology::{ISTIO_HOST, MTLS_HOST, Ports, Zone, loopback};

struct Kid {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// The running children.
pub struct Children {
    dir: PathBuf,
    kids: Vec<Kid>,
}

/// What the client proxy logged about one connection.
pub struct Access {
    /// The server's SPIFFE ID.
    pub peer_id: String,
    /// The server's metadata from the exchange.
    pub peer_meta: String,
}

impl Children {
    /// No children yet; logs go to `dir`.
    pub fn new(dir: &Path) -> Self {
        Children {
            dir: dir.to_owned(),
            kids: Vec::new(),
        }
    }

    fn spawn(&mut self, name: &'static str, args: &[String]) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the ferry binary")?;
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.kids.push(Kid { name, child, log });
        Ok(())
    }

    /// Fails naming the child that exited early.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for k in &mut self.kids {
            if let Ok(Some(status)) = k.child.try_wait() {
                let tail = tail(&k.log, 10);
                bail!("{} exited ({status}):\n{tail}", k.name);
            }
        }
        Ok(())
    }

    async fn wait(
        &mut self,
        what: &str,
        mut ready: impl AsyncFnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready().await {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{what} not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Both agents, until their xDS ports and Workload API sockets are up.
    pub async fn start_zones(
        &mut self,
        server: &Zone,
        client: &Zone,
        ports: &Ports,
    ) -> anyhow::Result<()> {
        for (name, zone, xds) in [
            ("agent-local.domain", server, ports.server_xds),
            ("agent-other1.domain", client, ports.client_xds),
        ] {
            self.spawn(
                name,
                &[
                    "agent".into(),
                    "--config".into(),
                    zone.config.display().to_string(),
                ],
            )?;
            let socket = zone.socket.clone();
            self.wait(name, async || {
                socket.exists() && tokio::net::TcpStream::connect(loopback(xds)).await.is_ok()
            })
            .await?;
        }
        Ok(())
    }

    /// The gateway and both proxies, until they answer (`/ready` for the proxies).
    pub async fn start_data_plane(
        &mut self,
        server: &Zone,
        client: &Zone,
        ports: &Ports,
    ) -> anyhow::Result<()> {
        let s = |v: &dyn std::fmt::Display| v.to_string();
        self.spawn(
            "gateway",
            &[
                s(&"gateway"),
                s(&"--config"),
                server.config.display().to_string(),
                s(&"--listen"),
                s(&loopback(ports.gateway)),
                s(&"--backend"),
                format!("{ISTIO_HOST}={}", loopback(ports.inbound)),
                s(&"--backend"),
                format!("{MTLS_HOST}={}", loopback(ports.mtls_app)),
            ],
        )?;
        let gw = loopback(ports.gateway);
        self.wait("ferry gateway", async || {
            tokio::net::TcpStream::connect(gw).await.is_ok()
        })
        .await?;
        self.spawn(
            "proxy-server",
            &[
                s(&"proxy"),
                s(&"--workload-api"),
                format!("unix://{}", server.socket.display()),
                s(&"--inbound"),
                s(&loopback(ports.inbound)),
                s(&"--inbound-app"),
                s(&loopback(ports.app)),
                s(&"--outbound"),
                s(&"off"),
                s(&"--dns"),
                s(&"off"),
                s(&"--admin"),
                s(&loopback(ports.server_admin)),
                s(&"--pod-name"),
                s(&"server-5d8f7c-x2x4q"),
                s(&"--workload-name"),
                s(&"server"),
                s(&"--namespace"),
                s(&"demo"),
                s(&"--cluster-id"),
                s(&"local-cluster"),
                s(&"--label"),
                s(&"app=server"),
            ],
        )?;
        self.spawn(
            "proxy-client",
            &[
                s(&"--log-format"),
                s(&"json"),
                s(&"proxy"),
                s(&"--xds"),
                s(&loopback(ports.client_xds)),
                s(&"--workload-api"),
                format!("unix://{}", client.socket.display()),
                s(&"--bind-vips"),
                s(&"--outbound"),
                s(&"off"),
                s(&"--dns"),
                s(&loopback(ports.dns)),
                s(&"--admin"),
                s(&loopback(ports.client_admin)),
                s(&"--pod-name"),
                s(&"client-6b7c9-k8s2p"),
                s(&"--workload-name"),
                s(&"client"),
                s(&"--namespace"),
                s(&"demo"),
                s(&"--cluster-id"),
                s(&"other1-cluster"),
                s(&"--label"),
                s(&"app=client"),
            ],
        )?;
        for (name, admin) in [
            ("proxy-server", ports.server_admin),
            ("proxy-client", ports.client_admin),
        ] {
            let addr = loopback(admin);
            self.wait(name, async || ready(addr).await).await?;
        }
        Ok(())
    }

    /// The client proxy's access-log line for the connection from `local`.
    pub async fn client_access_for(
        &self,
        local: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Access> {
        let log = self
            .kids
            .iter()
            .find(|k| k.name == "proxy-client")
            .map(|k| k.log.clone())
            .context("no client proxy")?;
        let deadline = Instant::now() + timeout;
        let src = local.to_string();
        loop {
            let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
            for line in text.lines().rev() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let f = &v["fields"];
                if v["target"] == "ferry::access" && f["src"] == src.as_str() {
                    let get = |k: &str| f[k].as_str().unwrap_or("-").to_owned();
                    if get("reason") != "completed" {
                        bail!(
                            "the sidecar closed the connection: {} {}",
                            get("reason"),
                            get("detail")
                        );
                    }
                    return Ok(Access {
                        peer_id: get("peer_id"),
                        peer_meta: get("peer_meta"),
                    });
                }
            }
            if Instant::now() > deadline {
                bail!("no access-log line for {src} in the client proxy's log");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of every child's log, for a failure report.
    pub fn log_tails(&self, n: usize) -> String {
        self.kids
            .iter()
            .map(|k| format!("--- {} ---\n{}", k.name, tail(&k.log, n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM to every child (proxies and gateway first), then a kill after 5 s.
    pub async fn stop(&mut self) {
        for k in self.kids.iter().rev() {
            if let Some(pid) = k.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for k in self.kids.iter_mut().rev() {
            if tokio::time::timeout(Duration::from_secs(5), k.child.wait())
                .await
                .is_err()
            {
                let _ = k.child.kill().await;
            }
        }
    }
}

async fn ready(admin: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
        return false;
    };
    if s.write_all(b"GET /ready HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200"))
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
