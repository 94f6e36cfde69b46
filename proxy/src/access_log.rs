//! One access-log line and one set of metrics per connection, however it ends.
//!
//! [`ConnLog`] is created when a connection is accepted and filled in as the connection
//! makes progress (route, endpoint, peer identity, metadata exchange, bytes). Its `Drop`
//! writes the line at target `ferry::access` (text or JSON, as the process logs) and
//! updates the counters, so an error path, a timeout, a drain or a panic in the
//! connection's task cannot skip it (the ztunnel `ConnectionResult` pattern).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::copy::{CloseReason, Transferred};
use crate::metrics::{Dir, Flow, Metrics, Outcome};
use crate::mx_stream::MxOutcome;

/// Which side of the proxy a connection went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local app towards a federated service (or a passthrough destination).
    Outbound,
    /// From a remote peer towards the local app.
    Inbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// The record of one connection; dropping it logs and counts it.
#[derive(Debug)]
pub struct ConnLog {
    /// Connection id (also on the tracing span).
    pub id: u64,
    /// Outbound or inbound.
    pub direction: Direction,
    /// The client's address.
    pub src: SocketAddr,
    /// Where the client meant to go (original destination, or the inbound listener).
    pub dst: SocketAddr,
    /// The cluster it was routed to (`passthrough` for direct forwarding).
    pub cluster: Option<String>,
    /// The endpoint dialled.
    pub endpoint: Option<SocketAddr>,
    /// The peer's SPIFFE ID (server on outbound, client on inbound).
    pub peer_id: Option<String>,
    /// The peer's metadata from the exchange, or why there is none.
    pub peer_meta: Option<String>,
    /// Negotiated ALPN.
    pub alpn: Option<String>,
    /// Bytes copied each way.
    pub counts: Transferred,
    /// Why it closed; `dropped` if the task ended without saying.
    pub reason: &'static str,
    /// Human detail for failures (error text).
    pub detail: Option<String>,
    start: Instant,
    metrics: Arc<Metrics>,
}

impl ConnLog {
    /// Starts the record and counts the accepted connection.
    pub fn new(
        id: u64,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Self {
        let d = Dir {
            direction: direction.as_str(),
        };
        metrics.accepted.get_or_create(&d).inc();
        metrics.active.get_or_create(&d).inc();
        ConnLog {
            id,
            direction,
            src,
            dst,
            cluster: None,
            endpoint: None,
            peer_id: None,
            peer_meta: None,
            alpn: None,
            counts: Transferred::default(),
            reason: "dropped",
            detail: None,
            start: Instant::now(),
            metrics,
        }
    }

    /// Records how the byte copy ended.
    pub fn closed(&mut self, reason: CloseReason) {
        self.reason = match reason {
            CloseReason::Completed => "completed",
            CloseReason::Idle => "idle_timeout",
            CloseReason::ClientReset => "client_reset",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::ClientError => "client_error",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::Shutdown => "shutdown",
        };
    }

    /// Records the metadata exchange: the peer's metadata for the log line, the outcome in
    /// the metrics, and a failed exchange as the close reason.
    pub fn record_mx(&mut self, outcome: &MxOutcome, metrics: &Metrics) {
        let direction = self.direction.as_str();
        match outcome {
            MxOutcome::Exchanged(meta) => {
                metrics.mx(direction, "exchanged");
                self.peer_meta = Some(meta.to_string());
            }
            MxOutcome::PeerMissingFilter => {
                metrics.mx(direction, "peer_missing_filter");
                self.peer_meta = Some("peer-missing-mx-filter".to_owned());
            }
            MxOutcome::Failed(why) => {
                metrics.mx(direction, "failed");
                self.fail("mx_failed", why);
            }
            MxOutcome::Pending => {
                metrics.mx(direction, "incomplete");
            }
        }
    }

    /// Records a failure: the reason label and its detail.
    pub fn fail(&mut self, reason: &'static str, detail: impl std::fmt::Display) {
        self.reason = reason;
        self.detail = Some(detail.to_string());
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        let direction = self.direction.as_str();
        let sent = self.counts.client_to_upstream.load(Ordering::Relaxed);
        let received = self.counts.upstream_to_client.load(Ordering::Relaxed);
        let m = &self.metrics;
        m.active.get_or_create(&Dir { direction }).dec();
        m.closed
            .get_or_create(&Outcome {
                direction,
                reason: self.reason,
            })
            .inc();
        m.bytes
            .get_or_create(&Flow {
                direction,
                flow: "sent",
            })
            .inc_by(sent);
        m.bytes
            .get_or_create(&Flow {
                direction,
                flow: "received",
            })
            .inc_by(received);
        tracing::info!(
            target: "ferry::access",
            conn = self.id,
            direction,
            src = %self.src,
            dst = %self.dst,
            cluster = self.cluster.as_deref().unwrap_or("-"),
            endpoint = %self.endpoint.map_or_else(|| "-".to_owned(), |e| e.to_string()),
            peer_id = self.peer_id.as_deref().unwrap_or("-"),
            peer_meta = self.peer_meta.as_deref().unwrap_or("-"),
            alpn = self.alpn.as_deref().unwrap_or("-"),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            reason = self.reason,
            detail = self.detail.as_deref().unwrap_or(""),
            "connection closed"
        );
    }
}
