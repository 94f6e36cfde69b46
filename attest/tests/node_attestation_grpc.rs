//! Node attestation over the real gRPC-over-TLS API, in process, with a real swtpm: a
//! node CA (`Hierarchy::Node` with `TpmUpstream`) is certified by a root CA
//! (`Hierarchy::Root`) at open, certified again when rotation prepares the next node CA at
//! half-life, and a node that does not trust the root's bundle refuses its TLS endpoint.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use attest::node_attest::audit::AUDIT_FILE;
use attest::node_attest::client::TpmUpstream;
use attest::node_attest::grpc::{self, NodeAttestationService};
use attest::node_attest::{AttestError, AuditLog, ManufacturerCas, Verifier};
use attest::tpm::{Tpm, TpmKeyStore};
use attest::{Authority, AuthorityConfig, Hierarchy, IssuanceMode, KeyStore, SoftwareKeyStore};
use registry::spiffe::TrustDomain;
use testkit::tpm::Swtpm;
use tokio_util::sync::CancellationToken;

const NODE_CA_TTL: Duration = Duration::from_secs(600);

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

fn software(dir: &Path, hierarchy: Hierarchy) -> Arc<Authority> {
    let keys: Arc<dyn KeyStore> = Arc::new(SoftwareKeyStore::new(dir.join("keys")));
    Authority::open_in(
        AuthorityConfig::new(td(), dir.to_owned(), Duration::from_secs(3600)),
        keys,
        IssuanceMode::Direct,
        hierarchy,
    )
    .unwrap()
}

fn write_bundle(ca: &Authority, path: &Path) {
    let pem: String = ca
        .x509_authorities()
        .iter()
        .map(|d| attest::x509::pem_encode("CERTIFICATE", d))
        .collect();
    std::fs::write(path, pem).unwrap();
}

fn accepted(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join(AUDIT_FILE))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"result\":\"accepted\""))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_ca_is_certified_over_grpc_at_open_and_again_before_expiry() {
    if !testkit::tpm::require() {
        return;
    }
    let tpm = Swtpm::start().unwrap();
    let dir = testkit::tempdir().unwrap();
    let root_dir = dir.path().join("root");
    let root = software(&root_dir, Hierarchy::Root);
    let cas = ManufacturerCas::from_pem_files(&[tpm.manufacturer_issuer_pem()]).unwrap();
    let verifier = Arc::new(Verifier::new(cas, Some(AuditLog::in_dir(&root_dir))));
    let service = NodeAttestationService::new(verifier, Arc::clone(&root), NODE_CA_TTL);
    let tls = attest::node_attest::tls::server_config(Arc::clone(&root)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(grpc::serve(listener, service, tls, shutdown.clone()));
    let bundle = dir.path().join("bundle.pem");
    write_bundle(&root, &bundle);

    let store = TpmKeyStore::new(
        Arc::new(Tpm::open(&tpm.tcti()).unwrap()),
        dir.path().join("node/tpm-keys"),
    );
    let upstream = TpmUpstream::new(&url, &td(), &bundle, store.clone()).unwrap();
    let node_dir = dir.path().join("node");
    let node = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            Authority::open_in(
                AuthorityConfig::new(td(), node_dir, Duration::from_secs(3600)),
                Arc::new(store),
                IssuanceMode::IssuingCa {
                    ttl: Duration::from_secs(300),
                },
                Hierarchy::Node(Arc::new(upstream)),
            )
        })
        .await
        .unwrap()
        .unwrap()
    };
    assert_eq!(node.x509_authorities(), root.x509_authorities());
    assert_eq!(accepted(&root_dir), 1);
    let id = td().id("/app").unwrap();
    let svid = node.issue_x509_svid(&id, Duration::from_secs(60)).unwrap();
    assert_eq!(svid.chain.len(), 3, "leaf, issuing CA, node CA");
    attest::verify_chain(&svid.chain, &node.x509_authorities(), SystemTime::now()).unwrap();
    let first = node.active_issuer_serial().unwrap();

    // Half-way through the node CA's life (capped by the root at 600 s) the next one is
    // prepared: a second attestation. At 5/6 it takes over.
    let t0 = SystemTime::now();
    let n = Arc::clone(&node);
    let changed = tokio::task::spawn_blocking(move || n.rotate(t0 + Duration::from_secs(310)))
        .await
        .unwrap()
        .unwrap();
    assert!(changed);
    assert_eq!(accepted(&root_dir), 2, "re-attested before expiry");
    assert_eq!(
        node.active_issuer_serial().unwrap(),
        first,
        "not active yet"
    );
    let n = Arc::clone(&node);
    tokio::task::spawn_blocking(move || n.rotate(t0 + Duration::from_secs(510)))
        .await
        .unwrap()
        .unwrap();
    let second = node.active_issuer_serial().unwrap();
    assert_ne!(second, first, "the new node CA signs now");
    let svid = node.issue_x509_svid(&id, Duration::from_secs(60)).unwrap();
    attest::verify_chain(&svid.chain, &node.x509_authorities(), SystemTime::now()).unwrap();

    // A node whose bundle is another trust domain root refuses the endpoint's TLS.
    let other = software(&dir.path().join("other"), Hierarchy::Standalone);
    let other_bundle = dir.path().join("other.pem");
    write_bundle(&other, &other_bundle);
    let wary = TpmUpstream::new(&url, &td(), &other_bundle, store.clone()).unwrap();
    let key = store.create("probe").unwrap();
    let e = wary.attest(&key, NODE_CA_TTL).await.unwrap_err();
    assert!(matches!(e, AttestError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert_eq!(accepted(&root_dir), 2);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
