//! RFC 7541 Appendix C examples, hostile inputs, and encoder round trips.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Decodes a whole block into `(name, value)` strings.
fn block(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        match d.decode(&bytes[pos..], out.is_empty())? {
            Decoded::Incomplete => panic!("incomplete at {pos}"),
            Decoded::SizeUpdate(n) => pos += n,
            Decoded::Field(f, n) => {
                pos += n;
                out.push((
                    String::from_utf8(f.name).unwrap(),
                    String::from_utf8(f.value).unwrap(),
                ));
            }
        }
    }
    Ok(out)
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[test]
fn huffman_code_is_canonical() {
    // The decoder relies on codes of one length being consecutive and in symbol order.
    let mut by_len: std::collections::BTreeMap<u8, Vec<(u32, usize)>> = Default::default();
    for (sym, &(code, len)) in huffman::CODES.iter().enumerate() {
        by_len.entry(len).or_default().push((code, sym));
    }
    for (len, mut v) in by_len {
        v.sort_unstable();
        for w in v.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "codes of length {len} not consecutive");
            assert!(w[1].1 > w[0].1, "codes of length {len} not in symbol order");
        }
    }
}

#[test]
fn rfc7541_c3_requests_without_huffman() {
    let mut d = Decoder::new(4096);
    let r1 = block(
        &mut d,
        &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
    )
    .unwrap();
    assert_eq!(
        r1,
        pairs(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ])
    );
    let r2 = block(&mut d, &hex("8286 84be 5808 6e6f 2d63 6163 6865")).unwrap();
    assert_eq!(r2[3], (":authority".into(), "www.example.com".into()));
    assert_eq!(r2[4], ("cache-control".into(), "no-cache".into()));
    let r3 = block(
        &mut d,
        &hex("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
    )
    .unwrap();
    assert_eq!(
        r3,
        pairs(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ])
    );
    assert_eq!(d.size, 164);
}

#[test]
fn rfc7541_c4_requests_with_huffman() {
    let mut d = Decoder::new(4096);
    let r1 = block(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap();
    assert_eq!(r1[3], (":authority".into(), "www.example.com".into()));
    let r2 = block(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
    assert_eq!(r2[4], ("cache-control".into(), "no-cache".into()));
    let r3 = block(
        &mut d,
        &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
    )
    .unwrap();
    assert_eq!(r3[4], ("custom-key".into(), "custom-value".into()));
    assert_eq!(d.size, 164);
}

#[test]
fn rfc7541_c5_eviction_in_a_small_table() {
    let mut d = Decoder::new(256);
    let r1 = block(
        &mut d,
        &hex(
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
              2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
              6c65 2e63 6f6d",
        ),
    )
    .unwrap();
    assert_eq!(r1[0], (":status".into(), "302".into()));
    assert_eq!(r1[3], ("location".into(), "https://www.example.com".into()));
    assert_eq!(d.size, 222);
    // ":status: 307" evicts ":status: 302"; the others shift by one.
    let r2 = block(&mut d, &hex("4803 3330 37c1 c0bf")).unwrap();
    assert_eq!(
        r2,
        pairs(&[
            (":status", "307"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("location", "https://www.example.com"),
        ])
    );
    assert_eq!(d.size, 222);
}

#[test]
fn size_updates_are_bounded_and_only_at_block_start() {
    let mut d = Decoder::new(4096);
    block(
        &mut d,
        &hex("4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
    )
    .unwrap();
    assert_eq!(d.table.len(), 1);
    // Size 0 empties the table; then index 62 is gone.
    assert_eq!(d.decode(&[0x20], true), Ok(Decoded::SizeUpdate(1)));
    assert_eq!(d.table.len(), 0);
    assert_eq!(d.decode(&[0xbe], true), Err(HpackError::BadIndex(62)));
    // 4097 > SETTINGS_HEADER_TABLE_SIZE.
    assert_eq!(
        d.decode(&hex("3fe2 1f"), true),
        Err(HpackError::SizeUpdateTooLarge {
            size: 4097,
            max: 4096
        })
    );
    assert_eq!(
        d.decode(&[0x20], false),
        Err(HpackError::SizeUpdateNotAtStart)
    );
}

#[test]
fn hostile_inputs_are_errors_or_incomplete_never_panics() {
    let mut d = Decoder::new(4096);
    // RUSTSEC-2023-0085's input: an unfinished size update.
    assert_eq!(d.decode(&[0x3f], true), Ok(Decoded::Incomplete));
    assert_eq!(d.decode(&[0x80], true), Err(HpackError::BadIndex(0)));
    assert_eq!(
        d.decode(&hex("ffff ffff ffff ff01"), true),
        Err(HpackError::IntegerOverflow)
    );
    // A literal whose value is announced as 1 MiB.
    assert!(matches!(
        d.decode(&hex("0001 61ff ffbf 3f"), true),
        Err(HpackError::StringTooLong { .. })
    ));
    // Huffman: EOS inside the string; padding of 8 bits; padding of zeros.
    assert_eq!(
        d.decode(&hex("0001 6184 ffff ffff"), true),
        Err(HpackError::HuffmanEos)
    );
    assert_eq!(
        d.decode(&hex("0001 6182 1fff"), true),
        Err(HpackError::HuffmanPadding)
    );
    assert_eq!(
        d.decode(&hex("0001 6181 00"), true),
        Err(HpackError::HuffmanPadding)
    );
    // Every prefix of a valid representation is Incomplete, and leaves the table alone.
    let full = hex("4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
    for cut in 0..full.len() {
        assert_eq!(d.decode(&full[..cut], true), Ok(Decoded::Incomplete));
    }
    assert_eq!(d.table.len(), 0);
    // Arbitrary bytes: a deterministic pseudo-random sweep.
    let mut x: u32 = 0x1234_5678;
    for _ in 0..20_000 {
        let mut buf = Vec::new();
        for _ in 0..(x % 24) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            buf.push(x as u8);
        }
        let _ = d.decode(&buf, x.is_multiple_of(2));
        x = x.wrapping_add(1);
    }
}

#[test]
fn encoded_literals_round_trip_and_do_not_index() {
    let fields = [
        Field {
            name: b":authority".to_vec(),
            value: b"localhost".to_vec(),
            never_indexed: false,
        },
        Field {
            name: b"workload.spiffe.io".to_vec(),
            value: b"true".to_vec(),
            never_indexed: false,
        },
        Field {
            name: b"authorization".to_vec(),
            value: vec![b'x'; 300],
            never_indexed: true,
        },
    ];
    let mut out = Vec::new();
    for f in &fields {
        encode_literal(&mut out, f);
    }
    let mut d = Decoder::new(4096);
    let mut pos = 0;
    for f in &fields {
        match d.decode(&out[pos..], false).unwrap() {
            Decoded::Field(g, n) => {
                assert_eq!(&g, f);
                pos += n;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pos, out.len());
    assert_eq!(
        d.table.len(),
        0,
        "literals without indexing leave the table empty"
    );
}
