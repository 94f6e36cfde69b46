//! The agent's CA, opened from the `ca` section of its config: the mapping from config to
//! [`attest::AuthorityConfig`] lives here so that `attest` reads no config files.

use std::sync::Arc;

use anyhow::Context;
use attest::{Authority, AuthorityConfig};
use registry::config::{AgentConfig, CaBackend};

/// The CA settings an agent config asks for.
pub fn settings(agent: &AgentConfig) -> AuthorityConfig {
    AuthorityConfig::new(
        agent.trust_domain.clone(),
        agent.ca.state_dir.clone(),
        agent.ca.ca_ttl,
    )
}

/// Opens (or creates) the configured CA. Blocking (key generation, file I/O): call it from
/// `spawn_blocking` or before the servers start.
pub fn open(agent: &AgentConfig) -> anyhow::Result<Arc<Authority>> {
    let settings = settings(agent);
    let keys = match agent.ca.backend {
        CaBackend::Software => settings.software_keys(),
        CaBackend::Tpm => anyhow::bail!(
            "ca.backend: tpm is not built yet (the TPM signer arrives with the TPM issue); set ca.backend: software"
        ),
    };
    let dir = settings.state_dir.display().to_string();
    Authority::open(settings, keys).with_context(|| format!("cannot open the CA in {dir}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm_backend_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.yaml");
        std::fs::write(
            &p,
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: example.org\nca:\n  backend: tpm\n",
        )
        .unwrap();
        let cfg = registry::config::load(&p).unwrap().config;
        let err = open(&cfg.agent).unwrap_err().to_string();
        assert!(err.contains("ca.backend: tpm"), "{err}");
    }
}
