//! The node's side of TPM node attestation ([`crate::node_attest`]): the evidence its TPM
//! gives (EK certificate and public area, an attestation key, the CA key's public area),
//! TPM2_ActivateCredential on the root's challenge, and TPM2_Certify of the CA key by the
//! attestation key over the root's nonce.
//!
//! The attestation key (AK) is a primary key of the endorsement hierarchy: a restricted
//! ECC P-256 ECDSA signing key with `fixedTPM | fixedParent | sensitiveDataOrigin`.
//! Being a primary, it is re-derived identically from the endorsement seed by every call,
//! so nothing about it is stored and the AK of Begin is the AK of Complete. The EK is the
//! TCG default RSA 2048 EK (the key of the certificate at NV `0x01c00002`).
//!
//! A TPM without a resource manager (swtpm, the simulator) holds only three transient
//! objects. So every job first flushes the thread's cached objects, keeps at most three
//! loaded (EK + AK for activation; AK + CA key, its parent flushed, for Certify), and
//! flushes everything it loaded — also when a command fails.

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ek};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::algorithm::PublicAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EccPoint, EccScheme, EncryptedSecret, HashScheme, IdObject, KeyDerivationFunctionScheme,
    Public, PublicBuilder, PublicEccParametersBuilder, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;

use super::{Tpm, TpmError, TpmSigner, TpmThread};
use crate::node_attest::{Answer, Challenge, Evidence};

/// The attestation key's template (see the module doc).
pub fn ak_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Transient objects and sessions a job loaded, flushed when it ends however it ends.
struct Loaded<'a> {
    st: &'a mut TpmThread,
    handles: Vec<ObjectHandle>,
}

impl<'a> Loaded<'a> {
    /// Starts a job: the thread's cached key and primary are flushed first, so the job
    /// has the TPM's transient slots to itself.
    fn new(st: &'a mut TpmThread) -> Self {
        st.flush_all();
        Self {
            st,
            handles: Vec::new(),
        }
    }

    fn ek(&mut self) -> Result<KeyHandle, TpmError> {
        let h = ek::create_ek_object_2(
            &mut self.st.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        )
        .map_err(
            self.st
                .err("create the RSA 2048 EK (TPM2_CreatePrimary, endorsement)"),
        )?;
        self.handles.push(h.into());
        Ok(h)
    }

    fn ak(&mut self) -> Result<KeyHandle, TpmError> {
        let template = ak_template().map_err(self.st.err("build the AK template"))?;
        let h = self
            .st
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Endorsement, template, None, None, None, None)
            })
            .map_err(
                self.st
                    .err("create the attestation key (TPM2_CreatePrimary, endorsement)"),
            )?
            .key_handle;
        self.handles.push(h.into());
        Ok(h)
    }

    /// The marshalled public area of a loaded object, checked against the TPM's Name of it
    /// (the verifier computes Names from these bytes).
    fn public(&mut self, h: KeyHandle, what: &str) -> Result<Vec<u8>, TpmError> {
        let (public, name, _) = self
            .st
            .ctx
            .read_public(h)
            .map_err(self.st.err("read a public area (TPM2_ReadPublic)"))?;
        marshal_checked(&public, name.value(), self.st.tcti(), what)
    }

    fn flush(&mut self, h: impl Into<ObjectHandle>) {
        let h = h.into();
        self.handles.retain(|x| *x != h);
        let _ = self.st.ctx.flush_context(h);
    }
}

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        for h in self.handles.drain(..) {
            let _ = self.st.ctx.flush_context(h);
        }
        self.st.flush_all();
    }
}

/// Marshals `public` and checks that it hashes to `name` (the TPM's Name for it).
fn marshal_checked(
    public: &Public,
    name: &[u8],
    tcti: &str,
    what: &str,
) -> Result<Vec<u8>, TpmError> {
    use sha2::{Digest as _, Sha256};
    let bad = |reason: String| TpmError::BadObject {
        tcti: tcti.to_owned(),
        what: what.to_owned(),
        reason,
    };
    let bytes = public.marshall().map_err(|e| bad(e.to_string()))?;
    let mut computed = 0x000bu16.to_be_bytes().to_vec();
    computed.extend_from_slice(&Sha256::digest(&bytes));
    if computed != name {
        return Err(bad(
            "its marshalled public area does not hash to the TPM's Name for it".into(),
        ));
    }
    Ok(bytes)
}

/// Gathers the evidence for Begin: the EK certificate and public area, the AK's public
/// area and `key`'s (the CA key to certify), asking for a node CA living `ttl`.
pub fn evidence(key: &TpmSigner, ttl: std::time::Duration) -> Result<Evidence, TpmError> {
    let ca_key_public = key.public_area().clone();
    key.tpm().call(move |st| {
        let mut job = Loaded::new(st);
        let ek_certificate = ek::retrieve_ek_pubcert(
            &mut job.st.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .map_err(|e| TpmError::Command {
            tcti: job.st.tcti().to_owned(),
            op: "read the EK certificate (NV 0x01c00002)",
            reason: e.to_string(),
            hint: Some("node attestation needs the manufacturer's RSA EK certificate in NV 0x01c00002 (`ferry attest info` shows it)"),
        })?;
        let ek = job.ek()?;
        let ek_public = job.public(ek, "EK")?;
        job.flush(ek);
        let ak = job.ak()?;
        let ak_public = job.public(ak, "attestation key")?;
        job.flush(ak);
        let ca_key_public = ca_key_public
            .marshall()
            .map_err(job.st.err("marshal the CA key's public area"))?;
        Ok(Evidence {
            ek_certificate,
            ek_public,
            ak_public,
            ca_key_public,
            ttl,
        })
    })?
}

/// TPM2_ActivateCredential on `tpm` with its EK and AK: recovers the challenge's secret,
/// which only the TPM whose EK and AK the challenge was made for can do.
pub fn activate(tpm: &Tpm, challenge: &Challenge) -> Result<Vec<u8>, TpmError> {
    let blob = challenge.credential_blob.clone();
    let secret = challenge.encrypted_secret.clone();
    tpm.call(move |st| {
        let mut job = Loaded::new(st);
        let blob = IdObject::try_from(blob).map_err(job.st.err("wrap the credential blob"))?;
        let secret =
            EncryptedSecret::try_from(secret).map_err(job.st.err("wrap the encrypted secret"))?;
        let ek = job.ek()?;
        let ak = job.ak()?;
        // The EK's policy (TCG policy A) is PolicySecret(endorsement hierarchy).
        let session = job
            .st
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(job.st.err("start a policy session (TPM2_StartAuthSession)"))?;
        let Some(session) = session else {
            return Err(TpmError::BadObject {
                tcti: job.st.tcti().to_owned(),
                what: "policy session".into(),
                reason: "the TPM returned no session".into(),
            });
        };
        job.handles.push(SessionHandle::from(session).into());
        let policy =
            PolicySession::try_from(session).map_err(job.st.err("use the policy session"))?;
        job.st
            .ctx
            .execute_with_nullauth_session(|c| {
                c.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(
                job.st
                    .err("satisfy the EK policy (TPM2_PolicySecret, endorsement)"),
            )?;
        let digest = job
            .st
            .ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                c.activate_credential(ak, ek, blob, secret)
            })
            .map_err(
                job.st
                    .err("activate the credential (TPM2_ActivateCredential)"),
            )?;
        Ok(digest.value().to_vec())
    })?
}

/// TPM2_Certify of `key` by the AK of `key`'s TPM with `nonce` as qualifying data: returns
/// the marshalled TPMS_ATTEST and TPMT_SIGNATURE.
pub fn certify(key: &TpmSigner, nonce: &[u8]) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let loadable = key.loadable();
    let nonce = nonce.to_vec();
    key.tpm().call(move |st| {
        let mut job = Loaded::new(st);
        // Load the CA key (under the storage primary), then drop the primary: the loaded
        // key does not need its parent, and the AK needs the slot.
        let ca = loadable.handle(job.st)?;
        if let Some(p) = job.st.primary.take() {
            let _ = job.st.ctx.flush_context(ObjectHandle::from(p));
        }
        let ak = job.ak()?;
        let data = Data::try_from(nonce).map_err(job.st.err("wrap the nonce"))?;
        let (attest, sig) = job
            .st
            .ctx
            .execute_with_sessions(
                (
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.certify(ca.into(), ak, data, SignatureScheme::Null),
            )
            .map_err(job.st.err("certify the CA key (TPM2_Certify)"))?;
        let attest = attest
            .marshall()
            .map_err(job.st.err("marshal the attestation"))?;
        let sig = sig
            .marshall()
            .map_err(job.st.err("marshal the signature"))?;
        Ok((attest, sig))
    })?
}

/// Answers `challenge` for `key`: activation and Certify on `key`'s TPM.
pub fn answer(key: &TpmSigner, challenge: &Challenge) -> Result<Answer, TpmError> {
    let activated_secret = activate(key.tpm(), challenge)?;
    let (certify_info, certify_signature) = certify(key, &challenge.nonce)?;
    Ok(Answer {
        session: challenge.session.clone(),
        activated_secret,
        certify_info,
        certify_signature,
    })
}
