//! Fuzzes JWT-SVID parsing and validation as ValidateJWTSVID sees it (any token string from
//! a local caller) and JWKS bundle parsing (any federated bundle file): never a panic, and
//! a token the fuzzer did not sign with the fixture key never validates.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use attest::JwtBundle;
use libfuzzer_sys::fuzz_target;
use registry::spiffe::TrustDomain;

fn bundles() -> &'static BTreeMap<TrustDomain, JwtBundle> {
    static B: OnceLock<BTreeMap<TrustDomain, JwtBundle>> = OnceLock::new();
    B.get_or_init(|| {
        // A real P-256 public key (SEC1, uncompressed) under a fixed kid.
        let point = hex_point();
        let mut b = JwtBundle::default();
        b.insert("fuzz-kid".to_owned(), point);
        let td = TrustDomain::parse("example.org").expect("fixture trust domain");
        BTreeMap::from([(td, b)])
    })
}

fn hex_point() -> Vec<u8> {
    // The P-256 generator point G: a valid curve point whose private key (1) no token here
    // is signed with, so no fuzzed token can carry a valid signature by accident.
    const G: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
    (0..G.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&G[i..i + 2], 16).expect("fixture hex"))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        let _ = JwtBundle::from_jwks(rest);
        return;
    }
    let Ok(token) = std::str::from_utf8(rest) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let r = attest::jwt::validate(token, "fuzz", bundles(), now);
    assert!(r.is_err(), "a fuzzed token validated: {token:?}");
});
