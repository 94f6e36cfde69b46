//! The proxy's Prometheus metrics (`/stats/prometheus`): connections, bytes, handshakes and
//! their failures by reason, metadata-exchange outcomes, refusals, and the xDS state.
//!
//! Label values are a fixed set of `&'static str` chosen by the code (never text from the
//! network), so a peer cannot grow the series count.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels naming the side of the proxy a connection went through.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dir {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
}

/// A direction and an outcome (why a connection closed, how a handshake ended).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// What happened.
    pub reason: &'static str,
}

/// Bytes moved, by direction and flow.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Flow {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `sent` (towards the upstream / app) or `received` (back to the client).
    pub flow: &'static str,
}

/// Every metric the data plane updates. Cheap to update from any task (atomics).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted.
    pub accepted: Family<Dir, Counter>,
    /// Connections open now.
    pub active: Family<Dir, Gauge>,
    /// Connections closed, by close reason.
    pub closed: Family<Outcome, Counter>,
    /// Bytes copied.
    pub bytes: Family<Flow, Counter>,
    /// TLS handshakes, `ok` or the failure reason.
    pub handshakes: Family<Outcome, Counter>,
    /// Metadata-exchange outcomes (`exchanged`, `peer_missing_filter`, `failed`,
    /// `not_negotiated`).
    pub mx: Family<Outcome, Counter>,
    /// Connections refused before any upstream was dialled (`loop`, `not_captured`,
    /// `registry_only`, `unknown_cluster`, `limit`, `plaintext`).
    pub refused: Family<Outcome, Counter>,
    /// Failed dials of an upstream endpoint (each failover attempt counts).
    pub connect_failures: Counter,
    /// Endpoints currently ejected by outlier detection.
    pub ejected: Gauge,
    /// 1 when the xDS state is synced.
    pub xds_synced: Gauge,
    /// 1 while the ADS stream is connected.
    pub xds_connected: Gauge,
    /// xDS updates applied.
    pub xds_updates: Gauge,
    /// NACKs sent to the xDS server.
    pub xds_nacks: Counter,
    /// Federated services (outbound filter chains) known.
    pub xds_routes: Gauge,
    /// VIP listeners bound by `--bind-vips`.
    pub vip_listeners: Gauge,
}

impl Metrics {
    /// Registers every metric under `ferry_proxy_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ferry_proxy");
        r.register(
            "connections_accepted",
            "Connections accepted",
            self.accepted.clone(),
        );
        r.register(
            "connections_active",
            "Connections open now",
            self.active.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed, by reason",
            self.closed.clone(),
        );
        r.register(
            "bytes",
            "Bytes copied, by direction and flow",
            self.bytes.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes, by result",
            self.handshakes.clone(),
        );
        r.register(
            "metadata_exchange",
            "Istio TCP metadata exchange outcomes",
            self.mx.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused before dialling, by reason",
            self.refused.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Failed dials of an upstream endpoint",
            self.connect_failures.clone(),
        );
        r.register(
            "outlier_ejected_endpoints",
            "Endpoints ejected by outlier detection",
            self.ejected.clone(),
        );
        r.register(
            "xds_synced",
            "1 when clusters, endpoints and listeners have all arrived",
            self.xds_synced.clone(),
        );
        r.register(
            "xds_connected",
            "1 while the ADS stream is up",
            self.xds_connected.clone(),
        );
        r.register(
            "xds_updates",
            "xDS updates applied",
            self.xds_updates.clone(),
        );
        r.register(
            "xds_nacks",
            "xDS responses rejected (NACKed)",
            self.xds_nacks.clone(),
        );
        r.register(
            "xds_routes",
            "Outbound filter chains known",
            self.xds_routes.clone(),
        );
        r.register(
            "vip_listeners",
            "VIP listeners bound by --bind-vips",
            self.vip_listeners.clone(),
        );
    }

    /// Counts a refusal.
    pub fn refuse(&self, direction: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&Outcome { direction, reason })
            .inc();
    }

    /// Counts a handshake result (`ok` or a failure reason).
    pub fn handshake(&self, direction: &'static str, reason: &'static str) {
        self.handshakes
            .get_or_create(&Outcome { direction, reason })
            .inc();
    }

    /// Counts a metadata-exchange outcome.
    pub fn mx(&self, direction: &'static str, reason: &'static str) {
        self.mx.get_or_create(&Outcome { direction, reason }).inc();
    }
}
