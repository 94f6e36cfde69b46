//! The ADS client ferry's own proxy and DNS use to follow a ferry agent, or any xDS
//! control plane that emits the standard Envoy resources a Cofide sidecar receives.
//!
//! It subscribes over one SotW ADS stream to every cluster (CDS wildcard), every listener
//! (LDS wildcard) and the endpoints of the EDS clusters, decodes each resource into plain
//! domain types ([`model`]), ACKs what it applied and NACKs (one by one, naming the
//! resource and the field) what it could not, and publishes an immutable [`XdsState`]
//! after every update. A rejected resource keeps its previous good version. When the
//! server goes away it reconnects with exponential backoff and jitter, and the last good
//! state keeps serving meanwhile (last-known-good cache).
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
//! // On each accepted connection, by its original destination:
//! let dst: std::net::SocketAddr = ([127, 240, 0, 1], 8443).into();
//! let cluster = reader.current().route(dst).and_then(|r| r.cluster.cloned());
//! # }
//! ```

mod cache;
pub mod model;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use registry::latest::Latest;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use cache::Cache;
pub use model::{
    Discovery, DnsListener, Endpoints, GatewayEndpoint, IstioTls, LdsListener, OutboundChain,
    OutboundListener, ResourceError, ResourceKind, Route, ServerIdMatch, Upstream, XdsState,
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
    /// Defaults for a sidecar: node `{id: "node", cluster: "cluster"}` (the Cofide sidecar
    /// bootstrap's), backoff 100 ms doubling to 15 s.
    pub fn new(server: impl Into<String>) -> Self {
        AdsClientConfig {
            server: server.into(),
            node_id: "node".to_owned(),
            node_cluster: "cluster".to_owned(),
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
    last_nack: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl AdsClient {
    /// Starts following the server; runs until `shutdown` fires.
    pub fn start(config: AdsClientConfig, shutdown: CancellationToken) -> AdsClient {
        let (state_tx, state) = watch::channel(Arc::new(XdsState::default()));
        let (conn_tx, connection) = watch::channel(ConnectionState::Connecting);
        let (nack_tx, last_nack) = watch::channel(None);
        let out = Outputs {
            state: state_tx,
            connection: conn_tx,
            last_nack: nack_tx,
        };
        let task = tokio::spawn(run(config, out, shutdown));
        AdsClient {
            state,
            connection,
            last_nack,
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

    /// A watch of the last NACK sent (type, version and every rejected resource with the
    /// field at fault), for the admin endpoint. It keeps the last one after later ACKs.
    pub fn last_nack(&self) -> watch::Receiver<Option<String>> {
        self.last_nack.clone()
    }

    /// Waits until the state is synced (clusters, listeners and all EDS endpoints arrived).
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

/// What the client publishes.
#[derive(Debug)]
struct Outputs {
    state: watch::Sender<Arc<XdsState>>,
    connection: watch::Sender<ConnectionState>,
    last_nack: watch::Sender<Option<String>>,
}

async fn run(config: AdsClientConfig, out: Outputs, shutdown: CancellationToken) {
    let mut cache = Cache::default();
    let mut attempt = 0u32;
    while !shutdown.is_cancelled() {
        out.connection.send_replace(ConnectionState::Connecting);
        let result = tokio::select! {
            r = session(&config, &mut cache, &out) => r,
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
            clusters = cache.clusters.len(),
            "xds client: disconnected; still serving the last known config"
        );
        out.connection.send_replace(ConnectionState::Disconnected {
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
    out: &Outputs,
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
    // Wildcard CDS and LDS; the first request carries the node, later ones need not.
    // EDS follows once CDS names the EDS clusters.
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
    let _ = tx
        .send(DiscoveryRequest {
            type_url: ResourceType::Listener.type_url().to_owned(),
            ..Default::default()
        })
        .await;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|s| (stream_err(s), false))?
        .into_inner();
    let mut cds = TypeState::default();
    let mut lds = TypeState::default();
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
            out.connection.send_replace(ConnectionState::Connected);
            tracing::info!(server = %server, "xds client: connected");
        }
        let mut requests = Vec::new();
        match resp.type_url.parse::<ResourceType>() {
            Ok(ResourceType::Cluster) => {
                let errors = cache.apply_clusters(&resp);
                requests.push(ack_or_nack(
                    &mut cds,
                    ResourceType::Cluster,
                    None,
                    &resp,
                    errors,
                ));
                let names = cache.eds_names();
                // An empty first EDS request would be a wildcard in SotW: skip it.
                if eds_names.is_none() && names.is_empty() {
                    eds_names = Some(names);
                } else if eds_names.as_ref() != Some(&names) {
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
            Ok(ResourceType::Listener) => {
                let errors = cache.apply_listeners(&resp);
                requests.push(ack_or_nack(
                    &mut lds,
                    ResourceType::Listener,
                    None,
                    &resp,
                    errors,
                ));
            }
            Ok(ResourceType::Endpoint) => {
                let names = eds_names.clone().unwrap_or_default();
                let errors = cache.apply_endpoints(&resp, &names);
                requests.push(ack_or_nack(
                    &mut eds,
                    ResourceType::Endpoint,
                    Some(names),
                    &resp,
                    errors,
                ));
            }
            Err(_) => {
                tracing::warn!(type_url = %resp.type_url, "xds client: ignoring a response of a type it did not ask for");
                continue;
            }
        }
        cache.publish(&out.state);
        for r in requests {
            if let Some(status) = &r.error_detail {
                out.last_nack.send_replace(Some(format!(
                    "{} version {:?}: {}",
                    type_url::short(&r.type_url).unwrap_or("?"),
                    resp.version_info,
                    status.message
                )));
            }
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

/// The ACK (the response's version) or, when any resource was rejected, the NACK (the last
/// good version, and every rejection in `error_detail`) for a response.
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
        tracing::warn!(r#type = %t, version = %resp.version_info, %message, "xds client: rejecting resources (NACK); the rest of the update applies and the rejected ones keep their last good version");
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
