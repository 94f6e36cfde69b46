//! The connection copy loops over real loopback TCP: `copy::bidirectional` (any stream pair,
//! the TLS path) and `splice::bidirectional` (plain passthrough) must behave the same for
//! bulk data, half-close, idle timeout and resets.

#![allow(clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy::copy::{self, CloseReason, CopyConfig, Transferred};
use proxy::splice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy)]
enum Mode {
    Copy,
    Splice,
}

const MODES: [Mode; 2] = [Mode::Copy, Mode::Splice];

/// A connected loopback TCP pair.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    (a.unwrap(), b.unwrap().0)
}

/// `app <-> proxy <-> server`: returns the application's socket, the server's socket, and
/// the proxy task, which yields the close reason and the counts.
async fn proxied(
    mode: Mode,
    cfg: CopyConfig,
) -> (
    TcpStream,
    TcpStream,
    JoinHandle<(CloseReason, Arc<Transferred>)>,
) {
    let (app, mut client) = tcp_pair().await;
    let (mut upstream, server) = tcp_pair().await;
    let task = tokio::spawn(async move {
        let counts = Arc::new(Transferred::default());
        let reason = match mode {
            Mode::Copy => copy::bidirectional(&mut client, &mut upstream, &cfg, &counts).await,
            Mode::Splice => splice::bidirectional(&mut client, &mut upstream, &cfg, &counts).await,
        };
        (reason, counts)
    });
    (app, server, task)
}

/// A deterministic byte stream: `block[p % block.len()]` at position `p`. The block length
/// is prime, so a lost, repeated or reordered chunk shows up as a mismatch.
struct Pattern {
    block: Vec<u8>,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        let mut x = seed | 1;
        let block = (0..65_521)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Pattern { block }
    }

    async fn send(&self, w: &mut (impl AsyncWrite + Unpin), len: usize) {
        let mut sent = 0;
        while sent < len {
            let at = sent % self.block.len();
            let n = (self.block.len() - at).min(len - sent);
            w.write_all(&self.block[at..at + n]).await.unwrap();
            sent += n;
        }
    }

    /// Reads to EOF and checks every byte against the pattern; returns the length.
    async fn verify(&self, r: &mut (impl AsyncRead + Unpin)) -> usize {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            let mut checked = 0;
            while checked < n {
                let at = (got + checked) % self.block.len();
                let m = (self.block.len() - at).min(n - checked);
                assert!(
                    buf[checked..checked + m] == self.block[at..at + m],
                    "corrupt data near byte {}",
                    got + checked
                );
                checked += m;
            }
            got += n;
        }
    }
}

const BIG: usize = 64 << 20;

async fn big_both_ways(mode: Mode) {
    let (app, server, proxy) = proxied(mode, CopyConfig::default()).await;
    let (up, down) = (Pattern::new(1), Pattern::new(2));
    let (mut app_r, mut app_w) = app.into_split();
    let (mut srv_r, mut srv_w) = server.into_split();
    let (_, _, got_up, got_down) = tokio::join!(
        async {
            up.send(&mut app_w, BIG).await;
            app_w.shutdown().await.unwrap();
        },
        async {
            down.send(&mut srv_w, BIG).await;
            srv_w.shutdown().await.unwrap();
        },
        up.verify(&mut srv_r),
        down.verify(&mut app_r),
    );
    assert_eq!((got_up, got_down), (BIG, BIG), "{mode:?}");
    let (reason, counts) = proxy.await.unwrap();
    assert_eq!(reason, CloseReason::Completed, "{mode:?}");
    assert_eq!(counts.snapshot(), (BIG as u64, BIG as u64), "{mode:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_moves_64_mib_each_way_concurrently() {
    big_both_ways(Mode::Copy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_moves_64_mib_each_way_concurrently() {
    big_both_ways(Mode::Splice).await;
}

/// An HTTP/1.0-style client: sends its request, shuts down its write half, then reads the
/// whole response. The server sees EOF only after the full request.
#[tokio::test]
async fn half_close_lets_the_response_through() {
    for mode in MODES {
        let (mut app, mut server, proxy) = proxied(mode, CopyConfig::default()).await;
        let request = b"GET / HTTP/1.0\r\n\r\n";
        app.write_all(request).await.unwrap();
        app.shutdown().await.unwrap();

        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "{mode:?}");
        let response = Pattern::new(3);
        response.send(&mut server, 3 << 20).await;
        server.shutdown().await.unwrap();

        assert_eq!(response.verify(&mut app).await, 3 << 20, "{mode:?}");
        let (reason, counts) = proxy.await.unwrap();
        assert_eq!(reason, CloseReason::Completed, "{mode:?}");
        assert_eq!(
            counts.snapshot(),
            (request.len() as u64, 3 << 20),
            "{mode:?}"
        );
    }
}

#[tokio::test]
async fn idle_connections_are_closed() {
    for mode in MODES {
        let cfg = CopyConfig {
            idle_timeout: Some(Duration::from_millis(200)),
            ..CopyConfig::default()
        };
        let start = Instant::now();
        let (mut app, mut server, proxy) = proxied(mode, cfg).await;
        app.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).await.unwrap();
        let (reason, counts) = proxy.await.unwrap();
        assert_eq!(reason, CloseReason::Idle, "{mode:?}");
        assert!(start.elapsed() >= Duration::from_millis(200), "{mode:?}");
        assert_eq!(counts.snapshot(), (1, 0), "{mode:?}");
        // The proxy dropped both sockets: both peers see EOF.
        assert_eq!(app.read(&mut b).await.unwrap(), 0);
        assert_eq!(server.read(&mut b).await.unwrap(), 0);
    }
}

/// Closes `s` with an RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

#[tokio::test]
async fn resets_are_blamed_on_the_right_side() {
    for mode in MODES {
        let (app, _server, proxy) = proxied(mode, CopyConfig::default()).await;
        reset(app);
        assert_eq!(proxy.await.unwrap().0, CloseReason::ClientReset, "{mode:?}");

        let (_app, server, proxy) = proxied(mode, CopyConfig::default()).await;
        reset(server);
        assert_eq!(
            proxy.await.unwrap().0,
            CloseReason::UpstreamReset,
            "{mode:?}"
        );
    }
}

/// A reset while data is flowing the other way is still the resetting side's.
#[tokio::test]
async fn reset_mid_transfer() {
    for mode in MODES {
        let (app, mut server, proxy) = proxied(mode, CopyConfig::default()).await;
        let mut buf = vec![0u8; 1 << 16];
        let (mut app_r, app_w) = app.into_split();
        let writer = tokio::spawn(async move {
            // Until the proxy stops reading: the server is gone.
            let chunk = vec![7u8; 1 << 16];
            while server.write_all(&chunk).await.is_ok() {}
        });
        app_r.read_exact(&mut buf).await.unwrap();
        reset(app_r.reunite(app_w).unwrap());
        let (reason, _) = proxy.await.unwrap();
        assert_eq!(reason, CloseReason::ClientReset, "{mode:?}");
        writer.await.unwrap();
    }
}

/// The TLS path's copy over in-memory streams: both ways, half-close, counts.
#[tokio::test]
async fn copy_over_duplex_streams() {
    let (mut client, app) = tokio::io::duplex(16 * 1024);
    let (mut upstream, server) = tokio::io::duplex(16 * 1024);
    let counts = Transferred::default();
    let cfg = CopyConfig {
        buffer_size: 4096,
        ..CopyConfig::default()
    };
    let (up, down) = (Pattern::new(4), Pattern::new(5));
    let len = 4 << 20;
    let (mut app_r, mut app_w) = tokio::io::split(app);
    let (mut srv_r, mut srv_w) = tokio::io::split(server);
    let (reason, (), (), got_up, got_down) = tokio::join!(
        copy::bidirectional(&mut client, &mut upstream, &cfg, &counts),
        async {
            up.send(&mut app_w, len).await;
            app_w.shutdown().await.unwrap();
        },
        async {
            down.send(&mut srv_w, len / 2).await;
            srv_w.shutdown().await.unwrap();
        },
        up.verify(&mut srv_r),
        down.verify(&mut app_r),
    );
    assert_eq!(reason, CloseReason::Completed);
    assert_eq!((got_up, got_down), (len, len / 2));
    assert_eq!(counts.snapshot(), (len as u64, (len / 2) as u64));
}

/// Copy errors carry the side: an upstream that vanishes while the client writes.
#[tokio::test]
async fn duplex_peer_dropped_is_an_upstream_failure() {
    let (mut client, mut app) = tokio::io::duplex(1024);
    let (mut upstream, server) = tokio::io::duplex(1024);
    drop(server);
    app.write_all(b"hello").await.unwrap();
    let counts = Transferred::default();
    let res =
        copy::try_bidirectional(&mut client, &mut upstream, &CopyConfig::default(), &counts).await;
    let err = res.unwrap_err();
    assert_eq!(err.reason(), CloseReason::UpstreamReset, "{err}");
}
