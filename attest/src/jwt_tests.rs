//! JWT-SVID validation against RFC 7515 (`crit`) and RFC 7519 (`nbf`, `iat`) with go-jose's
//! clock leeway. Tokens are forged with a real key so only the checked field is wrong.

use std::collections::BTreeMap;

use super::*;
use crate::signer::SoftwareSigner;

struct Fixture {
    signer: Arc<dyn Signer>,
    kid: String,
    bundles: BTreeMap<TrustDomain, JwtBundle>,
    now: SystemTime,
}

fn fixture() -> Fixture {
    let signer: Arc<dyn Signer> = Arc::new(SoftwareSigner::generate().unwrap());
    let kid = kid_for(signer.public_key_raw());
    let mut bundle = JwtBundle::default();
    bundle.insert(kid.clone(), signer.public_key_raw().to_vec());
    let mut bundles = BTreeMap::new();
    bundles.insert(TrustDomain::parse("example.org").unwrap(), bundle);
    Fixture {
        signer,
        kid,
        bundles,
        now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

impl Fixture {
    fn header(&self) -> Value {
        json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"})
    }

    /// Valid claims at `now`, with `extra` merged in.
    fn claims(&self, extra: Value) -> Value {
        let now = unix(self.now);
        let mut c = json!({
            "sub": "spiffe://example.org/web",
            "aud": ["svc"],
            "exp": now + 300,
            "iat": now,
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    fn validate(&self, header: &Value, claims: &Value) -> std::result::Result<Claims, JwtError> {
        let token = sign_compact(self.signer.as_ref(), header, claims).unwrap();
        validate(&token, "svc", &self.bundles, self.now)
    }
}

#[test]
fn forged_fixture_token_is_valid() {
    let f = fixture();
    f.validate(&f.header(), &f.claims(json!({}))).unwrap();
}

#[test]
fn rfc7515_4_1_11_unknown_crit_header_makes_the_token_invalid() {
    let f = fixture();
    let mut h = f.header();
    h["crit"] = json!(["exp-policy"]);
    h["exp-policy"] = json!("lenient");
    assert_eq!(
        f.validate(&h, &f.claims(json!({}))),
        Err(JwtError::CriticalHeader(vec!["exp-policy".into()]))
    );
    // An empty list is not allowed either (§4.1.11: "MUST NOT" be empty).
    h["crit"] = json!([]);
    assert_eq!(
        f.validate(&h, &f.claims(json!({}))),
        Err(JwtError::CriticalHeader(vec![]))
    );
    h["crit"] = json!("exp-policy");
    assert!(matches!(
        f.validate(&h, &f.claims(json!({}))),
        Err(JwtError::Malformed(_))
    ));
}

#[test]
fn nbf_later_than_now_plus_go_jose_leeway_is_rejected() {
    let f = fixture();
    let now = unix(f.now);
    assert_eq!(
        CLOCK_LEEWAY,
        Duration::from_secs(60),
        "go-jose DefaultLeeway"
    );
    // Within the leeway (and exactly at it, as go-jose's strict Before): accepted.
    f.validate(&f.header(), &f.claims(json!({"nbf": now + 30})))
        .unwrap();
    f.validate(&f.header(), &f.claims(json!({"nbf": now + 60})))
        .unwrap();
    assert_eq!(
        f.validate(&f.header(), &f.claims(json!({"nbf": now + 61}))),
        Err(JwtError::NotYetValid {
            not_before: now + 61,
            now,
            leeway_secs: 60
        })
    );
    // Fractional NumericDate (RFC 7519 §2) counts too.
    assert!(matches!(
        f.validate(&f.header(), &f.claims(json!({"nbf": now as f64 + 60.5}))),
        Err(JwtError::NotYetValid { .. })
    ));
    assert_eq!(
        f.validate(&f.header(), &f.claims(json!({"nbf": "soon"}))),
        Err(JwtError::BadClaim("nbf"))
    );
}

#[test]
fn iat_later_than_now_plus_go_jose_leeway_is_rejected() {
    let f = fixture();
    let now = unix(f.now);
    f.validate(&f.header(), &f.claims(json!({"iat": now + 60})))
        .unwrap();
    assert_eq!(
        f.validate(&f.header(), &f.claims(json!({"iat": now + 3600}))),
        Err(JwtError::IssuedInFuture {
            issued_at: now + 3600,
            now,
            leeway_secs: 60
        })
    );
    // iat is optional for JWT-SVIDs.
    let mut c = f.claims(json!({}));
    c.as_object_mut().unwrap().remove("iat");
    f.validate(&f.header(), &c).unwrap();
}
