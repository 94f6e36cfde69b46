//! The root's side of node attestation: checks evidence, issues single-use challenges and
//! verifies answers. Pure software (no TPM, no I/O but the audit log).
//!
//! Invariants: a challenge is answered at most once (it is removed from the pending set
//! before the answer is checked, whatever the outcome, and remembered as answered so a
//! replay is named as one); it expires after [`CHALLENGE_TTL`]; the AK that signs the
//! Certify attestation is the one whose Name the credential was made for.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::audit::{AuditLog, AuditRecord};
use super::credential::make_credential;
use super::ek_chain::{EkIdentity, ManufacturerCas, hex};
use super::tpm_objects::{ObjectPublic, check_ak, check_ca_key, check_ek, verify_certify};
use super::{Answer, Challenge, Evidence, Rejection};

/// How long a node has to answer a challenge.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// At most this many challenges wait for answers: a client holding a valid EK
/// certificate cannot grow the verifier's memory without bound.
pub const MAX_PENDING: usize = 4096;
/// How long answered sessions are remembered to name replays as such (later, a replay is
/// still refused, as an unknown session).
const ANSWERED_MEMORY: Duration = Duration::from_secs(600);

/// What a verified node gets certified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// The session that was answered.
    pub session: String,
    /// The EK's identity.
    pub ek: EkIdentity,
    /// The CA key, SEC1 P-256: what the node CA certificate certifies.
    pub ca_key: Vec<u8>,
    /// What the root knows the node by: `tpm:ek-pubhash:<sha256 hex>`,
    /// `tpm:ca-key-name:<hex>`.
    pub selectors: Vec<String>,
    /// The lifetime the node asked for.
    pub ttl: Duration,
}

struct Pending {
    created: Instant,
    nonce: [u8; 32],
    secret: [u8; 32],
    ak: p256::ecdsa::VerifyingKey,
    ca_key_name: Vec<u8>,
    ca_key: Vec<u8>,
    ek: EkIdentity,
    ttl: Duration,
}

/// Verifies nodes against a set of manufacturer CAs, recording every decision.
pub struct Verifier {
    cas: ManufacturerCas,
    audit: Option<AuditLog>,
    pending: Mutex<HashMap<String, Pending>>,
    answered: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("manufacturer_cas", &self.cas.len())
            .field("audit", &self.audit.as_ref().map(AuditLog::path))
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier trusting EK certificates from `cas`, writing decisions to `audit`.
    pub fn new(cas: ManufacturerCas, audit: Option<AuditLog>) -> Self {
        Self {
            cas,
            audit,
            pending: Mutex::new(HashMap::new()),
            answered: Mutex::new(HashMap::new()),
        }
    }

    fn record(&self, r: AuditRecord) {
        if let Some(a) = &self.audit {
            a.write(r);
        }
    }

    /// Checks `ev` from `peer` and returns a challenge, or the reason it was refused.
    pub fn begin(&self, peer: &str, ev: &Evidence) -> Result<Challenge, Rejection> {
        let span = tracing::info_span!("node_attest_begin", %peer);
        let _g = span.enter();
        let mut ek_hash = None;
        let res = self.begin_inner(ev, &mut ek_hash);
        match &res {
            Ok(c) => self.record(AuditRecord {
                peer: peer.to_owned(),
                session: Some(c.session.clone()),
                step: "Begin",
                ek_pub_hash: ek_hash,
                result: "challenged",
                ..Default::default()
            }),
            Err(e) => self.record(AuditRecord {
                peer: peer.to_owned(),
                step: "Begin",
                ek_pub_hash: ek_hash,
                result: "rejected",
                reason: Some(e.to_string()),
                ..Default::default()
            }),
        }
        res
    }

    fn begin_inner(
        &self,
        ev: &Evidence,
        ek_hash: &mut Option<String>,
    ) -> Result<Challenge, Rejection> {
        let ek = self.cas.verify(&ev.ek_certificate, SystemTime::now())?;
        *ek_hash = Some(ek.pubhash.clone());
        let ek_public = ObjectPublic::parse(&ev.ek_public, "EK public area")?;
        let ek_key = check_ek(&ek_public, &ek.modulus, &ek.exponent)?;
        let ak_public = ObjectPublic::parse(&ev.ak_public, "AK public area")?;
        let ak = check_ak(&ak_public)?;
        let ca_public = ObjectPublic::parse(&ev.ca_key_public, "CA key public area")?;
        let ca_key = check_ca_key(&ca_public)?;

        let secret: [u8; 32] = rand::random();
        let nonce: [u8; 32] = rand::random();
        let cred = make_credential(&ek_key, &ak_public.name, &secret)
            .map_err(|e| Rejection::UnsupportedEk(e.to_string()))?;
        let session = hex(&rand::random::<[u8; 16]>());
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.retain(|_, p| p.created.elapsed() < CHALLENGE_TTL);
        if pending.len() >= MAX_PENDING {
            return Err(Rejection::Busy(MAX_PENDING));
        }
        pending.insert(
            session.clone(),
            Pending {
                created: Instant::now(),
                nonce,
                secret,
                ak,
                ca_key_name: ca_public.name,
                ca_key,
                ek,
                ttl: ev.ttl,
            },
        );
        Ok(Challenge {
            session,
            nonce: nonce.to_vec(),
            credential_blob: cred.credential_blob,
            encrypted_secret: cred.encrypted_secret,
        })
    }

    /// Checks `answer` from `peer`. On success the caller issues the node CA and reports
    /// it with [`Verifier::accepted`] (or a failure to issue with [`Verifier::failed`]).
    pub fn complete(&self, peer: &str, answer: &Answer) -> Result<Attested, Rejection> {
        let span = tracing::info_span!("node_attest_complete", %peer, session = %answer.session);
        let _g = span.enter();
        let taken = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.remove(&answer.session)
        };
        let res = match taken {
            None => Err((self.unknown(&answer.session), None)),
            Some(p) => {
                self.remember_answered(&answer.session);
                match check_answer(&p, answer) {
                    Ok(()) => Ok(Attested {
                        session: answer.session.clone(),
                        selectors: vec![
                            format!("tpm:ek-pubhash:{}", p.ek.pubhash),
                            format!("tpm:ca-key-name:{}", hex(&p.ca_key_name)),
                        ],
                        ek: p.ek,
                        ca_key: p.ca_key,
                        ttl: p.ttl,
                    }),
                    Err(e) => Err((e, Some(p.ek.pubhash))),
                }
            }
        };
        res.map_err(|(e, hash)| {
            self.rejected(peer, &answer.session, hash, &e);
            e
        })
    }

    fn unknown(&self, session: &str) -> Rejection {
        let answered = self.answered.lock().unwrap_or_else(PoisonError::into_inner);
        if answered.contains_key(session) {
            Rejection::Replayed(session.to_owned())
        } else {
            Rejection::UnknownSession(session.to_owned())
        }
    }

    fn remember_answered(&self, session: &str) {
        let mut answered = self.answered.lock().unwrap_or_else(PoisonError::into_inner);
        answered.retain(|_, t| t.elapsed() < ANSWERED_MEMORY);
        answered.insert(session.to_owned(), Instant::now());
    }

    fn rejected(&self, peer: &str, session: &str, ek: Option<String>, e: &Rejection) {
        self.record(AuditRecord {
            peer: peer.to_owned(),
            session: Some(session.to_owned()),
            step: "Complete",
            ek_pub_hash: ek,
            result: "rejected",
            reason: Some(e.to_string()),
            ..Default::default()
        });
    }

    /// Records that `a` was certified as node CA `serial`.
    pub fn accepted(&self, peer: &str, a: &Attested, serial: &str) {
        self.record(AuditRecord {
            peer: peer.to_owned(),
            session: Some(a.session.clone()),
            step: "Complete",
            ek_pub_hash: Some(a.ek.pubhash.clone()),
            result: "accepted",
            node_ca_serial: Some(serial.to_owned()),
            selectors: a.selectors.clone(),
            ..Default::default()
        });
    }

    /// Records that `a` verified but its node CA could not be issued.
    pub fn failed(&self, peer: &str, a: &Attested, reason: &str) {
        self.record(AuditRecord {
            peer: peer.to_owned(),
            session: Some(a.session.clone()),
            step: "Complete",
            ek_pub_hash: Some(a.ek.pubhash.clone()),
            result: "rejected",
            reason: Some(format!(
                "verified, but the node CA could not be issued: {reason}"
            )),
            ..Default::default()
        });
    }
}

/// Constant-time equality (the secret is compared without leaking how much matched).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_answer(p: &Pending, answer: &Answer) -> Result<(), Rejection> {
    if p.created.elapsed() >= CHALLENGE_TTL {
        return Err(Rejection::UnknownSession(answer.session.clone()));
    }
    if !same(&answer.activated_secret, &p.secret) {
        return Err(Rejection::ActivationMismatch);
    }
    verify_certify(
        &answer.certify_info,
        &answer.certify_signature,
        &p.ak,
        &p.nonce,
        &p.ca_key_name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_replayed_sessions_are_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let v = Verifier::new(
            ManufacturerCas::default(),
            Some(AuditLog::in_dir(dir.path())),
        );
        let a = Answer {
            session: "nope".into(),
            ..Default::default()
        };
        assert_eq!(
            v.complete("peer", &a).unwrap_err(),
            Rejection::UnknownSession("nope".into())
        );
        v.remember_answered("nope");
        assert_eq!(
            v.complete("peer", &a).unwrap_err(),
            Rejection::Replayed("nope".into())
        );
        // Untrusted evidence is refused at Begin and audited.
        let e = v.begin("peer", &Evidence::default()).unwrap_err();
        assert!(matches!(e, Rejection::Malformed { .. }), "{e}");
        let log =
            std::fs::read_to_string(dir.path().join(super::super::audit::AUDIT_FILE)).unwrap();
        assert_eq!(log.lines().count(), 3, "{log}");
        assert!(log.contains("replayed nonce") && log.contains("\"result\":\"rejected\""));
        assert!(same(b"ab", b"ab") && !same(b"ab", b"ac") && !same(b"a", b"ab"));
    }
}
