//! The xDS server: Envoy's `AggregatedDiscoveryService` (SotW `StreamAggregatedResources`
//! and incremental `DeltaAggregatedResources`) plus the standalone CDS, EDS and LDS
//! services, all serving the latest [`Snapshot`].
//!
//! Each stream runs as its own task holding its own state (versions, nonces,
//! subscriptions), reading snapshots from a `watch` channel: a registry change wakes every
//! stream at once, and no stream ever waits on another or on a lock.

mod body;
mod delta;
mod grpc;
mod metrics;
mod sotw;
pub(crate) mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use wire::{DeltaResponse, SotwResponse};

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
            .add_service(grpc::Ads::new(self.clone()))
            .add_service(grpc::Cds::new(self.clone()))
            .add_service(grpc::Eds::new(self.clone()))
            .add_service(grpc::Lds::new(self.clone()))
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
    ) -> mpsc::Receiver<Result<SotwResponse, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let peer = req.remote_addr();
        let session = sotw::Session::new(self.ctx.clone(), self.next_id(), peer, fixed, tx);
        tokio::spawn(drive(session, self.ctx.clone(), req.into_inner()));
        rx
    }

    fn start_delta(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
        fixed: Option<ResourceType>,
    ) -> mpsc::Receiver<Result<DeltaResponse, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let peer = req.remote_addr();
        let session = delta::Session::new(self.ctx.clone(), self.next_id(), peer, fixed, tx);
        tokio::spawn(drive(session, self.ctx.clone(), req.into_inner()));
        rx
    }
}

impl XdsServer {
    /// The unary `Fetch*` call of the standalone service for `t`: the requested (or all)
    /// resources of the type, once.
    fn fetch(
        &self,
        t: ResourceType,
        req: DiscoveryRequest,
    ) -> Result<Response<SotwResponse>, Status> {
        if !req.type_url.is_empty() && req.type_url != t.type_url() {
            return Err(Status::invalid_argument(format!(
                "this is the {} service; it does not serve {:?}",
                t, req.type_url
            )));
        }
        let snap = self.ctx.snapshots.borrow().clone();
        let res = snap.of(t);
        let resources = res
            .resources
            .values()
            .filter(|r| req.resource_names.is_empty() || req.resource_names.contains(&r.name))
            .cloned()
            .collect();
        self.ctx.metrics.response(t);
        Ok(Response::new(SotwResponse {
            version_info: res.version.clone(),
            resources,
            type_url: t.type_url(),
            nonce: String::new(),
        }))
    }
}

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

/// How one stream variant sends a type's resources; [`Stream::push_all`] orders the pushes.
pub(crate) trait Push {
    /// Sends what the client of type `t` lacks. `initial`: answering a (new) subscription.
    /// `seen`: the generation the stream had, so only names changed since then (and
    /// `extra`) need a look. Returns whether a response was sent.
    async fn push(
        &mut self,
        t: ResourceType,
        initial: bool,
        seen: Option<u64>,
        extra: &[String],
    ) -> Result<bool, Closed>;
    /// Forgets that the client has `names` of type `t`, so the next push sends them again.
    fn forget(&mut self, t: ResourceType, names: &[String]);
}

impl<R, T> Stream<R, T>
where
    Self: Push,
{
    /// Pushes what changed in every subscribed type since generation `seen`, clusters
    /// first. A replaced EDS cluster starts warming and waits for its assignment even when
    /// the assignment did not change, and Envoy does not ask again for a name it already
    /// watches: so the assignments of every added or changed cluster are sent again right
    /// after the clusters.
    pub(crate) async fn push_all(&mut self, seen: u64) -> Result<(), Closed> {
        let mut rewarm: Vec<String> = Vec::new();
        if self.types[ResourceType::Cluster.index()].is_some()
            && self
                .push(ResourceType::Cluster, false, Some(seen), &[])
                .await?
        {
            rewarm = self.snapshot.changed_or_all(seen, ResourceType::Cluster);
            self.forget(ResourceType::Endpoint, &rewarm);
        }
        for t in [ResourceType::Endpoint, ResourceType::Listener] {
            if self.types[t.index()].is_some() {
                self.push(t, false, Some(seen), &rewarm).await?;
            }
        }
        Ok(())
    }
}

/// What every xDS stream keeps, SotW or Delta: `R` is the response type sent, `T` the
/// variant's per-resource-type state.
pub(crate) struct Stream<R, T> {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) id: u64,
    pub(crate) peer: Option<SocketAddr>,
    /// The one type a standalone CDS/EDS/LDS stream serves (`None` on ADS).
    pub(crate) fixed: Option<ResourceType>,
    pub(crate) tx: mpsc::Sender<Result<R, Status>>,
    /// The node id, from the first request that named one.
    pub(crate) node: String,
    pub(crate) types: [Option<T>; 3],
    pub(crate) nonces: u64,
    /// The registry snapshot this stream serves from.
    pub(crate) snapshot: Arc<Snapshot>,
}

impl<R, T> Stream<R, T> {
    /// A stream serving the current snapshot.
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        id: u64,
        peer: Option<SocketAddr>,
        fixed: Option<ResourceType>,
        tx: mpsc::Sender<Result<R, Status>>,
    ) -> Self {
        let snapshot = ctx.snapshots.borrow().clone();
        Stream {
            ctx,
            id,
            peer,
            fixed,
            tx,
            node: String::new(),
            types: [None, None, None],
            nonces: 0,
            snapshot,
        }
    }

    /// The start of every request: remembers the node the first time one is named, and
    /// resolves the type URL, answering an unknown one with `InvalidArgument` and ending
    /// the stream.
    pub(crate) async fn accept(
        &mut self,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        type_url: &str,
    ) -> Result<ResourceType, Closed> {
        if let Some(node) = node
            && self.node.is_empty()
        {
            self.node = node.id.clone();
            tracing::info!(stream = self.id, node = %self.node, cluster = %node.cluster, peer = ?self.peer, "xds: client connected");
        }
        match resolve_type(&self.ctx, self.fixed, type_url) {
            Ok(t) => Ok(t),
            Err(status) => {
                let _ = self.tx.send(Err(status)).await;
                Err(Closed)
            }
        }
    }
}

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
