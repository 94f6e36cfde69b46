//! The first flight of a TLS client, read just far enough to route it: SNI and offered
//! ALPN. Pure (no I/O), so it is unit-tested and fuzzed; bytes from the network are never
//! trusted to be complete or well-formed.
//!
//! RFC 8446 section 4.1.2 (ClientHello) and 5.1 (records; a handshake message may span
//! several records), RFC 6066 section 3 (server_name), RFC 7301 section 3.1 (ALPN). TLS 1.2
//! ClientHellos have the same shape.

/// The most bytes read before giving up: a ClientHello with post-quantum key shares is a
/// few KiB; 16 KiB of handshake plus record headers is generous.
pub const MAX_HELLO: usize = 16 * 1024 + 5 * 4;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not enough bytes yet: read more (up to [`MAX_HELLO`]).
    NeedMore,
    /// A complete ClientHello.
    Hello(Hello<'a>),
}

/// The routing facts of a ClientHello.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct Hello<'a> {
    /// The `host_name` of the server_name extension, if any.
    pub sni: Option<&'a str>,
    /// The offered protocols, in the client's order; empty without the extension.
    pub alpn: Vec<&'a [u8]>,
}

/// Why the bytes are not a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake record (plaintext, or another protocol).
    #[error("not a TLS handshake record (first byte {0:#04x})")]
    NotTls(u8),
    /// The first handshake message is not a ClientHello.
    #[error("handshake message type {0} is not a ClientHello")]
    NotClientHello(u8),
    /// Longer than ferry reads before routing.
    #[error("ClientHello longer than {MAX_HELLO} bytes")]
    TooLong,
    /// A length field points past its container, or a field is malformed.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Parses the records at the start of `buf`. Handshake bytes are gathered across records
/// into `scratch` only when the ClientHello spans more than one record.
pub fn parse<'a>(buf: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<Parsed<'a>, HelloError> {
    let body = match gather(buf, scratch)? {
        None => return more(buf),
        Some(Body::Single(range)) => &buf[range],
        Some(Body::Scratch(range)) => {
            let scratch: &'a Vec<u8> = scratch;
            &scratch[range]
        }
    };
    client_hello(body).map(Parsed::Hello)
}

/// Where the ClientHello body lies once complete.
enum Body {
    /// Inside `buf` (the usual case: one record).
    Single(std::ops::Range<usize>),
    /// Reassembled in the scratch buffer.
    Scratch(std::ops::Range<usize>),
}

fn gather(buf: &[u8], scratch: &mut Vec<u8>) -> Result<Option<Body>, HelloError> {
    scratch.clear();
    let mut pos = 0;
    let mut first: Option<std::ops::Range<usize>> = None;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Ok(None);
        };
        if header[0] != HANDSHAKE {
            return Err(HelloError::NotTls(header[0]));
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version is not 3.x"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        let fragment = pos + 5..pos + 5 + len;
        if buf.len() < fragment.end {
            return Ok(None);
        }
        pos = fragment.end;
        let handshake: &[u8] = match &first {
            None => {
                first = Some(fragment.clone());
                &buf[fragment.clone()]
            }
            Some(f) => {
                if scratch.is_empty() {
                    scratch.extend_from_slice(&buf[f.clone()]);
                }
                scratch.extend_from_slice(&buf[fragment.clone()]);
                scratch
            }
        };
        if handshake[0] != CLIENT_HELLO {
            return Err(HelloError::NotClientHello(handshake[0]));
        }
        let Some(lenb) = handshake.get(1..4) else {
            continue;
        };
        let body_len =
            (usize::from(lenb[0]) << 16) | (usize::from(lenb[1]) << 8) | usize::from(lenb[2]);
        if body_len + 4 > MAX_HELLO {
            return Err(HelloError::TooLong);
        }
        if handshake.len() < body_len + 4 {
            if pos >= MAX_HELLO {
                return Err(HelloError::TooLong);
            }
            continue;
        }
        return Ok(Some(if scratch.is_empty() {
            Body::Single(fragment.start + 4..fragment.start + 4 + body_len)
        } else {
            Body::Scratch(4..4 + body_len)
        }));
    }
}

fn more(buf: &[u8]) -> Result<Parsed<'_>, HelloError> {
    if buf.len() >= MAX_HELLO {
        Err(HelloError::TooLong)
    } else {
        Ok(Parsed::NeedMore)
    }
}

/// A cursor over a byte slice that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

fn client_hello(body: &[u8]) -> Result<Hello<'_>, HelloError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    r.vec8("legacy_session_id")?;
    r.vec16("cipher_suites")?;
    r.vec8("legacy_compression_methods")?;
    let mut hello = Hello::default();
    if r.0.is_empty() {
        return Ok(hello); // No extensions at all (old TLS 1.2 clients).
    }
    let mut exts = Reader(r.vec16("extensions")?);
    while !exts.0.is_empty() {
        let kind = exts.u16("extension type")?;
        let mut data = Reader(exts.vec16("extension data")?);
        match kind {
            EXT_SERVER_NAME => {
                let mut list = Reader(data.vec16("server_name_list")?);
                while !list.0.is_empty() {
                    let name_type = list.u8("name_type")?;
                    let name = list.vec16("host_name")?;
                    if name_type == 0 {
                        let host = std::str::from_utf8(name)
                            .map_err(|_| HelloError::Malformed("host_name is not UTF-8"))?;
                        if host.is_empty() || !host.is_ascii() {
                            return Err(HelloError::Malformed("host_name is not an ASCII name"));
                        }
                        hello.sni = Some(host);
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Reader(data.vec16("protocol_name_list")?);
                while !list.0.is_empty() {
                    let p = list.vec8("protocol_name")?;
                    if p.is_empty() {
                        return Err(HelloError::Malformed("empty protocol name"));
                    }
                    hello.alpn.push(p);
                }
            }
            _ => {}
        }
    }
    Ok(hello)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
