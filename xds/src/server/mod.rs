//! The xDS server: Envoy's `AggregatedDiscoveryService` (SotW `StreamAggregatedResources`
//! and incremental `DeltaAggregatedResources`) plus the standalone CDS, EDS and LDS
//! services, all serving the latest [`Snapshot`].
//!
//! Each stream runs as its own task holding its own state (versions, nonces,
//! subscriptions), reading snapshots from a `watch` channel: a registry change wakes every
//! stream at once, and no stream ever waits on another or on a lock. Each task runs in a
//! span with its stream id and peer; the protocol core it shares with SDS is [`core`].

mod body;
pub mod core;
mod delta;
mod grpc;
mod metrics;
mod sotw;
#[cfg(test)]
mod tests;
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
use tracing::Instrument;

use wire::{DeltaResponse, SotwResponse};

pub use self::core::{
    Exchange, MAX_NAMES_PER_REQUEST, Reply, StreamCore, TooManyNames, Verdict, check_names,
    stream_span, unique_names,
};
pub use metrics::{StreamGauge, XdsMetrics};

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
        let span = session.core.span();
        tokio::spawn(drive(session, self.ctx.clone(), req.into_inner()).instrument(span));
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
        let span = session.core.span();
        tokio::spawn(drive(session, self.ctx.clone(), req.into_inner()).instrument(span));
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
        let resources = select(res, &req.resource_names).inspect_err(|e| {
            self.ctx.metrics.oversized();
            tracing::warn!(r#type = %t, count = e.count, "xds: Fetch names too many resources");
        })?;
        self.ctx.metrics.response(t.short());
        Ok(Response::new(SotwResponse {
            version_info: res.version.clone(),
            resources,
            type_url: t.type_url(),
            nonce: String::new(),
        }))
    }
}

/// The resources a unary `Fetch*` answers with: every one for no names (or `*`), else
/// each distinct requested name that exists, in request order. One lookup per distinct
/// name, after the cap check: linear in the request, whatever the snapshot holds.
pub(crate) fn select(
    res: &crate::resources::TypeResources,
    names: &[String],
) -> Result<Vec<Arc<crate::resources::Resource>>, TooManyNames> {
    let names = unique_names(names)?;
    if names.is_empty() || names.contains(&sotw::WILDCARD) {
        return Ok(res.resources.values().cloned().collect());
    }
    Ok(names
        .into_iter()
        .filter_map(|n| res.get(n))
        .cloned()
        .collect())
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

/// The stream's response channel is gone: stop serving it.
#[derive(Debug)]
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
    /// Id, node, nonces, metrics, span and the open-streams gauge (shared with SDS).
    pub(crate) core: StreamCore,
    /// The one type a standalone CDS/EDS/LDS stream serves (`None` on ADS).
    pub(crate) fixed: Option<ResourceType>,
    pub(crate) tx: mpsc::Sender<Result<R, Status>>,
    pub(crate) types: [Option<T>; 3],
    /// The registry snapshot this stream serves from.
    pub(crate) snapshot: Arc<Snapshot>,
    /// Resource names looked up or compared by pushes so far: the stream's work, which
    /// must follow what changed, not what is subscribed (logged at debug, checked by tests).
    pub(crate) examined: u64,
}

/// How a peer address shows in a stream's span.
struct Peer(Option<SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("unknown"),
        }
    }
}

impl<R, T> Stream<R, T>
where
    Self: Protocol,
{
    /// A stream serving the current snapshot, counted open (and in its span) from now.
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        id: u64,
        peer: Option<SocketAddr>,
        fixed: Option<ResourceType>,
        tx: mpsc::Sender<Result<R, Status>>,
    ) -> Self {
        let snapshot = ctx.snapshots.borrow().clone();
        let variant = <Self as Protocol>::VARIANT;
        let span = stream_span(variant, id, &Peer(peer));
        Stream {
            core: StreamCore::new(ctx.metrics.clone(), variant, id, span),
            ctx,
            fixed,
            tx,
            types: [None, None, None],
            snapshot,
            examined: 0,
        }
    }
}

impl<R, T> Stream<R, T> {
    /// The start of every request: remembers the node the first time one is named, and
    /// resolves the type URL, answering an unknown one with `InvalidArgument` and ending
    /// the stream.
    pub(crate) async fn accept(
        &mut self,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        type_url: &str,
    ) -> Result<ResourceType, Closed> {
        if self.core.set_node(node) {
            let cluster = node.map(|n| n.cluster.as_str()).unwrap_or_default();
            tracing::info!(node = %self.core.node(), cluster, "xds: client connected");
        }
        match resolve_type(&self.ctx, self.fixed, type_url) {
            Ok(t) => Ok(t),
            Err(status) => self.end(status).await,
        }
    }

    /// Checks a request's name count; over the cap the stream ends with `InvalidArgument`
    /// naming the cap (the request is not applied).
    pub(crate) async fn check_cap(&mut self, t: ResourceType, count: usize) -> Result<(), Closed> {
        match check_names(count) {
            Ok(()) => Ok(()),
            Err(e) => {
                let status = self.core.oversized(t.short(), e);
                self.end(status).await
            }
        }
    }

    /// Ends the stream with `status`.
    async fn end<V>(&mut self, status: Status) -> Result<V, Closed> {
        let _ = self.tx.send(Err(status)).await;
        Err(Closed)
    }
}

/// What differs between a SotW and a Delta stream; [`drive`] is the loop they share.
pub(crate) trait Protocol {
    /// The request message of this variant.
    type Request;
    /// `sotw` or `delta`, for metrics and logs.
    const VARIANT: &'static str;
    /// The node id once the first request named it.
    fn node(&self) -> &str;
    /// Handles one request (subscription change, ACK or NACK).
    async fn on_request(&mut self, req: Self::Request) -> Result<(), Closed>;
    /// Pushes what changed in a newly published snapshot.
    async fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Result<(), Closed>;
}

/// Serves one stream: requests from the client and new registry snapshots, until the client
/// goes away, the response channel closes or the server shuts down. The stream counts as
/// open while `p` lives (its [`StreamCore`] holds the gauge), so a cancelled or panicking
/// task releases it too.
pub(crate) async fn drive<P: Protocol>(
    mut p: P,
    ctx: Arc<Ctx>,
    mut inbound: Streaming<P::Request>,
) {
    tracing::debug!("xds: stream opened");
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
                tracing::debug!(%status, "xds: stream error");
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
    tracing::debug!(node = %p.node(), "xds: stream closed");
}

/// Waits for `fut` or the shutdown token; `None` on shutdown.
pub(crate) async fn or_shutdown<F: Future>(ctx: &Ctx, fut: F) -> Option<F::Output> {
    tokio::select! {
        v = fut => Some(v),
        _ = ctx.shutdown.cancelled() => None,
    }
}
