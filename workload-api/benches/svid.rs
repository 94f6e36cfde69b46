//! Benchmarks: X.509-SVIDs issued per second by the software CA, and the latency of
//! `FetchX509SVID` until its first message over the Unix socket (real `spiffe` client).
//!
//! The `tpm` group compares the CA key's backends on a real software TPM (swtpm): one
//! signature by the TPM key against one by a software key, and the TPM key signing every
//! SVID (`ca.issuance: direct`) against the default, where it signs a short-lived in-memory
//! issuing CA that signs the SVIDs (`issuing-ca`).
//!
//! Run: `cargo bench -p workload-api --bench svid`.

// A bench is test code: a failed setup should stop it loudly.
#![allow(clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use registry::spiffe::SpiffeId;
use tokio_util::sync::CancellationToken;

/// A CA for `example.org` keeping its state in `dir`.
fn authority_config(dir: &std::path::Path) -> attest::AuthorityConfig {
    attest::AuthorityConfig::new(
        registry::spiffe::TrustDomain::parse("example.org").expect("td"),
        dir.to_owned(),
        Duration::from_secs(24 * 3600),
    )
}

fn issue(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = attest::Authority::open(
        authority_config(dir.path()),
        Arc::new(attest::SoftwareKeyStore::new(dir.path().join("keys"))),
    )
    .expect("CA");
    let id = SpiffeId::parse("spiffe://example.org/ns/bench/sa/app").expect("id");
    let mut g = c.benchmark_group("ca");
    g.throughput(Throughput::Elements(1));
    g.bench_function("issue_x509_svid", |b| {
        b.iter(|| {
            ca.issue_x509_svid(&id, Duration::from_secs(3600))
                .expect("issue")
        })
    });
    g.bench_function("issue_jwt_svid", |b| {
        let aud = vec!["bench".to_owned()];
        b.iter(|| {
            ca.issue_jwt_svid(&id, &aud, Duration::from_secs(300))
                .expect("issue")
        })
    });
    g.finish();
}

fn fetch_first_message(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let uid = nix::unistd::geteuid().as_raw();
    let yaml = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: example.org\nlisten:\n  workloadApi: unix://{d}/agent.sock\nca:\n  stateDir: {d}/ca\nregistrationEntries:\n  - spiffeId: spiffe://example.org/bench\n    selectors: [\"unix:uid:{uid}\"]\n",
        d = dir.path().display()
    );
    let cfg = dir.path().join("ferry.yaml");
    std::fs::write(&cfg, yaml).expect("write config");
    let shutdown = CancellationToken::new();
    let (client, _watcher) = rt.block_on(async {
        let watcher = registry::config::ConfigWatcher::start(&cfg)
            .await
            .expect("config");
        let agent = watcher.current().agent.clone();
        let settings = attest::AuthorityConfig::new(
            agent.trust_domain.clone(),
            agent.ca.state_dir.clone(),
            agent.ca.ca_ttl,
        );
        let keys = settings.software_keys();
        let authority = attest::Authority::open(settings, keys).expect("CA");
        let server = workload_api::WorkloadApiServer::start(
            watcher.subscribe(),
            authority,
            shutdown.clone(),
        )
        .expect("server");
        tokio::spawn(server.serve());
        let ep = format!("unix://{}/agent.sock", dir.path().display());
        let client = spiffe::WorkloadApiClient::connect_to(ep)
            .await
            .expect("client");
        (client, watcher)
    });
    let mut g = c.benchmark_group("workload_api");
    g.bench_function("fetch_x509_svid_first_message", |b| {
        b.to_async(&rt)
            .iter(|| async { client.fetch_x509_svid().await.expect("fetch") })
    });
    let ep = format!("unix://{}/agent.sock", dir.path().display());
    g.bench_function("connect_and_fetch_x509_svid_first_message", |b| {
        b.to_async(&rt).iter(|| async {
            let c = spiffe::WorkloadApiClient::connect_to(&ep)
                .await
                .expect("client");
            c.fetch_x509_svid().await.expect("fetch")
        })
    });
    g.finish();
    shutdown.cancel();
}

/// SVIDs per second with the CA key in a TPM, per issuance mode (skipped without swtpm).
fn tpm_issuance(c: &mut Criterion) {
    if !testkit::tpm::available() {
        eprintln!("tpm benches skipped: swtpm is not installed (./test.sh installs it)");
        return;
    }
    let swtpm = testkit::tpm::Swtpm::start().expect("swtpm");
    let tpm = Arc::new(attest::tpm::Tpm::open(&swtpm.tcti()).expect("open TPM"));
    let id = SpiffeId::parse("spiffe://example.org/ns/bench/sa/app").expect("id");
    let mut g = c.benchmark_group("tpm");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    // One ECDSA P-256 signature over a certificate-sized message: the CA key in swtpm
    // (TPM2_Sign) against the software key, through the same `Signer` interface.
    let msg = [0x5au8; 512];
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let signers: [(&str, Arc<dyn attest::KeyStore>); 2] = [
        (
            "sign_p256_tpm",
            Arc::new(attest::tpm::TpmKeyStore::new(
                tpm.clone(),
                keys_dir.path().join("tpm"),
            )),
        ),
        (
            "sign_p256_software",
            Arc::new(attest::SoftwareKeyStore::new(keys_dir.path().join("sw"))),
        ),
    ];
    for (name, store) in signers {
        let signer = store.generate("bench-sign").expect("generate a key");
        g.bench_function(name, |b| b.iter(|| signer.sign(&msg).expect("sign")));
    }
    for (name, mode) in [
        ("issue_x509_svid_direct", attest::IssuanceMode::Direct),
        (
            "issue_x509_svid_issuing_ca",
            attest::IssuanceMode::IssuingCa {
                ttl: Duration::from_secs(3600),
            },
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Arc::new(attest::tpm::TpmKeyStore::new(
            tpm.clone(),
            dir.path().join("keys"),
        ));
        let ca = attest::Authority::open_with_mode(authority_config(dir.path()), keys, mode)
            .expect("TPM CA");
        g.bench_function(name, |b| {
            b.iter(|| {
                ca.issue_x509_svid(&id, Duration::from_secs(3600))
                    .expect("issue")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, issue, fetch_first_message, tpm_issuance);
criterion_main!(benches);
