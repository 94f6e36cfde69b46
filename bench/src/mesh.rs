//! The topology every data-path scenario runs, with the proxy under test swapped:
//!
//! - **direct**: client -> the plain server;
//! - **ferry**: client -> `ferry proxy --bind-vips` -> the rustls server (`IstioMtls`) or
//!   the plain server (`Mtls`, passthrough);
//! - **envoy**: client -> stock Envoy with the Cofide sidecar bootstrap -> the same.
//!
//! Each proxy has its own `ferry agent` (xDS, Workload API + SDS, CA) with the same config
//! except the service port: Envoy's outbound listener binds `0.0.0.0:PORT` (what the agent's
//! LDS says), which would collide with ferry's `VIP:PORT`. Both agents register the same
//! entries: the client SVID for this uid (what both proxies present), the server SVID
//! additionally for this executable (what the rustls server presents).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::config::Entry;
use testkit::mesh::{FerryZone, ProxyCmd};

use crate::load;

const TD: &str = "local.domain";
const CLIENT_ID: &str = "spiffe://local.domain/ns/demo/sa/client";
/// The `IstioMtls` service's identity (`spiffeIDPaths: [/ns/demo/sa/istio]`).
const SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/istio";
/// The `IstioMtls` service (proxy originates mTLS).
const ISTIO_HOST: &str = "istio.demo.local.domain";
/// The `Mtls` service (passthrough to the plain server).
const PASS_HOST: &str = "pass.demo.local.domain";
const READY: Duration = Duration::from_secs(30);

/// Which proxy a measurement went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// No proxy.
    Direct,
    /// `ferry proxy`.
    Ferry,
    /// Stock Envoy.
    Envoy,
}

impl Variant {
    /// All three, in report order.
    pub const ALL: [Variant; 3] = [Variant::Direct, Variant::Ferry, Variant::Envoy];

    /// The report's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Ferry => "ferry",
            Variant::Envoy => "envoy",
        }
    }
}

/// The service's TLS mode, which decides what the proxy does with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The proxy originates Istio mTLS with its SVID.
    IstioMtls,
    /// The proxy passes the app's bytes through.
    Mtls,
}

impl Mode {
    /// Both, in report order.
    pub const ALL: [Mode; 2] = [Mode::IstioMtls, Mode::Mtls];

    /// The `tlsMode` name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::IstioMtls => "IstioMtls",
            Mode::Mtls => "Mtls",
        }
    }
}

/// Options for the topology.
#[derive(Debug, Clone)]
pub struct Options {
    /// The ferry binary (`ferry agent` and `ferry proxy`).
    pub ferry: PathBuf,
    /// Stock Envoy.
    pub envoy: PathBuf,
    /// Envoy `--concurrency` (ferry's runtime follows the cores).
    pub envoy_concurrency: usize,
    /// The TLS server picks the cipher suite (AES-128-GCM first) instead of honouring
    /// the proxy's offer order.
    pub server_cipher_order: bool,
}

/// One proxied side: its two service addresses.
struct Side {
    istio: SocketAddr,
    mtls: SocketAddr,
}

/// The running topology; everything stops when it drops.
pub struct Mesh {
    direct: SocketAddr,
    ferry: Side,
    envoy: Side,
    ferry_proxy: tokio::process::Child,
    envoy_proc: testkit::envoy::Envoy,
    _zones: [FerryZone; 2],
}

impl Mesh {
    /// Where `variant` takes connections for `mode`.
    pub fn target(&self, variant: Variant, mode: Mode) -> SocketAddr {
        let side = match variant {
            Variant::Direct => return self.direct,
            Variant::Ferry => &self.ferry,
            Variant::Envoy => &self.envoy,
        };
        match mode {
            Mode::IstioMtls => side.istio,
            Mode::Mtls => side.mtls,
        }
    }

    /// The proxy process of `variant` (none for direct).
    pub fn pid(&self, variant: Variant) -> Option<u32> {
        match variant {
            Variant::Direct => None,
            Variant::Ferry => self.ferry_proxy.id(),
            Variant::Envoy => self.envoy_proc.pid(),
        }
    }

    /// Starts the servers on `servers` (a runtime of their own, so their CPU is counted
    /// apart), both agents, `ferry proxy` and Envoy, and waits until an echo round trip
    /// passes through every variant and mode.
    pub async fn start(opts: &Options, servers: &tokio::runtime::Handle) -> anyhow::Result<Mesh> {
        let me = std::env::current_exe().context("current_exe")?;
        let plain = bind(servers, None).await?;

        let mut zones = Vec::new();
        let mut sides = Vec::new();
        let mut negotiated = Vec::new();
        // Two different ports (Envoy's wildcard bind would collide with ferry's VIP:port),
        // both outside the ephemeral range that the memory scenario's connections fill.
        let ferry_port = testkit::free_port();
        let envoy_port = testkit::free_port();
        for envoy in [false, true] {
            let port = if envoy { envoy_port } else { ferry_port };
            let tls_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let tls_addr = tls_listener.local_addr()?;
            // Envoy binds the agent's `listen.outbound`; ferry binds the VIPs itself.
            let outbound: SocketAddr = if envoy {
                ([0, 0, 0, 0], port).into()
            } else {
                ([127, 0, 0, 1], testkit::free_port()).into()
            };
            let services = testkit::mesh::own_domain_service("istio", port, "IstioMtls", tls_addr)
                + &testkit::mesh::own_domain_service("pass", port, "Mtls", plain);
            let uid = format!("unix:uid:{}", testkit::workload::my_uid());
            let zone = FerryZone::start(
                &opts.ferry,
                testkit::tempdir()?,
                TD,
                outbound,
                &[
                    Entry::new(
                        SERVER_ID,
                        [uid.clone(), format!("unix:path:{}", me.display())],
                    ),
                    Entry::new(CLIENT_ID, [uid]),
                ],
                &services,
            )
            .await;
            let ctx =
                testkit::mesh::fetch_context(&format!("unix://{}", zone.socket.display())).await;
            let acceptor = load::tls_acceptor(
                testkit::mesh::svid(&ctx, SERVER_ID),
                testkit::mesh::roots(&ctx, TD),
                opts.server_cipher_order,
            )?;
            tls_listener.set_nonblocking(true)?;
            let seen = load::Negotiated::default();
            negotiated.push(seen.clone());
            servers.spawn(async move {
                if let Ok(l) = tokio::net::TcpListener::from_std(tls_listener) {
                    load::accept_loop(l, Some(acceptor), seen).await;
                }
            });
            sides.push(Side {
                istio: (zone.vip(ISTIO_HOST), port).into(),
                mtls: (zone.vip(PASS_HOST), port).into(),
            });
            zones.push(zone);
        }
        let [zf, ze]: [FerryZone; 2] =
            zones.try_into().map_err(|_| anyhow::anyhow!("two zones"))?;
        let [ferry, envoy]: [Side; 2] =
            sides.try_into().map_err(|_| anyhow::anyhow!("two sides"))?;

        let ferry_proxy = start_ferry_proxy(&opts.ferry, &zf).await?;
        let admin = testkit::free_port();
        let envoy_proc = testkit::envoy::Envoy::start_with_args(
            &opts.envoy,
            &testkit::envoy::render_sidecar_bootstrap(ze.xds, &ze.socket, admin),
            admin,
            &[
                "--concurrency",
                &opts.envoy_concurrency.to_string(),
                "--log-level",
                "warn",
            ],
        )
        .await?;
        let mesh = Mesh {
            direct: plain,
            ferry,
            envoy,
            ferry_proxy,
            envoy_proc,
            _zones: [zf, ze],
        };
        for v in Variant::ALL {
            for m in Mode::ALL {
                mesh.wait_probe(v, m).await?;
            }
        }
        for (v, seen) in [Variant::Ferry, Variant::Envoy].iter().zip(&negotiated) {
            let what = seen.lock().ok().and_then(|g| g.clone());
            eprintln!(
                "{} -> TLS server negotiated {}",
                v.name(),
                what.as_deref().unwrap_or("?")
            );
        }
        Ok(mesh)
    }

    async fn wait_probe(&self, v: Variant, m: Mode) -> anyhow::Result<()> {
        let addr = self.target(v, m);
        let deadline = Instant::now() + READY;
        loop {
            match load::probe(addr).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let log = match v {
                        Variant::Envoy => self.envoy_proc.log_tail(40),
                        Variant::Ferry => tail(&ferry_log(&self._zones[0]), 40),
                        Variant::Direct => String::new(),
                    };
                    anyhow::bail!(
                        "no echo through {} ({}) at {addr} after {READY:?}: {e:#}\n{log}",
                        v.name(),
                        m.name()
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Binds a plain server on loopback, served on `servers`.
async fn bind(
    servers: &tokio::runtime::Handle,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?;
    servers.spawn(async move {
        if let Ok(l) = tokio::net::TcpListener::from_std(l) {
            load::accept_loop(l, tls, load::Negotiated::default()).await;
        }
    });
    Ok(addr)
}

/// `ferry proxy --bind-vips` fed by `zone`'s agent, at log level `info` (its default, with
/// one access-log line per connection, as deployed), logging to `<zone dir>/ferry-proxy.log`.
async fn start_ferry_proxy(
    ferry: &Path,
    zone: &FerryZone,
) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::File::create(ferry_log(zone))?;
    let cmd = ProxyCmd::new(&zone.socket)
        .arg("--xds", format!("http://{}", zone.xds))
        .flag("--bind-vips");
    let mut child = tokio::process::Command::new(ferry)
        .args(cmd.args())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("spawn ferry proxy")?;
    let deadline = Instant::now() + READY;
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("ferry proxy exited ({status}) before it was ready");
        }
        if testkit::http::get(cmd.admin, "/ready")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            return Ok(child);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "ferry proxy not ready on http://{}/ready after {READY:?}",
            cmd.admin
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ferry_log(zone: &FerryZone) -> PathBuf {
    zone.dir.path().join("ferry-proxy.log")
}

/// The last `n` lines of a log file, headed by its path.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- {} ---\n{}",
        path.display(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}
