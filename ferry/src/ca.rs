//! The agent's CA, opened from the `ca` section of its config: the mapping from config to
//! [`attest::AuthorityConfig`] lives here so that `attest` reads no config files.
//!
//! With `ca.backend: tpm` every CA key (root, node CA intermediate, JWT keys) is created in
//! the TPM at `ca.tpm.tcti`, as wrapped blobs under `<stateDir>/tpm-keys`; by default
//! (`ca.issuance: issuing-ca`) the TPM-held intermediate certifies a short-lived in-memory
//! issuing CA that signs SVIDs. A TPM that cannot be opened stops the agent unless
//! `ca.fallback: software` says otherwise.
//!
//! With `ca.role: root` the agent also verifies TPM nodes (the node-attestation API) and
//! writes its trust bundle for them; with `ca.role: node` its node CA key is certified by
//! that root after TPM attestation, at start and again before the node CA expires.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use attest::node_attest::client::TpmUpstream;
use attest::node_attest::grpc::{self, NodeAttestationService};
use attest::node_attest::{AuditLog, ManufacturerCas, Verifier};
use attest::tpm::{Tpm, TpmKeyStore};
use attest::{Authority, AuthorityConfig, Hierarchy, IssuanceMode, KeyStore};
use registry::config::{AgentConfig, CaBackend, CaFallback, CaIssuance, CaRole};
use tokio_util::sync::CancellationToken;

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

/// Where a root writes its trust bundle (PEM) for operators to hand to nodes as
/// `ca.upstreamBundle`.
pub fn root_bundle_path(agent: &AgentConfig) -> PathBuf {
    agent.ca.state_dir.join(ROOT_BUNDLE_FILE)
}

/// The file name of [`root_bundle_path`].
pub const ROOT_BUNDLE_FILE: &str = "trust-bundle.pem";

/// Opens (or creates) the configured CA. Blocking (key generation, TPM commands, file
/// I/O, and for `ca.role: node` the attestation with the root): call it from
/// `spawn_blocking` or before the servers start.
pub fn open(agent: &AgentConfig) -> anyhow::Result<Arc<Authority>> {
    let settings = settings(agent);
    let dir = settings.state_dir.display().to_string();
    if agent.ca.role == CaRole::Node {
        return open_node(agent, settings).with_context(|| {
            format!(
                "cannot open the node CA in {dir} (ca.role: node, upstream {})",
                agent.ca.upstream.as_deref().unwrap_or("-")
            )
        });
    }
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
    let hierarchy = match agent.ca.role {
        CaRole::Root => Hierarchy::Root,
        _ => Hierarchy::Standalone,
    };
    let ca = Authority::open_in(settings, keys, mode, hierarchy)
        .with_context(|| format!("cannot open the CA in {dir}"))?;
    if agent.ca.role == CaRole::Root {
        write_root_bundle(agent, &ca)?;
    }
    Ok(ca)
}

/// A node: the CA key in the TPM, certified by the root after attestation. There is no
/// software fallback: a node CA the root would certify must live in a TPM.
fn open_node(
    agent: &AgentConfig,
    settings: attest::AuthorityConfig,
) -> anyhow::Result<Arc<Authority>> {
    let (Some(url), Some(bundle)) = (&agent.ca.upstream, &agent.ca.upstream_bundle) else {
        anyhow::bail!("ca.role: node needs ca.upstream and ca.upstreamBundle");
    };
    let tpm = Tpm::open(&agent.ca.tpm_tcti).map(Arc::new).context(
        "ca.role: node needs a reachable TPM (ca.fallback: software does not apply: the root certifies only TPM-held node CAs)",
    )?;
    let keys = TpmKeyStore::new(tpm, tpm_keys_dir(agent));
    let upstream = TpmUpstream::new(url, &agent.trust_domain, bundle, keys.clone())?;
    Ok(Authority::open_in(
        settings,
        Arc::new(keys),
        issuance(agent),
        Hierarchy::Node(Arc::new(upstream)),
    )?)
}

/// Writes the root's current bundle to [`root_bundle_path`] (atomically: a node being
/// provisioned never reads half a file).
pub fn write_root_bundle(agent: &AgentConfig, ca: &Authority) -> anyhow::Result<()> {
    let pem: String = ca
        .x509_authorities()
        .iter()
        .map(|d| attest::x509::pem_encode("CERTIFICATE", d))
        .collect();
    let path = root_bundle_path(agent);
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write the trust bundle {}", path.display()))
}

/// With `ca.role: root`: the node-attestation API (gRPC over TLS on
/// `ca.nodeAttestation.listen`), bound now so a port conflict stops the agent at start.
/// Also keeps [`root_bundle_path`] current as roots rotate. `None` for other roles.
pub async fn node_attestation_server(
    agent: &AgentConfig,
    authority: &Arc<Authority>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<impl Future<Output = anyhow::Result<()>> + use<>>> {
    let (CaRole::Root, Some(na)) = (agent.ca.role, &agent.ca.node_attestation) else {
        return Ok(None);
    };
    let cas = ManufacturerCas::from_pem_files(&na.manufacturer_cas)
        .context("ca.nodeAttestation.manufacturerCas")?;
    let audit = AuditLog::in_dir(&agent.ca.state_dir);
    tracing::info!(listen = %na.listen, manufacturer_cas = cas.len(), audit = %audit.path().display(), "node attestation enabled");
    let verifier = Arc::new(Verifier::new(cas, Some(audit)));
    let service = NodeAttestationService::new(verifier, Arc::clone(authority), na.node_ca_ttl);
    let tls = attest::node_attest::tls::server_config(Arc::clone(authority))?;
    let listener = tokio::net::TcpListener::bind(na.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for node attestation on {} (ca.nodeAttestation.listen)",
                na.listen
            )
        })?;
    let (agent, ca) = (agent.clone(), Arc::clone(authority));
    Ok(Some(async move {
        let mut changes = ca.subscribe();
        let stop = shutdown.clone();
        let bundles = async move {
            while changes.changed().await.is_ok() {
                if let Err(e) = write_root_bundle(&agent, &ca) {
                    tracing::error!(error = %format!("{e:#}"), "cannot update the trust bundle file");
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            res = grpc::serve(listener, service, tls, shutdown) => res.context("node attestation server"),
            () = bundles => Ok(()),
            () = stop.cancelled() => Ok(()),
        }
    }))
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
    fn a_node_without_its_tpm_is_refused_naming_why() {
        let cfg = agent(
            "  backend: tpm\n  role: node\n  upstream: https://127.0.0.1:1\n  upstreamBundle: /nonexistent.pem\n  tpm:\n    tcti: swtpm:host=127.0.0.1,port=1\n",
        );
        let err = format!("{:#}", open(&cfg).unwrap_err());
        assert!(
            err.contains("ca.role: node needs a reachable TPM")
                && err.contains("swtpm:host=127.0.0.1,port=1")
                && err.contains("https://127.0.0.1:1"),
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
