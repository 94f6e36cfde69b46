//! The demo's two zones as config files: `local.domain` serves, `other1.domain` calls,
//! every port on loopback from `--base-port` up, each zone's CA created before its agent
//! starts so that the other zone's config can name its bundle file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The serving trust domain.
pub const SERVER_TD: &str = "local.domain";
/// The calling trust domain.
pub const CLIENT_TD: &str = "other1.domain";
/// The IstioMtls service (served by a plain HTTP app behind ferry's inbound).
pub const ISTIO_HOST: &str = "server.demo.local.domain";
/// The Mtls service (an app doing its own mTLS with its SVID).
pub const MTLS_HOST: &str = "mtls-server.demo.local.domain";
/// Both services' port, as the mission names it.
pub const SERVICE_PORT: u16 = 8443;
/// The IstioMtls server's SPIFFE ID (its sidecar's).
pub const SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/server";
/// The Mtls server app's SPIFFE ID.
pub const MTLS_SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/mtls-server";
/// The client's SPIFFE ID (its sidecar's and its own).
pub const CLIENT_ID: &str = "spiffe://other1.domain/ns/demo/sa/client";

/// Every loopback port the demo binds, from `--base-port`.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// `local.domain` agent's xDS.
    pub server_xds: u16,
    /// `other1.domain` agent's xDS (the client proxy follows it).
    pub client_xds: u16,
    /// `ferry gateway` (east-west).
    pub gateway: u16,
    /// The server-side `ferry proxy --inbound`.
    pub inbound: u16,
    /// The plain HTTP ping-pong app.
    pub app: u16,
    /// The Mtls app.
    pub mtls_app: u16,
    /// Server proxy admin.
    pub server_admin: u16,
    /// Client proxy DNS (UDP and TCP).
    pub dns: u16,
    /// Client proxy admin.
    pub client_admin: u16,
    /// The agents' `listen.dns` / `listen.outbound` (advertised in LDS, not bound by
    /// `ferry agent`), kept in the range so nothing collides with a real sidecar.
    pub advertised: [u16; 2],
}

impl Ports {
    /// Consecutive ports from `base`.
    pub fn from(base: u16) -> anyhow::Result<Ports> {
        let at = |i: u16| {
            base.checked_add(i)
                .ok_or_else(|| anyhow::anyhow!("--base-port {base} leaves no room for 11 ports"))
        };
        Ok(Ports {
            server_xds: at(0)?,
            client_xds: at(1)?,
            gateway: at(2)?,
            inbound: at(3)?,
            app: at(4)?,
            mtls_app: at(5)?,
            server_admin: at(6)?,
            dns: at(7)?,
            client_admin: at(8)?,
            advertised: [at(9)?, at(10)?],
        })
    }

    /// The TCP ports to check before starting (name, address).
    pub fn tcp(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("local.domain xDS", self.server_xds),
            ("other1.domain xDS", self.client_xds),
            ("gateway", self.gateway),
            ("server inbound", self.inbound),
            ("ping-pong app", self.app),
            ("Mtls app", self.mtls_app),
            ("server proxy admin", self.server_admin),
            ("client DNS (tcp)", self.dns),
            ("client proxy admin", self.client_admin),
        ]
        .into_iter()
        .map(|(n, p)| (n, loopback(p)))
        .collect()
    }
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Paths of one zone's files inside the demo dir.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The config file.
    pub config: PathBuf,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// CA state.
    pub state: PathBuf,
    /// This zone's bundle, written for the other zone.
    pub bundle: PathBuf,
}

impl Zone {
    /// The layout under `dir/<td>`.
    pub fn new(dir: &Path, td: &str) -> Zone {
        let d = dir.join(td);
        Zone {
            config: d.join("ferry.yaml"),
            socket: d.join("agent.sock"),
            state: d.join("ca"),
            bundle: dir.join(format!("{td}.bundle.pem")),
        }
    }
}

fn agent_doc(
    td: &str,
    zone: &Zone,
    xds: u16,
    advertised: [u16; 2],
    other: (&str, &Zone),
) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: {td}\nlisten:\n  xds: 127.0.0.1:{xds}\n  workloadApi: unix://{sock}\n  dns: 127.0.0.1:{dns}\n  outbound: 127.0.0.1:{out}\nca:\n  stateDir: {state}\n  svidTtl: 1h\ntrustBundles:\n  {otd}:\n    file: {obundle}\n",
        sock = zone.socket.display(),
        dns = advertised[0],
        out = advertised[1],
        state = zone.state.display(),
        otd = other.0,
        obundle = other.1.bundle.display(),
    )
}

fn entry(id: &str, uid: u32) -> String {
    format!("  - spiffeId: {id}\n    selectors: [\"unix:uid:{uid}\"]\n")
}

fn service(name: &str, tls_mode: &str, annotate: bool, gateway: u16) -> String {
    let ann = if annotate {
        format!("  annotations:\n    ferry.dev/trust-domain: {SERVER_TD}\n")
    } else {
        String::new()
    };
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\n{ann}spec:\n  name: {name}\n  namespace: demo\n  port: {SERVICE_PORT}\n  exportedTrustDomains: [{CLIENT_TD}]\n  spiffeIDPaths: [/ns/demo/sa/{name}]\n  tlsMode: {tls_mode}\n  gateways:\n    - type: istio-eastwestgateway\n      port: {gateway}\n      ip: 127.0.0.1\n"
    )
}

/// The serving zone: the server identities, and the services it serves (which
/// `ferry gateway` routes).
pub fn server_config(zone: &Zone, client: &Zone, ports: &Ports, uid: u32) -> String {
    let mut y = agent_doc(
        SERVER_TD,
        zone,
        ports.server_xds,
        ports.advertised,
        (CLIENT_TD, client),
    );
    y.push_str("registrationEntries:\n");
    // The first entry is the default SVID: the inbound sidecar's.
    y.push_str(&entry(SERVER_ID, uid));
    y.push_str(&entry(MTLS_SERVER_ID, uid));
    y.push_str(&service("server", "IstioMtls", false, ports.gateway));
    y.push_str(&service("mtls-server", "Mtls", false, ports.gateway));
    y
}

/// The calling zone: the client identity and the imported services.
pub fn client_config(zone: &Zone, server: &Zone, ports: &Ports, uid: u32) -> String {
    let mut y = agent_doc(
        CLIENT_TD,
        zone,
        ports.client_xds,
        ports.advertised,
        (SERVER_TD, server),
    );
    y.push_str("registrationEntries:\n");
    y.push_str(&entry(CLIENT_ID, uid));
    y.push_str(&service("server", "IstioMtls", true, ports.gateway));
    y.push_str(&service("mtls-server", "Mtls", true, ports.gateway));
    y
}
