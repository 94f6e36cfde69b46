//! Zero-copy bidirectional copy between two plain TCP sockets (`Mtls` passthrough, where the
//! proxy forwards the application's own TLS untouched), through `splice(2)`.
//!
//! Each direction moves bytes socket -> pipe -> socket inside the kernel: the payload never
//! reaches user space. Same semantics as [`copy::bidirectional`](crate::copy::bidirectional):
//! half-close forwarded with `shutdown(SHUT_WR)`, one idle timer for both directions, counts
//! added as bytes reach the destination socket, errors mapped to the side at fault.
//!
//! Invariants, per direction:
//! - the pipe is drained into the destination before the source is read again, so an
//!   `EAGAIN` from the source splice means "socket empty" (never "pipe full") and clearing
//!   the source's read readiness through `try_io` is correct; likewise an `EAGAIN` from
//!   the destination splice (pipe not empty) means "socket buffer full";
//! - a splice of 0 bytes from the source is EOF; the half-close is sent once the pipe is
//!   empty.
//!
//! A direction holds a pipe only while bytes move: it takes one when its source first has
//! something to read and gives it back, empty, as soon as the source has nothing more (the
//! splice from it would block and the pipe is drained), so an idle passthrough connection
//! costs its two sockets and nothing else. Given-back pipes wait in a small global pool
//! (at most [`MAX_POOLED_PIPES`]); new ones are `pipe2(O_NONBLOCK|O_CLOEXEC)`, enlarged to
//! [`PIPE_SIZE`] when the kernel allows. If a pipe cannot be had, or the first splice says
//! the sockets cannot be spliced (`EINVAL`/`ENOSYS`), the connection falls back to
//! [`copy::bidirectional`](crate::copy::bidirectional) before any byte has moved.

use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::copy::{self, CloseReason, CopyConfig, CopyError, Idle, Side, Transferred};
use crate::recycle::Recycler;

/// The pipe size asked for with `F_SETPIPE_SZ`: 1 MiB, the default `fs.pipe-max-size`.
///
/// The kernel charges it against the user's `fs.pipe-user-pages-soft` (64 MiB by default for
/// users without `CAP_SYS_RESOURCE`); past that, new pipes get the minimum size and still work.
pub const PIPE_SIZE: usize = 1 << 20;

/// The most idle pipes the pool keeps (two file descriptors each).
pub const MAX_POOLED_PIPES: usize = 64;

/// Empty pipes given back by directions that went idle, for the next burst to reuse.
static PIPES: Recycler<Pipe> = Recycler::new(MAX_POOLED_PIPES);

/// A pipe from the pool, else a new one.
fn take_pipe() -> io::Result<Pipe> {
    PIPES.take().map_or_else(Pipe::new, Ok)
}

/// Copies both ways between two TCP sockets with `splice(2)` until both directions end, one
/// fails, or the connection is idle for `cfg.idle_timeout`; returns why it ended.
///
/// Falls back to [`copy::bidirectional`] when splice is unavailable (see the module docs).
pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    cfg: &CopyConfig,
    counts: &Transferred,
) -> CloseReason {
    match try_bidirectional(client, upstream, cfg, counts).await {
        Ok(()) => CloseReason::Completed,
        Err(e) => {
            tracing::debug!(error = %e, "splice ended");
            e.reason()
        }
    }
}

/// [`bidirectional`] with the error: `Ok` means both sides closed cleanly.
pub async fn try_bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    cfg: &CopyConfig,
    counts: &Transferred,
) -> Result<(), CopyError> {
    try_bidirectional_with(client, upstream, cfg, counts, take_pipe, true).await
}

/// The body of [`try_bidirectional`], with the pipe source injectable so tests can force
/// the fallback (`pool`: whether idle pipes go back to the global pool).
pub(crate) async fn try_bidirectional_with(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    cfg: &CopyConfig,
    counts: &Transferred,
    new_pipe: impl Fn() -> io::Result<Pipe>,
    pool: bool,
) -> Result<(), CopyError> {
    let mut c2u = Direction::new(pool, Side::Client, Side::Upstream);
    let mut u2c = Direction::new(pool, Side::Upstream, Side::Client);
    let mut idle = Idle::new(cfg.idle_timeout);

    let spliced = poll_fn(|cx| {
        let mut progressed = false;
        let a = c2u.poll(
            cx,
            client,
            upstream,
            &counts.client_to_upstream,
            &mut progressed,
            &new_pipe,
        )?;
        let b = u2c.poll(
            cx,
            upstream,
            client,
            &counts.upstream_to_client,
            &mut progressed,
            &new_pipe,
        )?;
        match (a, b) {
            (Poll::Ready(DirectionEnd::Unsupported(side, e)), _)
            | (_, Poll::Ready(DirectionEnd::Unsupported(side, e))) => {
                // Falling back is only safe while no splice has moved a byte or an EOF.
                if c2u.fresh && u2c.fresh {
                    return Poll::Ready(Ok(Spliced::Unsupported(e)));
                }
                return Poll::Ready(Err(CopyError::from_io(side, e)));
            }
            (Poll::Ready(DirectionEnd::Done), Poll::Ready(DirectionEnd::Done)) => {
                return Poll::Ready(Ok(Spliced::Done));
            }
            _ => {}
        }
        idle.poll(cx, progressed)
    })
    .await;
    match spliced {
        Ok(Spliced::Done) => Ok(()),
        Ok(Spliced::Unsupported(e)) => {
            tracing::debug!(error = %e, "sockets cannot be spliced; copying through user space");
            drop((c2u, u2c));
            copy::try_bidirectional(client, upstream, cfg, counts).await
        }
        Err(e) => Err(e),
    }
}

/// How a splice loop ended without an error.
enum Spliced {
    /// Both directions done.
    Done,
    /// The first splice said these sockets cannot be spliced: copy instead if nothing moved.
    Unsupported(io::Error),
}

/// What a `Direction` reports: done, or splice unsupported on the first splice from `Side`.
enum DirectionEnd {
    Done,
    Unsupported(Side, io::Error),
}

/// A non-blocking pipe used as the in-kernel buffer of one direction.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    /// `pipe2(O_NONBLOCK|O_CLOEXEC)`, enlarged to [`PIPE_SIZE`] when allowed.
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let size = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
            Ok(n) => usize::try_from(n).unwrap_or(PIPE_SIZE),
            // EPERM past fs.pipe-max-size or the user's pipe quota: keep the default size.
            Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(64 * 1024),
        };
        Ok(Pipe { read, write, size })
    }
}

/// One direction: source socket -> pipe -> destination socket.
struct Direction {
    /// Held only while bytes move (see the module docs).
    pipe: Option<Pipe>,
    /// Give idle pipes back to the global pool (else close them).
    pool: bool,
    /// Bytes in the pipe, not yet spliced to the destination.
    in_pipe: usize,
    read_done: bool,
    done: bool,
    /// No splice has succeeded yet in this direction, not even an EOF (an EINVAL now means
    /// "unsupported", and falling back to copying is safe if the other direction is fresh too).
    fresh: bool,
    from: Side,
    to: Side,
}

impl Direction {
    fn new(pool: bool, from: Side, to: Side) -> Self {
        Direction {
            pipe: None,
            pool,
            in_pipe: 0,
            read_done: false,
            done: false,
            fresh: true,
            from,
            to,
        }
    }

    /// Moves bytes until a socket is not ready; `Ready(Ok(Done))` once EOF has been read,
    /// the pipe drained and the destination shut down for writing.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        count: &AtomicU64,
        progressed: &mut bool,
        new_pipe: &impl Fn() -> io::Result<Pipe>,
    ) -> Poll<Result<DirectionEnd, CopyError>> {
        if self.done {
            return Poll::Ready(Ok(DirectionEnd::Done));
        }
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            // Drain the pipe first (see the module invariant).
            while self.in_pipe > 0 {
                let Some(pipe) = &self.pipe else {
                    return Poll::Ready(Err(CopyError::Io {
                        side: self.to,
                        source: io::Error::other("splice pipe released with bytes in it"),
                    }));
                };
                ready!(dst.poll_write_ready(cx)).map_err(|e| CopyError::from_io(self.to, e))?;
                let res = dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, dst, None, self.in_pipe, flags)
                        .map_err(io::Error::from)
                });
                match res {
                    Ok(n) => {
                        self.in_pipe -= n;
                        *progressed = true;
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    // Readiness cleared by try_io: poll_write_ready registers the waker.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(CopyError::from_io(self.to, e))),
                }
            }

            if self.read_done {
                self.release();
                // The pipe is empty: forward the half-close.
                socket2::SockRef::from(dst)
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(|e| CopyError::from_io(self.to, e))?;
                self.done = true;
                return Poll::Ready(Ok(DirectionEnd::Done));
            }

            ready!(src.poll_read_ready(cx)).map_err(|e| CopyError::from_io(self.from, e))?;
            let pipe = match &mut self.pipe {
                Some(p) => p,
                empty @ None => match new_pipe() {
                    Ok(p) => empty.insert(p),
                    Err(e) if self.fresh => {
                        return Poll::Ready(Ok(DirectionEnd::Unsupported(self.from, e)));
                    }
                    Err(e) => return Poll::Ready(Err(CopyError::from_io(self.from, e))),
                },
            };
            let res = src.try_io(Interest::READABLE, || {
                splice(src, None, &pipe.write, None, pipe.size, flags).map_err(io::Error::from)
            });
            match res {
                Ok(0) => {
                    self.read_done = true;
                    self.fresh = false;
                }
                Ok(n) => {
                    self.in_pipe = n;
                    self.fresh = false;
                    *progressed = true;
                }
                // The source has nothing more and the pipe is empty: go idle without it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.release(),
                Err(e) => {
                    let unsupported = matches!(
                        e.raw_os_error().map(Errno::from_raw),
                        Some(Errno::EINVAL | Errno::ENOSYS)
                    );
                    if unsupported && self.fresh {
                        return Poll::Ready(Ok(DirectionEnd::Unsupported(self.from, e)));
                    }
                    return Poll::Ready(Err(CopyError::from_io(self.from, e)));
                }
            }
        }
    }
}

impl Direction {
    /// Gives the pipe back, to the pool if it is empty and pooling is on, else closes it.
    fn release(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        if self.pool && self.in_pipe == 0 {
            PIPES.give(pipe);
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// With no pipe available the copy goes through user space and still completes.
    #[tokio::test]
    async fn falls_back_to_copy_without_pipes() {
        let (mut app, mut client) = pair().await;
        let (mut upstream, mut server) = pair().await;
        let counts = Transferred::default();
        let cfg = CopyConfig::default();
        let no_pipe = || Err(io::Error::from(Errno::ENOSYS));
        let proxy =
            try_bidirectional_with(&mut client, &mut upstream, &cfg, &counts, no_pipe, false);
        let peers = async {
            app.write_all(b"hello").await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            server.write_all(b"world!").await.unwrap();
            server.shutdown().await.unwrap();
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"world!");
        };
        let (res, ()) = tokio::join!(proxy, peers);
        res.unwrap();
        assert_eq!(counts.snapshot(), (5, 6));
    }

    /// A first splice that fails with EINVAL (here: the "pipe" is /dev/null, which splice
    /// refuses) falls back to copying, with nothing lost.
    #[tokio::test]
    async fn falls_back_to_copy_when_the_first_splice_is_refused() {
        let (mut app, mut client) = pair().await;
        let (mut upstream, mut server) = pair().await;
        let counts = Transferred::default();
        let cfg = CopyConfig::default();
        let not_a_pipe = || {
            let null = || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            };
            Ok(Pipe {
                read: OwnedFd::from(null()?),
                write: OwnedFd::from(null()?),
                size: 4096,
            })
        };
        let proxy =
            try_bidirectional_with(&mut client, &mut upstream, &cfg, &counts, not_a_pipe, false);
        let peers = async {
            app.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            server.write_all(b"pong").await.unwrap();
            app.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            app.shutdown().await.unwrap();
            server.shutdown().await.unwrap();
        };
        let (res, ()) = tokio::join!(proxy, peers);
        res.unwrap();
        assert_eq!(counts.snapshot(), (4, 4));
    }

    /// Between bursts a direction holds no pipe: with pooling off, every burst each way
    /// needs a pipe of its own (held for the connection's life, two would do for all).
    #[tokio::test]
    async fn idle_directions_hold_no_pipe() {
        let (mut app, mut client) = pair().await;
        let (mut upstream, mut server) = pair().await;
        let counts = Transferred::default();
        let cfg = CopyConfig::default();
        let created = std::sync::atomic::AtomicUsize::new(0);
        let counting = || {
            created.fetch_add(1, Ordering::Relaxed);
            Pipe::new()
        };
        let proxy =
            try_bidirectional_with(&mut client, &mut upstream, &cfg, &counts, counting, false);
        let rounds = 3;
        let peers = async {
            let mut got = [0u8; 4];
            for _ in 0..rounds {
                app.write_all(b"ping").await.unwrap();
                server.read_exact(&mut got).await.unwrap();
                server.write_all(b"pong").await.unwrap();
                app.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"pong");
                // Idle long enough for both directions to see "would block".
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            app.shutdown().await.unwrap();
            server.shutdown().await.unwrap();
        };
        let (res, ()) = tokio::join!(proxy, peers);
        res.unwrap();
        assert_eq!(counts.snapshot(), (4 * rounds, 4 * rounds));
        assert!(
            created.load(Ordering::Relaxed) >= 2 * rounds as usize,
            "{} pipes for {rounds} bursts each way",
            created.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn pipes_are_enlarged_or_keep_a_usable_size() {
        let p = Pipe::new().unwrap();
        assert!(p.size >= 4096);
    }
}
