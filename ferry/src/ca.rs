//! The agent's CA, opened from the `ca` section of its config: the mapping from config to
//! [`attest::AuthorityConfig`] lives here so that `attest` reads no config files.
//!
//! With `ca.backend: tpm` every CA key (root, node CA intermediate, JWT keys) is created in
//! the TPM at `ca.tpm.tcti`, as wrapped blobs under `<stateDir>/tpm-keys`; by default
//! (`ca.issuance: issuing-ca`) the TPM-held intermediate certifies a short-lived in-memory
//! issuing CA that signs SVIDs. A TPM that cannot be opened stops the agent unless
//! `ca.fallback: software` says otherwise.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use attest::tpm::{Tpm, TpmKeyStore};
use attest::{Authority, AuthorityConfig, IssuanceMode, KeyStore};
use registry::config::{AgentConfig, CaBackend, CaFallback, CaIssuance, CaRole};

/// The CA settings an agent config asks for.
pub fn settings(agent: &AgentConfig) -> AuthorityConfig {
    AuthorityConfig::new(
        agent.trust_domain.clone(),
        agent.ca.state_dir.clone(),
        agent.ca.ca_ttl,
    )
}

/// Where TPM key blobs live in the CA state dir.
pub fn tpm_keys_dir(agent: &AgentConfig) -> PathBuf {
    agent.ca.state_dir.join("tpm-keys")
}

/// How long each in-memory issuing CA lives: four SVID lifetimes (so renewing at half-life
/// never cuts an SVID short), at least ten minutes, at most the intermediate's lifetime.
pub fn issuing_ttl(agent: &AgentConfig) -> Duration {
    (agent.ca.svid_ttl * 4)
        .max(Duration::from_secs(600))
        .min(agent.ca.ca_ttl)
}

/// The issuance mode the config asks for (software keys always sign directly: they are
/// fast, and their roots allow no extra CA level).
pub fn issuance(agent: &AgentConfig) -> IssuanceMode {
    match (agent.ca.backend, agent.ca.issuance) {
        (CaBackend::Tpm, CaIssuance::IssuingCa) => IssuanceMode::IssuingCa {
            ttl: issuing_ttl(agent),
        },
        _ => IssuanceMode::Direct,
    }
}

/// Opens the TPM the config names, with an error that names the TCTI and what to do.
pub fn open_tpm(agent: &AgentConfig) -> anyhow::Result<Arc<Tpm>> {
    Tpm::open(&agent.ca.tpm_tcti)
        .map(Arc::new)
        .context("ca.backend: tpm needs a reachable TPM (set ca.tpm.tcti to the right TPM, or ca.fallback: software to run without one)")
}

/// Opens (or creates) the configured CA. Blocking (key generation, TPM commands, file
/// I/O): call it from `spawn_blocking` or before the servers start.
pub fn open(agent: &AgentConfig) -> anyhow::Result<Arc<Authority>> {
    if agent.ca.role != CaRole::Standalone {
        anyhow::bail!(
            "ca.role: {:?} (TPM node attestation between a root and its nodes) is not available in this build; use ca.role: standalone",
            agent.ca.role
        );
    }
    let settings = settings(agent);
    let (keys, mode): (Arc<dyn KeyStore>, _) = match agent.ca.backend {
        CaBackend::Software => (settings.software_keys(), IssuanceMode::Direct),
        CaBackend::Tpm => match open_tpm(agent) {
            Ok(tpm) => (
                Arc::new(TpmKeyStore::new(tpm, tpm_keys_dir(agent))),
                issuance(agent),
            ),
            Err(e) if agent.ca.fallback == CaFallback::Software => {
                tracing::warn!(tcti = %agent.ca.tpm_tcti, error = %format!("{e:#}"), "no usable TPM: ca.fallback: software, running with software CA keys");
                (settings.software_keys(), IssuanceMode::Direct)
            }
            Err(e) => return Err(e),
        },
    };
    let dir = settings.state_dir.display().to_string();
    Authority::open_with_mode(settings, keys, mode)
        .with_context(|| format!("cannot open the CA in {dir}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(ca: &str) -> AgentConfig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.yaml");
        std::fs::write(
            &p,
            format!("apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: example.org\nca:\n  stateDir: {}\n{ca}", dir.path().join("ca").display()),
        )
        .unwrap();
        let cfg = registry::config::load(&p).unwrap().config.agent;
        std::mem::forget(dir);
        cfg
    }

    #[test]
    fn unreachable_tpm_is_refused_naming_the_tcti() {
        let cfg = agent("  backend: tpm\n  tpm:\n    tcti: swtpm:host=127.0.0.1,port=1\n");
        let err = format!("{:#}", open(&cfg).unwrap_err());
        assert!(
            err.contains("swtpm:host=127.0.0.1,port=1") && err.contains("ca.fallback: software"),
            "{err}"
        );
    }

    #[test]
    fn software_fallback_is_explicit() {
        let cfg = agent(
            "  backend: tpm\n  fallback: software\n  tpm:\n    tcti: swtpm:host=127.0.0.1,port=1\n",
        );
        let ca = open(&cfg).unwrap();
        assert_eq!(ca.x509_authorities().len(), 1);
    }

    #[test]
    fn issuing_ca_lifetime_covers_svids() {
        let cfg = agent("  backend: tpm\n  svidTtl: 1h\n  caTtl: 24h\n");
        assert_eq!(
            issuance(&cfg),
            IssuanceMode::IssuingCa {
                ttl: Duration::from_secs(4 * 3600)
            }
        );
        let cfg = agent("  backend: tpm\n  issuance: direct\n");
        assert_eq!(issuance(&cfg), IssuanceMode::Direct);
        assert_eq!(issuance(&agent("")), IssuanceMode::Direct);
    }
}
