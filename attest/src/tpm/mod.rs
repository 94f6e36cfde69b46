//! The TPM behind the CA (tss-esapi over the TSS2 ESAPI from Debian's `libtss2`).
//!
//! A tss-esapi [`Context`] is not `Send` and every TPM command blocks for milliseconds (a
//! hardware TPM: tens of them), so a [`Tpm`] owns its context on one dedicated OS thread
//! and other threads hand it closures ([`Tpm::call`]). Nothing TPM-related ever runs on an
//! async worker: async callers use `spawn_blocking` (or the signer's `block_in_place`).
//!
//! Keys are children of the owner hierarchy's storage primary (the TCG "SRK" template, ECC
//! P-256, recreated deterministically from the owner seed), so their wrapped blobs stay
//! loadable across restarts of the agent and of the TPM. [`keys`] stores those blobs;
//! [`info`] reports what `ferry attest info` prints; [`attestation`] is the node's side of
//! node attestation (EK, attestation key, credential activation, Certify).

pub mod attestation;
pub mod info;
pub mod keys;

use std::fmt;
use std::str::FromStr;
use std::sync::mpsc;

use tss_esapi::Context;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    EccPoint, Public, PublicBuilder, PublicEccParametersBuilder, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;

pub use info::{EkCertInfo, TpmInfo};
pub use keys::{TpmKeyStore, TpmSigner};

/// What went wrong talking to a TPM. Every variant names the TCTI so that an operator with
/// several TPMs (or a swtpm on the wrong port) knows which one.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string does not parse.
    #[error(
        "invalid TPM TCTI {tcti:?}: {reason} (use device:/dev/tpmrm0, tabrmd, or swtpm:host=127.0.0.1,port=2321)"
    )]
    BadTcti {
        /// The configured TCTI.
        tcti: String,
        /// tss-esapi's complaint.
        reason: String,
    },
    /// The TPM could not be opened or does not answer.
    #[error(
        "cannot open the TPM at TCTI {tcti}: {reason} (check that the TPM exists and answers: for device:/dev/tpmrm0 the agent's user needs the tss group; for swtpm: check that swtpm runs on that port; `tpm2_getcap -T {tcti} properties-fixed` shows whether it answers)"
    )]
    Open {
        /// The configured TCTI.
        tcti: String,
        /// The TSS error.
        reason: String,
    },
    /// A TPM command failed.
    #[error("TPM at {tcti}: {op} failed: {reason}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    Command {
        /// The TPM's TCTI.
        tcti: String,
        /// The operation (`create key`, `sign`, `read EK certificate`, ...).
        op: &'static str,
        /// The TSS error.
        reason: String,
        /// What the operator can do, when we know.
        hint: Option<&'static str>,
    },
    /// A key blob or structure from the TPM is not what ferry expects.
    #[error("TPM at {tcti}: {what} is unusable: {reason}")]
    BadObject {
        /// The TPM's TCTI.
        tcti: String,
        /// Which object (a key name, `EK certificate`, ...).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The thread that owns the TPM context is gone (it panicked).
    #[error("the TPM thread for {tcti} has stopped (restart the agent)")]
    Stopped {
        /// The TPM's TCTI.
        tcti: String,
    },
}

/// A unit of work run on the TPM thread.
type Job = Box<dyn FnOnce(&mut TpmThread) + Send>;

/// The state that lives on the TPM thread: the context and what is loaded in the TPM.
pub(crate) struct TpmThread {
    tcti: String,
    /// The ESAPI context (not `Send`: it never leaves this thread).
    pub(crate) ctx: Context,
    /// The owner storage primary, created on first use.
    primary: Option<KeyHandle>,
    /// The most recently used signing key, kept loaded so a burst of signatures by one key
    /// costs one TPM2_Load (`(signer id, handle)`). TPMs hold only a few transient objects,
    /// so at most one is cached.
    pub(crate) loaded: Option<(u64, KeyHandle)>,
}

impl TpmThread {
    /// A [`TpmError::Command`] for `op` on this TPM.
    pub(crate) fn err(&self, op: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
        let tcti = self.tcti.clone();
        move |e| TpmError::Command {
            tcti,
            op,
            reason: e.to_string(),
            hint: hint_for(&e),
        }
    }

    /// The TCTI of this TPM (for errors).
    pub(crate) fn tcti(&self) -> &str {
        &self.tcti
    }

    /// The owner-hierarchy storage primary (created, deterministically, on first use).
    pub(crate) fn primary(&mut self) -> Result<KeyHandle, TpmError> {
        if let Some(h) = self.primary {
            return Ok(h);
        }
        let template = storage_primary_template().map_err(self.err("build the SRK template"))?;
        let h = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(self.err("create the owner storage primary (TPM2_CreatePrimary)"))?
            .key_handle;
        self.primary = Some(h);
        Ok(h)
    }

    /// Flushes every transient object in the TPM (see [`Tpm::open`] for when this is safe).
    fn flush_stale_transients(&mut self) {
        use tss_esapi::constants::CapabilityType;
        use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
        use tss_esapi::structures::CapabilityData;
        let Ok((CapabilityData::Handles(list), _)) =
            self.ctx
                .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        else {
            return;
        };
        for h in list.into_inner() {
            if let Ok(obj) = self
                .ctx
                .execute_without_session(|c| c.tr_from_tpm_public(h))
            {
                tracing::debug!(tcti = %self.tcti, handle = ?h, "flushing a transient object left by a previous client");
                let _ = self.ctx.flush_context(obj);
            }
        }
    }

    /// Flushes the cached signing key and the primary so that a multi-object operation
    /// (attestation) has the TPM's transient slots to itself.
    pub(crate) fn flush_all(&mut self) {
        if let Some((_, h)) = self.loaded.take() {
            let _ = self.ctx.flush_context(ObjectHandle::from(h));
        }
        if let Some(h) = self.primary.take() {
            let _ = self.ctx.flush_context(ObjectHandle::from(h));
        }
    }
}

/// A hint for the TPM errors an operator can do something about.
fn hint_for(e: &tss_esapi::Error) -> Option<&'static str> {
    let s = e.to_string().to_ascii_lowercase();
    if s.contains("lockout") {
        Some(
            "the TPM is in dictionary-attack lockout: wait, or clear it with tpm2_dictionarylockout",
        )
    } else if s.contains("authorization") || s.contains("auth fail") || s.contains("bad_auth") {
        Some(
            "the owner hierarchy has a password; ferry expects an empty owner auth (tpm2_changeauth -c owner)",
        )
    } else if s.contains("object memory") || s.contains("out of memory") {
        Some(
            "the TPM ran out of transient object slots; use the kernel resource manager (device:/dev/tpmrm0) or tabrmd",
        )
    } else {
        None
    }
}

/// The TCG storage primary template: ECC P-256, restricted decryption, AES-128-CFB.
fn storage_primary_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A TPM, opened once per process per TCTI, with its context on a dedicated thread.
/// Cheap to share (`Arc<Tpm>`); the thread ends when the last handle is dropped.
pub struct Tpm {
    tcti: String,
    jobs: mpsc::Sender<Job>,
}

impl fmt::Debug for Tpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tpm").field("tcti", &self.tcti).finish()
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        // Flush what we loaded before the process may exit (a TPM without a resource
        // manager would otherwise keep it); wait briefly so a short-lived command's exit
        // does not race the flush.
        let (tx, rx) = mpsc::sync_channel(1);
        if self
            .jobs
            .send(Box::new(move |st| {
                st.flush_all();
                let _ = tx.send(());
            }))
            .is_ok()
        {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(2));
        }
    }
}

impl Tpm {
    /// Opens the TPM at `tcti` (`device:/dev/tpmrm0`, `tabrmd`, `swtpm:host=H,port=P`,
    /// `mssim:...`) and checks that it answers. Blocking.
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let conf = TctiNameConf::from_str(tcti.trim()).map_err(|e| TpmError::BadTcti {
            tcti: tcti.to_owned(),
            reason: e.to_string(),
        })?;
        // swtpm and the simulator serve one client at a time and have no resource manager:
        // objects a previous client (a crashed agent, `ferry ca init`) left loaded would fill
        // the TPM's few transient slots, so they are flushed on open. With /dev/tpmrm0 or
        // tabrmd every client sees only its own objects and nothing needs flushing.
        let shared_by_nobody = matches!(conf, TctiNameConf::Swtpm(_) | TctiNameConf::Mssim(_));
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let name = tcti.to_owned();
        let open_err = |reason: String| TpmError::Open {
            tcti: tcti.to_owned(),
            reason,
        };
        std::thread::Builder::new()
            .name("ferry-tpm".into())
            .spawn(move || {
                let ctx = Context::new(conf).and_then(|mut ctx| {
                    // A context can be created without talking to the TPM: ask it something.
                    ctx.get_tpm_property(tss_esapi::constants::PropertyTag::Manufacturer)?;
                    Ok(ctx)
                });
                let ctx = match ctx {
                    Ok(ctx) => ctx,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let mut st = TpmThread {
                    tcti: name,
                    ctx,
                    primary: None,
                    loaded: None,
                };
                if shared_by_nobody {
                    st.flush_stale_transients();
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = rx.recv() {
                    job(&mut st);
                }
                st.flush_all();
            })
            .map_err(|e| open_err(format!("cannot start the TPM thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tcti: tcti.to_owned(),
                jobs,
            }),
            Ok(Err(reason)) => Err(open_err(reason)),
            Err(_) => Err(open_err("the TPM thread died while opening".into())),
        }
    }

    /// The TCTI this TPM was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Runs `f` on the TPM thread and waits for its result. Blocking: never call it from an
    /// async worker (use `spawn_blocking`).
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut TpmThread) -> T + Send + 'static,
    ) -> Result<T, TpmError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let stopped = || TpmError::Stopped {
            tcti: self.tcti.clone(),
        };
        self.jobs
            .send(Box::new(move |st| {
                let _ = tx.send(f(st));
            }))
            .map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_and_unreachable_tctis_are_named() {
        let e = Tpm::open("carrier-pigeon").unwrap_err().to_string();
        assert!(
            e.contains("carrier-pigeon") && e.contains("swtpm:host="),
            "{e}"
        );
        // Nothing listens on port 1.
        let e = Tpm::open("swtpm:host=127.0.0.1,port=1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot open the TPM at TCTI swtpm:host=127.0.0.1,port=1"),
            "{e}"
        );
    }
}
