//! The rewriter on hand-built frames: authority replacement with the dynamic table, blocks
//! split across CONTINUATION (also mid-field), padding and priority, byte-for-byte
//! passthrough fed one byte at a time, and every way of sending garbage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::hpack::{Field, encode_literal};

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    FrameHead::write(&mut v, payload.len(), kind, flags, stream);
    v.extend_from_slice(payload);
    v
}

fn settings() -> Vec<u8> {
    // SETTINGS_ENABLE_PUSH = 0.
    frame(TYPE_SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0])
}

fn start() -> Vec<u8> {
    let mut v = PREFACE.to_vec();
    v.extend(settings());
    v
}

/// Literal with incremental indexing of `:authority` (static name index 1), raw string.
fn authority_indexed(value: &str) -> Vec<u8> {
    let mut v = vec![0x41, u8::try_from(value.len()).unwrap()];
    v.extend_from_slice(value.as_bytes());
    v
}

/// A request block: :method POST, :scheme http, :path (literal), then `extra`.
fn request(path: &str, extra: &[u8]) -> Vec<u8> {
    let mut v = vec![0x83, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    v.extend_from_slice(path.as_bytes());
    v.extend_from_slice(extra);
    v
}

/// Runs `input` through a rewriter in chunks of `chunk` bytes, as a socket would.
fn run(limits: H2Limits, input: &[u8], chunk: usize) -> Result<Vec<u8>, ShimError> {
    let mut rw = Rewriter::new(limits);
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for c in input.chunks(chunk) {
        pending.extend_from_slice(c);
        let n = rw.process(&pending, &mut out)?;
        pending.drain(..n);
    }
    assert!(
        pending.is_empty(),
        "{} bytes left unconsumed",
        pending.len()
    );
    Ok(out)
}

#[derive(Debug, PartialEq)]
struct OutFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frames(out: &[u8]) -> Vec<OutFrame> {
    assert_eq!(&out[..24], PREFACE);
    let mut v = Vec::new();
    let mut rest = &out[24..];
    while !rest.is_empty() {
        let h = FrameHead::parse(rest);
        v.push(OutFrame {
            kind: h.kind,
            flags: h.flags,
            stream: h.stream,
            payload: rest[9..9 + h.len].to_vec(),
        });
        rest = &rest[9 + h.len..];
    }
    v
}

/// Decodes every header block of `out` with a fresh decoder each time: output literals
/// never index, so a decoder that saw nothing before must understand each block.
fn blocks(out: &[u8]) -> Vec<Vec<(String, String)>> {
    let mut res = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for f in frames(out) {
        if f.kind == TYPE_HEADERS || f.kind == TYPE_CONTINUATION {
            let mut p = &f.payload[..];
            if f.kind == TYPE_HEADERS && f.flags & FLAG_PRIORITY != 0 {
                p = &p[5..];
            }
            cur.extend_from_slice(p);
            if f.flags & FLAG_END_HEADERS != 0 {
                let mut d = Decoder::new(0);
                let mut pos = 0;
                let mut fields = Vec::new();
                while pos < cur.len() {
                    match d.decode(&cur[pos..], false).unwrap() {
                        Decoded::Field(fl, n) => {
                            pos += n;
                            fields.push((
                                String::from_utf8(fl.name).unwrap(),
                                String::from_utf8(fl.value).unwrap(),
                            ));
                        }
                        other => panic!("{other:?}"),
                    }
                }
                res.push(fields);
                cur.clear();
            }
        }
    }
    res
}

fn authority_of(block: &[(String, String)]) -> &str {
    &block.iter().find(|(n, _)| n == ":authority").unwrap().1
}

#[test]
fn percent_encoded_authority_is_replaced_also_when_indexed() {
    let mut input = start();
    let b1 = request(
        "/SpiffeWorkloadAPI/FetchX509SVID",
        &authority_indexed("%2Ftmp%2Fagent.sock"),
    );
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b1));
    // Second request: :authority by dynamic index 62 (the entry the first one added).
    let b2 = request("/SpiffeWorkloadAPI/FetchJWTSVID", &[0xbe]);
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        3,
        &b2,
    ));
    // A valid authority is left alone.
    let b3 = request("/x", &authority_indexed("127.0.0.1:8080"));
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 5, &b3));
    let mut rw = Rewriter::new(H2Limits::default());
    let mut out = Vec::new();
    assert_eq!(rw.process(&input, &mut out).unwrap(), input.len());
    assert_eq!(rw.rewritten(), 2);
    assert!(rw.handshake_done());
    let b = blocks(&out);
    assert_eq!(b.len(), 3);
    assert_eq!(authority_of(&b[0]), "localhost");
    assert_eq!(authority_of(&b[1]), "localhost");
    assert_eq!(authority_of(&b[2]), "127.0.0.1:8080");
    assert_eq!(
        b[1][2],
        (":path".into(), "/SpiffeWorkloadAPI/FetchJWTSVID".into())
    );
    let f = frames(&out);
    assert_eq!(f[0].kind, TYPE_SETTINGS);
    assert_eq!(f[2].flags, FLAG_END_HEADERS | FLAG_END_STREAM);
    assert_eq!(f[2].stream, 3);
}

#[test]
fn other_frames_pass_byte_for_byte_one_byte_at_a_time() {
    let mut input = start();
    let data = frame(0x0, 0x1, 1, b"\0\0\0\0\x05hello");
    let ping = frame(0x6, 0, 0, b"12345678");
    let window = frame(0x8, 0, 0, &[0, 0, 0x10, 0]);
    let unknown = frame(0xfa, 0xff, 7, b"extension");
    for f in [&data, &ping, &window, &unknown] {
        input.extend_from_slice(f);
    }
    let out = run(H2Limits::default(), &input, 1).unwrap();
    assert_eq!(out, input);
}

#[test]
fn block_split_mid_field_across_continuations_with_padding_and_priority() {
    let mut block = request(
        "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
        &[],
    );
    block.extend(authority_indexed("%2Fvar%2Frun%2Fferry%2Fagent.sock"));
    let mut lit = Vec::new();
    encode_literal(
        &mut lit,
        &Field {
            name: b"workload.spiffe.io".to_vec(),
            value: b"true".to_vec(),
            never_indexed: true,
        },
    );
    block.extend(lit);
    // HEADERS: padded (3 bytes) and with priority, carrying the first 10 bytes; then two
    // CONTINUATIONs cutting fields in the middle.
    let mut p = vec![3u8];
    p.extend_from_slice(&[0x80, 0, 0, 1, 15]);
    p.extend_from_slice(&block[..10]);
    p.extend_from_slice(&[0, 0, 0]);
    let mut input = start();
    input.extend(frame(TYPE_HEADERS, FLAG_PADDED | FLAG_PRIORITY, 1, &p));
    input.extend(frame(TYPE_CONTINUATION, 0, 1, &block[10..50]));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block[50..]));
    for chunk in [1, 7, input.len()] {
        let out = run(H2Limits::default(), &input, chunk).unwrap();
        let b = blocks(&out);
        assert_eq!(b.len(), 1);
        assert_eq!(authority_of(&b[0]), "localhost");
        assert_eq!(b[0][4].0, "workload.spiffe.io");
        let f: Vec<_> = frames(&out).into_iter().skip(1).collect();
        assert_eq!(f[0].kind, TYPE_HEADERS);
        assert_eq!(f[0].flags & FLAG_PADDED, 0, "padding is dropped");
        assert_eq!(&f[0].payload[..5], &[0x80, 0, 0, 1, 15], "priority is kept");
        assert!(f.iter().skip(1).all(|f| f.kind == TYPE_CONTINUATION));
        assert_eq!(f.last().unwrap().flags & FLAG_END_HEADERS, FLAG_END_HEADERS);
    }
}

#[test]
fn expanded_blocks_are_reframed_within_max_frame_size() {
    let limits = H2Limits {
        max_frame_size: 64,
        ..H2Limits::default()
    };
    // One 40-byte custom header indexed once, then referenced 10 times by index 62.
    let mut block = request("/p", &[0x40, 3, b'a', b'b', b'c', 40]);
    block.extend([b'v'; 40]);
    block.extend([0xbe; 10]);
    let mut input = start();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
    let out = run(limits, &input, 5).unwrap();
    let f: Vec<_> = frames(&out).into_iter().skip(1).collect();
    assert!(f.len() > 3, "{} frames", f.len());
    assert!(f.iter().all(|f| f.payload.len() <= 64));
    assert_eq!(blocks(&out)[0].len(), 3 + 11);
}

fn err(input: &[u8]) -> ShimError {
    run(H2Limits::default(), input, input.len().max(1)).unwrap_err()
}

#[test]
fn garbage_is_refused() {
    // Not HTTP/2 at all: refused at the first wrong byte.
    assert_eq!(err(b"GET / HTTP/1.1\r\n"), ShimError::BadPreface);
    assert_eq!(err(b"X"), ShimError::BadPreface);
    // Preface, then not SETTINGS.
    let mut i = PREFACE.to_vec();
    i.extend(frame(0x6, 0, 0, b"12345678"));
    assert!(matches!(
        err(&i),
        ShimError::FirstFrameNotSettings { frame_type: 6 }
    ));
    // Frame over SETTINGS_MAX_FRAME_SIZE (header only: the payload is never awaited).
    let mut i = start();
    i.extend_from_slice(&[0x01, 0, 0, 0, 0, 0, 0, 0, 1]);
    assert!(matches!(
        err(&i),
        ShimError::FrameTooLarge { len: 65536, .. }
    ));
    // A DATA frame in the middle of a header block.
    let mut i = start();
    i.extend(frame(TYPE_HEADERS, 0, 1, &request("/p", &[])));
    i.extend(frame(0x0, 0, 1, b""));
    assert!(matches!(err(&i), ShimError::BrokenHeaderBlock { .. }));
    // CONTINUATION for another stream; CONTINUATION without HEADERS.
    let mut i = start();
    i.extend(frame(TYPE_HEADERS, 0, 1, &request("/p", &[])));
    i.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b""));
    assert!(matches!(err(&i), ShimError::BrokenHeaderBlock { .. }));
    let mut i = start();
    i.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b""));
    assert!(matches!(err(&i), ShimError::BrokenHeaderBlock { .. }));
    // PUSH_PROMISE from a client.
    let mut i = start();
    i.extend(frame(TYPE_PUSH_PROMISE, FLAG_END_HEADERS, 1, &[0, 0, 0, 2]));
    assert_eq!(err(&i), ShimError::PushPromise);
    // Padding longer than the frame.
    let mut i = start();
    i.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS | FLAG_PADDED,
        1,
        &[9, 0x82],
    ));
    assert!(matches!(err(&i), ShimError::MalformedHeaders { stream: 1 }));
    // END_HEADERS in the middle of a field.
    let mut i = start();
    i.extend(frame(
        TYPE_HEADERS,
        FLAG_END_HEADERS,
        1,
        &[0x82, 0x41, 0x05, b'a'],
    ));
    assert_eq!(err(&i), ShimError::TruncatedBlock);
    // HPACK error.
    let mut i = start();
    i.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x80]));
    assert_eq!(err(&i), ShimError::Hpack(HpackError::BadIndex(0)));
}

#[test]
fn header_list_expansion_is_capped() {
    // A 4000-byte entry referenced 5 times decodes to > 16 KiB from a ~4 KiB block.
    let mut block = vec![0x40, 1, b'x', 0x7f, 0xa1, 0x1e]; // value length 127 + 3873 = 4000
    block.extend(vec![b'v'; 4000]);
    block.extend([0xbe; 5]);
    let mut i = start();
    i.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
    assert!(matches!(err(&i), ShimError::HeaderListTooLarge { .. }));
}

#[tokio::test]
async fn silent_client_times_out_and_a_prompt_one_does_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_client, server) = tokio::io::duplex(1024);
    let mut shim = H2Shim::new(server, H2Limits::default(), Duration::from_millis(200));
    let mut b = [0u8; 64];
    let e = tokio::time::timeout(Duration::from_secs(10), shim.read(&mut b))
        .await
        .expect("times out by itself")
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);

    let (mut client, server) = tokio::io::duplex(1024);
    let mut shim = H2Shim::new(server, H2Limits::default(), Duration::from_millis(200));
    client.write_all(&start()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < start().len() {
        let n = shim.read(&mut b).await.unwrap();
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(got, start());
    // Past the deadline, an idle but handshaken connection is not closed by the shim.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client
        .write_all(&frame(0x6, 0, 0, b"12345678"))
        .await
        .unwrap();
    let n = shim.read(&mut b).await.unwrap();
    assert_eq!(n, 17);
    drop(client);
    assert_eq!(shim.read(&mut b).await.unwrap(), 0);
}
