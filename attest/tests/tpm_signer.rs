//! Issue 12, TPM signer, against a real swtpm: keys are created in the TPM, sign X.509
//! (DER ECDSA that verifies with the public key), drive a whole CA through the same
//! `KeyStore` trait as the software backend, and reload after the TPM and the agent restart.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use attest::tpm::{Tpm, TpmKeyStore};
use attest::{Authority, AuthorityConfig, KeyStore, verify_chain};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use registry::spiffe::{SpiffeId, TrustDomain};
use testkit::tpm::Swtpm;

fn verify(public_raw: &[u8], msg: &[u8], der: &[u8]) {
    let key = VerifyingKey::from_sec1_bytes(public_raw).unwrap();
    let sig = Signature::from_der(der).unwrap();
    key.verify(msg, &sig).unwrap();
}

#[test]
fn signs_with_a_tpm_key_and_reloads_it_after_restart() {
    if !testkit::tpm::require() {
        return;
    }
    let mut tpm = Swtpm::start().unwrap();
    let dir = testkit::tempdir().unwrap();
    let keys_dir = dir.path().join("keys");

    let store = TpmKeyStore::new(Arc::new(Tpm::open(&tpm.tcti()).unwrap()), &keys_dir);
    let signer = store.generate("node-ca").unwrap();
    let public = signer.public_key_raw().to_vec();
    assert_eq!(public.len(), 65);
    for msg in [&b"tbs certificate"[..], b"", &[7u8; 4096]] {
        verify(&public, msg, &signer.sign(msg).unwrap());
    }
    // The blob is 0600 in a 0700 dir and holds no usable private key.
    let blob = std::fs::read_to_string(keys_dir.join("node-ca.tpmkey")).unwrap();
    assert!(blob.contains("\"parent\""), "{blob}");
    drop((signer, store));

    // Reboot the TPM (transient objects gone, new port) and reopen: same key.
    tpm.restart().unwrap();
    let store = TpmKeyStore::new(Arc::new(Tpm::open(&tpm.tcti()).unwrap()), &keys_dir);
    let again = store.load("node-ca").unwrap();
    assert_eq!(again.public_key_raw(), &public[..]);
    verify(
        &public,
        b"after restart",
        &again.sign(b"after restart").unwrap(),
    );
    assert!(store.describe("node-ca").contains(&tpm.tcti()));

    // The blob does not load in another TPM: the error names the file.
    let other = Swtpm::start().unwrap();
    let foreign = TpmKeyStore::new(Arc::new(Tpm::open(&other.tcti()).unwrap()), &keys_dir);
    let e = foreign.load("node-ca").unwrap_err().to_string();
    assert!(
        e.contains("node-ca.tpmkey") && e.contains("another TPM"),
        "{e}"
    );
}

#[test]
fn a_whole_ca_runs_on_tpm_keys() {
    if !testkit::tpm::require() {
        return;
    }
    let mut tpm = Swtpm::start().unwrap();
    let dir = testkit::tempdir().unwrap();
    let td = TrustDomain::parse("example.org").unwrap();
    let cfg = AuthorityConfig::new(td.clone(), dir.path().join("ca"), Duration::from_secs(3600));
    let keys = |tcti: &str| -> Arc<dyn KeyStore> {
        Arc::new(TpmKeyStore::new(
            Arc::new(Tpm::open(tcti).unwrap()),
            dir.path().join("ca").join("tpm-keys"),
        ))
    };
    let id = SpiffeId::parse("spiffe://example.org/app").unwrap();

    let ca = Authority::open(cfg.clone(), keys(&tpm.tcti())).unwrap();
    let svid = ca.issue_x509_svid(&id, Duration::from_secs(60)).unwrap();
    let roots = ca.x509_authorities();
    verify_chain(&svid.chain, &roots, SystemTime::now()).unwrap();
    let jwt = ca
        .issue_jwt_svid(&id, &["aud".to_owned()], Duration::from_secs(60))
        .unwrap();
    drop(ca);

    tpm.restart().unwrap();
    let ca = Authority::open(cfg, keys(&tpm.tcti())).unwrap();
    assert_eq!(ca.x509_authorities(), roots, "same root after the restart");
    let svid = ca.issue_x509_svid(&id, Duration::from_secs(60)).unwrap();
    verify_chain(&svid.chain, &roots, SystemTime::now()).unwrap();
    let bundles = [(td, ca.jwt_bundle())].into_iter().collect();
    attest::jwt::validate(&jwt.token, "aud", &bundles, SystemTime::now()).unwrap();
}
