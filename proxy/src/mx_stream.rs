//! The Istio TCP metadata exchange (protocols.md §4) on a live stream.
//!
//! [`MxStream`] wraps the TLS stream of a connection that negotiated `istio-peer-exchange`
//! and is itself `AsyncRead + AsyncWrite`, so the bidirectional copy runs on it unchanged.
//! It strips the peer's frame from the bytes read and prepends ours to the bytes written;
//! once the peer's frame is through, every call is a plain delegation to the inner stream.
//!
//! Invariants:
//! - Reading never goes past the peer's frame: the header is read into an 8-byte array and
//!   the body into one buffer of exactly `len` bytes (at most [`MAX_FRAME`]), allocated
//!   once per connection; so the only bytes ever held back are a wrong-magic prefix, and
//!   those are returned to the caller before anything else.
//! - Our own frame is written, and flushed, before any byte of the caller's.
//! - The exchange has one deadline, `timeout` after construction; while the peer's frame is
//!   incomplete a read that would wait past it fails with [`MxError::Timeout`]. Errors reach
//!   the caller as `io::Error`s whose inner error is the typed [`MxError`].
//!
//! Client side: the Istio server answers only after reading our frame, so the caller sends
//! it with [`MxStream::send_own`] right after the handshake (the first write or read sends
//! it too). Server side: the client's frame is read first (a write from the application
//! drives that read); with the right magic ours is sent at once (the Istio client's reader
//! waits for it even when the server application is silent), with a wrong magic — a stock
//! Envoy that negotiated `istio-peer-exchange` without the metadata exchange filter —
//! nothing is sent and the bytes read so far are application data. **ferry:** Istio's
//! server sends its frame regardless of the magic; ferry withholds it because such a client
//! would hand our frame to its application as data.
//!
//! A server-first protocol behind a client without the filter cannot be told apart from a
//! slow client: the server's writes wait for the client's first bytes, up to the timeout.

use std::fmt;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::mx::{HEADER_LEN, Header, MAX_FRAME, MxError, PeerMetadata, decode_body, parse_header};

/// Default time allowed for the peer's frame to arrive, from the stream's construction.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the exchange went, for the access log and metrics.
// One per connection, read in place by the access log: boxing the metadata would only add
// an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum MxOutcome {
    /// The peer's frame has not been read yet.
    Pending,
    /// The peer's frame was read and stripped.
    Exchanged(PeerMetadata),
    /// The peer sent no frame (wrong magic); its bytes were passed through.
    PeerMissingFilter,
    /// The exchange failed (timeout, oversized or malformed frame, short read, I/O error).
    Failed(String),
}

impl fmt::Display for MxOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MxOutcome::Pending => f.write_str("mx=pending"),
            MxOutcome::Exchanged(meta) => write!(f, "mx=exchanged {meta}"),
            MxOutcome::PeerMissingFilter => f.write_str("mx=peer-missing-filter"),
            MxOutcome::Failed(e) => write!(f, "mx=failed ({e})"),
        }
    }
}

/// Which side of the exchange we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// State of our own frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnFrame {
    /// Server side, before the client's frame is checked: nothing may be written yet.
    Undecided,
    /// To be written (from `own_sent`) and flushed before the caller's bytes.
    Queued,
    /// Sent, or withheld for good.
    Done,
    /// The exchange failed: writes fail too, with the same error.
    Failed,
}

/// Why the exchange failed, kept to answer every later read the same way.
#[derive(Debug)]
enum Failure {
    Mx(MxError),
    Io(io::ErrorKind, String),
}

/// Read-side state.
#[derive(Debug)]
enum Read {
    Header {
        buf: [u8; HEADER_LEN],
        got: usize,
    },
    Body {
        body: Vec<u8>,
        got: usize,
    },
    /// Wrong-magic bytes to hand to the caller before delegating.
    Leftover {
        buf: [u8; HEADER_LEN],
        pos: usize,
        end: usize,
    },
    Done,
    Failed(Failure),
}

fn mx_io_error(e: MxError) -> io::Error {
    let kind = match e {
        MxError::Timeout { .. } => io::ErrorKind::TimedOut,
        MxError::ShortRead { .. } => io::ErrorKind::UnexpectedEof,
        MxError::TooLarge { .. } | MxError::Malformed { .. } => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

/// A stream that performs Istio's TCP metadata exchange, then is its inner stream.
#[derive(Debug)]
pub struct MxStream<S> {
    inner: S,
    role: Role,
    own: Arc<[u8]>,
    own_sent: usize,
    send: OwnFrame,
    read: Read,
    outcome: MxOutcome,
    timeout: Duration,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> MxStream<S> {
    fn new(inner: S, role: Role, own_frame: Arc<[u8]>, timeout: Duration) -> Self {
        MxStream {
            inner,
            role,
            own: own_frame,
            own_sent: 0,
            send: match role {
                Role::Client => OwnFrame::Queued,
                Role::Server => OwnFrame::Undecided,
            },
            read: Read::Header {
                buf: [0; HEADER_LEN],
                got: 0,
            },
            outcome: MxOutcome::Pending,
            timeout,
            deadline: Instant::now() + timeout,
            sleep: None,
        }
    }

    /// Outbound side: `own_frame` (from [`crate::mx::encode_frame`]) goes out first; call
    /// [`MxStream::send_own`] right after the handshake.
    pub fn client(inner: S, own_frame: Arc<[u8]>, timeout: Duration) -> Self {
        Self::new(inner, Role::Client, own_frame, timeout)
    }

    /// Inbound side: the client's frame is read first; `own_frame` is sent only if the
    /// client's magic is right.
    pub fn server(inner: S, own_frame: Arc<[u8]>, timeout: Duration) -> Self {
        Self::new(inner, Role::Server, own_frame, timeout)
    }

    /// How the exchange went so far, for logs and metrics.
    pub fn outcome(&self) -> &MxOutcome {
        &self.outcome
    }

    /// The inner stream, e.g. for its TLS session details.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner stream, mutably. Reading or writing it directly bypasses the exchange.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner stream. Bytes held back (a wrong-magic prefix not yet read, an unsent
    /// remainder of our frame) are dropped, so call this only once the exchange is over.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Records a failure and returns the error for the caller.
    fn fail(&mut self, e: MxError) -> io::Error {
        tracing::debug!(error = %e, "metadata exchange failed");
        self.outcome = MxOutcome::Failed(e.to_string());
        self.send = OwnFrame::Failed;
        self.sleep = None;
        let err = mx_io_error(e.clone());
        self.read = Read::Failed(Failure::Mx(e));
        err
    }

    fn fail_io(&mut self, e: io::Error) -> io::Error {
        self.outcome = MxOutcome::Failed(e.to_string());
        self.send = OwnFrame::Failed;
        self.sleep = None;
        self.read = Read::Failed(Failure::Io(e.kind(), e.to_string()));
        e
    }

    /// Called when the inner read is pending with the frame incomplete.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, got: usize) -> Poll<io::Result<()>> {
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(self.fail(MxError::Timeout {
                after: self.timeout,
                got,
            }))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> MxStream<S> {
    /// Writes and flushes our frame (client side, right after the handshake: the Istio
    /// server answers only after reading it). A no-op once sent.
    pub async fn send_own(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send_own(cx)).await
    }

    /// Writes the rest of our frame if it is queued, then flushes.
    fn poll_send_own(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.send != OwnFrame::Queued {
            return Poll::Ready(Ok(()));
        }
        while self.own_sent < self.own.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.own[self.own_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.own_sent += n;
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.send = OwnFrame::Done;
        Poll::Ready(Ok(()))
    }

    /// Reads the peer's frame until it is stripped, found missing, or failed.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.read {
                Read::Header { buf, got } => {
                    let before = *got;
                    let mut rb = ReadBuf::new(&mut buf[before..]);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                        Poll::Pending => return self.poll_deadline(cx, before),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail_io(e))),
                        Poll::Ready(Ok(())) => {}
                    }
                    let n = rb.filled().len();
                    if n == 0 {
                        if before == 0 {
                            // Closed before sending anything: plain EOF for the caller.
                            self.outcome = MxOutcome::Failed(
                                "peer closed the stream before its metadata exchange frame".into(),
                            );
                            self.send = OwnFrame::Done;
                            self.sleep = None;
                            self.read = Read::Done;
                            return Poll::Ready(Ok(()));
                        }
                        return Poll::Ready(Err(self.fail(MxError::ShortRead {
                            got: before,
                            expected: HEADER_LEN,
                        })));
                    }
                    *got += n;
                    let (buf, got) = (*buf, *got);
                    match parse_header(&buf[..got]) {
                        Ok(Header::NeedMore) => {}
                        Ok(Header::Frame { len }) => {
                            // One allocation of exactly `len` (<= MAX_FRAME) per connection.
                            self.read = Read::Body {
                                body: vec![0; len.min(MAX_FRAME)],
                                got: 0,
                            };
                        }
                        Ok(Header::WrongMagic) => {
                            tracing::warn!(
                                "peer missing TCP metadata exchange filter; passing bytes through"
                            );
                            self.outcome = MxOutcome::PeerMissingFilter;
                            if self.role == Role::Server {
                                self.send = OwnFrame::Done;
                            }
                            self.sleep = None;
                            self.read = Read::Leftover {
                                buf,
                                pos: 0,
                                end: got,
                            };
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) => return Poll::Ready(Err(self.fail(e))),
                    }
                }
                Read::Body { body, got } => {
                    if *got < body.len() {
                        let before = *got;
                        let expected = HEADER_LEN + body.len();
                        let mut rb = ReadBuf::new(&mut body[before..]);
                        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                            Poll::Pending => return self.poll_deadline(cx, HEADER_LEN + before),
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail_io(e))),
                            Poll::Ready(Ok(())) => {}
                        }
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Err(self.fail(MxError::ShortRead {
                                got: HEADER_LEN + before,
                                expected,
                            })));
                        }
                        *got += n;
                        continue;
                    }
                    match decode_body(body) {
                        Ok(meta) => {
                            tracing::debug!(peer = %meta, "metadata exchange: peer frame read");
                            self.outcome = MxOutcome::Exchanged(meta);
                            if self.send == OwnFrame::Undecided {
                                self.send = OwnFrame::Queued;
                            }
                            self.sleep = None;
                            self.read = Read::Done;
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) => return Poll::Ready(Err(self.fail(e))),
                    }
                }
                Read::Failed(Failure::Mx(e)) => {
                    let e = e.clone();
                    return Poll::Ready(Err(mx_io_error(e)));
                }
                Read::Failed(Failure::Io(kind, msg)) => {
                    return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
                }
                Read::Leftover { .. } | Read::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Before the caller's bytes go out: the server waits for the client's frame, then our
    /// frame is written if queued.
    fn poll_before_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if matches!(self.send, OwnFrame::Undecided | OwnFrame::Failed) {
            ready!(self.poll_frame(cx))?;
        }
        self.poll_send_own(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MxStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.read, Read::Done) {
            // Client side: a caller that reads first (without `send_own`) still gets our
            // frame out, or the Istio server would never answer. Write errors are left for
            // the write side to report (the frame stays queued); reads report read errors.
            let _ = this.poll_send_own(cx);
            ready!(this.poll_frame(cx))?;
            if let Read::Leftover { buf, pos, end } = &mut this.read {
                let n = out.remaining().min(*end - *pos);
                out.put_slice(&buf[*pos..*pos + n]);
                *pos += n;
                if *pos == *end {
                    this.read = Read::Done;
                }
                return Poll::Ready(Ok(()));
            }
        }
        if this.send == OwnFrame::Queued {
            // Server side: answer the client's frame now, even if the application is
            // silent. Pending only means the write side is full; a later call finishes it,
            // and a write error is reported by the next write, as above.
            let _ = this.poll_send_own(cx);
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MxStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.send != OwnFrame::Done {
            ready!(this.poll_before_write(cx))?;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_own(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_own(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mx::encode_frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    fn meta(name: &str) -> PeerMetadata {
        PeerMetadata {
            name: name.into(),
            namespace: "demo".into(),
            identity: format!("spiffe://local.domain/ns/demo/sa/{name}"),
            ..Default::default()
        }
    }

    fn frame(name: &str) -> Arc<[u8]> {
        encode_frame(&meta(name)).into()
    }

    fn mx_err(e: &io::Error) -> &MxError {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<MxError>())
            .unwrap_or_else(|| panic!("not an MxError: {e:?}"))
    }

    /// Hands out at most one byte per read, to exercise every partial state.
    struct OneByte(DuplexStream);

    impl AsyncRead for OneByte {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut one = [0u8; 1];
            let mut rb = ReadBuf::new(&mut one);
            ready!(Pin::new(&mut self.0).poll_read(cx, &mut rb))?;
            out.put_slice(rb.filled());
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for OneByte {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, &buf[..buf.len().min(1)])
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Reads exactly one frame from a plain stream.
    async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> PeerMetadata {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header).await.unwrap();
        let Header::Frame { len } = parse_header(&header).unwrap() else {
            panic!("no frame header: {header:?}");
        };
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        decode_body(&body).unwrap()
    }

    #[tokio::test]
    async fn both_ends_exchange_then_copy() {
        let (a, b) = duplex(64);
        let server = tokio::spawn(async move {
            let mut s = MxStream::server(b, frame("server"), DEFAULT_TIMEOUT);
            let mut ping = [0u8; 4];
            s.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping, b"ping");
            s.write_all(b"pong").await.unwrap();
            s.flush().await.unwrap();
            s.outcome().clone()
        });
        let mut c = MxStream::client(a, frame("client"), DEFAULT_TIMEOUT);
        assert_eq!(c.outcome(), &MxOutcome::Pending);
        c.send_own().await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        c.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        assert_eq!(c.outcome(), &MxOutcome::Exchanged(meta("server")));
        assert_eq!(server.await.unwrap(), MxOutcome::Exchanged(meta("client")));
        assert!(
            c.outcome()
                .to_string()
                .starts_with("mx=exchanged name=server")
        );
    }

    #[tokio::test]
    async fn client_against_plain_server_sending_frame_and_payload_together() {
        let (a, mut b) = duplex(4096);
        let mut c = MxStream::client(a, frame("client"), DEFAULT_TIMEOUT);
        c.send_own().await.unwrap();
        assert_eq!(read_frame(&mut b).await, meta("client"));
        let mut bytes = frame("server").to_vec();
        bytes.extend_from_slice(b"hello world");
        b.write_all(&bytes).await.unwrap();
        drop(b);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        assert_eq!(c.outcome(), &MxOutcome::Exchanged(meta("server")));
    }

    #[tokio::test]
    async fn client_writes_own_frame_before_payload_without_send_own() {
        let (a, mut b) = duplex(4096);
        let mut c = MxStream::client(a, frame("client"), DEFAULT_TIMEOUT);
        c.write_all(b"data").await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(read_frame(&mut b).await, meta("client"));
        let mut data = [0u8; 4];
        b.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"data");
    }

    #[tokio::test]
    async fn client_reading_first_still_sends_its_frame() {
        let (a, mut b) = duplex(4096);
        let mut c = MxStream::client(a, frame("client"), DEFAULT_TIMEOUT);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).await.map(|_| buf)
        });
        assert_eq!(read_frame(&mut b).await, meta("client"));
        let mut bytes = frame("server").to_vec();
        bytes.extend_from_slice(b"ok");
        b.write_all(&bytes).await.unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"ok");
    }

    #[tokio::test]
    async fn server_passes_through_a_client_without_the_filter() {
        let (mut a, b) = duplex(4096);
        let mut s = MxStream::server(b, frame("server"), DEFAULT_TIMEOUT);
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        a.write_all(request).await.unwrap();
        let mut got = vec![0u8; request.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request);
        assert_eq!(s.outcome(), &MxOutcome::PeerMissingFilter);
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        a.read_to_end(&mut answer).await.unwrap();
        assert_eq!(
            answer, b"HTTP/1.1 200 OK\r\n\r\n",
            "no frame may be written back"
        );
    }

    #[tokio::test]
    async fn server_answers_the_frame_even_if_the_application_is_silent() {
        let (mut a, b) = duplex(4096);
        let mut s = MxStream::server(b, frame("server"), DEFAULT_TIMEOUT);
        let mut bytes = frame("client").to_vec();
        bytes.extend_from_slice(b"ping");
        a.write_all(&bytes).await.unwrap();
        let mut ping = [0u8; 4];
        s.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        assert_eq!(read_frame(&mut a).await, meta("server"));
    }

    #[tokio::test]
    async fn server_first_write_waits_for_the_client_frame() {
        let (mut a, b) = duplex(4096);
        let mut s = MxStream::server(b, frame("server"), DEFAULT_TIMEOUT);
        let writer = tokio::spawn(async move {
            s.write_all(b"banner").await.unwrap();
            s.flush().await.unwrap();
            s
        });
        a.write_all(&frame("client")).await.unwrap();
        assert_eq!(read_frame(&mut a).await, meta("server"));
        let mut banner = [0u8; 6];
        a.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"banner");
        let s = writer.await.unwrap();
        assert_eq!(s.outcome(), &MxOutcome::Exchanged(meta("client")));
    }

    #[tokio::test]
    async fn byte_by_byte_delivery() {
        let (a, mut b) = duplex(4096);
        let mut c = MxStream::client(OneByte(a), frame("client"), DEFAULT_TIMEOUT);
        c.send_own().await.unwrap();
        assert_eq!(read_frame(&mut b).await, meta("client"));
        let mut bytes = frame("server").to_vec();
        bytes.extend_from_slice(b"payload");
        b.write_all(&bytes).await.unwrap();
        drop(b);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"payload");
        assert_eq!(c.outcome(), &MxOutcome::Exchanged(meta("server")));

        // Wrong magic, one byte at a time: a 2-byte prefix that matches, then a mismatch.
        let (a, mut b) = duplex(4096);
        let mut s = MxStream::server(OneByte(a), frame("server"), DEFAULT_TIMEOUT);
        b.write_all(b"=#xyz").await.unwrap();
        drop(b);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"=#xyz");
        assert_eq!(s.outcome(), &MxOutcome::PeerMissingFilter);
    }

    #[tokio::test]
    async fn short_read() {
        for cut in [5, HEADER_LEN + 10] {
            let (a, mut b) = duplex(4096);
            let mut c = MxStream::client(a, frame("client"), DEFAULT_TIMEOUT);
            b.write_all(&frame("server")[..cut]).await.unwrap();
            drop(b);
            let err = c.read(&mut [0u8; 64]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            assert!(
                matches!(mx_err(&err), MxError::ShortRead { got, .. } if *got == cut),
                "{err}"
            );
            assert!(matches!(c.outcome(), MxOutcome::Failed(_)));
            // Later reads keep failing the same way.
            let again = c.read(&mut [0u8; 64]).await.unwrap_err();
            assert!(matches!(mx_err(&again), MxError::ShortRead { .. }));
        }
    }

    #[tokio::test]
    async fn eof_before_anything_is_plain_eof() {
        let (a, b) = duplex(64);
        drop(b);
        let mut s = MxStream::server(a, frame("server"), DEFAULT_TIMEOUT);
        assert_eq!(s.read(&mut [0u8; 8]).await.unwrap(), 0);
        assert!(matches!(s.outcome(), MxOutcome::Failed(_)));
    }

    #[tokio::test]
    async fn oversized_and_malformed() {
        let (a, mut b) = duplex(4096);
        let mut c = MxStream::client(a, frame("client"), DEFAULT_TIMEOUT);
        let mut header = crate::mx::MAGIC.to_be_bytes().to_vec();
        header.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        b.write_all(&header).await.unwrap();
        let err = c.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(mx_err(&err), &MxError::TooLarge { len: MAX_FRAME + 1 });

        let (a, mut b) = duplex(4096);
        let mut s = MxStream::server(a, frame("server"), DEFAULT_TIMEOUT);
        let mut bytes = crate::mx::MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&4u32.to_be_bytes());
        bytes.extend_from_slice(b"\xff\xff\xff\xff");
        b.write_all(&bytes).await.unwrap();
        let err = s.read(&mut [0u8; 64]).await.unwrap_err();
        assert!(matches!(mx_err(&err), MxError::Malformed { .. }), "{err}");
        // A failed server exchange never writes our frame.
        assert!(s.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn timeout_while_the_frame_is_incomplete() {
        let (a, mut b) = duplex(4096);
        // Real time (tokio's test-util clock is not enabled for this crate): short timeout.
        let timeout = Duration::from_millis(100);
        let mut c = MxStream::client(a, frame("client"), timeout);
        b.write_all(&frame("server")[..3]).await.unwrap();
        let start = Instant::now();
        let err = c.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            mx_err(&err),
            &MxError::Timeout {
                after: timeout,
                got: 3
            }
        );
        assert!(start.elapsed() >= timeout);
        drop(b);
    }

    #[tokio::test]
    async fn no_timer_after_the_exchange() {
        let (a, mut b) = duplex(4096);
        let mut c = MxStream::client(a, frame("client"), Duration::from_millis(50));
        b.write_all(&frame("server")).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.map(|_| buf)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.write_all(b"late").await.unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"late");
    }
}
