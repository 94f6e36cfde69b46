//! rustls on `ring` against rustls on `aws-lc-rs`: the two costs a sidecar pays in its TLS
//! library, measured in memory (no sockets) so only the crypto provider differs.
//!
//! - `handshake/*`: one full TLS 1.3 mTLS handshake, P-256 certificates on both sides
//!   (ECDSA sign on each side, chain verification of each peer), X25519 key exchange;
//! - `bulk/*`: 16 KiB of application data sealed by one side and opened by the other with
//!   `TLS13_AES_128_GCM_SHA256` (the suite `ferry proxy` offers first).
//!
//! `ferry proxy` runs on aws-lc-rs because it measured faster here (README, Performance):
//!
//! ```sh
//! cargo bench -p proxy --bench crypto_provider
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

const RECORD: usize = 16 * 1024;

struct Pki {
    roots: Arc<RootCertStore>,
    server: (Vec<CertificateDer<'static>>, Vec<u8>),
    client: (Vec<CertificateDer<'static>>, Vec<u8>),
}

fn leaf(
    name: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    (vec![cert.der().clone()], key.serialize_der())
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(params, ca_key);
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    Pki {
        roots: Arc::new(roots),
        server: leaf("server.test", &issuer),
        client: leaf("client.test", &issuer),
    }
}

fn key(der: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
}

/// Client and server configs on `provider`, AES-128-GCM only, mutual authentication.
fn configs(provider: CryptoProvider, pki: &Pki) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let mut provider = provider;
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(pki.client.0.clone(), key(&pki.client.1))
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        pki.roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.0.clone(), key(&pki.server.1))
        .unwrap();
    // Every connection a full handshake, as in the `connections` scenario.
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    (Arc::new(client), Arc::new(server))
}

/// Moves everything `from` wants to send into `to`.
fn pump(from: &mut Connection, to: &mut Connection, wire: &mut Vec<u8>) {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).unwrap();
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets().unwrap();
    }
}

fn connect(
    c: &Arc<ClientConfig>,
    s: &Arc<ServerConfig>,
    wire: &mut Vec<u8>,
) -> (Connection, Connection) {
    let name = ServerName::try_from("server.test").unwrap();
    let mut client = Connection::Client(ClientConnection::new(c.clone(), name).unwrap());
    let mut server = Connection::Server(ServerConnection::new(s.clone()).unwrap());
    while client.is_handshaking() || server.is_handshaking() {
        pump(&mut client, &mut server, wire);
        pump(&mut server, &mut client, wire);
    }
    (client, server)
}

fn providers() -> [(&'static str, CryptoProvider); 2] {
    [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ]
}

fn bench(c: &mut Criterion) {
    let pki = pki();
    let mut wire = Vec::with_capacity(64 * 1024);

    let mut g = c.benchmark_group("handshake");
    for (name, provider) in providers() {
        let (cc, sc) = configs(provider, &pki);
        g.bench_function(name, |b| b.iter(|| connect(&cc, &sc, &mut wire)));
    }
    g.finish();

    let mut g = c.benchmark_group("bulk");
    g.throughput(Throughput::Bytes(RECORD as u64));
    let plain = vec![0x5au8; RECORD];
    let mut out = vec![0u8; RECORD];
    for (name, provider) in providers() {
        let (cc, sc) = configs(provider, &pki);
        let (mut client, mut server) = connect(&cc, &sc, &mut wire);
        g.bench_function(name, |b| {
            b.iter(|| {
                client.writer().write_all(&plain).unwrap();
                pump(&mut client, &mut server, &mut wire);
                let mut got = 0;
                while got < RECORD {
                    got += server.reader().read(&mut out[got..]).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
