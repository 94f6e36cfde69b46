//! Issue 12 with a real swtpm and the real `ferry` binary: `ferry attest info` names the
//! TPM and its EK certificate (or the TCTI it could not open), `ferry ca init` creates the
//! CA in the TPM, and an agent with `ca.backend: tpm` serves the `spiffe` crate client an
//! SVID whose chain is leaf -> in-memory issuing CA -> TPM node CA -> root; after a restart
//! on the same TPM state it keeps the same root and node CA key.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use attest::tpm::{Tpm, TpmKeyStore};
use testkit::tpm::Swtpm;
use x509_parser::prelude::{FromDer, X509Certificate};

fn write_config(dir: &Path, tcti: &str) -> std::path::PathBuf {
    let d = dir.display();
    let cfg = dir.join("ferry.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: example.org\nlisten:\n  xds: 127.0.0.1:{xds}\n  dns: 127.0.0.1:{dns}\n  workloadApi: unix://{d}/agent.sock\nca:\n  backend: tpm\n  stateDir: {d}/ca\n  svidTtl: 1h\n  tpm:\n    tcti: {tcti}\nregistrationEntries:\n  - spiffeId: spiffe://example.org/app\n    selectors: [\"unix:uid:{uid}\"]\n",
            xds = testkit::free_port(),
            dns = testkit::free_port(),
            uid = testkit::workload::my_uid(),
        ),
    )
    .unwrap();
    cfg
}

fn ferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SEC1 public key and BasicConstraints pathLen of a certificate.
fn key_and_path_len(der: &[u8]) -> (Vec<u8>, Option<u32>) {
    let (_, c) = X509Certificate::from_der(der).unwrap();
    let bc = c.basic_constraints().unwrap().map(|b| b.value.clone());
    (
        c.public_key().subject_public_key.data.to_vec(),
        bc.and_then(|b| b.path_len_constraint),
    )
}

/// Fetches the SVID chain and the trust domain's roots with the `spiffe` crate client.
async fn fetch(endpoint: &str) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    for _ in 0..300 {
        if let Ok(c) = spiffe::WorkloadApiClient::connect_to(endpoint).await
            && let Ok(svid) = c.fetch_x509_svid().await
            && let Ok(bundles) = c.fetch_x509_bundles().await
        {
            let td = spiffe::TrustDomain::new("example.org").unwrap();
            let roots = bundles
                .get(&td)
                .expect("bundle for example.org")
                .authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect();
            let chain = svid
                .cert_chain()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect();
            return (chain, roots);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ferry agent with ca.backend: tpm serves no SVID within 30 s");
}

async fn run_agent(cfg: &Path, endpoint: &str) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--config"])
        .arg(cfg)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry agent");
    let got = fetch(endpoint).await;
    let status = common::sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn tpm_backed_agent_serves_a_chain_through_the_tpm_node_ca() {
    if !testkit::tpm::require() {
        return;
    }
    let mut tpm = Swtpm::start().unwrap();
    let dir = testkit::tempdir().unwrap();
    let cfg = write_config(dir.path(), &tpm.tcti());
    let cfg_s = cfg.display().to_string();

    // An unopenable TCTI is an error naming it.
    let (ok, _, err) = ferry(&["attest", "info", "--tcti", "swtpm:host=127.0.0.1,port=1"]);
    assert!(!ok && err.contains("swtpm:host=127.0.0.1,port=1"), "{err}");

    let (ok, out, err) = ferry(&["ca", "init", "--config", &cfg_s]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("root CA serial") && out.contains(&tpm.tcti()),
        "{out}"
    );

    let (ok, out, err) = ferry(&["attest", "info", "--config", &cfg_s]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("manufacturer:  IBM"), "{out}");
    assert!(out.contains("EK certificate (NV 0x01c00002)"), "{out}");
    assert!(
        out.contains("issuer:") && out.contains("swtpm-localca"),
        "{out}"
    );
    assert!(out.contains(": loads in this TPM"), "{out}");

    let endpoint = format!("unix://{}/agent.sock", dir.path().display());
    let (chain, roots) = run_agent(&cfg, &endpoint).await;
    assert_eq!(chain.len(), 3, "leaf, issuing CA, node CA");
    attest::verify_chain(&chain, &roots, std::time::SystemTime::now()).unwrap();
    let (_, leaf_len) = key_and_path_len(&chain[0]);
    let (_, issuing_len) = key_and_path_len(&chain[1]);
    let (node_ca_key, node_len) = key_and_path_len(&chain[2]);
    let (_, root_len) = key_and_path_len(&roots[0]);
    assert_eq!(
        (leaf_len, issuing_len, node_len, root_len),
        (None, Some(0), Some(1), Some(2)),
        "path lengths allow exactly leaf -> issuing -> node CA -> root"
    );

    // The node CA's key is a TPM key: it equals the public area of a blob that loads in
    // this TPM (and in no other).
    let tpm_keys = || {
        let t = Arc::new(Tpm::open(&tpm.tcti()).unwrap());
        TpmKeyStore::new(t, dir.path().join("ca/tpm-keys"))
    };
    let node_ca_blob = |store: &TpmKeyStore| {
        std::fs::read_dir(dir.path().join("ca/tpm-keys"))
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().into_string().unwrap();
                let name = n.strip_suffix(".tpmkey")?.to_owned();
                let k = store.load_tpm(&name).unwrap();
                let raw = attest::tpm::keys::ecc_point(k.public_area()).unwrap();
                (raw == node_ca_key).then_some(name)
            })
            .next()
    };
    let name = node_ca_blob(&tpm_keys()).expect("node CA key is a TPM key of this TPM");
    assert!(name.starts_with("int-"), "{name}");

    // Restart TPM and agent on the same state: same root, same node CA key.
    tpm.restart().unwrap();
    write_config(dir.path(), &tpm.tcti());
    let (chain2, roots2) = run_agent(&cfg, &endpoint).await;
    assert_eq!(roots2, roots, "same root after restart");
    assert_eq!(
        key_and_path_len(&chain2[2]).0,
        node_ca_key,
        "same node CA key"
    );
    assert_eq!(chain2[2], chain[2], "same node CA certificate: no re-issue");
}
