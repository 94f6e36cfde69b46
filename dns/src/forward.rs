//! Forwarding to upstream resolvers: the client's packet is relayed byte for byte (so EDNS0
//! options survive) under a fresh random id, over UDP with a TCP retry when the answer is
//! truncated and the client can take a full one; bounded in flight and in time, so a dead
//! upstream yields SERVFAIL, never a hang.
//!
//! UDP goes through a few long-lived sockets per upstream (random source ports chosen at
//! start, as c-ares does), each with one receive task that hands answers to the waiting
//! query by id; an answer is accepted only if it carries our id and our question.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use registry::hostname::Hostname;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{DnsError, ForwardError};

/// Relays queries to the configured upstream resolvers.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// One pool per upstream, same order.
    pools: Vec<UdpPool>,
    timeout: Duration,
    inflight: Arc<Semaphore>,
    /// Stops the receive tasks when the forwarder is dropped.
    _stop: DropGuard,
}

/// UDP sockets per upstream.
const SOCKETS_PER_UPSTREAM: usize = 4;

impl Forwarder {
    /// A forwarder over `upstreams` (tried in order), giving up after `timeout` in all, with
    /// at most `max_inflight` queries outstanding. Must be called inside a Tokio runtime (it
    /// starts the sockets' receive tasks).
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_inflight: usize,
    ) -> Result<Self, DnsError> {
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstreams);
        }
        let stop = CancellationToken::new();
        let pools = upstreams
            .iter()
            .map(|u| UdpPool::start(*u, &stop))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            upstreams,
            pools,
            timeout,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            _stop: stop.drop_guard(),
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
        for (upstream, pool) in self.upstreams.iter().zip(&self.pools) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let budget = per_try.min(deadline - now);
            let attempt = async {
                let (resp, out) = pool.exchange(packet, query).await?;
                if full && is_truncated(&resp) {
                    let id = u16::from_be_bytes([out[0], out[1]]);
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

/// Connected UDP sockets to one upstream and the queries waiting on them.
#[derive(Debug)]
struct UdpPool {
    upstream: SocketAddr,
    sockets: Vec<Arc<PooledSocket>>,
    next: AtomicUsize,
}

/// A query waiting for its answer: the token of the query that registered the id, and
/// where the answer goes.
type Waiter = (u64, oneshot::Sender<Vec<u8>>);

#[derive(Debug)]
struct PooledSocket {
    sock: UdpSocket,
    /// Queries in flight on this socket, by id, each with the token of the query that
    /// registered it (an id is reused as soon as it is free).
    pending: Mutex<HashMap<u16, Waiter>>,
    /// Source of those tokens.
    tokens: AtomicU64,
}

impl UdpPool {
    fn start(upstream: SocketAddr, stop: &CancellationToken) -> Result<Self, DnsError> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let err = |source| DnsError::UpstreamSocket { upstream, source };
        let mut sockets = Vec::with_capacity(SOCKETS_PER_UPSTREAM);
        for _ in 0..SOCKETS_PER_UPSTREAM {
            let std = std::net::UdpSocket::bind(bind).map_err(err)?;
            std.connect(upstream).map_err(err)?;
            std.set_nonblocking(true).map_err(err)?;
            let s = Arc::new(PooledSocket {
                sock: UdpSocket::from_std(std).map_err(err)?,
                pending: Mutex::new(HashMap::new()),
                tokens: AtomicU64::new(0),
            });
            tokio::spawn(receive(s.clone(), stop.clone()));
            sockets.push(s);
        }
        Ok(Self {
            upstream,
            sockets,
            next: AtomicUsize::new(0),
        })
    }

    /// Sends `packet` under a fresh id and waits for the matching answer. Returns the
    /// answer and the packet as sent (for a TCP retry under the same id).
    async fn exchange(
        &self,
        packet: &[u8],
        query: &Message,
    ) -> Result<(Vec<u8>, Vec<u8>), ForwardError> {
        let upstream = self.upstream;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sockets.len();
        let s = &self.sockets[i];
        let (tx, rx) = oneshot::channel();
        let token = s.tokens.fetch_add(1, Ordering::Relaxed);
        let id = {
            let mut pending = s.pending.lock().map_err(|_| ForwardError::Poisoned)?;
            let mut id: u16 = rand::random();
            while pending.contains_key(&id) {
                id = rand::random();
            }
            pending.insert(id, (token, tx));
            id
        };
        // Whatever happens next (answer, error, timeout dropping this future), the id is freed.
        let _slot = PendingSlot {
            socket: s,
            id,
            token,
        };
        let mut out = packet.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        s.sock
            .send(&out)
            .await
            .map_err(|source| ForwardError::Io { upstream, source })?;
        let resp = rx.await.map_err(|_| ForwardError::Closed { upstream })?;
        if matches(&resp, id, query) {
            Ok((resp, out))
        } else {
            Err(ForwardError::Mismatch { upstream })
        }
    }
}

/// Frees a pending id when its query ends, however it ends, unless the id already belongs
/// to a newer query: once the answer took this query's entry, another query may register
/// the same id before this one finishes, and removing that entry would leave the newer
/// query waiting on a dropped sender (it answered SERVFAIL, "forwarder closed").
struct PendingSlot<'a> {
    socket: &'a PooledSocket,
    id: u16,
    token: u64,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.socket.pending.lock()
            && p.get(&self.id).is_some_and(|(t, _)| *t == self.token)
        {
            p.remove(&self.id);
        }
    }
}

/// Hands each datagram to the query waiting on its id; others are dropped.
async fn receive(s: Arc<PooledSocket>, stop: CancellationToken) {
    let mut buf = vec![0u8; 65535];
    loop {
        let n = tokio::select! {
            r = s.sock.recv(&mut buf) => match r {
                Ok(n) => n,
                // ICMP port unreachable and the like: the waiting queries time out.
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        if n < 12 {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let waiter = s.pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some((_, tx)) = waiter {
            let _ = tx.send(buf[..n].to_vec());
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
        .map(|s| s.iter().map(|d| Hostname::new(d).into()).collect())
        .unwrap_or_default();
    Ok((upstreams, search))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interleaving behind the "forwarder closed" SERVFAILs: query A's answer takes its
    /// entry, query B registers the same id, then A's slot drops. B must still be waiting.
    #[tokio::test]
    async fn a_finished_query_does_not_free_a_newer_query_with_its_id() {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let s = PooledSocket {
            sock: UdpSocket::from_std(std).unwrap(),
            pending: Mutex::new(HashMap::new()),
            tokens: AtomicU64::new(0),
        };
        let id = 7;
        let (tx_a, _rx_a) = oneshot::channel();
        s.pending.lock().unwrap().insert(id, (0, tx_a));
        let slot_a = PendingSlot {
            socket: &s,
            id,
            token: 0,
        };
        // The answer to A arrives: `receive` takes A's entry.
        drop(s.pending.lock().unwrap().remove(&id));
        // B registers the now free id.
        let (tx_b, mut rx_b) = oneshot::channel();
        s.pending.lock().unwrap().insert(id, (1, tx_b));
        drop(slot_a);
        assert!(
            s.pending.lock().unwrap().contains_key(&id),
            "A's slot removed B's entry"
        );
        assert!(
            rx_b.try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        // B's own slot frees it.
        drop(PendingSlot {
            socket: &s,
            id,
            token: 1,
        });
        assert!(s.pending.lock().unwrap().is_empty());
    }
}
