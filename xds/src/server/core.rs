//! The protocol core every xDS stream shares, whatever it serves: ADS SotW and Delta here,
//! SDS in `workload-api`. It owns the parts of the xDS protocol that do not depend on the
//! resources: nonces, telling a request from an ACK, a NACK or a stale message, the
//! per-request name cap, the stream's tracing span and its metrics (including the open
//! streams gauge, held by a drop guard).
//!
//! Nonce rule (as go-control-plane applies it): a request is stale, and ignored, only when
//! a response of its type was already sent on this stream and the request carries another
//! non-empty nonce. Before the first response every request counts (a client reconnecting
//! may repeat a nonce from its previous stream), and an empty nonce is a fresh request.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tonic::Status;
use tracing::Span;

use super::metrics::{StreamGauge, XdsMetrics};

/// The most resource names one request may carry (SotW `resource_names`, Delta
/// `resource_names_subscribe` + `resource_names_unsubscribe` or
/// `initial_resource_versions`, SDS names), and the most names one Delta stream may
/// subscribe to per type.
///
/// 16,384 is above the largest legitimate request: a SotW EDS request lists every EDS
/// cluster, one per federated service, and ferry is sized and benchmarked for 10,000
/// services; so a real mesh has headroom, while a request cannot make a worker do more than
/// 16,384 lookups or hold more than that many names (100,000 names used to cost 1.5 s of
/// CPU, and 200,000 SDS names a 381 MB response).
pub const MAX_NAMES_PER_REQUEST: usize = 16_384;

/// A request named more resources than [`MAX_NAMES_PER_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the request names {count} resources; ferry accepts at most {max} names per request (MAX_NAMES_PER_REQUEST); subscribe with the wildcard or split the request"
)]
pub struct TooManyNames {
    /// How many names the request carried.
    pub count: usize,
    /// The cap.
    pub max: usize,
}

impl From<TooManyNames> for Status {
    fn from(e: TooManyNames) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

/// Checks a request's name count against [`MAX_NAMES_PER_REQUEST`].
pub fn check_names(count: usize) -> Result<(), TooManyNames> {
    if count > MAX_NAMES_PER_REQUEST {
        return Err(TooManyNames {
            count,
            max: MAX_NAMES_PER_REQUEST,
        });
    }
    Ok(())
}

/// The distinct names of a request, in request order, after the cap check: what a
/// response is built from, so a name repeated 200,000 times costs one lookup.
pub fn unique_names(names: &[String]) -> Result<Vec<&str>, TooManyNames> {
    check_names(names.len())?;
    let mut seen = HashSet::with_capacity(names.len());
    Ok(names
        .iter()
        .map(String::as_str)
        .filter(|n| seen.insert(*n))
        .collect())
}

/// The span a stream runs in: every log line of the stream carries its variant, id and
/// peer (and its node, recorded once the client names it) without repeating them.
pub fn stream_span(variant: &'static str, id: u64, peer: &dyn fmt::Display) -> Span {
    tracing::info_span!(
        "xds_stream",
        variant,
        stream = id,
        peer = %peer,
        node = tracing::field::Empty
    )
}

/// What one type's exchange on one stream last sent: the nonce a current ACK or NACK
/// must carry, and the version it would accept or reject.
#[derive(Debug, Default, Clone)]
pub struct Exchange {
    nonce: String,
    version: Option<String>,
}

impl Exchange {
    /// The nonce of the last response (empty before the first).
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The version of the last response, if one was sent.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Whether a response was sent.
    pub fn responded(&self) -> bool {
        !self.nonce.is_empty()
    }
}

/// The parts of a request (SotW or Delta) that say what it answers.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// `response_nonce`.
    pub nonce: &'a str,
    /// `version_info` (SotW: the version the client keeps; empty on Delta).
    pub version: &'a str,
    /// `error_detail`: present on a NACK.
    pub error: Option<&'a RpcStatus>,
}

/// What a request is, relative to the last response of its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A request that answers no response (the first, or an empty nonce).
    Request,
    /// Accepts the last response.
    Ack,
    /// Rejects the last response; the client keeps its previous config. Its subscription
    /// still counts (xDS: a NACK's names are the client's subscription).
    Nack,
    /// Answers a response since superseded: ignored.
    Stale,
}

/// The protocol state of one stream that every variant keeps: id, node, nonce counter,
/// metrics, span, and the open-streams gauge (released on drop, however the stream ends).
#[derive(Debug)]
pub struct StreamCore {
    metrics: Arc<XdsMetrics>,
    id: u64,
    node: String,
    nonces: u64,
    span: Span,
    _gauge: StreamGauge,
}

impl StreamCore {
    /// A stream of `variant` (`sotw`, `delta`, `sds`), counted open from now until drop.
    /// `span` is the stream's span (see [`stream_span`]); the node is recorded in it.
    pub fn new(metrics: Arc<XdsMetrics>, variant: &'static str, id: u64, span: Span) -> Self {
        let gauge = metrics.open_stream(variant);
        StreamCore {
            metrics,
            id,
            node: String::new(),
            nonces: 0,
            span,
            _gauge: gauge,
        }
    }

    /// The stream id (unique per server).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The node id, once a request named one.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The stream's span (to instrument its task with).
    pub fn span(&self) -> Span {
        self.span.clone()
    }

    /// The metrics the stream counts into.
    pub fn metrics(&self) -> &Arc<XdsMetrics> {
        &self.metrics
    }

    /// Remembers the node the first time a request names one (later requests need not);
    /// returns whether this was that first time.
    pub fn set_node(&mut self, node: Option<&Node>) -> bool {
        match node {
            Some(n) if self.node.is_empty() && !n.id.is_empty() => {
                self.node = n.id.clone();
                self.span.record("node", self.node.as_str());
                true
            }
            _ => false,
        }
    }

    /// Classifies a request of type `short` (`CDS`, `SDS`, ...) against `exchange`, and
    /// counts and logs ACKs and NACKs.
    pub fn verdict(&self, short: &'static str, exchange: &Exchange, reply: Reply<'_>) -> Verdict {
        if exchange.responded() && !reply.nonce.is_empty() && reply.nonce != exchange.nonce {
            tracing::debug!(
                r#type = short,
                nonce = reply.nonce,
                "xds: ignoring stale request"
            );
            return Verdict::Stale;
        }
        if let Some(err) = reply.error {
            self.metrics.nack(short);
            tracing::warn!(
                r#type = short,
                rejected_version = exchange.version().unwrap_or(""),
                kept_version = reply.version,
                nonce = reply.nonce,
                code = err.code,
                message = %err.message,
                "xds: client NACKed a response; it keeps its last accepted version and ferry does not resend the rejected one"
            );
            return Verdict::Nack;
        }
        if reply.nonce.is_empty() {
            return Verdict::Request;
        }
        self.metrics.ack(short);
        tracing::debug!(r#type = short, version = reply.version, "xds: ACK");
        Verdict::Ack
    }

    /// Records a response of type `short` with `version` about to be sent on `exchange`,
    /// and returns its nonce.
    pub fn respond(
        &mut self,
        short: &'static str,
        exchange: &mut Exchange,
        version: &str,
    ) -> String {
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        exchange.nonce = nonce.clone();
        exchange.version = Some(version.to_owned());
        self.metrics.response(short);
        nonce
    }

    /// Counts a request refused for naming too many resources, logs it, and returns the
    /// status that ends the stream.
    pub fn oversized(&self, short: &'static str, e: TooManyNames) -> Status {
        self.metrics.oversized();
        tracing::warn!(
            r#type = short,
            count = e.count,
            max = e.max,
            "xds: request names too many resources; ending the stream"
        );
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> StreamCore {
        StreamCore::new(Arc::default(), "sotw", 1, Span::none())
    }

    #[test]
    fn nonces_classify_requests() {
        let mut c = core();
        let mut ex = Exchange::default();
        let r = |nonce| Reply {
            nonce,
            version: "",
            error: None,
        };
        // Before any response, even a nonce from an earlier stream counts.
        assert_eq!(c.verdict("CDS", &ex, r("")), Verdict::Request);
        assert_eq!(c.verdict("CDS", &ex, r("17")), Verdict::Ack);
        let n = c.respond("CDS", &mut ex, "v1");
        assert_eq!(c.verdict("CDS", &ex, r(&n)), Verdict::Ack);
        assert_eq!(c.verdict("CDS", &ex, r("0")), Verdict::Stale);
        assert_eq!(c.verdict("CDS", &ex, r("")), Verdict::Request);
        let err = RpcStatus::default();
        let nack = Reply {
            nonce: &n,
            version: "",
            error: Some(&err),
        };
        assert_eq!(c.verdict("CDS", &ex, nack), Verdict::Nack);
        assert_eq!(c.metrics().nacks_of("CDS"), 1);
        assert_eq!(c.metrics().responses_of("CDS"), 1);
    }

    #[test]
    fn names_are_capped_and_deduplicated() {
        let names: Vec<String> = ["a", "b", "a", "c", "b"].map(String::from).to_vec();
        assert_eq!(unique_names(&names).unwrap(), ["a", "b", "c"]);
        let many = vec!["default".to_owned(); MAX_NAMES_PER_REQUEST + 1];
        let e = unique_names(&many).unwrap_err();
        assert!(e.to_string().contains("16384"), "{e}");
        assert!(check_names(MAX_NAMES_PER_REQUEST).is_ok());
    }

    #[test]
    fn the_gauge_is_held_by_the_core() {
        let m = Arc::new(XdsMetrics::default());
        let c = StreamCore::new(m.clone(), "delta", 7, Span::none());
        assert_eq!(m.open_streams("delta"), 1);
        drop(c);
        assert_eq!(m.open_streams("delta"), 0);
    }
}
