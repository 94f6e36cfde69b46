//! Makes every client's request `:authority` acceptable to h2, and bounds the handshake.
//!
//! grpc C-core (so grpcio/py-spiffe, C++) and grpc-java send a Unix socket's path,
//! percent-encoded, as `:authority` (`%2Ftmp%2Fx%2Fagent.sock`). h2 parses it with
//! `http::uri::Authority`, fails, and resets the stream with PROTOCOL_ERROR, and has no
//! option to relax that. So the client→server bytes go through [`Rewriter`] before h2 reads
//! them:
//!
//! - the 24-byte client preface must arrive first, then a SETTINGS frame; anything else is
//!   garbage and closes the connection;
//! - every frame but HEADERS/CONTINUATION is passed byte for byte as it arrives;
//! - a HEADERS frame and its CONTINUATIONs are HPACK-decoded with the client's dynamic table
//!   ([`crate::hpack::Decoder`]); an `:authority` that `http::uri::Authority` rejects is
//!   replaced by [`REPLACEMENT_AUTHORITY`]; every field is re-encoded as a literal *without
//!   indexing*, so h2's decoder table stays empty and never drifts from ours. Padding is
//!   dropped; priority, END_STREAM and the stream id are kept.
//!
//! Bounds (the socket is open to every local user): a frame longer than the server's
//! SETTINGS_MAX_FRAME_SIZE closes the connection (h2 would too); at most one frame is held
//! at a time, plus the unfinished tail of a field split across frames (itself at most one
//! frame); a header block decoding to more than the server's SETTINGS_MAX_HEADER_LIST_SIZE
//! closes the connection, which bounds what one block can expand to. The server→client
//! direction is untouched.
//!
//! [`H2Shim`] wraps a stream with a [`Rewriter`] and a deadline for the preface + SETTINGS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::codegen::http::uri::Authority;

use crate::hpack::{self, Decoded, Decoder, HpackError};

/// RFC 9113 §3.4: what a client sends first.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What an invalid `:authority` becomes. h2 only needs it to parse; routing ignores it.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// The server's HTTP/2 settings the rewriter must mirror: they bound what a client may send.
/// They must equal what the server advertises (see `server.rs`, which uses the same values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// SETTINGS_MAX_FRAME_SIZE the server advertises.
    pub max_frame_size: usize,
    /// SETTINGS_HEADER_TABLE_SIZE the server advertises (h2 never changes the default 4096).
    pub header_table_size: usize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE the server advertises.
    pub max_header_list_size: usize,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self {
            max_frame_size: 16 * 1024,
            header_table_size: 4096,
            max_header_list_size: 16 * 1024,
        }
    }
}

/// Why a client's byte stream was refused (the connection is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShimError {
    /// The first bytes are not the HTTP/2 client preface.
    #[error("not an HTTP/2 client (bad connection preface)")]
    BadPreface,
    /// RFC 9113 §3.4: the preface must be followed by SETTINGS.
    #[error("first frame is type {frame_type:#x}, not SETTINGS")]
    FirstFrameNotSettings {
        /// The frame type received.
        frame_type: u8,
    },
    /// A frame longer than SETTINGS_MAX_FRAME_SIZE.
    #[error("frame of {len} bytes exceeds SETTINGS_MAX_FRAME_SIZE {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The server's limit.
        max: usize,
    },
    /// A header block was interrupted by another frame, or CONTINUATION came out of the blue.
    #[error("frame type {frame_type:#x} on stream {stream} breaks a header block")]
    BrokenHeaderBlock {
        /// The frame type received.
        frame_type: u8,
        /// Its stream id.
        stream: u32,
    },
    /// Clients must not send PUSH_PROMISE (RFC 9113 §8.4).
    #[error("client sent PUSH_PROMISE")]
    PushPromise,
    /// Padding or priority fields longer than the frame.
    #[error("HEADERS frame on stream {stream} is shorter than its padding/priority fields")]
    MalformedHeaders {
        /// The stream id.
        stream: u32,
    },
    /// The header block did not decode.
    #[error("header block: {0}")]
    Hpack(#[from] HpackError),
    /// The decoded header list is larger than SETTINGS_MAX_HEADER_LIST_SIZE.
    #[error("header list exceeds SETTINGS_MAX_HEADER_LIST_SIZE {max}")]
    HeaderListTooLarge {
        /// The server's limit.
        max: usize,
    },
    /// END_HEADERS arrived in the middle of a field representation.
    #[error("header block ends inside a field")]
    TruncatedBlock,
}

impl From<ShimError> for io::Error {
    fn from(e: ShimError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
        // len <= max_frame_size < 2^24.
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Preface,
    Head,
    Pass { remaining: usize },
    Block(FrameHead),
}

/// An open header block (HEADERS seen, END_HEADERS not yet).
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    /// A field representation cut by the end of the previous frame.
    tail: Vec<u8>,
    /// Re-encoded fields not yet framed.
    pending: Vec<u8>,
    headers_sent: bool,
    fields: usize,
    list_size: usize,
}

/// The client→server transformer, free of I/O: bytes in, bytes for h2 out.
#[derive(Debug)]
pub struct Rewriter {
    limits: H2Limits,
    state: State,
    decoder: Decoder,
    block: Option<Block>,
    settings_seen: bool,
    handshake_done: bool,
    rewritten: u64,
}

impl Rewriter {
    /// A rewriter for a fresh connection to a server advertising `limits`.
    pub fn new(limits: H2Limits) -> Self {
        Self {
            limits,
            state: State::Preface,
            decoder: Decoder::new(limits.header_table_size),
            block: None,
            settings_seen: false,
            handshake_done: false,
            rewritten: 0,
        }
    }

    /// True once the preface and the whole first SETTINGS frame went through.
    pub fn handshake_done(&self) -> bool {
        self.handshake_done
    }

    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// The most input bytes that [`Rewriter::process`] may need at once to make progress.
    pub fn max_needed(&self) -> usize {
        self.limits.max_frame_size + FRAME_HEADER_LEN + PREFACE.len()
    }

    /// Consumes what it can of `input` and appends the bytes h2 should see to `out`;
    /// returns how many input bytes were consumed. Unconsumed bytes must be offered again,
    /// followed by more input (a HEADERS or CONTINUATION frame is processed whole).
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ShimError> {
        let mut pos = 0;
        loop {
            let avail = &input[pos..];
            match self.state {
                State::Preface => {
                    let n = avail.len().min(PREFACE.len());
                    if avail[..n] != PREFACE[..n] {
                        return Err(ShimError::BadPreface);
                    }
                    if n < PREFACE.len() {
                        return Ok(pos);
                    }
                    out.extend_from_slice(PREFACE);
                    pos += n;
                    self.state = State::Head;
                }
                State::Head => {
                    if avail.len() < FRAME_HEADER_LEN {
                        return Ok(pos);
                    }
                    let head = FrameHead::parse(avail);
                    self.check_head(head)?;
                    pos += FRAME_HEADER_LEN;
                    if matches!(head.kind, TYPE_HEADERS | TYPE_CONTINUATION) {
                        self.state = State::Block(head);
                    } else {
                        out.extend_from_slice(&avail[..FRAME_HEADER_LEN]);
                        self.state = State::Pass {
                            remaining: head.len,
                        };
                    }
                }
                State::Pass { remaining } => {
                    let n = avail.len().min(remaining);
                    out.extend_from_slice(&avail[..n]);
                    pos += n;
                    if n < remaining {
                        self.state = State::Pass {
                            remaining: remaining - n,
                        };
                        return Ok(pos);
                    }
                    self.state = State::Head;
                    if self.settings_seen {
                        self.handshake_done = true;
                    }
                }
                State::Block(head) => {
                    if avail.len() < head.len {
                        return Ok(pos);
                    }
                    self.header_frame(head, &avail[..head.len], out)?;
                    pos += head.len;
                    self.state = State::Head;
                }
            }
        }
    }

    fn check_head(&mut self, head: FrameHead) -> Result<(), ShimError> {
        if head.len > self.limits.max_frame_size {
            return Err(ShimError::FrameTooLarge {
                len: head.len,
                max: self.limits.max_frame_size,
            });
        }
        if !self.settings_seen {
            if head.kind != TYPE_SETTINGS || head.flags & FLAG_ACK != 0 {
                return Err(ShimError::FirstFrameNotSettings {
                    frame_type: head.kind,
                });
            }
            self.settings_seen = true;
        }
        if head.kind == TYPE_PUSH_PROMISE {
            return Err(ShimError::PushPromise);
        }
        let continues = head.kind == TYPE_CONTINUATION;
        let open = self.block.as_ref().map(|b| b.stream);
        let fits = match open {
            Some(stream) => continues && head.stream == stream,
            None => !continues,
        };
        if !fits {
            return Err(ShimError::BrokenHeaderBlock {
                frame_type: head.kind,
                stream: head.stream,
            });
        }
        Ok(())
    }

    /// One whole HEADERS or CONTINUATION frame.
    fn header_frame(
        &mut self,
        head: FrameHead,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ShimError> {
        let malformed = ShimError::MalformedHeaders {
            stream: head.stream,
        };
        let mut frag = payload;
        if head.kind == TYPE_HEADERS {
            if head.flags & FLAG_PADDED != 0 {
                let (&pad, rest) = frag.split_first().ok_or_else(|| malformed.clone())?;
                let keep = rest
                    .len()
                    .checked_sub(usize::from(pad))
                    .ok_or_else(|| malformed.clone())?;
                frag = &rest[..keep];
            }
            let priority = if head.flags & FLAG_PRIORITY != 0 {
                let (p, rest) = frag.split_first_chunk::<5>().ok_or(malformed)?;
                frag = rest;
                Some(*p)
            } else {
                None
            };
            self.block = Some(Block {
                stream: head.stream,
                end_stream: head.flags & FLAG_END_STREAM != 0,
                priority,
                tail: Vec::new(),
                pending: Vec::new(),
                headers_sent: false,
                fields: 0,
                list_size: 0,
            });
        }
        let Some(mut block) = self.block.take() else {
            // check_head admits CONTINUATION only with an open block.
            return Err(ShimError::BrokenHeaderBlock {
                frame_type: head.kind,
                stream: head.stream,
            });
        };
        let mut data = std::mem::take(&mut block.tail);
        data.extend_from_slice(frag);
        let mut pos = 0;
        loop {
            match self.decoder.decode(&data[pos..], block.fields == 0)? {
                Decoded::Incomplete => break,
                Decoded::SizeUpdate(n) => pos += n,
                Decoded::Field(mut field, n) => {
                    pos += n;
                    block.fields += 1;
                    block.list_size += field.size();
                    if block.list_size > self.limits.max_header_list_size {
                        return Err(ShimError::HeaderListTooLarge {
                            max: self.limits.max_header_list_size,
                        });
                    }
                    if field.name == b":authority" && Authority::try_from(&field.value[..]).is_err()
                    {
                        tracing::debug!(
                            authority = %String::from_utf8_lossy(&field.value),
                            "replacing an :authority h2 would refuse"
                        );
                        field.value = REPLACEMENT_AUTHORITY.to_vec();
                        self.rewritten += 1;
                    }
                    hpack::encode_literal(&mut block.pending, &field);
                }
            }
        }
        block.tail = data.split_off(pos);
        let end = head.flags & FLAG_END_HEADERS != 0;
        if end && !block.tail.is_empty() {
            return Err(ShimError::TruncatedBlock);
        }
        if block.tail.len() > self.limits.max_frame_size {
            // A single field larger than a frame is larger than any allowed header list.
            return Err(ShimError::HeaderListTooLarge {
                max: self.limits.max_header_list_size,
            });
        }
        self.emit(&mut block, end, out);
        if !end {
            self.block = Some(block);
        }
        Ok(())
    }

    /// Frames the pending re-encoded fields: HEADERS first, then CONTINUATIONs, each at
    /// most SETTINGS_MAX_FRAME_SIZE; END_HEADERS on the last one once the block ended.
    fn emit(&self, block: &mut Block, end: bool, out: &mut Vec<u8>) {
        let max = self.limits.max_frame_size;
        let mut rest = &block.pending[..];
        while !rest.is_empty() || end {
            let (kind, mut flags, prefix) = if block.headers_sent {
                (TYPE_CONTINUATION, 0, None)
            } else {
                let mut f = 0;
                if block.end_stream {
                    f |= FLAG_END_STREAM;
                }
                if block.priority.is_some() {
                    f |= FLAG_PRIORITY;
                }
                (TYPE_HEADERS, f, block.priority)
            };
            let room = max - prefix.map_or(0, |p| p.len());
            let n = rest.len().min(room);
            let last = end && n == rest.len();
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let len = n + prefix.map_or(0, |p| p.len());
            FrameHead::write(out, len, kind, flags, block.stream);
            if let Some(p) = prefix {
                out.extend_from_slice(&p);
            }
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            block.headers_sent = true;
            if last {
                break;
            }
        }
        block.pending.clear();
    }
}

/// A stream whose reads go through a [`Rewriter`], and which fails reads with `TimedOut`
/// when the client has not completed the preface + SETTINGS within the handshake timeout.
/// Writes pass straight through.
#[derive(Debug)]
pub struct H2Shim<S> {
    inner: S,
    rw: Rewriter,
    /// Raw client bytes not yet consumed: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    out_pos: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    eof: bool,
}

impl<S> H2Shim<S> {
    /// Wraps `inner`; the handshake must complete within `handshake_timeout`.
    pub fn new(inner: S, limits: H2Limits, handshake_timeout: Duration) -> Self {
        let rw = Rewriter::new(limits);
        Self {
            buf: vec![0; rw.max_needed()].into_boxed_slice(),
            rw,
            inner,
            start: 0,
            end: 0,
            out: Vec::new(),
            out_pos: 0,
            deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The rewriter (for its counters).
    pub fn rewriter(&self) -> &Rewriter {
        &self.rw
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H2Shim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = dst.remaining().min(this.out.len() - this.out_pos);
                dst.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rw.handshake_done() {
                this.deadline = None;
            } else if let Some(d) = this.deadline.as_mut()
                && d.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface and SETTINGS within the handshake timeout",
                )));
            }
            if this.start < this.end {
                let n = this
                    .rw
                    .process(&this.buf[this.start..this.end], &mut this.out)?;
                this.start += n;
                if this.start == this.end {
                    (this.start, this.end) = (0, 0);
                }
                if !this.out.is_empty() {
                    continue;
                }
            }
            if this.end == this.buf.len() {
                // Make room: what is left is less than one frame (max_needed).
                this.buf.copy_within(this.start..this.end, 0);
                (this.start, this.end) = (0, this.end - this.start);
                if this.end == this.buf.len() {
                    // Unreachable: the rewriter never needs more than max_needed bytes.
                    return Poll::Ready(Err(io::Error::other("HTTP/2 shim buffer full")));
                }
            }
            let mut rb = ReadBuf::new(&mut this.buf[this.end..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        // h2 reports a truncated frame itself.
                        this.eof = true;
                    }
                    this.end += n;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Shim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
