//! JWT-SVIDs: ES256 tokens with `kid`, `typ: JWT`, `sub`, `aud`, `exp`, `iat`, and the JWKS
//! bundles that verify them. Built by hand on `p256` (the format is small and fixed), with
//! the signature made by a [`Signer`] so a TPM key can sign tokens too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use registry::spiffe::{SpiffeId, TrustDomain};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, JwtError, Result};
use crate::signer::Signer;

/// The JWK `use` value SPIFFE bundles give JWT signing keys.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// Clock skew tolerated for `nbf` and `iat` in the future: go-jose's `jwt.DefaultLeeway`
/// (one minute), which SPIRE's JWT-SVID validation uses, so ferry and SPIRE agree on which
/// tokens are valid yet.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(60);

/// A JWT signing key with the window in which it is published.
#[derive(Debug, Clone)]
pub struct JwtKey {
    /// The key id put in every token's header and in the JWKS.
    pub kid: String,
    /// The private key.
    pub signer: Arc<dyn Signer>,
    /// When it was created.
    pub not_before: SystemTime,
    /// When it stops being published and used.
    pub not_after: SystemTime,
}

/// The key id of a public key: base64url of the first 18 bytes of its SHA-256. Stable across
/// restarts, unique per key.
pub fn kid_for(public_key_raw: &[u8]) -> String {
    let h = Sha256::digest(public_key_raw);
    B64.encode(&h[..18])
}

/// A signed JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The identity (`sub`).
    pub spiffe_id: SpiffeId,
    /// The compact token.
    pub token: String,
    /// Its `exp`.
    pub expiry: SystemTime,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a JWT-SVID for `sub` and `aud` with `key`, valid for `ttl` (capped by the key).
pub(crate) fn sign(
    key: &JwtKey,
    sub: &SpiffeId,
    aud: &[String],
    now: SystemTime,
    ttl: Duration,
) -> Result<JwtSvid> {
    if aud.is_empty() {
        return Err(JwtError::NoAudience.into());
    }
    let exp = (now + ttl).min(key.not_after);
    let header = json!({"alg": "ES256", "kid": key.kid, "typ": "JWT"});
    let claims = json!({
        "sub": sub.to_string(),
        "aud": aud,
        "exp": unix(exp),
        "iat": unix(now),
    });
    Ok(JwtSvid {
        spiffe_id: sub.clone(),
        token: sign_compact(key.signer.as_ref(), &header, &claims)?,
        expiry: UNIX_EPOCH + Duration::from_secs(unix(exp)),
    })
}

/// Signs `header` and `claims` as a compact ES256 JWS (tests use it to forge odd tokens).
pub(crate) fn sign_compact(signer: &dyn Signer, header: &Value, claims: &Value) -> Result<String> {
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let der = signer.sign(signing_input.as_bytes())?;
    let sig = Signature::from_der(&der).map_err(|e| Error::Key {
        op: "sign",
        reason: format!("signer returned a bad ECDSA signature: {e}"),
    })?;
    Ok(format!("{signing_input}.{}", B64.encode(sig.to_bytes())))
}

/// The JWT signing keys of one trust domain, by `kid` (SEC1 uncompressed P-256 points).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundle {
    keys: BTreeMap<String, Vec<u8>>,
}

impl JwtBundle {
    /// Adds a key.
    pub fn insert(&mut self, kid: String, public_key_raw: Vec<u8>) {
        self.keys.insert(kid, public_key_raw);
    }

    /// True when the bundle holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, sorted.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Reads the JWT keys of a JWKS / SPIFFE bundle: EC P-256 keys with a `kid` whose `use`
    /// is `jwt-svid` or absent. Other keys (X.509 authorities, other curves) are skipped.
    pub fn from_jwks(bytes: &[u8]) -> std::result::Result<Self, JwtError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| JwtError::Malformed(format!("JWKS: {e}")))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwtError::Malformed("JWKS has no keys array".into()))?;
        let mut out = Self::default();
        for k in keys {
            let s = |f: &str| k.get(f).and_then(Value::as_str);
            if s("use").is_some_and(|u| u != USE_JWT_SVID)
                || s("kty") != Some("EC")
                || s("crv") != Some("P-256")
            {
                continue;
            }
            let (Some(kid), Some(x), Some(y)) = (s("kid"), s("x"), s("y")) else {
                continue;
            };
            let (Ok(x), Ok(y)) = (B64.decode(x), B64.decode(y)) else {
                continue;
            };
            if x.len() != 32 || y.len() != 32 {
                continue;
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            out.insert(kid.to_owned(), point);
        }
        Ok(out)
    }

    /// The bundle as a JWKS document (`kty`, `crv`, `x`, `y`, `kid`, `use` on every key).
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .filter(|(_, p)| p.len() == 65)
            .map(|(kid, p)| {
                json!({
                    "kty": "EC",
                    "crv": "P-256",
                    "x": B64.encode(&p[1..33]),
                    "y": B64.encode(&p[33..65]),
                    "kid": kid,
                    "use": USE_JWT_SVID,
                })
            })
            .collect();
        json!({ "keys": keys }).to_string().into_bytes()
    }
}

/// What a valid JWT-SVID says.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`, always as a list.
    pub audience: Vec<String>,
    /// `exp`.
    pub expiry: SystemTime,
    /// Every claim, as sent.
    pub all: Map<String, Value>,
}

fn part(token_part: &str, what: &str) -> std::result::Result<Vec<u8>, JwtError> {
    B64.decode(token_part)
        .map_err(|_| JwtError::Malformed(format!("{what} is not base64url")))
}

/// A NumericDate claim (RFC 7519 §2: seconds, possibly fractional), if present.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> std::result::Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite())
            .map(Some)
            .ok_or(JwtError::BadClaim(name)),
    }
}

/// Validates a JWT-SVID: no `crit` header (RFC 7515 §4.1.11: ferry understands no
/// extension), ES256 signature by a key (found by `kid`) of the bundle of the `sub`'s trust
/// domain, not expired at `now`, `nbf` and `iat` (when present) no later than `now` plus
/// [`CLOCK_LEEWAY`], and `audience` among its `aud`.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &BTreeMap<TrustDomain, JwtBundle>,
    now: SystemTime,
) -> std::result::Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header: Map<String, Value> = serde_json::from_slice(&part(h, "header")?)
        .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    let claims: Map<String, Value> = serde_json::from_slice(&part(c, "claims")?)
        .map_err(|e| JwtError::Malformed(format!("claims: {e}")))?;
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        other => {
            return Err(JwtError::UnsupportedAlgorithm(
                other.unwrap_or("").to_owned(),
            ));
        }
    }
    // RFC 7515 §4.1.11: a recipient that does not understand every extension listed in
    // `crit` MUST reject the JWS. ferry understands none, so any `crit` is fatal.
    if let Some(crit) = header.get("crit") {
        let names = crit
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| JwtError::Malformed("crit is not an array of names".into()))?;
        return Err(JwtError::CriticalHeader(names));
    }
    if let Some(typ) = header.get("typ") {
        match typ.as_str() {
            Some("JWT" | "JOSE") => {}
            _ => return Err(JwtError::BadType(typ.to_string())),
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingKeyId)?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|s| SpiffeId::parse(s).ok())
        .ok_or(JwtError::BadClaim("sub"))?;
    let td = sub.trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| JwtError::UnknownTrustDomain(td.to_string()))?;
    let point = bundle.keys.get(kid).ok_or_else(|| JwtError::UnknownKey {
        kid: kid.to_owned(),
        trust_domain: td.to_string(),
    })?;
    let vk = VerifyingKey::from_sec1_bytes(point).map_err(|_| JwtError::BadSignature)?;
    let sig = Signature::from_slice(&part(s, "signature")?).map_err(|_| JwtError::BadSignature)?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    vk.verify(signing_input.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;

    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(JwtError::BadClaim("exp"))?;
    if exp <= unix(now) {
        return Err(JwtError::Expired);
    }
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let latest = now_secs + CLOCK_LEEWAY.as_secs_f64();
    if let Some(nbf) = numeric_date(&claims, "nbf")?.filter(|&t| t > latest) {
        return Err(JwtError::NotYetValid {
            not_before: nbf as u64,
            now: unix(now),
            leeway_secs: CLOCK_LEEWAY.as_secs(),
        });
    }
    if let Some(iat) = numeric_date(&claims, "iat")?.filter(|&t| t > latest) {
        return Err(JwtError::IssuedInFuture {
            issued_at: iat as u64,
            now: unix(now),
            leeway_secs: CLOCK_LEEWAY.as_secs(),
        });
    }
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::BadClaim("aud"))?,
        _ => return Err(JwtError::BadClaim("aud")),
    };
    if aud.is_empty() {
        return Err(JwtError::BadClaim("aud"));
    }
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtError::WrongAudience {
            expected: audience.to_owned(),
            actual: aud,
        });
    }
    Ok(Claims {
        spiffe_id: sub,
        audience: aud,
        expiry: UNIX_EPOCH + Duration::from_secs(exp),
        all: claims,
    })
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
