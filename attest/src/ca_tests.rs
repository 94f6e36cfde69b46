//! Unit tests of the CA: the SVID profile, chains, rotation schedule (driven with explicit
//! clock values, so no sleeping), persistence and JWT-SVIDs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::JwtError;

fn cfg(dir: &Path) -> AuthorityConfig {
    AuthorityConfig {
        trust_domain: TrustDomain::parse("example.org").unwrap(),
        state_dir: dir.to_owned(),
        root_ttl: Duration::from_secs(600),
        ca_ttl: Duration::from_secs(60),
    }
}

fn open(dir: &Path) -> Arc<Authority> {
    Authority::open(cfg(dir), Arc::new(SoftwareKeyStore::new(dir.join("keys")))).unwrap()
}

fn id(p: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://example.org{p}")).unwrap()
}

fn secs(t: SystemTime) -> u64 {
    unix(t)
}

#[test]
fn svid_follows_the_spiffe_profile_and_chains_to_the_bundle() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let before = SystemTime::now();
    let svid = ca
        .issue_x509_svid(&id("/ns/demo/sa/web"), Duration::from_secs(3600))
        .unwrap();
    assert_eq!(
        x509::check_svid_profile(&svid.chain[0]).unwrap(),
        id("/ns/demo/sa/web")
    );
    assert_eq!(svid.chain.len(), 2, "leaf + intermediate");
    x509::verify_chain(&svid.chain, &ca.x509_authorities(), SystemTime::now()).unwrap();
    // NotBefore 10 s in the past (second precision).
    let nb = secs(svid.not_before);
    assert!(
        nb + 11 >= secs(before) && nb + 9 <= secs(before),
        "{nb} vs {}",
        secs(before)
    );
    // 1h requested, but the intermediate lives 60 s: capped.
    let issuer = CaCert::from_der(svid.chain[1].clone()).unwrap();
    assert_eq!(svid.not_after, issuer.not_after);
    // Other trust domain: refused.
    let other = SpiffeId::parse("spiffe://other.org/x").unwrap();
    assert!(ca.issue_x509_svid(&other, Duration::from_secs(5)).is_err());
}

#[test]
fn ca_certificates_are_cas_with_cert_sign() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    for der in ca.x509_authorities() {
        let c = CaCert::from_der(der).unwrap();
        assert_eq!(secs(c.not_after) - secs(c.not_before), 600 + 10);
    }
    // A leaf is not a CA.
    let svid = ca
        .issue_x509_svid(&id("/a"), Duration::from_secs(5))
        .unwrap();
    assert!(CaCert::from_der(svid.chain[0].clone()).is_err());
    assert!(x509::check_svid_profile(&svid.chain[1]).is_err());
}

#[test]
fn state_survives_restart_with_private_key_files() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let bundle = ca.x509_authorities();
    let jwks = ca.jwt_bundle();
    drop(ca);
    let keys = std::fs::read_dir(d.path().join("keys")).unwrap();
    let mut n = 0;
    for k in keys {
        let m = k.unwrap().metadata().unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        n += 1;
    }
    assert_eq!(n, 3, "root, intermediate, JWT key");
    let ca2 = open(d.path());
    assert_eq!(ca2.x509_authorities(), bundle, "same root after restart");
    assert_eq!(ca2.jwt_bundle(), jwks);
    let svid = ca2
        .issue_x509_svid(&id("/a"), Duration::from_secs(5))
        .unwrap();
    x509::verify_chain(&svid.chain, &bundle, SystemTime::now()).unwrap();
}

#[test]
fn wrong_trust_domain_state_is_refused() {
    let d = tempfile::tempdir().unwrap();
    drop(open(d.path()));
    let mut c = cfg(d.path());
    c.trust_domain = TrustDomain::parse("other.org").unwrap();
    let e = Authority::open(c, Arc::new(SoftwareKeyStore::new(d.path().join("keys")))).unwrap_err();
    assert!(matches!(e, Error::TrustDomainMismatch { .. }), "{e}");
}

#[test]
fn intermediate_is_prepared_at_half_and_activated_at_five_sixths() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let t0 = SystemTime::now();
    let first = ca.active_issuer_serial().unwrap();
    let mut rx = ca.subscribe();
    rx.mark_unchanged();
    // Before half-life nothing happens.
    assert!(!ca.rotate(t0 + Duration::from_secs(20)).unwrap());
    // The lifetime runs from NotBefore (t0 - 10 s) to t0 + 60 s: half is at t0 + 25 s. The
    // next one is prepared then but does not sign yet.
    assert!(ca.rotate(t0 + Duration::from_secs(26)).unwrap());
    assert!(rx.has_changed().unwrap());
    assert_eq!(ca.active_issuer_serial().unwrap(), first);
    assert_eq!(ca.read().intermediates.len(), 2);
    // At 5/6 (t0 + 48.3 s) it takes over.
    assert!(ca.rotate(t0 + Duration::from_secs(49)).unwrap());
    let second = ca.active_issuer_serial().unwrap();
    assert_ne!(second, first);
    // The old one expires and is dropped, with its key file.
    assert!(ca.rotate(t0 + Duration::from_secs(61)).unwrap());
    let st = ca.read();
    assert!(st.intermediates.iter().all(|g| g.v.cert.serial != first));
    let gens = st.roots.len() + st.intermediates.len() + st.jwt.len();
    assert_eq!(
        std::fs::read_dir(d.path().join("keys")).unwrap().count(),
        gens
    );
}

#[test]
fn new_root_is_published_before_it_signs() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let t0 = SystemTime::now();
    let root0 = ca.x509_authorities();
    assert_eq!(root0.len(), 1);
    // Root half-life: 300 s.
    ca.rotate(t0 + Duration::from_secs(295)).unwrap();
    let published = ca.x509_authorities();
    assert_eq!(published.len(), 2, "next root published at half-life");
    // Intermediates made now are still signed by the old root.
    let int_now = ca
        .read()
        .intermediates
        .iter()
        .find(|g| g.status == Status::Active)
        .map(|g| g.v.cert.der.clone())
        .unwrap();
    x509::verify_chain(&[int_now], &root0, t0 + Duration::from_secs(295)).unwrap();
    // At 5/6 (500 s) the new root becomes active; the next intermediate made after that
    // chains only to the new root, which clients have had since t0+295.
    let t = t0 + Duration::from_secs(495);
    ca.rotate(t).unwrap();
    let new_root = vec![published[1].clone()];
    let mut step_t = t;
    // Let the intermediate rotate twice so its issuer is the new root.
    for _ in 0..4 {
        step_t += Duration::from_secs(30);
        ca.rotate(step_t).unwrap();
    }
    let st = ca.read();
    let active = st
        .intermediates
        .iter()
        .find(|g| g.status == Status::Active)
        .unwrap();
    x509::verify_chain(std::slice::from_ref(&active.v.cert.der), &new_root, step_t).unwrap();
}

#[test]
fn jwt_svid_signs_validates_and_rejects_tampering() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let sub = id("/ns/demo/sa/web");
    let svid = ca
        .issue_jwt_svid(
            &sub,
            &["svc-a".into(), "svc-b".into()],
            Duration::from_secs(300),
        )
        .unwrap();
    let mut bundles = BTreeMap::new();
    bundles.insert(ca.trust_domain().clone(), ca.jwt_bundle());
    let now = SystemTime::now();
    let claims = jwt::validate(&svid.token, "svc-b", &bundles, now).unwrap();
    assert_eq!(claims.spiffe_id, sub);
    assert!(claims.all.contains_key("iat"));
    // Header has kid and typ.
    let header = svid.token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap();
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));

    assert!(matches!(
        jwt::validate(&svid.token, "svc-c", &bundles, now),
        Err(JwtError::WrongAudience { .. })
    ));
    // Flip one character of the claims part.
    let mut parts: Vec<String> = svid.token.split('.').map(str::to_owned).collect();
    let mut c = parts[1].clone().into_bytes();
    c[5] = if c[5] == b'A' { b'B' } else { b'A' };
    parts[1] = String::from_utf8(c).unwrap();
    let tampered = parts.join(".");
    assert!(jwt::validate(&tampered, "svc-b", &bundles, now).is_err());
    assert_eq!(
        jwt::validate(
            &svid.token,
            "svc-b",
            &bundles,
            now + Duration::from_secs(301)
        ),
        Err(JwtError::Expired)
    );
    assert!(matches!(
        jwt::validate(&svid.token, "svc-b", &BTreeMap::new(), now),
        Err(JwtError::UnknownTrustDomain(_))
    ));
    assert!(
        ca.issue_jwt_svid(&sub, &[], Duration::from_secs(5))
            .is_err()
    );
}

#[test]
fn jwks_round_trips_with_use_and_kid() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let b = ca.jwt_bundle();
    let doc: serde_json::Value = serde_json::from_slice(&b.to_jwks()).unwrap();
    let k = &doc["keys"][0];
    assert_eq!(k["use"], "jwt-svid");
    assert_eq!(k["kty"], "EC");
    assert!(k["kid"].is_string());
    assert_eq!(JwtBundle::from_jwks(&b.to_jwks()).unwrap(), b);
}

#[test]
fn jwt_keys_rotate_like_the_ca() {
    let d = tempfile::tempdir().unwrap();
    let ca = open(d.path());
    let t0 = SystemTime::now();
    let sub = id("/a");
    let old = ca
        .issue_jwt_svid(&sub, &["x".into()], Duration::from_secs(300))
        .unwrap();
    ca.rotate(t0 + Duration::from_secs(31)).unwrap();
    assert_eq!(
        ca.jwt_bundle().kids().count(),
        2,
        "next key published at half-life"
    );
    ca.rotate(t0 + Duration::from_secs(51)).unwrap();
    let new = ca
        .issue_jwt_svid(&sub, &["x".into()], Duration::from_secs(300))
        .unwrap();
    let kid = |t: &str| t.split('.').next().unwrap().to_owned();
    assert_ne!(kid(&old.token), kid(&new.token));
    let mut bundles = BTreeMap::new();
    bundles.insert(ca.trust_domain().clone(), ca.jwt_bundle());
    // Both still verify while both keys are published.
    jwt::validate(&old.token, "x", &bundles, SystemTime::now()).unwrap();
    jwt::validate(&new.token, "x", &bundles, SystemTime::now()).unwrap();
}
