//! A small HPACK (RFC 7541) codec for the `:authority` shim ([`crate::authority_shim`]).
//!
//! Why our own: h2's codec is private, and the published HPACK crates (`hpack`,
//! `fluke-hpack`/`loona-hpack`) carry open advisories for panics on hostile input
//! (RUSTSEC-2023-0085, GHSA-7vm6-qwh5-9x44). This decoder sits in front of h2 on a socket
//! every local user may reach, so it must never panic and must bound every allocation.
//!
//! - [`Decoder`] is the full decoder: static table, dynamic table with eviction and size
//!   updates (bounded by the size the server advertised), Huffman strings. It decodes one
//!   field representation at a time and reports [`Decoded::Incomplete`] instead of failing
//!   when a representation continues in the next frame; the table only changes once a
//!   representation is complete, so a retry with more bytes is exact.
//! - [`encode_literal`] writes a field as a literal *without indexing* (or *never indexed*
//!   when the client asked for that), with raw strings. A re-encoded block therefore never
//!   touches the receiver's dynamic table, which stays empty: no shared state to keep in step.

mod huffman;

use std::collections::VecDeque;
use std::sync::OnceLock;

/// RFC 7541 §4.1: every table entry costs its name and value lengths plus 32 octets.
pub const ENTRY_OVERHEAD: usize = 32;

/// The longest string literal accepted (a whole header list may not be longer anyway).
pub const MAX_STRING: usize = 16 * 1024;

/// RFC 7541 Appendix A: the static table, index 1 to 61.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a header block could not be decoded (each is a connection error, RFC 7541 §2.3.3
/// and RFC 9113 §4.3: COMPRESSION_ERROR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// An integer needs more than 28 bits.
    #[error("HPACK integer overflows")]
    IntegerOverflow,
    /// Index 0, or past the end of the static and dynamic tables.
    #[error("HPACK index {0} is not in the table")]
    BadIndex(usize),
    /// A string literal longer than [`MAX_STRING`].
    #[error("HPACK string of {len} bytes exceeds {max}")]
    StringTooLong {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A Huffman string contains the EOS symbol.
    #[error("HPACK Huffman string contains EOS")]
    HuffmanEos,
    /// A Huffman string ends with more than 7 bits, or padding that is not EOS's prefix.
    #[error("HPACK Huffman string has invalid padding")]
    HuffmanPadding,
    /// A dynamic table size update above the size the decoder allowed.
    #[error("HPACK table size update to {size} exceeds the allowed {max}")]
    SizeUpdateTooLarge {
        /// Requested size.
        size: usize,
        /// SETTINGS_HEADER_TABLE_SIZE of the decoding side.
        max: usize,
    },
    /// A dynamic table size update after the first field of a block (RFC 7541 §4.2).
    #[error("HPACK table size update after a header field")]
    SizeUpdateNotAtStart,
}

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name, as sent (HPACK does not require lowercase; h2 checks that).
    pub name: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The client marked it *never indexed* (RFC 7541 §6.2.3): keep the mark downstream.
    pub never_indexed: bool,
}

impl Field {
    /// Its size for header list and table accounting (RFC 7541 §4.1).
    pub fn size(&self) -> usize {
        self.name.len() + self.value.len() + ENTRY_OVERHEAD
    }
}

/// What [`Decoder::decode`] found at the front of its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The representation continues past the input: call again with more bytes.
    Incomplete,
    /// A dynamic table size update of this many bytes was applied.
    SizeUpdate(usize),
    /// A field, and how many input bytes it took.
    Field(Field, usize),
}

/// The decoding context of one connection direction (RFC 7541 §2.2).
#[derive(Debug)]
pub struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    limit: usize,
}

impl Decoder {
    /// A decoder whose side advertised SETTINGS_HEADER_TABLE_SIZE = `limit` (4096 unless
    /// the server changed it); the table starts at that size, as RFC 7541 §4.2 says.
    pub fn new(limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes the representation at the front of `buf`. `block_start` tells whether a
    /// field was already decoded in this header block (size updates must come first).
    pub fn decode(&mut self, buf: &[u8], block_start: bool) -> Result<Decoded, HpackError> {
        let Some(&first) = buf.first() else {
            return Ok(Decoded::Incomplete);
        };
        if first & 0x80 != 0 {
            // §6.1 Indexed header field.
            let Some((index, n)) = decode_int(buf, 7)? else {
                return Ok(Decoded::Incomplete);
            };
            let (name, value) = self.entry(index)?;
            let field = Field {
                name,
                value,
                never_indexed: false,
            };
            return Ok(Decoded::Field(field, n));
        }
        if first & 0xe0 == 0x20 {
            // §6.3 Dynamic table size update.
            let Some((size, n)) = decode_int(buf, 5)? else {
                return Ok(Decoded::Incomplete);
            };
            if !block_start {
                return Err(HpackError::SizeUpdateNotAtStart);
            }
            if size > self.limit {
                return Err(HpackError::SizeUpdateTooLarge {
                    size,
                    max: self.limit,
                });
            }
            self.max_size = size;
            self.evict(0);
            return Ok(Decoded::SizeUpdate(n));
        }
        // §6.2 Literals: with incremental indexing (01), never indexed (0001), without (0000).
        let (prefix, index_it, never_indexed) = if first & 0xc0 == 0x40 {
            (6, true, false)
        } else {
            (4, false, first & 0x10 != 0)
        };
        let Some((index, mut pos)) = decode_int(buf, prefix)? else {
            return Ok(Decoded::Incomplete);
        };
        let name = if index == 0 {
            let Some((name, n)) = decode_string(&buf[pos..])? else {
                return Ok(Decoded::Incomplete);
            };
            pos += n;
            name
        } else {
            self.entry(index)?.0
        };
        let Some((value, n)) = decode_string(&buf[pos..])? else {
            return Ok(Decoded::Incomplete);
        };
        pos += n;
        let field = Field {
            name,
            value,
            never_indexed,
        };
        if index_it {
            self.insert(&field);
        }
        Ok(Decoded::Field(field, pos))
    }

    fn entry(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(0));
        }
        if let Some((n, v)) = STATIC_TABLE.get(index - 1) {
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.table
            .get(index - 1 - STATIC_TABLE.len())
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    fn insert(&mut self, f: &Field) {
        let size = f.size();
        if size > self.max_size {
            // §4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.table.push_front((f.name.clone(), f.value.clone()));
        self.size += size;
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// §5.1: an integer with an `n`-bit prefix; `None` when `buf` ends first.
fn decode_int(buf: &[u8], n: u8) -> Result<Option<(usize, usize)>, HpackError> {
    let mask = (1u8 << n) - 1;
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok(Some((value, 1)));
    }
    let mut shift = 0u32;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Ok(None)
}

/// §5.2: a string literal; `None` when `buf` ends first.
fn decode_string(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HpackError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((len, n)) = decode_int(buf, 7)? else {
        return Ok(None);
    };
    if len > MAX_STRING {
        return Err(HpackError::StringTooLong {
            len,
            max: MAX_STRING,
        });
    }
    let Some(raw) = buf.get(n..n + len) else {
        return Ok(None);
    };
    let s = if first & 0x80 != 0 {
        huffman_decode(raw)?
    } else {
        raw.to_vec()
    };
    Ok(Some((s, n + len)))
}

/// Canonical decoding tables built from [`huffman::CODES`]: per code length, the first
/// code, how many codes have that length, and where their symbols start in `symbols`
/// (the HPACK code is canonical: codes of one length are consecutive, in symbol order;
/// a unit test checks it).
struct HuffmanTable {
    first: [u32; 31],
    count: [u32; 31],
    offset: [usize; 31],
    symbols: Vec<u16>,
}

fn huffman_table() -> &'static HuffmanTable {
    static TABLE: OnceLock<HuffmanTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut by_len: Vec<(u8, u32, u16)> = huffman::CODES
            .iter()
            .zip(0u16..)
            .map(|(&(code, len), sym)| (len, code, sym))
            .collect();
        by_len.sort_unstable();
        let mut t = HuffmanTable {
            first: [0; 31],
            count: [0; 31],
            offset: [0; 31],
            symbols: Vec::with_capacity(by_len.len()),
        };
        for (i, &(len, code, sym)) in by_len.iter().enumerate() {
            let l = usize::from(len);
            if t.count[l] == 0 {
                t.first[l] = code;
                t.offset[l] = i;
            }
            t.count[l] += 1;
            t.symbols.push(sym);
        }
        t
    })
}

/// §5.2 + Appendix B: decodes a Huffman string, rejecting EOS and bad padding.
fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let t = huffman_table();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if len > 30 {
                // Cannot happen with a complete code (EOS is the only 30-bit all-ones one).
                return Err(HpackError::HuffmanEos);
            }
            let k = code.wrapping_sub(t.first[len]);
            if t.count[len] > 0 && code >= t.first[len] && k < t.count[len] {
                let sym = t.symbols[t.offset[len] + k as usize];
                let Ok(b) = u8::try_from(sym) else {
                    return Err(HpackError::HuffmanEos);
                };
                out.push(b);
                code = 0;
                len = 0;
            }
        }
    }
    // §5.2: padding is fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::HuffmanPadding);
    }
    Ok(out)
}

/// §5.1: appends `value` with an `n`-bit prefix whose high bits are `flags`.
fn encode_int(out: &mut Vec<u8>, flags: u8, n: u8, mut value: usize) {
    let mask = (1u8 << n) - 1;
    if value < usize::from(mask) {
        // In range: value < mask <= 255.
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask);
    value -= usize::from(mask);
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// §5.2 without Huffman.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Appends `field` as a literal without indexing (§6.2.2), or never indexed (§6.2.3) when
/// it was marked so, naming it by static table index when the static table has the name.
/// The receiver's dynamic table is never touched.
pub fn encode_literal(out: &mut Vec<u8>, field: &Field) {
    let flags = if field.never_indexed { 0x10 } else { 0x00 };
    match STATIC_TABLE
        .iter()
        .position(|(n, _)| n.as_bytes() == field.name.as_slice())
    {
        Some(i) => encode_int(out, flags, 4, i + 1),
        None => {
            out.push(flags);
            encode_string(out, &field.name);
        }
    }
    encode_string(out, &field.value);
}

#[cfg(test)]
mod tests;
