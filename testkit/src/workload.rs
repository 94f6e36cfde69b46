//! A Workload API server in-process, started from a real config file the way `ferry agent`
//! starts it (config watcher -> CA -> server), and clients to poke it with: for the tests
//! of `workload-api` and of everything that fetches SVIDs.

// Test harness code: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use registry::config::ConfigWatcher;
use tokio_util::sync::CancellationToken;
use workload_api::WorkloadApiServer;

use crate::config::AgentDoc;
pub use crate::config::Entry;

/// A running server and everything needed to poke it.
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), workload_api::Error>>,
    pub authority: std::sync::Arc<attest::Authority>,
    _watcher: ConfigWatcher,
}

impl Agent {
    /// `unix:///...` for clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops the server and waits for it (the socket file goes away).
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops within 10 s")
            .expect("server task")
            .expect("server result");
    }
}

/// The software CA a config describes, as `ferry agent` opens it.
pub fn open_authority(config: &registry::config::Config) -> std::sync::Arc<attest::Authority> {
    let a = &config.agent;
    let settings =
        attest::AuthorityConfig::new(a.trust_domain.clone(), a.ca.state_dir.clone(), a.ca.ca_ttl);
    let keys = settings.software_keys();
    attest::Authority::open(settings, keys).expect("CA opens")
}

/// The uid the tests run as.
pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The AgentConfig document these tests use: trust domain `example.org`, the socket and CA
/// in `dir`, a 1 h CA, `svid_ttl`, the entries and federated bundles given.
pub fn config_yaml(
    dir: &Path,
    svid_ttl: &str,
    entries: &[Entry<'_>],
    bundles: &[(&str, &Path)],
) -> String {
    let mut doc = AgentDoc::in_dir("example.org", dir)
        .ca("caTtl", "1h")
        .ca("svidTtl", svid_ttl);
    for (td, file) in bundles {
        doc = doc.bundle(td, file);
    }
    for e in entries {
        doc = doc.entry(e);
    }
    doc.render()
}

/// Writes `yaml` to `<dir>/ferry.yaml` and starts a server from it.
pub async fn start(dir: &Path, yaml: &str) -> Agent {
    let config = dir.join("ferry.yaml");
    std::fs::write(&config, yaml).unwrap();
    start_from(dir, &config).await
}

/// Starts a server from an existing config file in `dir`.
pub async fn start_from(dir: &Path, config: &Path) -> Agent {
    let watcher = ConfigWatcher::start(config).await.expect("config loads");
    let shutdown = CancellationToken::new();
    let server = WorkloadApiServer::start(
        watcher.subscribe(),
        open_authority(&watcher.current()),
        shutdown.clone(),
    )
    .expect("server starts");
    let authority = server.authority().clone();
    let task = tokio::spawn(server.serve());
    Agent {
        dir: dir.to_owned(),
        config: config.to_owned(),
        socket: dir.join("agent.sock"),
        shutdown,
        task,
        authority,
        _watcher: watcher,
    }
}

/// Adds the Workload API security header, or not.
#[derive(Clone, Copy)]
pub struct Header(pub bool);

impl tonic::service::Interceptor for Header {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0 {
            r.metadata_mut()
                .insert("workload.spiffe.io", "true".parse().unwrap());
        }
        Ok(r)
    }
}

/// The generated client over a channel, with [`Header`].
pub type RawClient = workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Header>,
>;

/// A client of the generated stubs on the agent's socket, optionally without the
/// security header (the `spiffe` crate always sends it).
pub async fn raw_client(agent: &Agent, with_header: bool) -> RawClient {
    raw_client_at(&agent.endpoint(), with_header).await
}

/// Like [`raw_client`], for any endpoint string.
pub async fn raw_client_at(endpoint: &str, with_header: bool) -> RawClient {
    let ep = spiffe::transport::Endpoint::parse(endpoint).unwrap();
    let channel = spiffe::transport::connect(&ep).await.unwrap();
    workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
        channel,
        Header(with_header),
    )
}

/// Runs `cmd` as uid/gid 65534 (`nobody`; needs root) and returns its stdout and stderr.
/// The child runs on the blocking pool so the in-process server keeps serving it.
pub async fn run_as_nobody(mut cmd: std::process::Command) -> String {
    use std::os::unix::process::CommandExt;
    cmd.uid(65534).gid(65534);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("child finishes within 60 s")
    .expect("join")
    .expect("spawn child as uid 65534");
    format!(
        "status: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
