//! Istio's metadata exchange codec, as pure code (no I/O, fuzzed).
//!
//! TCP (ALPN `istio-peer-exchange`, protocols.md §4): each side prepends one frame
//! `[magic u32 BE = 0x3D230467][len u32 BE][len bytes: google.protobuf.Any]` to the bytes it
//! sends. The `Any` wraps a `google.protobuf.Struct` with `x-envoy-peer-metadata` (the
//! peer struct) and `x-envoy-peer-metadata-id` (the node id, omitted when empty).
//!
//! HTTP (protocols.md §5): the header `x-envoy-peer-metadata` is the standard padded
//! base64 of the bare peer `Struct`.
//!
//! Encoding is done by hand rather than through prost's `Struct`, whose `HashMap` makes the
//! byte order random: ferry writes map entries sorted by key, as Istio's Envoy does (the
//! `istio-mx-tcp-*.bin` vectors), so identical metadata always gives identical bytes.
//! Decoding goes through prost; key order is not significant to readers and unknown keys
//! are ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::Message as _;
use prost::encoding::{encode_varint, encoded_len_varint};

/// The frame's magic number (Istio's `MetadataExchangeInitialHeader::magic`).
pub const MAGIC: u32 = 0x3D23_0467;
/// Bytes of the frame header: magic + length.
pub const HEADER_LEN: usize = 8;
/// ferry's cap on a frame's body length; Istio has none, a real frame is well under 2 KiB.
pub const MAX_FRAME: usize = 64 * 1024;
/// `Any.type_url` of the frame body.
pub const TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
/// Key of the peer struct in the frame's outer struct (and the HTTP header name).
pub const METADATA_KEY: &str = "x-envoy-peer-metadata";
/// Key of the node id in the frame's outer struct (and the HTTP header name).
pub const METADATA_ID_KEY: &str = "x-envoy-peer-metadata-id";

/// Errors of the metadata exchange, in the codec and on the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    /// The header announces a body over [`MAX_FRAME`].
    #[error(
        "metadata exchange frame of {len} bytes exceeds ferry's cap of {MAX_FRAME}; is the peer really an Istio sidecar?"
    )]
    TooLarge {
        /// The announced body length.
        len: usize,
    },
    /// The body is not the expected protobuf.
    #[error("malformed metadata exchange frame: {reason}")]
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// The peer's frame did not arrive in time.
    #[error(
        "peer metadata exchange frame not received within {after:?} (got {got} bytes); the peer negotiated istio-peer-exchange but sent no frame"
    )]
    Timeout {
        /// The exchange timeout.
        after: Duration,
        /// Bytes of the frame received so far.
        got: usize,
    },
    /// The peer closed the stream in the middle of its frame.
    #[error("peer closed the stream after {got} of {expected} metadata exchange frame bytes")]
    ShortRead {
        /// Bytes received.
        got: usize,
        /// Bytes the frame needed (header only, until the header is complete).
        expected: usize,
    },
}

impl MxError {
    fn malformed(reason: impl Into<String>) -> Self {
        MxError::Malformed {
            reason: reason.into(),
        }
    }
}

/// The peer metadata Istio sidecars exchange: who is on the other end, for access logs,
/// metrics labels and Istio telemetry on the peer's side.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerMetadata {
    /// `NAME`: the pod name.
    pub name: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `WORKLOAD_NAME`: the deployment (or other owner) name.
    pub workload_name: String,
    /// `CLUSTER_ID`, `Kubernetes` by default in Istio.
    pub cluster_id: String,
    /// `IDENTITY`: the workload's SPIFFE ID.
    pub identity: String,
    /// `LABELS`: always sent, possibly empty.
    pub labels: BTreeMap<String, String>,
    /// `OWNER`: `kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<name>`.
    pub owner: String,
    /// `REGION`.
    pub region: String,
    /// `AVAILABILITY_ZONE`.
    pub availability_zone: String,
    /// `x-envoy-peer-metadata-id`, the node id; `""` means absent.
    pub id: String,
}

impl PeerMetadata {
    /// The string fields with their Istio keys, in key order (the encoding order).
    fn string_fields(&self) -> [(&'static str, &str); 8] {
        [
            ("AVAILABILITY_ZONE", &self.availability_zone),
            ("CLUSTER_ID", &self.cluster_id),
            ("IDENTITY", &self.identity),
            ("NAME", &self.name),
            ("NAMESPACE", &self.namespace),
            ("OWNER", &self.owner),
            ("REGION", &self.region),
            ("WORKLOAD_NAME", &self.workload_name),
        ]
    }

    fn field_mut(&mut self, key: &str) -> Option<&mut String> {
        Some(match key {
            "NAME" => &mut self.name,
            "NAMESPACE" => &mut self.namespace,
            "WORKLOAD_NAME" => &mut self.workload_name,
            "CLUSTER_ID" => &mut self.cluster_id,
            "IDENTITY" => &mut self.identity,
            "OWNER" => &mut self.owner,
            "REGION" => &mut self.region,
            "AVAILABILITY_ZONE" => &mut self.availability_zone,
            _ => return None,
        })
    }
}

/// One line for access logs: `name=… namespace=… workload=… identity=…` (`-` when empty).
impl fmt::Display for PeerMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn or_dash(s: &str) -> &str {
            if s.is_empty() { "-" } else { s }
        }
        write!(
            f,
            "name={} namespace={} workload={} identity={}",
            or_dash(&self.name),
            or_dash(&self.namespace),
            or_dash(&self.workload_name),
            or_dash(&self.identity)
        )
    }
}

// ---- encoding (sorted keys, byte-stable) ----

/// A `google.protobuf.Value` restricted to what the exchange uses, with ordered struct fields.
enum V<'a> {
    Str(&'a str),
    Struct(Vec<(&'a str, V<'a>)>),
}

const WT_LEN: u64 = 2;

fn key(tag: u64) -> u64 {
    (tag << 3) | WT_LEN
}

fn len_delimited_len(inner: usize) -> usize {
    1 + encoded_len_varint(inner as u64) + inner
}

impl V<'_> {
    /// Length of the encoded `Value` message.
    fn encoded_len(&self) -> usize {
        match self {
            V::Str(s) => len_delimited_len(s.len()),
            V::Struct(fields) => len_delimited_len(struct_len(fields)),
        }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            V::Str(s) => {
                encode_varint(key(3), buf); // string_value = 3
                encode_varint(s.len() as u64, buf);
                buf.extend_from_slice(s.as_bytes());
            }
            V::Struct(fields) => {
                encode_varint(key(5), buf); // struct_value = 5
                encode_varint(struct_len(fields) as u64, buf);
                encode_struct(fields, buf);
            }
        }
    }
}

/// Length of one map entry message `{1: key, 2: value}`.
fn entry_len(k: &str, v: &V<'_>) -> usize {
    len_delimited_len(k.len()) + len_delimited_len(v.encoded_len())
}

/// Length of the encoded `Struct` message.
fn struct_len(fields: &[(&str, V<'_>)]) -> usize {
    fields
        .iter()
        .map(|(k, v)| len_delimited_len(entry_len(k, v)))
        .sum()
}

fn encode_struct(fields: &[(&str, V<'_>)], buf: &mut Vec<u8>) {
    for (k, v) in fields {
        encode_varint(key(1), buf); // Struct.fields = 1
        encode_varint(entry_len(k, v) as u64, buf);
        encode_varint(key(1), buf); // entry key = 1
        encode_varint(k.len() as u64, buf);
        buf.extend_from_slice(k.as_bytes());
        encode_varint(key(2), buf); // entry value = 2
        encode_varint(v.encoded_len() as u64, buf);
        v.encode(buf);
    }
}

/// The peer struct's fields, sorted by key: empty strings omitted, `LABELS` always present.
fn peer_fields(meta: &PeerMetadata) -> Vec<(&str, V<'_>)> {
    let labels = V::Struct(
        meta.labels
            .iter()
            .map(|(k, v)| (k.as_str(), V::Str(v.as_str())))
            .collect(),
    );
    let mut fields: Vec<(&str, V<'_>)> = meta
        .string_fields()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, V::Str(v)))
        .collect();
    fields.push(("LABELS", labels));
    fields.sort_by(|a, b| a.0.cmp(b.0));
    fields
}

/// The bare peer `Struct` bytes (the HTTP header's payload).
fn encode_peer_struct(meta: &PeerMetadata) -> Vec<u8> {
    let fields = peer_fields(meta);
    let mut buf = Vec::with_capacity(struct_len(&fields));
    encode_struct(&fields, &mut buf);
    buf
}

/// The complete TCP frame (header + `Any`) announcing `meta`, built once per proxy and
/// written at the start of every `istio-peer-exchange` connection.
pub fn encode_frame(meta: &PeerMetadata) -> Vec<u8> {
    let mut outer = vec![(METADATA_KEY, V::Struct(peer_fields(meta)))];
    if !meta.id.is_empty() {
        outer.push((METADATA_ID_KEY, V::Str(&meta.id)));
    }
    // Keys are already in order: "x-envoy-peer-metadata" < "x-envoy-peer-metadata-id".
    let value_len = struct_len(&outer);
    let any_len = len_delimited_len(TYPE_URL.len()) + len_delimited_len(value_len);
    let mut buf = Vec::with_capacity(HEADER_LEN + any_len);
    buf.extend_from_slice(&MAGIC.to_be_bytes());
    // A frame over 4 GiB cannot come from metadata ferry builds from flags and env; saturate
    // rather than wrap so the peer rejects it instead of misparsing.
    buf.extend_from_slice(&u32::try_from(any_len).unwrap_or(u32::MAX).to_be_bytes());
    encode_varint(key(1), &mut buf); // Any.type_url = 1
    encode_varint(TYPE_URL.len() as u64, &mut buf);
    buf.extend_from_slice(TYPE_URL.as_bytes());
    encode_varint(key(2), &mut buf); // Any.value = 2
    encode_varint(value_len as u64, &mut buf);
    encode_struct(&outer, &mut buf);
    buf
}

/// What the first bytes of a stream say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Fewer than [`HEADER_LEN`] bytes so far (or a magic prefix that still matches).
    NeedMore,
    /// The stream does not start with [`MAGIC`]: the peer has no metadata exchange filter.
    WrongMagic,
    /// A frame header; the body is the next `len` bytes.
    Frame {
        /// The body length, at most [`MAX_FRAME`].
        len: usize,
    },
}

/// Reads the frame header from the first bytes of a stream. A wrong magic is reported as
/// soon as the bytes present differ from it, so a plain client is not kept waiting.
pub fn parse_header(buf: &[u8]) -> Result<Header, MxError> {
    let magic = MAGIC.to_be_bytes();
    let n = buf.len().min(4);
    if buf[..n] != magic[..n] {
        return Ok(Header::WrongMagic);
    }
    let Some(len) = buf.get(4..HEADER_LEN) else {
        return Ok(Header::NeedMore);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(MxError::TooLarge { len });
    }
    Ok(Header::Frame { len })
}

/// Decodes a frame body (the `len` bytes after the header).
pub fn decode_body(body: &[u8]) -> Result<PeerMetadata, MxError> {
    let any = Any::decode(body).map_err(|e| MxError::malformed(format!("Any: {e}")))?;
    if any.type_url != TYPE_URL {
        return Err(MxError::malformed(format!(
            "type_url {:?}, expected {TYPE_URL:?}",
            any.type_url
        )));
    }
    let outer = Struct::decode(any.value.as_slice())
        .map_err(|e| MxError::malformed(format!("Struct: {e}")))?;
    let peer = match outer.fields.get(METADATA_KEY).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(s)) => s,
        Some(_) => {
            return Err(MxError::malformed(format!(
                "{METADATA_KEY} is not a struct"
            )));
        }
        None => return Err(MxError::malformed(format!("no {METADATA_KEY} key"))),
    };
    let mut meta = from_peer_struct(peer);
    if let Some(Kind::StringValue(id)) = outer
        .fields
        .get(METADATA_ID_KEY)
        .and_then(|v| v.kind.as_ref())
    {
        meta.id.clone_from(id);
    }
    Ok(meta)
}

/// Reads the known keys of a peer struct; unknown keys and values of unexpected types are
/// ignored, as Istio's readers do.
fn from_peer_struct(peer: &Struct) -> PeerMetadata {
    let mut meta = PeerMetadata::default();
    for (k, v) in &peer.fields {
        match (k.as_str(), v.kind.as_ref()) {
            ("LABELS", Some(Kind::StructValue(labels))) => {
                meta.labels = labels
                    .fields
                    .iter()
                    .filter_map(|(lk, lv)| match &lv.kind {
                        Some(Kind::StringValue(s)) => Some((lk.clone(), s.clone())),
                        _ => None,
                    })
                    .collect();
            }
            (k, Some(Kind::StringValue(s))) => {
                if let Some(field) = meta.field_mut(k) {
                    field.clone_from(s);
                }
            }
            _ => {}
        }
    }
    meta
}

/// The `x-envoy-peer-metadata` HTTP header value for `meta` (the id goes in its own header).
pub fn encode_http_header(meta: &PeerMetadata) -> String {
    base64::engine::general_purpose::STANDARD.encode(encode_peer_struct(meta))
}

/// Decodes an `x-envoy-peer-metadata` HTTP header value; `id` is left empty (it travels in
/// `x-envoy-peer-metadata-id`).
pub fn decode_http_header(v: &str) -> Result<PeerMetadata, MxError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .map_err(|e| MxError::malformed(format!("base64: {e}")))?;
    let peer =
        Struct::decode(bytes.as_slice()).map_err(|e| MxError::malformed(format!("Struct: {e}")))?;
    Ok(from_peer_struct(&peer))
}

/// Keeps `Value` in the public surface documented: callers building metadata for other
/// filters can convert ours into a prost `Struct` (unordered, for non-wire uses).
pub fn to_struct(meta: &PeerMetadata) -> Struct {
    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.to_owned())),
        }
    }
    let mut fields: std::collections::HashMap<String, Value> = meta
        .string_fields()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), s(v)))
        .collect();
    let labels = Struct {
        fields: meta.labels.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
    };
    fields.insert(
        "LABELS".to_owned(),
        Value {
            kind: Some(Kind::StructValue(labels)),
        },
    );
    Struct { fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &[u8] = include_bytes!("../tests/data/istio-mx-tcp-minimal.bin");
    const SERVER: &[u8] = include_bytes!("../tests/data/istio-mx-tcp-server.bin");
    const HTTP: &str = include_str!("../tests/data/istio-mx-http-header.txt");

    fn server_meta() -> PeerMetadata {
        PeerMetadata {
            name: "server-6b7c9-x2x4q".into(),
            namespace: "demo".into(),
            workload_name: "server".into(),
            cluster_id: "Kubernetes".into(),
            identity: "spiffe://local.domain/ns/demo/sa/server".into(),
            labels: [("app", "ping-pong-server"), ("version", "v1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            owner: "kubernetes://apis/apps/v1/namespaces/demo/deployments/server".into(),
            region: String::new(),
            availability_zone: String::new(),
            id: "sidecar~10.1.2.3~server-6b7c9-x2x4q.demo~demo.svc.cluster.local".into(),
        }
    }

    fn split(frame: &[u8]) -> (Header, &[u8]) {
        (parse_header(frame).unwrap(), &frame[HEADER_LEN..])
    }

    #[test]
    fn minimal_vector_is_byte_exact() {
        let meta = PeerMetadata {
            namespace: "ns".into(),
            ..Default::default()
        };
        assert_eq!(MINIMAL.len(), 116);
        assert_eq!(encode_frame(&meta), MINIMAL);
        let (h, body) = split(MINIMAL);
        assert_eq!(h, Header::Frame { len: 108 });
        assert_eq!(decode_body(body).unwrap(), meta);
    }

    #[test]
    fn server_vector_decodes_every_field() {
        let (h, body) = split(SERVER);
        assert_eq!(h, Header::Frame { len: 0x1d2 });
        assert_eq!(body.len(), 0x1d2);
        assert_eq!(decode_body(body).unwrap(), server_meta());
        // Sorted-key encoding reproduces Envoy's bytes exactly here too.
        assert_eq!(encode_frame(&server_meta()), SERVER);
    }

    #[test]
    fn http_header_vector() {
        let mut expected = server_meta();
        expected.id.clear();
        assert_eq!(decode_http_header(HTTP).unwrap(), expected);
        assert_eq!(encode_http_header(&expected), HTTP.trim());
    }

    #[test]
    fn round_trip_with_labels_and_all_fields() {
        let mut meta = server_meta();
        meta.region = "eu-west-1".into();
        meta.availability_zone = "eu-west-1a".into();
        meta.labels
            .insert("service.istio.io/canonical-name".into(), "x".into());
        let frame = encode_frame(&meta);
        let (h, body) = split(&frame);
        assert_eq!(h, Header::Frame { len: body.len() });
        assert_eq!(decode_body(body).unwrap(), meta);
        assert_eq!(to_struct(&meta).fields.len(), 9);
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header(&[]).unwrap(), Header::NeedMore);
        assert_eq!(parse_header(&MINIMAL[..3]).unwrap(), Header::NeedMore);
        assert_eq!(parse_header(&MINIMAL[..7]).unwrap(), Header::NeedMore);
        assert_eq!(parse_header(b"G").unwrap(), Header::WrongMagic);
        assert_eq!(
            parse_header(b"GET / HTTP/1.1\r\n").unwrap(),
            Header::WrongMagic
        );
        assert_eq!(
            parse_header(&[0x3d, 0x23, 0x05]).unwrap(),
            Header::WrongMagic
        );
        let mut big = MAGIC.to_be_bytes().to_vec();
        big.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert!(matches!(
            parse_header(&big),
            Err(MxError::TooLarge { len }) if len == MAX_FRAME + 1
        ));
        let mut max = MAGIC.to_be_bytes().to_vec();
        max.extend_from_slice(&(MAX_FRAME as u32).to_be_bytes());
        assert_eq!(
            parse_header(&max).unwrap(),
            Header::Frame { len: MAX_FRAME }
        );
    }

    #[test]
    fn garbage_bodies_are_malformed() {
        for body in [
            &b"\xff\xff\xff"[..],
            b"\x0a\x03abc",                          // wrong type_url
            &MINIMAL[HEADER_LEN..MINIMAL.len() - 1], // truncated
        ] {
            assert!(
                matches!(decode_body(body), Err(MxError::Malformed { .. })),
                "{body:?}"
            );
        }
        // A Struct without the metadata key.
        let any = Any {
            type_url: TYPE_URL.into(),
            value: Struct::default().encode_to_vec(),
        };
        assert!(matches!(
            decode_body(&any.encode_to_vec()),
            Err(MxError::Malformed { reason }) if reason.contains("no x-envoy-peer-metadata")
        ));
        assert!(matches!(
            decode_http_header("!!"),
            Err(MxError::Malformed { .. })
        ));
    }

    #[test]
    fn unknown_keys_and_types_are_ignored() {
        let mut s = to_struct(&server_meta());
        s.fields.insert(
            "EXTRA".into(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        );
        s.fields.insert(
            "NAME".into(),
            Value {
                kind: Some(Kind::NumberValue(1.0)),
            },
        );
        let header = base64::engine::general_purpose::STANDARD.encode(s.encode_to_vec());
        let got = decode_http_header(&header).unwrap();
        assert_eq!(got.name, "");
        assert_eq!(got.namespace, "demo");
    }

    #[test]
    fn display_is_one_line() {
        let line = server_meta().to_string();
        assert_eq!(
            line,
            "name=server-6b7c9-x2x4q namespace=demo workload=server identity=spiffe://local.domain/ns/demo/sa/server"
        );
        assert_eq!(
            PeerMetadata::default().to_string(),
            "name=- namespace=- workload=- identity=-"
        );
    }
}
