//! Bidirectional copy between the client and the upstream connection, for any pair of streams.
//!
//! One task drives both directions through a poll-based state machine (as tokio's
//! `copy_bidirectional` does) instead of two tasks on split halves: a TLS stream cannot be
//! split without a lock, and one task per connection keeps wakeups and scheduling cheap.
//!
//! Invariants, per direction:
//! - one buffer of `buffer_size` bytes while bytes are moving, taken from a small global
//!   [`pool`] when the reader has something to read and given back as soon as it has
//!   nothing more (the read is pending and every byte read was written) or the copy ends
//!   however it ends (drop guard): an idle connection holds no buffer, and steady-state
//!   traffic neither allocates nor zeroes one;
//! - a read happens only into an empty buffer, so every byte read is written before the
//!   next read (no unbounded buffering);
//! - a read of 0 bytes (EOF) is forwarded as a half-close: pending bytes are written, the
//!   writer is flushed and shut down, and the other direction keeps running until it ends
//!   too (the `linkerd/duplex` lesson: HTTP/1.0-style clients `shutdown(SHUT_WR)` and then
//!   wait for the response);
//! - byte counts are added with `Relaxed` atomics as bytes are *written*, so the admin
//!   endpoint sees progress during the copy and the access log the totals after it.
//!
//! The idle timeout is one `tokio::time::Sleep` per connection. Progress only records a
//! timestamp; when the timer fires early because there was progress, it is `reset()` to
//! the last progress plus the timeout, so a busy connection re-arms it at most once per
//! timeout period rather than once per read.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Byte counts both ways, readable while the copy runs (admin/metrics) and at the end (access log).
///
/// Shared by reference with the copy so the connection guard can read it at any time; the
/// counts are only ever added to, with `Relaxed` ordering (they order nothing else).
#[derive(Debug, Default)]
pub struct Transferred {
    /// Bytes written to the upstream (read from the client).
    pub client_to_upstream: AtomicU64,
    /// Bytes written to the client (read from the upstream).
    pub upstream_to_client: AtomicU64,
}

impl Transferred {
    /// `(client_to_upstream, upstream_to_client)` as of now: for access logs and metrics.
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.client_to_upstream.load(Ordering::Relaxed),
            self.upstream_to_client.load(Ordering::Relaxed),
        )
    }
}

/// Tuning of a connection's copy: the proxy config nests it so `/config_dump` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CopyConfig {
    /// Bytes per direction buffer (default 64 KiB); buffers of [`DEFAULT_BUFFER_SIZE`] are pooled.
    pub buffer_size: usize,
    /// Close the connection when no byte has moved either way for this long (default 1 h;
    /// `None` = never).
    pub idle_timeout: Option<Duration>,
}

/// The default per-direction buffer size, and the only size the buffer pool keeps.
pub const DEFAULT_BUFFER_SIZE: usize = 64 * 1024;

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            buffer_size: DEFAULT_BUFFER_SIZE,
            idle_timeout: Some(Duration::from_secs(3600)),
        }
    }
}

/// Why a proxied connection ended: the access log's and the metrics' label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CloseReason {
    /// Both sides closed cleanly (EOF both ways, both half-closes forwarded).
    Completed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// The client reset the connection (ECONNRESET, EPIPE, ...).
    ClientReset,
    /// The upstream reset the connection.
    UpstreamReset,
    /// Another I/O error on the client side.
    ClientError,
    /// Another I/O error on the upstream side.
    UpstreamError,
    /// The proxy is shutting down. The copy never returns it itself: the caller that races
    /// the copy against its drain signal reports it.
    Shutdown,
}

/// Which side of the proxied connection an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Side {
    /// The downstream application connection.
    Client,
    /// The connection the proxy dialled.
    Upstream,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// Why a copy did not complete, with the side at fault: for debug logs, and mapped to a
/// [`CloseReason`] for the access log.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The peer on `side` reset the connection (ECONNRESET, EPIPE, ECONNABORTED, ENOTCONN).
    #[error("the {side} reset the connection: {source}")]
    Reset {
        /// Whose connection was reset.
        side: Side,
        /// The error from the socket.
        source: io::Error,
    },
    /// Any other I/O error on `side`.
    #[error("I/O error on the {side} connection: {source}")]
    Io {
        /// Whose connection failed.
        side: Side,
        /// The error from the stream.
        source: io::Error,
    },
    /// No byte moved either way for this long.
    #[error("no byte moved either way for {0:?} (the copy's idle_timeout)")]
    Idle(Duration),
}

impl CopyError {
    /// Classifies an I/O error from `side`: peer resets apart from other failures.
    pub fn from_io(side: Side, source: io::Error) -> Self {
        use io::ErrorKind::*;
        match source.kind() {
            ConnectionReset | BrokenPipe | ConnectionAborted | NotConnected => {
                CopyError::Reset { side, source }
            }
            _ => CopyError::Io { side, source },
        }
    }

    /// The access-log label for this error.
    pub fn reason(&self) -> CloseReason {
        match self {
            CopyError::Reset {
                side: Side::Client, ..
            } => CloseReason::ClientReset,
            CopyError::Reset {
                side: Side::Upstream,
                ..
            } => CloseReason::UpstreamReset,
            CopyError::Io {
                side: Side::Client, ..
            } => CloseReason::ClientError,
            CopyError::Io {
                side: Side::Upstream,
                ..
            } => CloseReason::UpstreamError,
            CopyError::Idle(_) => CloseReason::Idle,
        }
    }
}

/// Copies both ways between `client` and `upstream` until both directions end, one fails,
/// or the connection is idle for `cfg.idle_timeout`; returns why it ended.
///
/// Errors are logged at debug level; use [`try_bidirectional`] to get them.
pub async fn bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    cfg: &CopyConfig,
    counts: &Transferred,
) -> CloseReason
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match try_bidirectional(client, upstream, cfg, counts).await {
        Ok(()) => CloseReason::Completed,
        Err(e) => {
            tracing::debug!(error = %e, "copy ended");
            e.reason()
        }
    }
}

/// [`bidirectional`] with the error: `Ok` means both sides closed cleanly.
pub async fn try_bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    cfg: &CopyConfig,
    counts: &Transferred,
) -> Result<(), CopyError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut c2u = Direction::new(cfg.buffer_size, Side::Client, Side::Upstream);
    let mut u2c = Direction::new(cfg.buffer_size, Side::Upstream, Side::Client);
    let mut idle = Idle::new(cfg.idle_timeout);

    poll_fn(|cx| {
        let mut progressed = false;
        let a = c2u.poll(
            cx,
            Pin::new(&mut *client),
            Pin::new(&mut *upstream),
            &counts.client_to_upstream,
            &mut progressed,
        )?;
        let b = u2c.poll(
            cx,
            Pin::new(&mut *upstream),
            Pin::new(&mut *client),
            &counts.upstream_to_client,
            &mut progressed,
        )?;
        if a.is_ready() && b.is_ready() {
            return Poll::Ready(Ok(()));
        }
        idle.poll(cx, progressed)
    })
    .await
}

/// The idle timer: one `Sleep`, re-armed lazily from the last progress.
pub(crate) struct Idle {
    timer: Option<(Duration, Pin<Box<Sleep>>)>,
    last_progress: Instant,
}

impl Idle {
    /// A timer that fires `timeout` after the last progress (never if `None`).
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        let now = Instant::now();
        Idle {
            timer: timeout.map(|t| (t, Box::pin(tokio::time::sleep_until(now + t)))),
            last_progress: now,
        }
    }

    /// Records progress (if any) and polls the timer: `Ready(Err(Idle))` once the
    /// connection has been idle for the timeout, `Pending` otherwise.
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        progressed: bool,
    ) -> Poll<Result<T, CopyError>> {
        let Some((timeout, sleep)) = &mut self.timer else {
            return Poll::Pending;
        };
        if progressed {
            self.last_progress = Instant::now();
        }
        loop {
            ready!(sleep.as_mut().poll(cx));
            let deadline = self.last_progress + *timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Err(CopyError::Idle(*timeout)));
            }
            // Progress since the timer was armed: re-arm from it (and poll again to register).
            sleep.as_mut().reset(deadline);
        }
    }
}

/// One direction of the copy: reads from one side into its buffer, writes to the other.
struct Direction {
    /// Held only while bytes move (see the module docs); `buf_size` bytes when taken.
    buf: Option<pool::Buffer>,
    buf_size: usize,
    /// `buf[pos..cap]` is read but not yet written.
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    from: Side,
    to: Side,
}

impl Direction {
    fn new(buf_size: usize, from: Side, to: Side) -> Self {
        Direction {
            buf: None,
            buf_size,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
            from,
            to,
        }
    }

    /// Moves bytes until the reader or the writer is pending; `Ready(Ok)` once EOF has been
    /// read, everything written and the writer shut down.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        count: &AtomicU64,
        progressed: &mut bool,
    ) -> Poll<Result<(), CopyError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Cooperative budget: a stream that is always ready must not starve the worker.
            let coop = ready!(tokio::task::coop::poll_proceed(cx));

            if self.pos == self.cap && !self.read_done {
                let size = self.buf_size;
                let buf = self.buf.get_or_insert_with(|| pool::take(size));
                let mut rb = ReadBuf::new(&mut buf[..]);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                            *progressed = true;
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(CopyError::from_io(self.from, e)));
                    }
                    Poll::Pending => {
                        // Nothing to read now and nothing unwritten: an idle direction
                        // holds no buffer (the reader keeps the waker, not the buffer).
                        self.buf = None;
                        // Push out what was written (TLS records).
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))
                                .map_err(|e| CopyError::from_io(self.to, e))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while self.pos < self.cap {
                // Bytes are pending only in a buffer we hold (cap > 0 came from a read into it).
                let Some(buf) = self.buf.as_deref() else {
                    return Poll::Ready(Err(CopyError::Io {
                        side: self.to,
                        source: io::Error::other("copy buffer released with bytes unwritten"),
                    }));
                };
                let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))
                    .map_err(|e| CopyError::from_io(self.to, e))?;
                if n == 0 {
                    return Poll::Ready(Err(CopyError::Io {
                        side: self.to,
                        source: io::Error::new(io::ErrorKind::WriteZero, "write returned 0"),
                    }));
                }
                self.pos += n;
                self.need_flush = true;
                *progressed = true;
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            coop.made_progress();

            if self.read_done {
                self.buf = None;
                // EOF: forward the half-close, then this direction is over.
                ready!(writer.as_mut().poll_flush(cx))
                    .map_err(|e| CopyError::from_io(self.to, e))?;
                ready!(writer.as_mut().poll_shutdown(cx))
                    .map_err(|e| CopyError::from_io(self.to, e))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// A small global pool of copy buffers, so bursts of traffic neither allocate nor zero a
/// buffer each.
///
/// Only [`DEFAULT_BUFFER_SIZE`] buffers are pooled; other sizes are allocated and freed.
/// The pool holds at most [`pool::MAX_POOLED`] buffers; a `Mutex` is taken when a
/// direction starts moving bytes and when it goes idle, for a pop or a push.
pub mod pool {
    use std::ops::{Deref, DerefMut};

    use super::DEFAULT_BUFFER_SIZE;
    use crate::recycle::Recycler;

    /// The most buffers the pool keeps (8 MiB at the default size).
    pub const MAX_POOLED: usize = 128;

    static POOL: Recycler<Box<[u8]>> = Recycler::new(MAX_POOLED);

    /// A copy buffer that goes back to the pool when dropped, however the copy ends.
    #[derive(Debug)]
    pub struct Buffer(Box<[u8]>);

    impl Deref for Buffer {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.0
        }
    }

    impl DerefMut for Buffer {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            if self.0.len() != DEFAULT_BUFFER_SIZE {
                return;
            }
            POOL.give(std::mem::take(&mut self.0));
        }
    }

    /// A buffer of `size` bytes, from the pool when it has one.
    pub fn take(size: usize) -> Buffer {
        let size = size.max(1);
        let pooled = (size == DEFAULT_BUFFER_SIZE).then(|| POOL.take()).flatten();
        Buffer(pooled.unwrap_or_else(|| vec![0u8; size].into_boxed_slice()))
    }

    /// How many buffers are pooled now (for metrics and tests).
    pub fn pooled() -> usize {
        POOL.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn errors_map_to_reasons() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            CopyError::from_io(Side::Client, reset).reason(),
            CloseReason::ClientReset
        );
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        assert_eq!(
            CopyError::from_io(Side::Upstream, pipe).reason(),
            CloseReason::UpstreamReset
        );
        let other = io::Error::from(io::ErrorKind::InvalidData);
        assert_eq!(
            CopyError::from_io(Side::Upstream, other).reason(),
            CloseReason::UpstreamError
        );
        let other = io::Error::from(io::ErrorKind::InvalidData);
        assert_eq!(
            CopyError::from_io(Side::Client, other).reason(),
            CloseReason::ClientError
        );
    }

    /// Real time (the workspace's tokio has no `test-util`): short timeouts, loose bounds.
    #[tokio::test]
    async fn progress_pushes_the_idle_deadline() {
        let (mut c, mut c_peer) = tokio::io::duplex(1024);
        let (mut u, mut u_peer) = tokio::io::duplex(1024);
        let timeout = Duration::from_millis(300);
        let cfg = CopyConfig {
            idle_timeout: Some(timeout),
            ..CopyConfig::default()
        };
        let counts = Transferred::default();
        let start = Instant::now();
        let peers = async {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                c_peer.write_all(b"ping").await.unwrap();
                let mut b = [0u8; 4];
                u_peer.read_exact(&mut b).await.unwrap();
            }
            (Instant::now(), c_peer, u_peer)
        };
        let (reason, (last, _c, _u)) =
            tokio::join!(bidirectional(&mut c, &mut u, &cfg, &counts), peers);
        assert_eq!(reason, CloseReason::Idle);
        // Alive past the timeout thanks to progress, then idle a timeout after the last one.
        assert!(last - start > timeout);
        assert!(last.elapsed() + Duration::from_millis(20) >= timeout);
        assert_eq!(counts.snapshot(), (16, 0));
    }

    #[test]
    fn pool_reuses_default_buffers_only() {
        let (a, b) = (
            pool::take(DEFAULT_BUFFER_SIZE),
            pool::take(DEFAULT_BUFFER_SIZE),
        );
        drop((a, b));
        assert!(pool::pooled() >= 2);
        let a = pool::take(1000);
        assert_eq!(a.len(), 1000);
    }
}
