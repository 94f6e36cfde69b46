//! The harness's own peers: the sink/echo server (plain, and behind rustls mTLS as the
//! stand-in for the remote Istio sidecar) and the load generator. Every variant (direct,
//! ferry, Envoy) talks to the same server code, so only the proxy in between differs.
//!
//! Wire protocol, one byte from the client first: `S` = sink (read to EOF, then answer the
//! byte count as a big-endian `u64` and close), `E` = echo (write back whatever arrives).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// First byte: sink mode.
const SINK: u8 = b'S';
/// First byte: echo mode.
const ECHO: u8 = b'E';
/// How late tokio's millisecond timer may wake a paced request before the delay is
/// counted against the proxy (see [`latency`]).
const TIMER_SLACK: Duration = Duration::from_millis(2);
/// Bulk write size of the generator and read size of the sink.
const CHUNK: usize = 256 * 1024;

/// Serves one connection of the wire protocol until the client is done.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    let mut buf = vec![0u8; if mode[0] == SINK { CHUNK } else { 64 * 1024 }];
    let mut total: u64 = 0;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // A proxy may close without close_notify: the bytes still arrived.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if mode[0] == ECHO {
            s.write_all(&buf[..n]).await?;
        }
    }
    if mode[0] == SINK {
        s.write_all(&total.to_be_bytes()).await?;
    }
    s.shutdown().await
}

/// The TLS version and cipher suite the last connection negotiated (each proxy picks its
/// own offer order; the server honours it), for the report.
pub type Negotiated = Arc<std::sync::Mutex<Option<String>>>;

/// Accepts on `listener` forever, plain or through `tls` (noting what each handshake
/// negotiated in `seen`), serving the wire protocol.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    seen: Negotiated,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let _ = match tls {
                Some(a) => match a.accept(tcp).await {
                    Ok(s) => {
                        let c = s.get_ref().1;
                        let what = format!(
                            "{:?} {:?}",
                            c.protocol_version(),
                            c.negotiated_cipher_suite().map(|s| s.suite())
                        );
                        if let Ok(mut g) = seen.lock() {
                            *g = Some(what);
                        }
                        serve(s).await
                    }
                    Err(e) => Err(e),
                },
                None => serve(tcp).await,
            };
        });
    }
}

/// The rustls server standing in for the remote sidecar: presents `identity`, requires a
/// client certificate under `roots`, advertises only the `istio` ALPN (so no metadata
/// exchange is negotiated by either proxy) and never resumes a session, so every
/// connection costs the proxy a full handshake.
///
/// With `server_order` the server picks the suite by its own preference, AES-128-GCM
/// first (what BoringSSL clients such as Envoy offer first), instead of honouring the
/// client's order: both proxies then do the same crypto work per byte.
pub fn tls_acceptor(
    identity: testkit::mesh::Identity,
    roots: rustls::RootCertStore,
    server_order: bool,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let mut provider = rustls::crypto::ring::default_provider();
    if server_order {
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    let provider = Arc::new(provider);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    cfg.alpn_protocols = vec![b"istio".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.ignore_client_order = server_order;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One echo round trip through `addr` (readiness probe): `Ok` once bytes come back.
pub async fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let step = async {
        let mut s = connect(addr).await?;
        s.write_all(&[ECHO, b'p']).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        anyhow::ensure!(b == [b'p'], "echo answered {b:?}");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(3), step)
        .await
        .context("probe timed out")?
}

/// What a bulk transfer achieved: bytes the sink counted, and the time from the first
/// write until the last count arrived.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes the sink received (all connections).
    pub bytes: u64,
    /// Wall time, including the drain after the last write.
    pub elapsed: Duration,
}

/// Bulk transfer over `conns` connections to `addr` for `duration`.
pub async fn throughput(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<Transfer> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(addr).await?;
            s.write_all(&[SINK]).await?;
            let chunk = vec![0x5au8; CHUNK];
            let mut sent: u64 = 0;
            while Instant::now() < deadline {
                s.write_all(&chunk).await?;
                sent += CHUNK as u64;
            }
            s.shutdown().await?;
            let mut count = [0u8; 8];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut count))
                .await
                .context("the sink's byte count did not arrive (half-close lost?)")??;
            let got = u64::from_be_bytes(count);
            if got != sent {
                bail!("sent {sent} bytes, the sink counted {got}");
            }
            anyhow::Ok(got)
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await??;
    }
    Ok(Transfer {
        bytes,
        elapsed: start.elapsed(),
    })
}

/// A fresh latency histogram in microseconds (1 µs to 60 s, 3 significant digits).
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Request/response: `conns` connections each send `size` bytes and wait for them to come
/// back, for `duration`. With `rate` 0 each connection sends its next request at once
/// (max rate) and records the round trip; with a `rate` (requests per second per
/// connection) requests are due on a fixed schedule and each records its time from when it
/// was due (less the timer's own lateness, up to [`TIMER_SLACK`]), so a stall also counts
/// against the requests it delayed (no coordinated omission).
pub async fn latency(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut s = connect(addr).await?;
            s.write_all(&[ECHO]).await?;
            let req = vec![0x42u8; size];
            let mut resp = vec![0u8; size];
            let mut due = Instant::now();
            while Instant::now() < deadline {
                let t = match interval {
                    Some(i) => {
                        tokio::time::sleep_until(due.into()).await;
                        let now = Instant::now();
                        // tokio's timer wakes up to a millisecond late: that lateness is
                        // the harness's, not the proxy's. A request held back longer was
                        // delayed by the previous response and counts from when it was due.
                        let t = if now.duration_since(due) > TIMER_SLACK {
                            due
                        } else {
                            now
                        };
                        due += i;
                        t
                    }
                    None => Instant::now(),
                };
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await?;
                h.record(t.elapsed().as_micros().max(1) as u64)?;
            }
            anyhow::Ok(h)
        }));
    }
    let mut all = histogram()?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok(all)
}

/// New connections per second: `conns` loops each connect, exchange one echoed byte (the
/// proxy's upstream handshake is done by then) and close, for `duration`. Returns the
/// number completed and the per-connection time histogram (µs).
pub async fn connections(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration, Histogram<u64>)> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut s = connect(addr).await?;
                s.write_all(&[ECHO, b'c']).await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                h.record(t.elapsed().as_micros().max(1) as u64)?;
                n += 1;
            }
            anyhow::Ok((n, h))
        }));
    }
    let mut all = histogram()?;
    let mut total = 0;
    for t in tasks {
        let (n, h) = t.await??;
        total += n;
        all.add(h)?;
    }
    Ok((total, start.elapsed(), all))
}

/// How long one held connection may take to connect and echo its byte.
const HOLD_STEP: Duration = Duration::from_secs(10);

/// Opens `n` connections to `addr` from `source` (an address in 127/8, so separate runs
/// do not share one ephemeral port range), at most `in_flight` opening at once, each fully
/// established end to end (echo mode, one byte sent and echoed back, so the proxy's
/// upstream leg and its handshake are done), and returns them open and idle. Dropping
/// them closes them all.
pub async fn hold(
    addr: SocketAddr,
    source: Ipv4Addr,
    n: usize,
    in_flight: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..in_flight.clamp(1, n.max(1)) {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match tokio::time::timeout(HOLD_STEP, hold_one(addr, source)).await {
                    Ok(Ok(s)) => mine.push(s),
                    Ok(Err(e)) => {
                        next.store(n, Ordering::Relaxed);
                        return (mine, Some(e));
                    }
                    Err(_) => {
                        next.store(n, Ordering::Relaxed);
                        return (mine, Some(anyhow::anyhow!("connect + echo timed out")));
                    }
                }
            }
            (mine, None)
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut failed = None;
    for w in workers {
        let (mine, e) = w.await?;
        all.extend(mine);
        failed = failed.or(e);
    }
    if let Some(e) = failed {
        bail!(
            "held {} of {n} connections to {addr} from {source}, then: {e:#}",
            all.len()
        );
    }
    Ok(all)
}

/// One held connection: bound to `source`, connected, one byte echoed.
async fn hold_one(addr: SocketAddr, source: Ipv4Addr) -> anyhow::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind((source, 0).into())
        .with_context(|| format!("bind {source}"))?;
    let mut s = sock
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr} from {source}"))?;
    s.set_nodelay(true)?;
    s.write_all(&[ECHO, b'h']).await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .await
        .context("no echo (the proxy closed the connection?)")?;
    anyhow::ensure!(b == [b'h'], "echo answered {b:?}");
    Ok(s)
}
