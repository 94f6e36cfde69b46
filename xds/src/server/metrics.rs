//! The xDS server's Prometheus metrics: streams, responses, ACKs and NACKs per type.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::resources::ResourceType;

/// Label set: the xDS type (`CDS`, `EDS`, `LDS`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The short type name.
    pub r#type: String,
}

/// Label set: the transport variant (`sotw` or `delta`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabel {
    /// `sotw` or `delta`.
    pub variant: String,
}

/// Counters an operator watches to see whether clients accept what ferry serves.
#[derive(Debug, Default)]
pub struct XdsMetrics {
    streams: Family<VariantLabel, Gauge>,
    responses: Family<TypeLabel, Counter>,
    acks: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    unknown_types: Counter,
    /// Mirrors of the NACK counters per type, readable without encoding (tests, logs).
    nack_totals: [AtomicU64; 3],
}

fn label(t: ResourceType) -> TypeLabel {
    TypeLabel {
        r#type: t.short().to_owned(),
    }
}

impl XdsMetrics {
    /// Registers every metric under the `xds_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("xds");
        r.register(
            "streams",
            "Open xDS streams by variant",
            self.streams.clone(),
        );
        r.register(
            "responses",
            "xDS responses sent by type",
            self.responses.clone(),
        );
        r.register("acks", "xDS ACKs received by type", self.acks.clone());
        r.register(
            "nacks",
            "xDS NACKs received by type (the client rejected a response and keeps its previous config)",
            self.nacks.clone(),
        );
        r.register(
            "unknown_type_requests",
            "Requests for a type URL ferry does not serve",
            self.unknown_types.clone(),
        );
    }

    /// A registry holding only these metrics, encoded as Prometheus text.
    pub fn encode_text(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// NACKs received so far for `t`.
    pub fn nacks(&self, t: ResourceType) -> u64 {
        self.nack_totals[t.index()].load(Ordering::Relaxed)
    }

    pub(crate) fn stream_opened(&self, variant: &'static str) {
        self.streams
            .get_or_create(&VariantLabel {
                variant: variant.to_owned(),
            })
            .inc();
    }

    pub(crate) fn stream_closed(&self, variant: &'static str) {
        self.streams
            .get_or_create(&VariantLabel {
                variant: variant.to_owned(),
            })
            .dec();
    }

    pub(crate) fn response(&self, t: ResourceType) {
        self.responses.get_or_create(&label(t)).inc();
    }

    pub(crate) fn ack(&self, t: ResourceType) {
        self.acks.get_or_create(&label(t)).inc();
    }

    pub(crate) fn nack(&self, t: ResourceType) {
        self.nacks.get_or_create(&label(t)).inc();
        self.nack_totals[t.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn unknown_type(&self) {
        self.unknown_types.inc();
    }
}
