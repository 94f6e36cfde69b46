//! The resolver's Prometheus metrics: queries by result, forwarded queries, malformed
//! packets, upstream latency.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Outcome {
    /// A federated name answered with its VIP.
    Federated,
    /// A federated name, a type with no data (AAAA, TXT, ...): NOERROR, no answer.
    FederatedNoData,
    /// Forwarded; the upstream's answer was relayed.
    Forwarded,
    /// Forwarding failed (timeout, unreachable upstream, overload): SERVFAIL.
    ServFail,
    /// Not a standard query (NOTIMP) or not exactly one question (FORMERR).
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: Outcome,
}

/// Counters shared by every listener of one resolver.
#[derive(Debug)]
pub struct Metrics {
    queries: Family<ResultLabel, Counter>,
    forwarded: Counter,
    malformed: Counter,
    upstream_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queries: Family::default(),
            forwarded: Counter::default(),
            malformed: Counter::default(),
            upstream_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

impl Metrics {
    /// Registers the metrics under `registry` (prefix it with `dns` via `sub_registry`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("queries", "DNS queries by result", self.queries.clone());
        registry.register(
            "forwarded",
            "Queries forwarded upstream",
            self.forwarded.clone(),
        );
        registry.register(
            "malformed",
            "Packets dropped because they do not parse as a DNS query",
            self.malformed.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Upstream round-trip time",
            self.upstream_latency.clone(),
        );
    }

    /// Counts one query with its outcome.
    pub fn query(&self, result: Outcome) {
        self.queries.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts one forwarded query and its upstream latency.
    pub fn forwarded(&self, secs: f64) {
        self.forwarded.inc();
        self.upstream_latency.observe(secs);
    }

    /// Counts one dropped malformed packet.
    pub fn malformed(&self) {
        self.malformed.inc();
    }

    /// Queries so far with `result` (for tests and the admin page).
    pub fn count(&self, result: Outcome) -> u64 {
        self.queries.get_or_create(&ResultLabel { result }).get()
    }

    /// Malformed packets dropped so far.
    pub fn malformed_count(&self) -> u64 {
        self.malformed.get()
    }

    /// Queries forwarded so far.
    pub fn forwarded_count(&self) -> u64 {
        self.forwarded.get()
    }
}
