//! The xDS server's Prometheus metrics: streams, responses, ACKs and NACKs per type.
//!
//! Shared by every stream that speaks the xDS protocol: ADS (SotW and Delta), the
//! standalone CDS/EDS/LDS services, and SDS in `workload-api`. Types are labelled by their
//! short name (`CDS`, `EDS`, `LDS`, `SDS`; see [`crate::type_url::short`]).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::resources::ResourceType;

/// Label set: the xDS type (`CDS`, `EDS`, `LDS`, `SDS`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The short type name.
    pub r#type: String,
}

/// Label set: the transport variant (`sotw`, `delta` or `sds`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabel {
    /// `sotw`, `delta` or `sds`.
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
    oversized: Counter,
}

fn label(short: &str) -> TypeLabel {
    TypeLabel {
        r#type: short.to_owned(),
    }
}

fn variant(v: &str) -> VariantLabel {
    VariantLabel {
        variant: v.to_owned(),
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
        r.register(
            "oversized_requests",
            "Requests refused for naming more resources than the per-request cap",
            self.oversized.clone(),
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
        self.nacks_of(t.short())
    }

    /// NACKs received so far for the type with short name `short` (e.g. `SDS`).
    pub fn nacks_of(&self, short: &str) -> u64 {
        self.nacks.get_or_create(&label(short)).get()
    }

    /// ACKs received so far for the type with short name `short`.
    pub fn acks_of(&self, short: &str) -> u64 {
        self.acks.get_or_create(&label(short)).get()
    }

    /// Responses sent so far for the type with short name `short`.
    pub fn responses_of(&self, short: &str) -> u64 {
        self.responses.get_or_create(&label(short)).get()
    }

    /// Streams of `variant` (`sotw`, `delta`, `sds`) open now.
    pub fn open_streams(&self, variant_name: &str) -> i64 {
        self.streams.get_or_create(&variant(variant_name)).get()
    }

    /// Requests refused so far for naming too many resources.
    pub fn oversized_requests(&self) -> u64 {
        self.oversized.get()
    }

    /// Counts a stream of `variant` as open until the returned guard is dropped, however
    /// the stream's task ends (return, error, panic or cancellation).
    pub fn open_stream(self: &Arc<Self>, variant_name: &'static str) -> StreamGauge {
        self.streams.get_or_create(&variant(variant_name)).inc();
        StreamGauge {
            metrics: self.clone(),
            variant: variant_name,
        }
    }

    /// Counts a response sent for the type `short`.
    pub fn response(&self, short: &str) {
        self.responses.get_or_create(&label(short)).inc();
    }

    /// Counts an ACK received for the type `short`.
    pub fn ack(&self, short: &str) {
        self.acks.get_or_create(&label(short)).inc();
    }

    /// Counts a NACK received for the type `short`.
    pub fn nack(&self, short: &str) {
        self.nacks.get_or_create(&label(short)).inc();
    }

    pub(crate) fn unknown_type(&self) {
        self.unknown_types.inc();
    }

    /// Counts a request refused for naming more resources than the cap.
    pub fn oversized(&self) {
        self.oversized.inc();
    }
}

/// One open stream in the `xds_streams` gauge: decrements it when dropped, so a stream
/// whose task returns early, panics or is cancelled does not leak a count.
#[derive(Debug)]
#[must_use = "the stream counts as open only while the guard lives"]
pub struct StreamGauge {
    metrics: Arc<XdsMetrics>,
    variant: &'static str,
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.metrics
            .streams
            .get_or_create(&variant(self.variant))
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_guard_decrements_on_panic() {
        let m = Arc::new(XdsMetrics::default());
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let _g = m2.open_stream("sotw");
            assert_eq!(m2.open_streams("sotw"), 1);
            panic!("session panicked");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(m.open_streams("sotw"), 0);
    }
}
