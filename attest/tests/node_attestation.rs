//! Node attestation at the library level with real swtpm TPMs (`swtpm_setup
//! --create-ek-cert`, each with its own manufacturer CA): the node side
//! (`attest::tpm::attestation`) against the verifier (`attest::node_attest::Verifier`),
//! the positive path and each refusal with its reason and audit record.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use attest::node_attest::audit::AUDIT_FILE;
use attest::node_attest::{AuditLog, Evidence, ManufacturerCas, Rejection, Verifier};
use attest::tpm::attestation::{activate, answer, certify, evidence};
use attest::tpm::{Tpm, TpmKeyStore, TpmSigner};
use attest::{Authority, AuthorityConfig, Hierarchy, IssuanceMode, Signer};
use testkit::tpm::Swtpm;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    EccPoint, EccScheme, HashScheme, PublicBuilder, PublicEccParametersBuilder,
};

const TTL: Duration = Duration::from_secs(3600);

fn ca_key(tpm: &Swtpm, dir: &Path) -> TpmSigner {
    let t = Arc::new(Tpm::open(&tpm.tcti()).unwrap());
    TpmKeyStore::new(t, dir.join("keys"))
        .create("node-ca")
        .unwrap()
}

fn manufacturer(tpm: &Swtpm) -> ManufacturerCas {
    ManufacturerCas::from_pem_files(&[tpm.manufacturer_issuer_pem(), tpm.manufacturer_root_pem()])
        .unwrap()
}

fn verifier(cas: ManufacturerCas, dir: &Path) -> Verifier {
    Verifier::new(cas, Some(AuditLog::in_dir(dir)))
}

fn audit(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(AUDIT_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn last_reason(dir: &Path) -> String {
    let recs = audit(dir);
    let last = recs.last().expect("an audit record");
    assert_eq!(last["result"], "rejected", "{last}");
    last["reason"].as_str().unwrap().to_owned()
}

#[test]
fn a_tpm_node_attests_and_replays_stale_nonces_and_movable_keys_are_refused() {
    if !testkit::tpm::require() {
        return;
    }
    let tpm = Swtpm::start().unwrap();
    let dir = testkit::tempdir().unwrap();
    let key = ca_key(&tpm, dir.path());
    let v = verifier(manufacturer(&tpm), dir.path());

    // Positive: evidence, challenge, activation + Certify, accepted.
    let ev = evidence(&key, TTL).unwrap();
    let ch = v.begin("10.0.0.1:1234", &ev).unwrap();
    let ans = answer(&key, &ch).unwrap();
    let ok = v.complete("10.0.0.1:1234", &ans).unwrap();
    assert_eq!(ok.ca_key, key.public_key_raw(), "the TPM key is certified");
    assert!(
        ok.selectors[0].starts_with("tpm:ek-pubhash:") && ok.selectors[0].len() == 15 + 64,
        "{:?}",
        ok.selectors
    );

    // The root signs the node CA for exactly that key.
    let root = Authority::open_in(
        AuthorityConfig::new(
            registry::spiffe::TrustDomain::parse("example.org").unwrap(),
            dir.path().join("root"),
            Duration::from_secs(24 * 3600),
        ),
        Arc::new(attest::SoftwareKeyStore::new(dir.path().join("root-keys"))),
        IssuanceMode::Direct,
        Hierarchy::Root,
    )
    .unwrap();
    let (node_ca, roots) = root.sign_node_ca(&ok.ca_key, &ok.selectors, TTL).unwrap();
    v.accepted("10.0.0.1:1234", &ok, &node_ca.serial);
    assert_eq!(node_ca.public_key_raw().unwrap(), key.public_key_raw());
    assert_eq!(roots, root.x509_authorities());
    let recs = audit(dir.path());
    assert_eq!(recs.last().unwrap()["result"], "accepted");
    assert_eq!(
        recs.last().unwrap()["ekPubHash"].as_str().unwrap(),
        ok.ek.pubhash
    );

    // Replay: the same answer again.
    let e = v.complete("10.0.0.1:1234", &ans).unwrap_err();
    assert_eq!(e, Rejection::Replayed(ch.session.clone()));
    assert!(last_reason(dir.path()).contains("replayed nonce"));

    // A Certify over an old nonce in a new session (activation itself is fresh).
    let ch2 = v.begin("10.0.0.1:1234", &ev).unwrap();
    let mut stale = answer(&key, &ch2).unwrap();
    let (old_attest, old_sig) = certify(&key, &ch.nonce).unwrap();
    stale.certify_info = old_attest;
    stale.certify_signature = old_sig;
    let e = v.complete("10.0.0.1:1234", &stale).unwrap_err();
    assert!(
        matches!(&e, Rejection::BadCertify(r) if r.contains("nonce")),
        "{e}"
    );
    assert!(last_reason(dir.path()).contains("not this challenge's nonce"));

    // A key without fixedTPM (it could be duplicated out of the TPM) is refused at Begin.
    let t = Arc::clone(key.tpm());
    let movable = TpmKeyStore::new(t, dir.path().join("keys"))
        .create_from_template("movable", movable_template())
        .unwrap();
    let e = v
        .begin("10.0.0.1:1234", &evidence(&movable, TTL).unwrap())
        .unwrap_err();
    assert!(
        matches!(&e, Rejection::BadCaKey(r) if r.contains("lacks fixedTPM")),
        "{e}"
    );
    assert!(last_reason(dir.path()).contains("lacks fixedTPM"));

    // ... and a Certify of it cannot pass for the announced CA key either.
    let ch3 = v.begin("10.0.0.1:1234", &ev).unwrap();
    let mut swapped = answer(&key, &ch3).unwrap();
    let (a, s) = certify(&movable, &ch3.nonce).unwrap();
    swapped.certify_info = a;
    swapped.certify_signature = s;
    let e = v.complete("10.0.0.1:1234", &swapped).unwrap_err();
    assert!(
        matches!(&e, Rejection::BadCertify(r) if r.contains("another object")),
        "{e}"
    );
}

/// An ECDSA P-256 signing key that lacks fixedTPM (and so fixedParent, which the TPM
/// requires to match): duplicable, so never a CA key.
fn movable_template() -> tss_esapi::structures::Public {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(false)
        .with_fixed_parent(false)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .unwrap();
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .unwrap(),
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .unwrap()
}

#[test]
fn another_manufacturer_and_another_tpm_are_refused() {
    if !testkit::tpm::require() {
        return;
    }
    let (a, b) = (Swtpm::start().unwrap(), Swtpm::start().unwrap());
    let dir = testkit::tempdir().unwrap();
    let (key_a, key_b) = (
        ca_key(&a, &dir.path().join("a")),
        ca_key(&b, &dir.path().join("b")),
    );
    let ev_a: Evidence = evidence(&key_a, TTL).unwrap();

    // The verifier trusts only B's manufacturer: A's EK certificate is refused.
    let only_b = verifier(manufacturer(&b), dir.path());
    let e = only_b.begin("10.0.0.2:1", &ev_a).unwrap_err();
    assert!(matches!(e, Rejection::UntrustedEk(_)), "{e}");
    let reason = last_reason(dir.path());
    assert!(
        reason.contains("no configured manufacturer CA") && reason.contains("manufacturerCas"),
        "{reason}"
    );

    // Trusting both: a challenge for A's EK cannot be activated by B, and B's answer (B's
    // own credential, B's Certify over A's nonce) is refused.
    let mut both = manufacturer(&a);
    both = ManufacturerCas::from_der(
        [&both, &manufacturer(&b)]
            .iter()
            .flat_map(|m| m.ders().to_vec())
            .collect(),
    );
    let v = verifier(both, dir.path());
    let ch_a = v.begin("10.0.0.2:1", &ev_a).unwrap();
    let err = activate(key_b.tpm(), &ch_a).unwrap_err().to_string();
    assert!(err.contains("TPM2_ActivateCredential"), "{err}");
    let ch_b = v
        .begin("10.0.0.3:1", &evidence(&key_b, TTL).unwrap())
        .unwrap();
    let secret_b = activate(key_b.tpm(), &ch_b).unwrap();
    let (attest_b, sig_b) = certify(&key_b, &ch_a.nonce).unwrap();
    let forged = attest::node_attest::Answer {
        session: ch_a.session.clone(),
        activated_secret: secret_b,
        certify_info: attest_b,
        certify_signature: sig_b,
    };
    let e = v.complete("10.0.0.3:1", &forged).unwrap_err();
    assert_eq!(e, Rejection::ActivationMismatch);
    assert!(last_reason(dir.path()).contains("credential activation failed"));
}
