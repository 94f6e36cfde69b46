//! `proxy::identity` against a real ferry Workload API (in-process, `testkit::workload`):
//! Istio-style mTLS between a client config and a server config built from two
//! registration entries, SPIFFE ID and trust domain refusals, and SVID rotation.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use proxy::identity::{Identity, peer_spiffe_id};
use proxy::verify::{Bundles, SpiffeServerVerifier, Validation};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use spiffe::X509Bundle;
use testkit::workload::{Entry, config_yaml, my_uid, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use xds::client::model::{IstioTls, ServerIdMatch};

const SERVER: &str = "spiffe://example.org/ns/demo/sa/server";
const CLIENT: &str = "spiffe://example.org/ns/demo/sa/client";
const SNI: &str = "outbound_.8443_._.server.demo.example.org";

fn uid_sel() -> Vec<String> {
    vec![format!("unix:uid:{}", my_uid())]
}

async fn agent(dir: &std::path::Path, svid_ttl: &str) -> (testkit::workload::Agent, Identity) {
    let yaml = config_yaml(
        dir,
        svid_ttl,
        &[Entry::new(SERVER, uid_sel()), Entry::new(CLIENT, uid_sel())],
        &[],
    );
    let agent = start(dir, &yaml).await;
    let identity = Identity::connect(&agent.endpoint(), Duration::from_secs(10))
        .await
        .expect("identity from the Workload API");
    (agent, identity)
}

fn istio_tls(cert: &str, validation: &str, ids: ServerIdMatch) -> IstioTls {
    IstioTls {
        sni: SNI.into(),
        alpn: vec!["istio-peer-exchange".into(), "istio".into()],
        cert_secret: cert.into(),
        validation_secret: validation.into(),
        server_ids: ids,
    }
}

/// Handshake over an in-memory pipe; returns both sides' results as strings or the
/// negotiated details.
async fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (
    Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>, std::io::Error>,
    Result<tokio_rustls::server::TlsStream<tokio::io::DuplexStream>, std::io::Error>,
) {
    let (a, b) = duplex(64 * 1024);
    let name = ServerName::try_from(SNI).unwrap();
    let c = TlsConnector::from(client).connect(name, a);
    let s = TlsAcceptor::from(server).accept(b);
    tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(c, s) })
        .await
        .expect("handshake finishes")
}

#[tokio::test]
async fn istio_mtls_between_two_entries() {
    let d = testkit::tempdir().unwrap();
    let (agent, identity) = agent(d.path(), "1h").await;
    assert!(identity.is_ready());
    let default_id = identity.spiffe_id().unwrap();
    let other = if default_id == SERVER { CLIENT } else { SERVER };

    let tls = istio_tls(
        other,
        "spiffe://example.org",
        ServerIdMatch::Exact(vec![default_id.clone()]),
    );
    let client = identity.client_config(&tls).unwrap();
    // Cached: the same config for the same cluster parameters.
    assert!(Arc::ptr_eq(&client, &identity.client_config(&tls).unwrap()));
    let server = identity
        .server_config(&[b"istio-peer-exchange", b"h2", b"http/1.1"])
        .unwrap();

    let (c, s) = handshake(client, server).await;
    let mut c = c.expect("client handshake");
    let mut s = s.expect("server handshake");
    let (_, cc) = c.get_ref();
    let (_, sc) = s.get_ref();
    assert_eq!(cc.alpn_protocol(), Some(&b"istio-peer-exchange"[..]));
    assert_eq!(
        peer_spiffe_id(cc.peer_certificates().unwrap()),
        Some(default_id)
    );
    assert_eq!(
        peer_spiffe_id(sc.peer_certificates().unwrap()).as_deref(),
        Some(other)
    );
    assert_eq!(sc.server_name(), Some(SNI));

    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // ROOTCA / ALL and a prefix match work too.
    for validation in ["ROOTCA", "ALL"] {
        let tls = istio_tls(
            "default",
            validation,
            ServerIdMatch::Prefix("spiffe://example.org/".into()),
        );
        let (c, s) = handshake(
            identity.client_config(&tls).unwrap(),
            identity.server_config(&[b"istio-peer-exchange"]).unwrap(),
        )
        .await;
        c.expect(validation);
        s.expect(validation);
    }
    agent.stop().await;
}

#[tokio::test]
async fn wrong_server_id_is_refused_naming_it() {
    let d = testkit::tempdir().unwrap();
    let (agent, identity) = agent(d.path(), "1h").await;
    let presented = identity.spiffe_id().unwrap();
    let tls = istio_tls(
        "default",
        "spiffe://example.org",
        ServerIdMatch::Exact(vec!["spiffe://example.org/ns/demo/sa/other".into()]),
    );
    let (c, _s) = handshake(
        identity.client_config(&tls).unwrap(),
        identity.server_config(&[b"istio"]).unwrap(),
    )
    .await;
    let err = c.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "server presented {presented}, expected one of [spiffe://example.org/ns/demo/sa/other]"
        )),
        "{err}"
    );

    // A validation context for a trust domain without a bundle.
    let tls = istio_tls(
        "default",
        "spiffe://elsewhere.org",
        ServerIdMatch::Prefix("spiffe://elsewhere.org/".into()),
    );
    let (c, _s) = handshake(
        identity.client_config(&tls).unwrap(),
        identity.server_config(&[b"istio"]).unwrap(),
    )
    .await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("trusts only elsewhere.org"), "{err}");

    // Names ferry does not serve are configuration errors, not handshake failures.
    assert!(
        identity
            .client_config(&istio_tls(
                "bogus",
                "ROOTCA",
                ServerIdMatch::Prefix(String::new())
            ))
            .is_err()
    );
    assert!(
        identity
            .client_config(&istio_tls(
                "default",
                "bogus",
                ServerIdMatch::Prefix(String::new())
            ))
            .is_err()
    );
    agent.stop().await;
}

/// A self-made CA (not in any bundle) and a leaf for `id` signed by it.
fn rogue(id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id).unwrap(),
    )];
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    (
        vec![leaf.der().clone(), ca_cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn rogue_server(id: &str) -> Arc<rustls::ServerConfig> {
    let (chain, key) = rogue(id);
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"istio".to_vec()];
    Arc::new(cfg)
}

/// The agent's own bundle, fixed, for a hand-made client that trusts our server.
#[derive(Debug)]
struct Fixed(Arc<X509Bundle>);

impl Bundles for Fixed {
    fn bundle(&self, td: &str) -> Option<Arc<X509Bundle>> {
        (td == "example.org").then(|| self.0.clone())
    }
    fn own_trust_domain(&self) -> Option<String> {
        Some("example.org".into())
    }
}

#[tokio::test]
async fn untrusted_domains_and_issuers_are_refused() {
    let d = testkit::tempdir().unwrap();
    let (agent, identity) = agent(d.path(), "1h").await;

    // A server from a trust domain with no bundle: named in the error.
    let tls = istio_tls("default", "ALL", ServerIdMatch::Prefix("spiffe://".into()));
    let (c, _s) = handshake(
        identity.client_config(&tls).unwrap(),
        rogue_server("spiffe://evil.org/ns/x/sa/y"),
    )
    .await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("no bundle for trust domain evil.org"), "{err}");

    // A forged SVID of our own trust domain, from a CA outside the bundle.
    let (c, _s) = handshake(identity.client_config(&tls).unwrap(), rogue_server(SERVER)).await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A client from a trust domain with no bundle is refused by our server.
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = identity.source().try_bundle_for_trust_domain(&td).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = rogue("spiffe://evil.org/ns/x/sa/y");
    let mut evil = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            Arc::new(Fixed(bundle)),
            Validation::Own,
            ServerIdMatch::Prefix("spiffe://example.org/".into()),
            provider,
        )))
        .with_client_auth_cert(chain, key)
        .unwrap();
    evil.alpn_protocols = vec![b"istio".to_vec()];
    let (_c, s) = handshake(Arc::new(evil), identity.server_config(&[b"istio"]).unwrap()).await;
    let err = s.unwrap_err().to_string();
    assert!(err.contains("no bundle for trust domain evil.org"), "{err}");
    agent.stop().await;
}

#[tokio::test]
async fn rotation_applies_to_new_handshakes_only() {
    let d = testkit::tempdir().unwrap();
    let (agent, identity) = agent(d.path(), "4s").await;
    let tls = istio_tls(
        "default",
        "ROOTCA",
        ServerIdMatch::Prefix("spiffe://example.org/".into()),
    );
    let client = identity.client_config(&tls).unwrap();
    let server = identity.server_config(&[b"istio"]).unwrap();

    let (c, s) = handshake(client.clone(), server.clone()).await;
    let (mut c1, mut s1) = (c.unwrap(), s.unwrap());
    let first = c1.get_ref().1.peer_certificates().unwrap()[0].clone();
    let generation = identity.generation();

    // Updates also come for the other entry's SVID and for bundles: wait for the default
    // SVID itself to change.
    let mut updates = identity.source().updated();
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            updates.changed().await.unwrap();
            let svid = identity.source().try_svid().unwrap();
            if svid.leaf().as_bytes() != first.as_ref() {
                break;
            }
        }
    })
    .await
    .expect("an SVID rotation within 15 s");
    assert_ne!(identity.generation(), generation);

    // Same configs, new certificate.
    let (c, s) = handshake(client, server).await;
    let (c2, _s2) = (c.unwrap(), s.unwrap());
    let second = c2.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first, second, "a new handshake presents the rotated SVID");
    let serial = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der)
            .unwrap()
            .1
            .tbs_certificate
            .raw_serial()
            .to_vec()
    };
    assert_ne!(serial(&first), serial(&second));

    // The connection opened before the rotation still carries data.
    c1.write_all(b"still here").await.unwrap();
    c1.flush().await.unwrap();
    let mut buf = [0u8; 10];
    s1.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    agent.stop().await;
}
