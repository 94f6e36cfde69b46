//! The ADS client ferry's own proxy and DNS use to follow a ferry agent (or any xDS server
//! serving the same resources).
//!
//! It subscribes over one SotW ADS stream to every cluster (CDS wildcard) and to the
//! endpoints of the EDS clusters, decodes each resource into plain domain types
//! ([`model`]), ACKs what it applied and NACKs (one by one, with the reason) what it could
//! not, and publishes an immutable [`XdsState`] after every update. When the server goes
//! away it reconnects with exponential backoff and jitter, and the last good state keeps
//! serving meanwhile (last-known-good cache).
//!
//! Readers hold a [`StateReader`]: checking for a newer state is one atomic load, so the
//! data path never waits on a lock or on the network.
//!
//! ```no_run
//! # async fn demo() {
//! use xds::client::{AdsClient, AdsClientConfig};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let client = AdsClient::start(AdsClientConfig::new("http://127.0.0.1:18001"), shutdown);
//! let mut reader = client.reader();
//! // On each DNS query / accepted connection:
//! let vip = reader.current().resolve("server.demo.local.domain");
//! # }
//! ```

pub mod model;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, Resource as PbResource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use registry::latest::Latest;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use model::{
    ClusterInfo, Endpoints, GatewayEndpoint, IstioTls, RemoteService, ResourceError, ServerIdMatch,
    Transport, XdsState,
};

use crate::resources::ResourceType;
use crate::type_url;

/// The largest response accepted (10,000 clusters are a few MB).
const MAX_MESSAGE: usize = 256 << 20;

/// How to reach the xDS server and who we are.
#[derive(Debug, Clone)]
pub struct AdsClientConfig {
    /// `http://host:port` of the ADS server (plaintext gRPC, the Cofide convention).
    pub server: String,
    /// The node id sent on the first request.
    pub node_id: String,
    /// The node cluster sent on the first request.
    pub node_cluster: String,
    /// First reconnect delay.
    pub initial_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
}

impl AdsClientConfig {
    /// Defaults for a sidecar: node `ferry-proxy`, backoff 100 ms doubling to 15 s.
    pub fn new(server: impl Into<String>) -> Self {
        AdsClientConfig {
            server: server.into(),
            node_id: "ferry-proxy".to_owned(),
            node_cluster: "ferry".to_owned(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether the client currently has a stream to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Dialling (first time or after a failure).
    Connecting,
    /// A stream is open and has delivered at least one response.
    Connected,
    /// The last attempt failed; retrying after a backoff.
    Disconnected {
        /// Consecutive failed attempts.
        attempt: u32,
        /// Why.
        error: String,
    },
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a valid URI.
    #[error("invalid xDS server address {server:?}: {reason} (expected http://host:port)")]
    Address {
        /// What was configured.
        server: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Could not connect.
    #[error(
        "cannot connect to the xDS server at {server}: {source} (is the ferry agent running and listen.xds reachable?)"
    )]
    Connect {
        /// The server.
        server: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The stream failed or the server refused it.
    #[error("xDS stream to {server} failed: {status}")]
    Stream {
        /// The server.
        server: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The server closed the stream.
    #[error("xDS server {server} closed the stream")]
    Closed {
        /// The server.
        server: String,
    },
}

/// A running ADS client. Dropping it does not stop the task; cancel the token given to
/// [`AdsClient::start`].
#[derive(Debug)]
pub struct AdsClient {
    state: watch::Receiver<Arc<XdsState>>,
    connection: watch::Receiver<ConnectionState>,
    task: tokio::task::JoinHandle<()>,
}

impl AdsClient {
    /// Starts following the server; runs until `shutdown` fires.
    pub fn start(config: AdsClientConfig, shutdown: CancellationToken) -> AdsClient {
        let (state_tx, state) = watch::channel(Arc::new(XdsState::default()));
        let (conn_tx, connection) = watch::channel(ConnectionState::Connecting);
        let task = tokio::spawn(run(config, state_tx, conn_tx, shutdown));
        AdsClient {
            state,
            connection,
            task,
        }
    }

    /// A lock-free reader of the latest state, for the data path.
    pub fn reader(&self) -> StateReader {
        StateReader::new(self.state.clone())
    }

    /// A watch of the latest state, for tasks that react to changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<XdsState>> {
        self.state.clone()
    }

    /// The latest state.
    pub fn state(&self) -> Arc<XdsState> {
        self.state.borrow().clone()
    }

    /// A watch of the connection state (for health and admin endpoints).
    pub fn connection(&self) -> watch::Receiver<ConnectionState> {
        self.connection.clone()
    }

    /// Waits until the state is synced (clusters and all their endpoints arrived).
    pub async fn wait_synced(&self) -> Arc<XdsState> {
        let mut rx = self.state.clone();
        let synced = rx.wait_for(|s| s.synced).await.map(|s| s.clone());
        match synced {
            Ok(s) => s,
            Err(_) => rx.borrow().clone(),
        }
    }

    /// Whether the client task has ended (after shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Reads the latest [`XdsState`] without locking: registry's [`Latest`], whose cached `Arc`
/// is replaced only when the watch's version (an atomic) says a newer one exists.
pub type StateReader = Latest<XdsState>;

/// The delay before reconnect attempt `attempt` (1-based): exponential, capped, with jitter
/// in [delay/2, delay] so a fleet of sidecars does not reconnect in lockstep.
pub fn backoff(config: &AdsClientConfig, attempt: u32) -> Duration {
    let exp = config
        .initial_backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(config.max_backoff);
    let half = capped / 2;
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let frac = (h.finish() % 1000) as u32;
    half + half * frac / 1000
}

/// What the client has applied, across reconnects (the last-known-good cache).
#[derive(Debug, Default)]
struct Cache {
    clusters: BTreeMap<String, ClusterInfo>,
    endpoints: HashMap<String, Vec<GatewayEndpoint>>,
    clusters_seen: bool,
    updates: u64,
}

impl Cache {
    fn publish(&mut self, tx: &watch::Sender<Arc<XdsState>>) {
        self.updates += 1;
        let mut synced = self.clusters_seen;
        let services = self
            .clusters
            .values()
            .map(|c| {
                let endpoints = match &c.inline_endpoints {
                    Some(e) => e.clone(),
                    None => match self.endpoints.get(&c.name) {
                        Some(e) => e.clone(),
                        None => {
                            synced = false;
                            Vec::new()
                        }
                    },
                };
                RemoteService {
                    cluster: c.clone(),
                    endpoints,
                }
            })
            .collect();
        tx.send_replace(Arc::new(XdsState::new(services, synced, self.updates)));
    }

    fn eds_names(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter(|c| c.uses_eds())
            .map(|c| c.name.clone())
            .collect()
    }
}

async fn run(
    config: AdsClientConfig,
    state: watch::Sender<Arc<XdsState>>,
    conn: watch::Sender<ConnectionState>,
    shutdown: CancellationToken,
) {
    let mut cache = Cache::default();
    let mut attempt = 0u32;
    while !shutdown.is_cancelled() {
        conn.send_replace(ConnectionState::Connecting);
        let result = tokio::select! {
            r = session(&config, &mut cache, &state, &conn) => r,
            _ = shutdown.cancelled() => break,
        };
        let error = match result {
            Ok(never) => match never {},
            Err((e, got_response)) => {
                if got_response {
                    attempt = 0;
                }
                e
            }
        };
        attempt += 1;
        let delay = backoff(&config, attempt);
        tracing::warn!(
            error = %error,
            attempt,
            retry_in = ?delay,
            services = cache.clusters.len(),
            "xds client: disconnected; still serving the last known config"
        );
        conn.send_replace(ConnectionState::Disconnected {
            attempt,
            error: error.to_string(),
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}

/// Per-type protocol state of one stream.
#[derive(Debug, Default)]
struct TypeState {
    /// Last ACKed version.
    version: String,
    /// Nonce of the last response.
    nonce: String,
}

/// Runs one stream until it fails. The `bool` says whether any response arrived (so the
/// backoff restarts from the beginning).
async fn session(
    config: &AdsClientConfig,
    cache: &mut Cache,
    state: &watch::Sender<Arc<XdsState>>,
    conn: &watch::Sender<ConnectionState>,
) -> Result<std::convert::Infallible, (ClientError, bool)> {
    let server = config.server.clone();
    let endpoint = tonic::transport::Endpoint::from_shared(server.clone())
        .map_err(|e| {
            (
                ClientError::Address {
                    server: server.clone(),
                    reason: e.to_string(),
                },
                false,
            )
        })?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|source| {
        (
            ClientError::Connect {
                server: server.clone(),
                source,
            },
            false,
        )
    })?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let stream_err = |status| ClientError::Stream {
        server: server.clone(),
        status,
    };
    // The first request carries the node; later ones do not need to.
    let _ = tx
        .send(DiscoveryRequest {
            node: Some(Node {
                id: config.node_id.clone(),
                cluster: config.node_cluster.clone(),
                ..Default::default()
            }),
            type_url: ResourceType::Cluster.type_url().to_owned(),
            ..Default::default()
        })
        .await;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|s| (stream_err(s), false))?
        .into_inner();
    let mut cds = TypeState::default();
    let mut eds = TypeState::default();
    let mut eds_names: Option<BTreeSet<String>> = None;
    let mut got_response = false;
    loop {
        let resp = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err((
                    ClientError::Closed {
                        server: server.clone(),
                    },
                    got_response,
                ));
            }
            Err(s) => return Err((stream_err(s), got_response)),
        };
        if !got_response {
            got_response = true;
            conn.send_replace(ConnectionState::Connected);
            tracing::info!(server = %server, "xds client: connected");
        }
        let mut requests = Vec::new();
        match resp.type_url.parse::<ResourceType>() {
            Ok(ResourceType::Cluster) => {
                let errors = apply_clusters(cache, &resp);
                requests.push(ack_or_nack(
                    &mut cds,
                    ResourceType::Cluster,
                    None,
                    &resp,
                    errors,
                ));
                let names = cache.eds_names();
                cache.endpoints.retain(|n, _| names.contains(n));
                if eds_names.as_ref() != Some(&names) {
                    requests.push(DiscoveryRequest {
                        type_url: ResourceType::Endpoint.type_url().to_owned(),
                        resource_names: names.iter().cloned().collect(),
                        version_info: eds.version.clone(),
                        response_nonce: eds.nonce.clone(),
                        ..Default::default()
                    });
                    eds_names = Some(names);
                }
            }
            Ok(ResourceType::Endpoint) => {
                let errors = apply_endpoints(cache, &resp);
                let names = eds_names.clone().unwrap_or_default();
                requests.push(ack_or_nack(
                    &mut eds,
                    ResourceType::Endpoint,
                    Some(names),
                    &resp,
                    errors,
                ));
            }
            _ => {
                tracing::warn!(type_url = %resp.type_url, "xds client: ignoring a response of a type it did not ask for");
                continue;
            }
        }
        cache.publish(state);
        for r in requests {
            if tx.send(r).await.is_err() {
                return Err((
                    ClientError::Closed {
                        server: server.clone(),
                    },
                    got_response,
                ));
            }
        }
    }
}

fn ack_or_nack(
    st: &mut TypeState,
    t: ResourceType,
    names: Option<BTreeSet<String>>,
    resp: &DiscoveryResponse,
    errors: Vec<ResourceError>,
) -> DiscoveryRequest {
    st.nonce = resp.nonce.clone();
    let error_detail = if errors.is_empty() {
        st.version = resp.version_info.clone();
        None
    } else {
        let message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(r#type = %t, version = %resp.version_info, %message, "xds client: rejecting resources (NACK); the rest of the update applies");
        Some(RpcStatus {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: Vec::new(),
        })
    };
    DiscoveryRequest {
        type_url: t.type_url().to_owned(),
        resource_names: names.map(|n| n.into_iter().collect()).unwrap_or_default(),
        version_info: st.version.clone(),
        response_nonce: st.nonce.clone(),
        error_detail,
        ..Default::default()
    }
}

/// Decodes resource `index` of a response as `P` (type URL `expected`). A resource may
/// come bare or in the `envoy.service.discovery.v3.Resource` wrapper (which names it). A
/// failure names the resource as well as it can be named before decoding: the wrapper's
/// name, else `<index> of <type URL>`, so the NACK says which one was rejected.
fn decode<P: Message + Default>(
    any: &Any,
    index: usize,
    expected: &'static str,
) -> Result<P, ResourceError> {
    let unnamed = || format!("#{index} of {}", type_url::message_name(&any.type_url));
    let (name, inner) = if any.type_url == type_url::RESOURCE {
        match PbResource::decode(any.value.as_slice()) {
            Ok(r) => {
                let name = if r.name.is_empty() { unnamed() } else { r.name };
                (name, r.resource.unwrap_or_default())
            }
            Err(e) => {
                return Err(ResourceError::Decode {
                    name: unnamed(),
                    expected: type_url::message_name(expected),
                    reason: format!("the Resource wrapper does not decode: {e}"),
                });
            }
        }
    } else {
        (unnamed(), any.clone())
    };
    if type_url::message_name(&inner.type_url) != type_url::message_name(expected) {
        return Err(ResourceError::Decode {
            name,
            expected: type_url::message_name(expected),
            reason: format!("type URL is {}", inner.type_url),
        });
    }
    P::decode(inner.value.as_slice()).map_err(|e| ResourceError::Decode {
        name,
        expected: type_url::message_name(expected),
        reason: e.to_string(),
    })
}

/// Applies a full-state CDS response; a cluster that does not decode keeps its previous
/// version (if any) and is reported.
fn apply_clusters(cache: &mut Cache, resp: &DiscoveryResponse) -> Vec<ResourceError> {
    let mut errors = Vec::new();
    let mut next = BTreeMap::new();
    for (i, any) in resp.resources.iter().enumerate() {
        let decoded = decode::<Cluster>(any, i, type_url::CLUSTER);
        let cluster = match decoded {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        match ClusterInfo::try_from(&cluster) {
            Ok(info) => {
                next.insert(info.name.clone(), info);
            }
            Err(e) => {
                if let Some(prev) = cache.clusters.get(&cluster.name) {
                    next.insert(prev.name.clone(), prev.clone());
                }
                errors.push(e);
            }
        }
    }
    cache.clusters = next;
    cache.clusters_seen = true;
    errors
}

/// Applies an EDS response (only the resources it carries).
fn apply_endpoints(cache: &mut Cache, resp: &DiscoveryResponse) -> Vec<ResourceError> {
    let mut errors = Vec::new();
    for (i, any) in resp.resources.iter().enumerate() {
        let cla = match decode::<ClusterLoadAssignment>(any, i, type_url::ENDPOINT) {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        match Endpoints::try_from(&cla) {
            Ok(e) => {
                cache.endpoints.insert(e.cluster, e.endpoints);
            }
            Err(e) => errors.push(e),
        }
    }
    errors
}
