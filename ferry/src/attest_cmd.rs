//! `ferry attest info` and `ferry ca init`: what an operator runs before and after switching
//! an agent to `ca.backend: tpm` — is the TPM there, who made it, does it carry an EK
//! certificate, does the CA key exist in it — and creating a CA ahead of the first start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use attest::CaCert;
use attest::tpm::{Tpm, TpmInfo, TpmKeyStore};
use clap::{Args, Subcommand};
use registry::config::{AgentConfig, CaBackend};

/// `ferry attest ...`
#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Show the TPM: manufacturer, vendor, firmware, EK certificate subject and issuer, and
    /// (with --config) whether the CA keys under ca.stateDir exist and load in this TPM.
    /// A TCTI that cannot be opened is an error naming it.
    Info(InfoArgs),
}

/// Arguments of `ferry attest info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The TPM to ask (`device:/dev/tpmrm0`, `tabrmd`, `swtpm:host=H,port=P`); default:
    /// the config's ca.tpm.tcti, else device:/dev/tpmrm0.
    #[arg(long)]
    pub tcti: Option<String>,
    /// An agent config whose ca.stateDir holds the CA's TPM key blobs.
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the trust domain's CA (root, intermediate, JWT keys) under ca.stateDir with
    /// the configured backend, or load the existing one, and print the root fingerprints
    /// to distribute. With ca.backend: tpm the keys are created in the TPM.
    Init(InitArgs),
}

/// Arguments of `ferry ca init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The agent config (its ca section and trustDomain).
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: PathBuf,
}

fn load(path: &Path) -> anyhow::Result<AgentConfig> {
    Ok(registry::config::load(path)
        .with_context(|| format!("cannot load {}", path.display()))?
        .config
        .agent)
}

/// Runs `ferry attest ...`.
pub fn run_attest(cmd: AttestCommand) -> anyhow::Result<ExitCode> {
    let AttestCommand::Info(args) = cmd;
    let agent = args.config.as_deref().map(load).transpose()?;
    let tcti = args
        .tcti
        .clone()
        .or_else(|| agent.as_ref().map(|a| a.ca.tpm_tcti.clone()))
        .unwrap_or_else(|| "device:/dev/tpmrm0".to_owned());
    let tpm = Arc::new(Tpm::open(&tcti)?);
    let info = TpmInfo::read(&tpm)?;
    let keys = match &agent {
        Some(a) => ca_keys(a, &tpm)?,
        None => Vec::new(),
    };
    if args.json {
        let v = serde_json::json!({ "tpm": info, "caKeys": keys.iter().map(|k| serde_json::json!({
            "name": k.name, "blob": k.blob, "loads": k.error.is_none(), "error": k.error, "publicKeySha256": k.public_sha256,
        })).collect::<Vec<_>>() });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{info}");
        if let Some(a) = &agent {
            if keys.is_empty() {
                println!(
                    "CA keys:       none in {} (the agent or `ferry ca init` creates them)",
                    crate::ca::tpm_keys_dir(a).display()
                );
            } else {
                println!("CA keys:");
                for k in &keys {
                    match &k.error {
                        None => println!(
                            "  {}: loads in this TPM, public key sha256 {} (blob {})",
                            k.name, k.public_sha256, k.blob
                        ),
                        Some(e) => println!("  {}: DOES NOT LOAD: {e} (blob {})", k.name, k.blob),
                    }
                }
            }
        }
    }
    Ok(if keys.iter().any(|k| k.error.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

struct KeyReport {
    name: String,
    blob: String,
    public_sha256: String,
    error: Option<String>,
}

/// Every `.tpmkey` blob in the config's state dir, and whether it loads in `tpm`.
fn ca_keys(agent: &AgentConfig, tpm: &Arc<Tpm>) -> anyhow::Result<Vec<KeyReport>> {
    let dir = crate::ca::tpm_keys_dir(agent);
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".tpmkey"))
                    .map(str::to_owned)
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    names.sort();
    let store = TpmKeyStore::new(Arc::clone(tpm), &dir);
    Ok(names
        .into_iter()
        .map(|name| {
            let blob = dir.join(format!("{name}.tpmkey")).display().to_string();
            match store.load_tpm(&name) {
                Ok(k) => KeyReport {
                    public_sha256: k.public_key_sha256(),
                    name,
                    blob,
                    error: None,
                },
                Err(e) => KeyReport {
                    name,
                    blob,
                    public_sha256: String::new(),
                    error: Some(e.to_string()),
                },
            }
        })
        .collect())
}

/// Runs `ferry ca ...`.
pub fn run_ca(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    let CaCommand::Init(args) = cmd;
    let agent = load(&args.config)?;
    let ca = crate::ca::open(&agent)?;
    println!(
        "CA for trust domain {} in {} (backend {}{})",
        agent.trust_domain,
        agent.ca.state_dir.display(),
        agent.ca.backend,
        if agent.ca.backend == CaBackend::Tpm {
            format!(", TCTI {}", agent.ca.tpm_tcti)
        } else {
            String::new()
        }
    );
    for der in ca.x509_authorities() {
        let cert = CaCert::from_der(der)?;
        println!(
            "root CA serial {} sha256 {}",
            cert.serial,
            cert.sha256_fingerprint()
        );
    }
    Ok(ExitCode::SUCCESS)
}
