//! Forwarding to upstream resolvers: the client's packet is relayed byte for byte (so EDNS0
//! options survive) under a fresh random id from a fresh ephemeral port, over UDP with a
//! TCP retry when the answer is truncated and the client can take a full one; bounded
//! in flight and in time, so a dead upstream yields SERVFAIL, never a hang.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{DnsError, ForwardError};

/// Relays queries to the configured upstream resolvers.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    inflight: Arc<Semaphore>,
}

impl Forwarder {
    /// A forwarder over `upstreams` (tried in order), giving up after `timeout` in all, with
    /// at most `max_inflight` queries outstanding.
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_inflight: usize,
    ) -> Result<Self, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstreams);
        }
        Ok(Self {
            upstreams,
            timeout,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
        })
    }

    /// The upstreams, in the order they are tried.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// A slot for one more forwarded query, or `None` when `max_inflight` are outstanding
    /// (the caller answers SERVFAIL at once rather than queueing without bound).
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.inflight.clone().try_acquire_owned().ok()
    }

    /// Forwards `packet` (whose parse is `query`) and returns the upstream's response with
    /// the client's id restored. `full` asks for the complete answer (the client is on TCP):
    /// a truncated UDP answer is then retried over TCP.
    pub async fn forward(
        &self,
        packet: &[u8],
        query: &Message,
        full: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        if packet.len() < 12 {
            return Err(ForwardError::Malformed);
        }
        let deadline = Instant::now() + self.timeout;
        let per_try = (self.timeout / self.upstreams.len() as u32).max(Duration::from_millis(200));
        let mut last = ForwardError::Timeout {
            timeout: self.timeout,
        };
        for upstream in &self.upstreams {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let budget = per_try.min(deadline - now);
            let id: u16 = rand::random();
            let mut out = packet.to_vec();
            out[..2].copy_from_slice(&id.to_be_bytes());
            let attempt = async {
                let resp = udp_exchange(*upstream, &out, id, query).await?;
                if full && is_truncated(&resp) {
                    return tcp_exchange(*upstream, &out, id, query).await;
                }
                Ok(resp)
            };
            match tokio::time::timeout(budget, attempt).await {
                Ok(Ok(mut resp)) => {
                    resp[..2].copy_from_slice(&packet[..2]);
                    return Ok(resp);
                }
                Ok(Err(e)) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed");
                    last = e;
                }
                Err(_) => {
                    tracing::debug!(%upstream, ?budget, "upstream timed out");
                    last = ForwardError::Timeout { timeout: budget };
                }
            }
        }
        Err(last)
    }
}

fn is_truncated(resp: &[u8]) -> bool {
    resp.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// Accepts only a response to our question under our id (anything else on the socket is
/// ignored, as a spoofing defence).
fn matches(resp: &[u8], id: u16, query: &Message) -> bool {
    if resp.len() < 12 || resp[..2] != id.to_be_bytes() || resp[2] & 0x80 == 0 {
        return false;
    }
    Message::from_vec(resp).is_ok_and(|m| m.queries == query.queries)
}

async fn udp_exchange(
    upstream: SocketAddr,
    out: &[u8],
    id: u16,
    query: &Message,
) -> Result<Vec<u8>, ForwardError> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let io = |source| ForwardError::Io { upstream, source };
    let sock = UdpSocket::bind(bind).await.map_err(io)?;
    sock.connect(upstream).await.map_err(io)?;
    sock.send(out).await.map_err(io)?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        if matches(&buf[..n], id, query) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    out: &[u8],
    id: u16,
    query: &Message,
) -> Result<Vec<u8>, ForwardError> {
    let io = |source| ForwardError::Io { upstream, source };
    let mut s = TcpStream::connect(upstream).await.map_err(io)?;
    let len = u16::try_from(out.len()).map_err(|_| ForwardError::Malformed)?;
    let mut frame = Vec::with_capacity(out.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(out);
    s.write_all(&frame).await.map_err(io)?;
    let n = s.read_u16().await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.map_err(io)?;
    if matches(&buf, id, query) {
        Ok(buf)
    } else {
        Err(ForwardError::Mismatch { upstream })
    }
}

/// Upstream resolvers and search domains from a resolv.conf file (port 53).
pub fn from_resolv_conf(
    path: &std::path::Path,
) -> Result<(Vec<SocketAddr>, Vec<String>), DnsError> {
    let bytes = std::fs::read(path).map_err(|source| DnsError::ResolvConf {
        path: path.to_owned(),
        reason: source.to_string(),
    })?;
    let conf = resolv_conf::Config::parse(&bytes).map_err(|e| DnsError::ResolvConf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let upstreams = conf
        .nameservers
        .iter()
        .map(|ns| SocketAddr::new(ns.into(), 53))
        .collect();
    let search = conf
        .get_search()
        .map(|s| s.iter().map(|d| crate::table::normalize(d)).collect())
        .unwrap_or_default();
    Ok((upstreams, search))
}
