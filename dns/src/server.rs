//! The resolver's sockets: UDP workers (one `SO_REUSEPORT` socket each, so the kernel
//! spreads queries across cores) and a TCP listener, all on the same port. Local answers
//! are sent from the receive loop without spawning; forwarded queries run as tasks bounded
//! by the forwarder's in-flight limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::answer::{Settings, Verdict, decide, max_udp_payload, servfail, truncate_for_udp};
use crate::error::DnsError;
use crate::forward::Forwarder;
use crate::metrics::{Metrics, Outcome};
use crate::table::DnsTable;
use registry::latest::Latest;

/// At most this many TCP clients at once.
const MAX_TCP_CONNECTIONS: usize = 512;

/// Everything the resolver needs to run.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// UDP and TCP listen address (`127.0.0.1:15053` by default).
    pub listen: SocketAddr,
    /// How federated names are answered.
    pub settings: Settings,
    /// Where other names go.
    pub upstreams: Vec<SocketAddr>,
    /// Total time allowed for one forwarded query before SERVFAIL.
    pub timeout: Duration,
    /// Forwarded queries outstanding at once; more get SERVFAIL immediately.
    pub max_inflight: usize,
    /// UDP sockets (and receive loops); defaults to the number of cores.
    pub udp_workers: usize,
    /// A TCP client idle (or stalled mid-message) this long is disconnected; RFC 7766
    /// suggests seconds. Default 10 s.
    pub tcp_idle: Duration,
}

impl ResolverConfig {
    /// Defaults around a listen address and upstream list.
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            settings: Settings::default(),
            upstreams,
            timeout: Duration::from_secs(2),
            max_inflight: 1024,
            tcp_idle: Duration::from_secs(10),
            udp_workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// A resolver whose sockets are bound; [`Resolver::run`] serves until cancelled.
pub struct Resolver {
    udp: Vec<Arc<UdpSocket>>,
    tcp: TcpListener,
    local: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    tcp_idle: Duration,
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    table: watch::Receiver<Arc<DnsTable>>,
}

impl Resolver {
    /// Binds the sockets now (so a port conflict is reported at start-up) and takes the
    /// table from `table`, which the control plane updates.
    pub fn bind(
        cfg: ResolverConfig,
        table: watch::Receiver<Arc<DnsTable>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DnsError> {
        let bind_err = |source| DnsError::Bind {
            addr: cfg.listen,
            source,
        };
        // UDP and TCP share one port. With port 0 the kernel picks a free UDP port whose TCP
        // twin may be taken: pick again instead of failing.
        let attempts = if cfg.listen.port() == 0 { 20 } else { 1 };
        let mut attempt = 0;
        let (first, local, tcp) = loop {
            attempt += 1;
            let first = reuseport_udp(cfg.listen).map_err(bind_err)?;
            let local = first.local_addr().map_err(bind_err)?;
            let tcp = std::net::TcpListener::bind(local).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            });
            match tcp {
                Ok(tcp) => break (first, local, tcp),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < attempts => {
                    continue;
                }
                Err(e) => return Err(bind_err(e)),
            }
        };
        if let Some(addr) = cfg.upstreams.iter().find(|u| reaches_self(**u, local)) {
            return Err(DnsError::UpstreamIsSelf { addr: *addr });
        }
        let mut udp = vec![Arc::new(first)];
        for _ in 1..cfg.udp_workers.max(1) {
            udp.push(Arc::new(reuseport_udp(local).map_err(bind_err)?));
        }
        let forwarder = Forwarder::new(cfg.upstreams, cfg.timeout, cfg.max_inflight)?;
        Ok(Self {
            udp,
            tcp,
            local,
            shared: Arc::new(Shared {
                settings: cfg.settings,
                tcp_idle: cfg.tcp_idle,
                forwarder,
                metrics,
                table,
            }),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(listen = %self.local, upstreams = ?self.shared.forwarder.upstreams(), "DNS resolver serving");
        let mut tasks = tokio::task::JoinSet::new();
        for sock in self.udp {
            tasks.spawn(udp_loop(sock, self.shared.clone(), shutdown.clone()));
        }
        tasks.spawn(tcp_loop(self.tcp, self.shared.clone(), shutdown.clone()));
        while tasks.join_next().await.is_some() {}
    }
}

/// Whether a query sent to `upstream` would arrive back at a resolver listening on `local`
/// (a loop: each forwarded query comes back and is forwarded again). Beyond the exact
/// address, a wildcard listener (`0.0.0.0:P`, `[::]:P`) receives on every address of the
/// host: loopback, the unspecified address, and any local interface address.
fn reaches_self(upstream: SocketAddr, local: SocketAddr) -> bool {
    if upstream.port() != local.port() {
        return false;
    }
    let u = upstream.ip().to_canonical();
    let l = local.ip().to_canonical();
    if u == l {
        return true;
    }
    if !l.is_unspecified() {
        return false;
    }
    // An IPv4 wildcard does not receive IPv6; an IPv6 wildcard is dual-stack on Linux by
    // default (`bindv6only=0`) and receives both.
    if matches!(l, IpAddr::V4(_)) && matches!(u, IpAddr::V6(_)) {
        return false;
    }
    u.is_loopback() || u.is_unspecified() || is_local_address(u)
}

/// A host's own address is the source the kernel picks for a route to it (no packet sent).
fn is_local_address(ip: IpAddr) -> bool {
    let any: SocketAddr = match ip {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect((ip, 53))?;
            s.local_addr()
        })
        .is_ok_and(|a| a.ip() == ip)
}

fn reuseport_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

async fn udp_loop(sock: Arc<UdpSocket>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 65535];
    let mut table = Latest::new(shared.table.clone());
    loop {
        let (n, src) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let packet = &buf[..n];
        match decide(packet, table.current(), &shared.settings) {
            Verdict::Drop => shared.metrics.malformed(),
            Verdict::Reply { bytes, outcome } => {
                shared.metrics.query(outcome);
                if let Err(e) = sock.send_to(&bytes, src).await {
                    tracing::debug!(%src, error = %e, "DNS UDP send failed");
                }
            }
            Verdict::Forward(query) => {
                let Some(permit) = shared.forwarder.try_permit() else {
                    shared.metrics.query(Outcome::ServFail);
                    tracing::warn!("DNS forwarding at its in-flight limit: SERVFAIL");
                    if let Some(sf) = servfail(&query) {
                        let _ = sock.send_to(&sf, src).await;
                    }
                    continue;
                };
                let (sock, shared, packet) = (sock.clone(), shared.clone(), packet.to_vec());
                tokio::spawn(async move {
                    let _permit = permit;
                    let reply = forward(&shared, &packet, &query, false).await;
                    let reply = match reply {
                        Some(r) => truncate_for_udp(&r, max_udp_payload(&query)).unwrap_or(r),
                        None => return,
                    };
                    if let Err(e) = sock.send_to(&reply, src).await {
                        tracing::debug!(%src, error = %e, "DNS UDP send failed");
                    }
                });
            }
        }
    }
}

/// Forwards and counts; `None` only if not even a SERVFAIL can be encoded.
async fn forward(
    shared: &Shared,
    packet: &[u8],
    query: &hickory_proto::op::Message,
    full: bool,
) -> Option<Vec<u8>> {
    let start = Instant::now();
    match shared.forwarder.forward(packet, query, full).await {
        Ok(resp) => {
            shared.metrics.forwarded(start.elapsed().as_secs_f64());
            shared.metrics.query(Outcome::Forwarded);
            Some(resp)
        }
        Err(e) => {
            let name = query
                .queries
                .first()
                .map(|q| q.name().to_ascii())
                .unwrap_or_default();
            tracing::warn!(%name, error = %e, "DNS forward failed: SERVFAIL");
            shared.metrics.query(Outcome::ServFail);
            servfail(query)
        }
    }
}

async fn tcp_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many DNS TCP clients, closing");
            continue;
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = tcp_conn(stream, &shared) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn tcp_conn(mut stream: TcpStream, shared: &Shared) {
    let mut table = Latest::new(shared.table.clone());
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(shared.tcp_idle, stream.read_u16()).await else {
            return;
        };
        let mut packet = vec![0u8; usize::from(len)];
        // A client that announces a length and then stalls (or never reads its answers
        // below) loses its connection after `tcp_idle` instead of holding a slot forever.
        if !matches!(
            tokio::time::timeout(shared.tcp_idle, stream.read_exact(&mut packet)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply = match decide(&packet, table.current(), &shared.settings) {
            Verdict::Drop => {
                shared.metrics.malformed();
                return;
            }
            Verdict::Reply { bytes, outcome } => {
                shared.metrics.query(outcome);
                bytes
            }
            Verdict::Forward(query) => match shared.forwarder.try_permit() {
                None => {
                    shared.metrics.query(Outcome::ServFail);
                    match servfail(&query) {
                        Some(sf) => sf,
                        None => return,
                    }
                }
                Some(_permit) => match forward(shared, &packet, &query, true).await {
                    Some(r) => r,
                    None => return,
                },
            },
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(reply.len() + 2);
        frame.extend_from_slice(&n.to_be_bytes());
        frame.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(shared.tcp_idle, stream.write_all(&frame)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}
