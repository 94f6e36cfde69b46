//! The accept loop: per-peer limits before any per-connection work, accept errors backed
//! off, and each admitted connection wrapped in the HTTP/2 shim and its own tracing span.
//!
//! The loop is generic over [`Accept`] so tests can inject a source of accept errors.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::authority_shim::H2Shim;
use crate::limits::{
    Backoff, BurstLog, ConnStats, ConnTracker, ConnectionLimits, LOG_WINDOW, PeerKey, Refusal,
    Slot, is_connection_error,
};
use crate::peer::PeerInfo;

/// A source of connections, in two steps so that a peer over its limit costs nothing
/// beyond the `accept` itself.
pub trait Accept: Send + 'static {
    /// A connection as accepted, before its peer facts are gathered.
    type Raw: Send;
    /// The connection with its peer facts.
    type Io: AsyncRead + AsyncWrite + Connected<ConnectInfo = PeerInfo> + Unpin + Send + 'static;

    /// Waits for the next connection and says whose quota it counts against (cheap).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Raw, PeerKey)>> + Send;

    /// Gathers the peer facts of an admitted connection.
    fn admit(raw: Self::Raw) -> Self::Io;
}

struct Loop<A> {
    source: A,
    limits: ConnectionLimits,
    tracker: ConnTracker,
    stats: Arc<ConnStats>,
    backoff: Backoff,
    over_limit_log: BurstLog,
    error_log: BurstLog,
    next_id: u64,
}

/// The admitted connections of `source`, for `serve_with_incoming`. Never yields an error:
/// accept errors are handled (retried or backed off) here, so nothing upstream spins.
pub fn incoming<A: Accept>(
    source: A,
    limits: ConnectionLimits,
    stats: Arc<ConnStats>,
) -> impl Stream<Item = io::Result<Connection<A::Io>>> + Send {
    let state = Loop {
        source,
        tracker: ConnTracker::new(
            limits.max_connections_per_peer,
            limits.max_connections_total,
        ),
        limits,
        stats,
        backoff: Backoff::default(),
        over_limit_log: BurstLog::new(LOG_WINDOW),
        error_log: BurstLog::new(LOG_WINDOW),
        next_id: 0,
    };
    futures::stream::unfold(state, |mut s| async move {
        let conn = s.next().await;
        Some((Ok(conn), s))
    })
}

impl<A: Accept> Loop<A> {
    async fn next(&mut self) -> Connection<A::Io> {
        loop {
            // A flood of over-limit connections must not starve the rest of the runtime.
            tokio::task::coop::consume_budget().await;
            let (raw, key) = match self.source.accept().await {
                Ok(c) => c,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    ConnStats::bump(&self.stats.accept_errors);
                    let pause = self.backoff.next_delay();
                    if let Some(folded) = self.error_log.note(Instant::now()) {
                        tracing::warn!(
                            error = %e,
                            pause_ms = pause.as_millis(),
                            folded,
                            "Workload API cannot accept connections (out of file descriptors? \
                             raise the agent's RLIMIT_NOFILE); pausing before retrying"
                        );
                    }
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            self.backoff.reset();
            let slot = match self.tracker.try_acquire(key) {
                Ok(slot) => slot,
                Err(refusal) => {
                    drop(raw);
                    ConnStats::bump(&self.stats.rejected_over_limit);
                    if let Some(folded) = self.over_limit_log.note(Instant::now()) {
                        let (limit, why) = match refusal {
                            Refusal::Peer(n) => (n, "peer holds the most connections allowed"),
                            Refusal::Total(n) => {
                                (n, "the agent holds the most connections allowed in all")
                            }
                        };
                        tracing::warn!(peer = %key, limit, folded, "Workload API connection refused: {why}");
                    }
                    continue;
                }
            };
            ConnStats::bump(&self.stats.accepted);
            self.next_id += 1;
            let io = A::admit(raw);
            return Connection::new(io, slot, self.next_id, &self.limits, self.stats.clone());
        }
    }
}

/// An admitted connection: the client's bytes go through [`H2Shim`]; it holds its peer's
/// [`Slot`] until dropped, and polls inside its own span (`wapi_conn`, with an id).
#[derive(Debug)]
pub struct Connection<S> {
    io: H2Shim<S>,
    peer: PeerInfo,
    _slot: Slot,
    span: tracing::Span,
    stats: Arc<ConnStats>,
    failed: bool,
}

impl<S: Connected<ConnectInfo = PeerInfo>> Connection<S> {
    fn new(io: S, slot: Slot, id: u64, limits: &ConnectionLimits, stats: Arc<ConnStats>) -> Self {
        let peer = io.connect_info();
        let span = tracing::info_span!(
            "wapi_conn",
            id,
            peer = %slot.key(),
            pid = peer.cred.as_ref().map(|c| c.pid),
        );
        span.in_scope(|| tracing::debug!("connection accepted"));
        Self {
            io: H2Shim::new(io, limits.h2, limits.handshake_timeout),
            peer,
            _slot: slot,
            span,
            stats,
            failed: false,
        }
    }

    /// How many `:authority` values the shim replaced on this connection so far.
    pub fn authorities_rewritten(&self) -> u64 {
        self.io.rewriter().rewritten()
    }
}

impl<S> Connected for Connection<S> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        let rewritten = self.io.rewriter().rewritten();
        self.span
            .in_scope(|| tracing::debug!(authorities_rewritten = rewritten, "connection closed"));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let _g = this.span.enter();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &res
            && !this.failed
        {
            this.failed = true;
            let counter: &AtomicU64 = match e.kind() {
                io::ErrorKind::TimedOut => &this.stats.handshake_timeouts,
                io::ErrorKind::InvalidData => &this.stats.protocol_errors,
                _ => return res,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "closing connection");
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let _g = this.span.enter();
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let _g = this.span.enter();
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let _g = this.span.enter();
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let _g = this.span.enter();
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::DuplexStream;

    use super::*;

    /// A duplex stream posing as an accepted connection.
    struct Fake(DuplexStream);

    impl Connected for Fake {
        type ConnectInfo = PeerInfo;
        fn connect_info(&self) -> PeerInfo {
            PeerInfo::default()
        }
    }

    impl AsyncRead for Fake {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Fake {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    /// Fails with EMFILE `failures` times (counting calls), then yields connections.
    struct Flaky {
        failures: u64,
        calls: Arc<AtomicU64>,
        keep: Vec<DuplexStream>,
    }

    impl Accept for Flaky {
        type Raw = Fake;
        type Io = Fake;

        async fn accept(&mut self) -> io::Result<(Fake, PeerKey)> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            if n < self.failures {
                return Err(io::Error::from_raw_os_error(nix::libc::EMFILE));
            }
            if n == self.failures {
                // One aborted handshake: retried at once, not backed off.
                return Err(io::Error::from_raw_os_error(nix::libc::ECONNABORTED));
            }
            let (a, b) = tokio::io::duplex(64);
            self.keep.push(a);
            Ok((Fake(b), PeerKey::Uid(7)))
        }

        fn admit(raw: Fake) -> Fake {
            raw
        }
    }

    #[tokio::test]
    async fn emfile_is_backed_off_not_spun_on() {
        let calls = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(ConnStats::default());
        let src = Flaky {
            failures: u64::MAX,
            calls: calls.clone(),
            keep: Vec::new(),
        };
        let mut inc = Box::pin(incoming(src, ConnectionLimits::default(), stats.clone()));
        // Nothing comes out in 2 s, and the source was asked only a few times (a spinning
        // loop asks millions of times): 10+20+...+640 ms, then 1 s steps.
        let r = tokio::time::timeout(Duration::from_secs(2), inc.next()).await;
        assert!(r.is_err());
        let n = calls.load(Ordering::Relaxed);
        assert!((3..=30).contains(&n), "{n} accept calls in 2 s");
        assert_eq!(ConnStats::get(&stats.accept_errors), n);
    }

    async fn next_conn<S>(inc: &mut S) -> Connection<Fake>
    where
        S: Stream<Item = io::Result<Connection<Fake>>> + Unpin,
    {
        tokio::time::timeout(Duration::from_secs(10), StreamExt::next(inc))
            .await
            .expect("a connection")
            .expect("stream goes on")
            .expect("never an error")
    }

    #[tokio::test]
    async fn accepting_resumes_after_errors_and_limits_apply() {
        let calls = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(ConnStats::default());
        let src = Flaky {
            failures: 3,
            calls: calls.clone(),
            keep: Vec::new(),
        };
        let limits = ConnectionLimits {
            max_connections_per_peer: 2,
            ..ConnectionLimits::default()
        };
        let mut inc = Box::pin(incoming(src, limits, stats.clone()));
        let c1: Connection<Fake> = next_conn(&mut inc).await;
        let _c2: Connection<Fake> = next_conn(&mut inc).await;
        assert_eq!(ConnStats::get(&stats.accept_errors), 3);
        // The third of uid 7 is refused (and the loop keeps refusing) until one closes.
        let r = tokio::time::timeout(Duration::from_millis(300), StreamExt::next(&mut inc)).await;
        assert!(r.is_err());
        assert!(ConnStats::get(&stats.rejected_over_limit) > 0);
        drop(c1);
        let _c3: Connection<Fake> = next_conn(&mut inc).await;
        assert_eq!(ConnStats::get(&stats.accepted), 3);
    }
}
