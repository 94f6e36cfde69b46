//! The xDS server: Envoy's `AggregatedDiscoveryService` (SotW `StreamAggregatedResources`
//! and incremental `DeltaAggregatedResources`) plus the standalone CDS, EDS and LDS
//! services, all serving the latest [`Snapshot`].
//!
//! Each stream runs as its own task holding its own state (versions, nonces,
//! subscriptions), reading snapshots from a `watch` channel: a registry change wakes every
//! stream at once, and no stream ever waits on another or on a lock.

mod delta;
mod metrics;
mod sotw;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_server::{
    ListenerDiscoveryService, ListenerDiscoveryServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use metrics::XdsMetrics;

use crate::resources::{ResourceType, Snapshot};

/// Responses one stream may have queued before it stops reading (backpressure).
const STREAM_QUEUE: usize = 16;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error(
        "cannot listen for xDS on {addr}: {source} (is another ferry agent or a Cofide Agent already using the port? set listen.xds in the config)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed while serving.
    #[error("xDS gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What every stream of one server shares (read-only, or atomics).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(crate) metrics: Arc<XdsMetrics>,
    pub(crate) shutdown: CancellationToken,
    next_stream: AtomicU64,
}

/// The xDS server. Cheap to clone; every clone serves the same snapshots.
#[derive(Debug, Clone)]
pub struct XdsServer {
    ctx: Arc<Ctx>,
}

impl XdsServer {
    /// A server for the snapshots `snapshots` yields; streams end when `shutdown` fires.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, shutdown: CancellationToken) -> Self {
        XdsServer {
            ctx: Arc::new(Ctx {
                snapshots,
                metrics: Arc::new(XdsMetrics::default()),
                shutdown,
                next_stream: AtomicU64::new(1),
            }),
        }
    }

    /// The server's metrics (NACKs, ACKs, responses, open streams).
    pub fn metrics(&self) -> Arc<XdsMetrics> {
        self.ctx.metrics.clone()
    }

    /// A tonic router with ADS and the standalone CDS, EDS and LDS services.
    pub fn router(&self) -> tonic::transport::server::Router {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(
                AggregatedDiscoveryServiceServer::new(self.clone())
                    .max_decoding_message_size(16 << 20),
            )
            .add_service(ClusterDiscoveryServiceServer::new(Standalone {
                server: self.clone(),
                t: ResourceType::Cluster,
            }))
            .add_service(EndpointDiscoveryServiceServer::new(Standalone {
                server: self.clone(),
                t: ResourceType::Endpoint,
            }))
            .add_service(ListenerDiscoveryServiceServer::new(Standalone {
                server: self.clone(),
                t: ResourceType::Listener,
            }))
    }

    /// Binds `addr` and serves until the shutdown token fires.
    pub async fn serve(self, addr: SocketAddr) -> Result<(), ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        self.serve_on(listener).await
    }

    /// Serves on an already bound listener (tests bind port 0) until shutdown.
    pub async fn serve_on(self, listener: TcpListener) -> Result<(), ServerError> {
        let addr = listener.local_addr().ok();
        tracing::info!(addr = ?addr, "xds: serving ADS (SotW + Delta), CDS, EDS, LDS");
        let shutdown = self.ctx.shutdown.clone();
        self.router()
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                shutdown.cancelled().await
            })
            .await?;
        tracing::info!("xds: server stopped");
        Ok(())
    }

    fn next_id(&self) -> u64 {
        self.ctx.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    fn start_sotw(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
        fixed: Option<ResourceType>,
    ) -> ResponseStream<DiscoveryResponse> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let peer = req.remote_addr();
        let session = sotw::Session::new(self.ctx.clone(), self.next_id(), peer, fixed, tx);
        tokio::spawn(drive(session, self.ctx.clone(), req.into_inner()));
        Box::pin(ReceiverStream::new(rx))
    }

    fn start_delta(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
        fixed: Option<ResourceType>,
    ) -> ResponseStream<DeltaDiscoveryResponse> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let peer = req.remote_addr();
        let session = delta::Session::new(self.ctx.clone(), self.next_id(), peer, fixed, tx);
        tokio::spawn(drive(session, self.ctx.clone(), req.into_inner()));
        Box::pin(ReceiverStream::new(rx))
    }
}

/// A boxed stream of responses (what every streaming method returns).
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start_sotw(req, None)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start_delta(req, None)))
    }
}

/// One standalone (non-aggregated) discovery service: CDS, EDS or LDS.
#[derive(Debug, Clone)]
struct Standalone {
    server: XdsServer,
    t: ResourceType,
}

impl Standalone {
    /// The unary `Fetch*` call: the requested (or all) resources of the type, once.
    fn fetch(&self, req: DiscoveryRequest) -> Result<Response<DiscoveryResponse>, Status> {
        if !req.type_url.is_empty() && req.type_url != self.t.type_url() {
            return Err(Status::invalid_argument(format!(
                "this is the {} service; it does not serve {:?}",
                self.t, req.type_url
            )));
        }
        let snap = self.server.ctx.snapshots.borrow().clone();
        let res = snap.of(self.t);
        let resources = res
            .resources
            .values()
            .filter(|r| req.resource_names.is_empty() || req.resource_names.contains(&r.name))
            .map(|r| r.any.clone())
            .collect();
        self.server.ctx.metrics.response(self.t);
        Ok(Response::new(DiscoveryResponse {
            version_info: res.version.clone(),
            resources,
            type_url: self.t.type_url().to_owned(),
            nonce: String::new(),
            ..Default::default()
        }))
    }
}

/// Implements one standalone service trait by delegating to the shared stream code.
macro_rules! standalone {
    ($trait:ident, $sotw_ty:ident, $sotw:ident, $delta_ty:ident, $delta:ident, $fetch:ident) => {
        #[tonic::async_trait]
        impl $trait for Standalone {
            type $sotw_ty = ResponseStream<DiscoveryResponse>;
            type $delta_ty = ResponseStream<DeltaDiscoveryResponse>;

            async fn $sotw(
                &self,
                req: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<Self::$sotw_ty>, Status> {
                Ok(Response::new(self.server.start_sotw(req, Some(self.t))))
            }

            async fn $delta(
                &self,
                req: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<Self::$delta_ty>, Status> {
                Ok(Response::new(self.server.start_delta(req, Some(self.t))))
            }

            async fn $fetch(
                &self,
                req: Request<DiscoveryRequest>,
            ) -> Result<Response<DiscoveryResponse>, Status> {
                self.fetch(req.into_inner())
            }
        }
    };
}

standalone!(
    ClusterDiscoveryService,
    StreamClustersStream,
    stream_clusters,
    DeltaClustersStream,
    delta_clusters,
    fetch_clusters
);
standalone!(
    EndpointDiscoveryService,
    StreamEndpointsStream,
    stream_endpoints,
    DeltaEndpointsStream,
    delta_endpoints,
    fetch_endpoints
);
standalone!(
    ListenerDiscoveryService,
    StreamListenersStream,
    stream_listeners,
    DeltaListenersStream,
    delta_listeners,
    fetch_listeners
);

/// Resolves a request's type URL: the stream's fixed type for standalone services (where
/// an empty type URL is allowed), else one of the served types, or a clear error.
pub(crate) fn resolve_type(
    ctx: &Ctx,
    fixed: Option<ResourceType>,
    type_url: &str,
) -> Result<ResourceType, Status> {
    if let Some(t) = fixed
        && (type_url.is_empty() || type_url == t.type_url())
    {
        return Ok(t);
    }
    match type_url.parse::<ResourceType>() {
        Ok(t) if fixed.is_none() => Ok(t),
        Ok(t) => Err(Status::invalid_argument(format!(
            "this stream serves {}, not {t}",
            fixed.map(|f| f.type_url()).unwrap_or_default()
        ))),
        Err(e) => {
            ctx.metrics.unknown_type();
            tracing::warn!(
                type_url,
                "xds: client asked for a type ferry does not serve"
            );
            Err(Status::invalid_argument(e.to_string()))
        }
    }
}

/// Waits for `fut` or the shutdown token; `None` on shutdown.
/// The stream's response channel is gone: stop serving it.
pub(crate) struct Closed;

/// What differs between a SotW and a Delta stream; [`drive`] is the loop they share.
pub(crate) trait Protocol {
    /// The request message of this variant.
    type Request;
    /// `sotw` or `delta`, for metrics and logs.
    const VARIANT: &'static str;
    /// The stream id, for logs.
    fn id(&self) -> u64;
    /// The node id once the first request named it.
    fn node(&self) -> &str;
    /// Handles one request (subscription change, ACK or NACK).
    async fn on_request(&mut self, req: Self::Request) -> Result<(), Closed>;
    /// Pushes what changed in a newly published snapshot.
    async fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Result<(), Closed>;
}

/// Serves one stream: requests from the client and new registry snapshots, until the client
/// goes away, the response channel closes or the server shuts down.
pub(crate) async fn drive<P: Protocol>(
    mut p: P,
    ctx: Arc<Ctx>,
    mut inbound: Streaming<P::Request>,
) {
    ctx.metrics.stream_opened(P::VARIANT);
    tracing::debug!(stream = p.id(), variant = P::VARIANT, "xds: stream opened");
    let mut snapshots = ctx.snapshots.clone();
    snapshots.mark_unchanged();
    loop {
        let next = or_shutdown(&ctx, async {
            tokio::select! {
                m = inbound.message() => Ok(m),
                c = snapshots.changed() => Err(c.is_ok()),
            }
        })
        .await;
        let step = match next {
            None | Some(Ok(Ok(None))) | Some(Err(false)) => break,
            Some(Ok(Ok(Some(req)))) => p.on_request(req).await,
            Some(Ok(Err(status))) => {
                tracing::debug!(stream = p.id(), node = %p.node(), variant = P::VARIANT, %status, "xds: stream error");
                break;
            }
            Some(Err(true)) => {
                let snapshot = snapshots.borrow_and_update().clone();
                p.on_snapshot(snapshot).await
            }
        };
        if step.is_err() {
            break;
        }
    }
    ctx.metrics.stream_closed(P::VARIANT);
    tracing::debug!(stream = p.id(), node = %p.node(), variant = P::VARIANT, "xds: stream closed");
}

pub(crate) async fn or_shutdown<F: Future>(ctx: &Ctx, fut: F) -> Option<F::Output> {
    tokio::select! {
        v = fut => Some(v),
        _ = ctx.shutdown.cancelled() => None,
    }
}
