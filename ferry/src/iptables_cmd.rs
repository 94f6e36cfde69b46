//! `ferry iptables`: installs the capture rules of an injected sidecar in the current
//! network namespace (the init container's job), with istio-iptables' flags.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use iptables::{Applied, Backend, RawOptions, Runner};

/// `ferry iptables ...` (flags compatible with istio-iptables where they overlap).
#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// The capture flags (validated by the `iptables` crate before anything is touched).
    #[command(flatten)]
    pub rules: RawOptions,
    /// Which tool writes the rules; `auto` picks nftables when `nft` works here.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Where --redirect-dns finds the nameservers to capture.
    #[arg(long, default_value = "/etc/resolv.conf", value_name = "PATH")]
    pub resolv_conf: PathBuf,
    /// Print the exact input the tool would be given; change nothing.
    #[arg(long, conflicts_with_all = ["cleanup", "verify"])]
    pub dry_run: bool,
    /// Remove the profile's chains/table (and the jumps into them), nothing else.
    #[arg(long, conflicts_with = "verify")]
    pub cleanup: bool,
    /// Read the installed rules back and compare; exit non-zero on a difference.
    #[arg(long)]
    pub verify: bool,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackendArg {
    /// nftables when `nft` works here, else iptables.
    Auto,
    /// iptables-restore / ip6tables-restore.
    Iptables,
    /// A native nft table.
    Nftables,
}

/// Runs `ferry iptables`.
pub fn run(args: &IptablesArgs) -> anyhow::Result<()> {
    let runner = Runner::host();
    if args.cleanup {
        // Only the profile's names matter: every flag but --profile is irrelevant here.
        let names = RawOptions {
            profile: args.rules.profile.clone(),
            ..RawOptions::default()
        };
        let rules = iptables::profile::build(&names.validate(&args.resolv_conf)?);
        let backends: Vec<Backend> = match args.backend {
            BackendArg::Iptables => vec![Backend::Iptables],
            BackendArg::Nftables => vec![Backend::Nftables],
            BackendArg::Auto => [Backend::Nftables, Backend::Iptables]
                .into_iter()
                .filter(|b| runner.has(tool(*b)))
                .collect(),
        };
        for b in backends {
            let removed = iptables::cleanup(&rules, b, &runner)
                .with_context(|| format!("removing the {} rules ({})", rules.profile, b.name()))?;
            println!(
                "{}: {}",
                b.name(),
                if removed {
                    format!("removed the {} rules", rules.profile)
                } else {
                    "nothing of ferry's installed".to_owned()
                }
            );
        }
        return Ok(());
    }
    let opts = args.rules.validate(&args.resolv_conf)?;
    let rules = iptables::profile::build(&opts);
    let backend = match args.backend {
        BackendArg::Iptables => Backend::Iptables,
        BackendArg::Nftables => Backend::Nftables,
        BackendArg::Auto if args.dry_run => Backend::Nftables,
        BackendArg::Auto => iptables::apply::detect(&runner),
    };
    if args.dry_run {
        print!("{}", iptables::apply::render(&rules, backend));
        return Ok(());
    }
    if args.verify {
        iptables::verify(&rules, backend, &runner)?;
        println!(
            "{}: the {} rules are installed as expected",
            backend.name(),
            rules.profile
        );
        return Ok(());
    }
    let applied = iptables::apply(&rules, backend, &runner)
        .with_context(|| format!("applying the {} rules ({})", rules.profile, backend.name()))?;
    if let Err(e) = iptables::verify(&rules, backend, &runner) {
        bail!("the rules were applied but read back differently (left in place): {e}");
    }
    println!(
        "{}: {} rules {}",
        backend.name(),
        rules.profile,
        match applied {
            Applied::Changed => "applied and verified",
            Applied::Unchanged => "already installed; nothing changed",
        }
    );
    Ok(())
}

fn tool(b: Backend) -> &'static str {
    match b {
        Backend::Iptables => "iptables-save",
        Backend::Nftables => "nft",
    }
}
