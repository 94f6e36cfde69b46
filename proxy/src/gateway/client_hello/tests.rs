//! ClientHellos from a real TLS stack (rustls), whole, fragmented and broken.

use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::*;

/// The first flight rustls sends for `server` with `alpn`.
fn hello_bytes(server: &str, alpn: &[&str]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let name = ServerName::try_from(server.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

fn parsed(buf: &[u8]) -> Result<(Option<String>, Vec<Vec<u8>>), HelloError> {
    let mut scratch = Vec::new();
    match parse(buf, &mut scratch)? {
        Parsed::NeedMore => panic!("incomplete"),
        Parsed::Hello(h) => Ok((
            h.sni.map(str::to_owned),
            h.alpn.iter().map(|a| a.to_vec()).collect(),
        )),
    }
}

#[test]
fn istio_sni_and_alpn_from_a_real_client_hello() {
    let sni = "outbound_.8443_._.server.demo.local.domain";
    let b = hello_bytes(sni, &["istio-peer-exchange", "istio"]);
    let (got_sni, alpn) = parsed(&b).unwrap();
    assert_eq!(got_sni.as_deref(), Some(sni));
    assert_eq!(
        alpn,
        vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()]
    );
}

#[test]
fn no_sni_for_an_ip_and_no_alpn() {
    let b = hello_bytes("127.0.0.1", &[]);
    assert_eq!(parsed(&b).unwrap(), (None, vec![]));
}

#[test]
fn every_prefix_needs_more_and_the_whole_parses() {
    let b = hello_bytes("server.demo.local.domain", &["h2"]);
    let mut scratch = Vec::new();
    for n in 0..b.len() {
        assert_eq!(
            parse(&b[..n], &mut scratch),
            Ok(Parsed::NeedMore),
            "prefix {n}"
        );
    }
    assert!(matches!(parse(&b, &mut scratch), Ok(Parsed::Hello(_))));
}

#[test]
fn a_hello_split_across_records_is_reassembled() {
    let b = hello_bytes("server.demo.local.domain", &["istio"]);
    let body = &b[5..];
    let mut split = Vec::new();
    for chunk in body.chunks(100) {
        split.extend_from_slice(&[22, 3, 1]);
        split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        split.extend_from_slice(chunk);
    }
    let (sni, alpn) = parsed(&split).unwrap();
    assert_eq!(sni.as_deref(), Some("server.demo.local.domain"));
    assert_eq!(alpn, vec![b"istio".to_vec()]);
    let mut scratch = Vec::new();
    assert_eq!(
        parse(&split[..split.len() - 1], &mut scratch),
        Ok(Parsed::NeedMore)
    );
}

#[test]
fn plaintext_and_other_records_are_not_tls() {
    let mut scratch = Vec::new();
    assert_eq!(
        parse(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", &mut scratch),
        Err(HelloError::NotTls(b'G'))
    );
    assert_eq!(
        parse(&[23, 3, 3, 0, 1, 0], &mut scratch),
        Err(HelloError::NotTls(23))
    );
    // A handshake record holding a ServerHello.
    assert_eq!(
        parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0], &mut scratch),
        Err(HelloError::NotClientHello(2))
    );
}

#[test]
fn lengths_that_lie_are_malformed_not_panics() {
    let b = hello_bytes("server.demo.local.domain", &["istio"]);
    // Every single-byte corruption after the record header parses or fails cleanly.
    for i in 5..b.len() {
        for v in [0x00, 0xff] {
            let mut c = b.clone();
            c[i] = v;
            let mut scratch = Vec::new();
            let _ = parse(&c, &mut scratch);
        }
    }
    // A ClientHello claiming 1 MiB is refused without waiting for it.
    let mut scratch = Vec::new();
    assert_eq!(
        parse(&[22, 3, 1, 0, 4, 1, 0x10, 0, 0], &mut scratch),
        Err(HelloError::TooLong)
    );
    // Endless tiny records.
    let mut tiny = Vec::new();
    tiny.extend_from_slice(&[22, 3, 1, 0, 4, 1, 0, 0x3f, 0xf0]);
    while tiny.len() <= MAX_HELLO + 16 {
        tiny.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
    }
    assert_eq!(parse(&tiny, &mut scratch), Err(HelloError::TooLong));
}
