//! Wiring: opens the CA, binds the socket, and serves the Workload API and SDS on it until
//! shutdown.

use std::sync::Arc;

use attest::Authority;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use registry::config::{Config, Endpoint};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::endpoint::{self, Listener};
use crate::error::Error;
use crate::limits::{ConnStats, ConnectionLimits};
use crate::proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::sds::Sds;
use crate::state::{self, SvidCache};
use crate::workload::{WorkloadApi, require_security_header};

/// A bound, ready Workload API server: the socket accepts connections from the moment
/// [`WorkloadApiServer::start`] returns; [`WorkloadApiServer::serve`] answers them.
#[derive(Debug)]
pub struct WorkloadApiServer {
    listener: Listener,
    core: Arc<Core>,
    endpoint: Endpoint,
    limits: ConnectionLimits,
    stats: Arc<ConnStats>,
    sds_metrics: Arc<xds::server::XdsMetrics>,
}

impl WorkloadApiServer {
    /// Starts CA rotation and the snapshot task for `authority` (opened by the caller from
    /// its CA settings) and binds `listen.workloadApi`. Must run inside a Tokio runtime.
    pub fn start(
        config: watch::Receiver<Arc<Config>>,
        authority: Arc<Authority>,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let endpoint = config.borrow().agent.listen.workload_api.clone();
        let listener = endpoint::bind(&endpoint)?;
        tokio::spawn(authority.clone().run(shutdown.child_token()));
        let snapshot = state::start(config, authority.clone(), shutdown.clone());
        let core = Arc::new(Core {
            authority,
            snapshot,
            cache: SvidCache::default(),
            shutdown,
        });
        tracing::info!(%endpoint, "Workload API and SDS listening");
        Ok(Self {
            listener,
            core,
            endpoint,
            limits: ConnectionLimits::default(),
            stats: Arc::default(),
            sds_metrics: Arc::default(),
        })
    }

    /// Replaces the connection limits (per-peer connections, handshake timeout, HTTP/2
    /// keepalive and streams); the defaults are [`ConnectionLimits::default`].
    #[must_use]
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Counts SDS streams, responses, ACKs and NACKs into `metrics` (the agent passes the
    /// xDS server's, so one registry shows `xds_streams{variant="sds"}` beside ADS).
    #[must_use]
    pub fn with_sds_metrics(mut self, metrics: Arc<xds::server::XdsMetrics>) -> Self {
        self.sds_metrics = metrics;
        self
    }

    /// Counters of admitted, refused and failed connections.
    pub fn stats(&self) -> Arc<ConnStats> {
        self.stats.clone()
    }

    /// The endpoint being served.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The CA behind the server.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.core.authority
    }

    /// Serves until the shutdown token is cancelled; open streams end at shutdown, and the
    /// socket file is removed.
    pub async fn serve(self) -> Result<(), Error> {
        let Self {
            listener,
            core,
            endpoint,
            limits,
            stats,
            sds_metrics,
        } = self;
        let stop = core.shutdown.clone();
        let wapi = SpiffeWorkloadApiServer::with_interceptor(
            WorkloadApi::new(core.clone()),
            require_security_header,
        );
        let sds = SecretDiscoveryServiceServer::new(Sds::with_metrics(core, sds_metrics));
        let h2 = limits.h2;
        tonic::transport::Server::builder()
            // The shim in front of h2 mirrors these: keep them in step (authority_shim.rs).
            .max_frame_size(u32::try_from(h2.max_frame_size).ok())
            .http2_max_header_list_size(u32::try_from(h2.max_header_list_size).ok())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .add_service(wapi)
            .add_service(sds)
            .serve_with_incoming_shutdown(listener.incoming(limits, stats), async move {
                stop.cancelled().await
            })
            .await?;
        tracing::info!(%endpoint, "Workload API stopped");
        Ok(())
    }
}
