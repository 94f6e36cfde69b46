//! An in-process xDS control plane wired as `ferry agent` wires it (config file on disk,
//! hot reload, translator, ADS server on a loopback port), for the tests of `xds` and of
//! the proxies it feeds.
// Test harness: a failed setup is a test failure, loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use registry::config::{Config, ConfigWatcher};
use tokio_util::sync::CancellationToken;
use xds::resources::{Snapshot, spawn_translator};
use xds::server::{XdsMetrics, XdsServer};

use crate::config::AgentDoc;
pub use crate::config::{Gw, host, service_doc};

/// Listener settings for the `AgentConfig` a test writes.
#[derive(Clone, Copy)]
pub struct Ports {
    /// `listen.outbound`.
    pub outbound: SocketAddr,
    /// `listen.dns` (UDP).
    pub dns: SocketAddr,
}

impl Ports {
    /// Free ports on loopback / all addresses.
    pub fn free() -> Self {
        Ports {
            outbound: ([0, 0, 0, 0], crate::free_port()).into(),
            dns: ([127, 0, 0, 1], crate::free_port()).into(),
        }
    }
}

/// The `AgentConfig` document of trust domain `client.domain` with these listeners.
pub fn agent_doc(ports: Ports) -> String {
    AgentDoc::new("client.domain")
        .listen("outbound", ports.outbound)
        .listen("dns", ports.dns)
        .render()
}

/// A running control plane, as `ferry agent` wires it.
pub struct Agent {
    pub dir: crate::TempDir,
    pub path: PathBuf,
    pub addr: SocketAddr,
    pub metrics: Arc<XdsMetrics>,
    pub snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    pub config: tokio::sync::watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
    _watcher: ConfigWatcher,
}

impl Agent {
    /// Writes `yaml` to a config file and starts watcher, translator and server on an
    /// ephemeral loopback port.
    pub async fn start(yaml: &str) -> Agent {
        Self::start_on(yaml, ([127, 0, 0, 1], 0).into()).await
    }

    /// Like [`Agent::start`], on a given address (to restart a server where it was).
    pub async fn start_on(yaml: &str, xds: SocketAddr) -> Agent {
        let dir = crate::tempdir().expect("tempdir");
        let path = dir.path().join("ferry.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let watcher = ConfigWatcher::start(&path).await.expect("config loads");
        let config = watcher.subscribe();
        let (snapshots, _task) = spawn_translator(config.clone());
        let shutdown = CancellationToken::new();
        let server = XdsServer::new(snapshots.clone(), shutdown.clone());
        let metrics = server.metrics();
        let listener = tokio::net::TcpListener::bind(xds).await.expect("bind xds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(server.serve_on(listener));
        Agent {
            dir,
            path,
            addr,
            metrics,
            snapshots,
            config,
            shutdown,
            _watcher: watcher,
        }
    }

    /// Replaces the config file the way editors do (write a temp file, rename over).
    pub fn write(&self, yaml: &str) {
        let tmp = self.dir.path().join(".ferry.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write temp config");
        std::fs::rename(&tmp, &self.path).expect("rename config");
    }

    /// `http://<addr>` for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A TCP server on `addr` that answers every connection with `tag` then echoes.
pub async fn echo_server(addr: SocketAddr, tag: &'static str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind echo");
    let local = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(tag.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    local
}
