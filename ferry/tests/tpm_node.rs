//! Issue 12, node attestation end to end with real processes and a real swtpm: a root
//! agent (`ca.role: root`, software keys, the swtpm's manufacturer CA configured) and a
//! TPM-backed node agent (`ca.role: node`) that attests its TPM to the root at start. The
//! `spiffe` crate client then gets from the node an SVID whose chain is leaf -> issuing CA
//! -> TPM node CA -> root, the node CA's key being the TPM key; the root's audit log holds
//! the decision; a restart on the same TPM state reuses the node CA without attesting
//! again. A root that trusts another manufacturer refuses the node, which then does not
//! start, naming the reason.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use attest::node_attest::audit::AUDIT_FILE;
use attest::tpm::{Tpm, TpmKeyStore};
use testkit::tpm::Swtpm;
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "example.org";

fn common_yaml(dir: &Path) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: {TD}\nlisten:\n  xds: 127.0.0.1:{xds}\n  dns: 127.0.0.1:{dns}\n  workloadApi: unix://{d}/agent.sock\nregistrationEntries:\n  - spiffeId: spiffe://{TD}/app\n    selectors: [\"unix:uid:{uid}\"]\n",
        d = dir.display(),
        xds = testkit::free_port(),
        dns = testkit::free_port(),
        uid = testkit::workload::my_uid(),
    )
}

/// A root agent's config trusting EK certificates from `manufacturer` (PEM files).
fn root_config(dir: &Path, port: u16, manufacturer: &[PathBuf]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cas: Vec<String> = manufacturer
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    let cfg = dir.join("root.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{}ca:\n  role: root\n  stateDir: {}/ca\n  nodeAttestation:\n    listen: 127.0.0.1:{port}\n    manufacturerCas: [{}]\n",
            common_yaml(dir),
            dir.display(),
            cas.join(", ")
        ),
    )
    .unwrap();
    cfg
}

fn node_config(dir: &Path, tcti: &str, port: u16, bundle: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{}ca:\n  role: node\n  backend: tpm\n  stateDir: {}/ca\n  svidTtl: 1h\n  upstream: https://127.0.0.1:{port}\n  upstreamBundle: {}\n  tpm:\n    tcti: {tcti}\n",
            common_yaml(dir),
            dir.display(),
            bundle.display()
        ),
    )
    .unwrap();
    cfg
}

/// Starts `ferry agent`; with `capture`, its stderr is kept for the test to read (only for
/// agents expected to exit soon: an undrained pipe would block a long-running one).
fn agent_with(cfg: &Path, capture: bool) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--config"])
        .arg(cfg)
        .stderr(if capture {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::inherit()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry agent")
}

fn agent(cfg: &Path) -> tokio::process::Child {
    agent_with(cfg, false)
}

/// Waits until the root serves node attestation and has written its bundle.
async fn root_ready(dir: &Path, port: u16) -> PathBuf {
    let bundle = dir.join("ca/trust-bundle.pem");
    for _ in 0..300 {
        if bundle.is_file()
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            return bundle;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the root agent did not start node attestation within 30 s");
}

/// Fetches the SVID chain and the trust domain's roots with the `spiffe` crate client.
async fn fetch(endpoint: &str, node: &mut tokio::process::Child) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    for _ in 0..600 {
        if let Ok(Some(status)) = node.try_wait() {
            panic!("the node agent exited ({status}): {}", stderr(node).await);
        }
        if let Ok(c) = spiffe::WorkloadApiClient::connect_to(endpoint).await
            && let Ok(svid) = c.fetch_x509_svid().await
            && let Ok(bundles) = c.fetch_x509_bundles().await
        {
            let td = spiffe::TrustDomain::new(TD).unwrap();
            let roots = bundles
                .get(&td)
                .expect("bundle for the trust domain")
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
    panic!("the node agent serves no SVID within 60 s");
}

async fn stderr(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s).await;
    }
    s
}

fn audit(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("ca").join(AUDIT_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn pem_certs(path: &Path) -> Vec<Vec<u8>> {
    attest::x509::pem_decode_all(&std::fs::read_to_string(path).unwrap(), "CERTIFICATE")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tpm_node_attests_to_the_root_and_serves_svids_under_it() {
    if !testkit::tpm::require() {
        return;
    }
    let mut tpm = Swtpm::start().unwrap();
    let dir = testkit::tempdir().unwrap();
    let (root_dir, node_dir) = (dir.path().join("root"), dir.path().join("node"));
    let port = testkit::free_port();
    let root_cfg = root_config(
        &root_dir,
        port,
        &[tpm.manufacturer_issuer_pem(), tpm.manufacturer_root_pem()],
    );
    let mut root = agent(&root_cfg);
    let bundle = root_ready(&root_dir, port).await;
    let root_certs = pem_certs(&bundle);

    let node_cfg = node_config(&node_dir, &tpm.tcti(), port, &bundle);
    let endpoint = format!("unix://{}/agent.sock", node_dir.display());
    let mut node = agent(&node_cfg);
    let (chain, roots) = fetch(&endpoint, &mut node).await;
    assert!(common::sigterm(&mut node).await.success());

    assert_eq!(roots, root_certs, "the node's bundle is the root's");
    assert_eq!(chain.len(), 3, "leaf, issuing CA, node CA");
    attest::verify_chain(&chain, &roots, std::time::SystemTime::now()).unwrap();
    let (_, node_ca) = X509Certificate::from_der(&chain[2]).unwrap();
    let (_, root_ca) = X509Certificate::from_der(&roots[0]).unwrap();
    assert_eq!(
        node_ca.issuer(),
        root_ca.subject(),
        "the root signed the node CA"
    );
    let subject = node_ca.subject().to_string();
    assert!(subject.contains("tpm:ek-pubhash:"), "{subject}");

    // The node CA's key is the public area of a TPM key blob that loads in this TPM.
    let node_key = node_ca.public_key().subject_public_key.data.to_vec();
    let store = TpmKeyStore::new(
        Arc::new(Tpm::open(&tpm.tcti()).unwrap()),
        node_dir.join("ca/tpm-keys"),
    );
    let owner = std::fs::read_dir(node_dir.join("ca/tpm-keys"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            let name = n.strip_suffix(".tpmkey")?.to_owned();
            let k = store.load_tpm(&name).unwrap();
            (attest::tpm::keys::ecc_point(k.public_area()).unwrap() == node_key).then_some(name)
        })
        .next();
    assert!(owner.is_some(), "the node CA key is a key of this TPM");
    drop(store);

    // The root recorded the attestation, with the EK hash it put in the certificate.
    let recs = audit(&root_dir);
    let accepted: Vec<_> = recs.iter().filter(|r| r["result"] == "accepted").collect();
    assert_eq!(accepted.len(), 1, "{recs:?}");
    let ek_hash = accepted[0]["ekPubHash"].as_str().unwrap();
    assert!(subject.contains(ek_hash), "{subject} / {ek_hash}");
    assert!(
        accepted[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // Restart TPM and node on the same state: same node CA, no new attestation.
    tpm.restart().unwrap();
    let node_cfg = node_config(&node_dir, &tpm.tcti(), port, &bundle);
    let mut node = agent(&node_cfg);
    let (chain2, _) = fetch(&endpoint, &mut node).await;
    assert!(common::sigterm(&mut node).await.success());
    assert_eq!(
        chain2[2], chain[2],
        "same node CA certificate after restart"
    );
    let accepted = audit(&root_dir)
        .iter()
        .filter(|r| r["result"] == "accepted")
        .count();
    assert_eq!(accepted, 1, "no re-attestation before expiry");
    assert!(common::sigterm(&mut root).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_trusting_another_manufacturer_refuses_the_node() {
    if !testkit::tpm::require() {
        return;
    }
    let (tpm, other) = (Swtpm::start().unwrap(), Swtpm::start().unwrap());
    let dir = testkit::tempdir().unwrap();
    let (root_dir, node_dir) = (dir.path().join("root"), dir.path().join("node"));
    let port = testkit::free_port();
    let root_cfg = root_config(&root_dir, port, &[other.manufacturer_issuer_pem()]);
    let mut root = agent(&root_cfg);
    let bundle = root_ready(&root_dir, port).await;

    let node_cfg = node_config(&node_dir, &tpm.tcti(), port, &bundle);
    let mut node = agent_with(&node_cfg, true);
    let status = tokio::time::timeout(Duration::from_secs(60), node.wait())
        .await
        .expect("the refused node exits")
        .unwrap();
    let err = stderr(&mut node).await;
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("refused node attestation") && err.contains("EK certificate is not trusted"),
        "{err}"
    );
    let recs = audit(&root_dir);
    let last = recs.last().expect("an audit record");
    assert_eq!(last["result"], "rejected");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("no configured manufacturer CA"),
        "{last}"
    );
    assert!(common::sigterm(&mut root).await.success());
}
