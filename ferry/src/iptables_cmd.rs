//! `ferry iptables`: installs the capture rules of an injected sidecar in the current
//! network namespace (the init container's job), with istio-iptables' flags.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use iptables::{Applied, Backend, RawOptions, Runner};

/// `ferry iptables ...` (flags compatible with istio-iptables where they overlap).
#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// Rule set: `cofide` (spiffe-enable's: uid 1337 returns, DNS to 15053, all loopback
    /// TCP to 10000) or `istio` (istio-iptables REDIRECT mode).
    #[arg(long, value_enum, default_value = "cofide")]
    pub profile: ProfileArg,
    /// Which tool writes the rules; `auto` picks nftables when `nft` works here.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// The proxy's outbound capture port [default: 10000 (cofide), 15001 (istio)].
    #[arg(short = 'p', long = "envoy-port", value_name = "PORT")]
    pub proxy_port: Option<String>,
    /// Inbound capture port [istio; default: 15006].
    #[arg(short = 'z', long = "inbound-capture-port", value_name = "PORT")]
    pub inbound_port: Option<String>,
    /// Uid(s) whose traffic is never captured, comma-separated [default: 1337].
    #[arg(short = 'u', long = "proxy-uid", value_name = "UID")]
    pub proxy_uid: Option<String>,
    /// Gid(s) whose traffic is never captured [istio; default: 1337].
    #[arg(short = 'g', long = "proxy-gid", value_name = "GID")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode; only REDIRECT is supported [istio].
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        value_name = "MODE"
    )]
    pub inbound_mode: Option<String>,
    /// Inbound ports to capture, comma-separated, or `*` for all [istio; default: none].
    #[arg(short = 'b', long = "istio-inbound-ports", value_name = "PORTS")]
    pub inbound_ports: Option<String>,
    /// Inbound ports not captured when `-b '*'` [istio].
    #[arg(short = 'd', long = "istio-local-exclude-ports", value_name = "PORTS")]
    pub inbound_ports_exclude: Option<String>,
    /// Outbound CIDRs to capture, or `*` [istio; default: `*`].
    #[arg(short = 'i', long = "istio-service-cidr", value_name = "CIDRS")]
    pub outbound_cidrs: Option<String>,
    /// Outbound CIDRs never captured [istio].
    #[arg(short = 'x', long = "istio-service-exclude-cidr", value_name = "CIDRS")]
    pub outbound_cidrs_exclude: Option<String>,
    /// Outbound ports always captured [istio].
    #[arg(
        short = 'q',
        long = "istio-include-outbound-ports",
        value_name = "PORTS"
    )]
    pub outbound_ports: Option<String>,
    /// Outbound ports never captured [istio].
    #[arg(
        short = 'o',
        long = "istio-exclude-outbound-ports",
        value_name = "PORTS"
    )]
    pub outbound_ports_exclude: Option<String>,
    /// Capture DNS (udp/tcp 53 to the nameservers of --resolv-conf) to 15053 [istio;
    /// always on for cofide].
    #[arg(long)]
    pub redirect_dns: bool,
    /// With --redirect-dns: capture DNS to any server, not only resolv.conf's [istio].
    #[arg(long)]
    pub capture_all_dns: bool,
    /// Install IPv6 rules too [istio; cofide always has its ::1 rule].
    #[arg(long)]
    pub dual_stack: bool,
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

/// `--profile`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProfileArg {
    /// spiffe-enable's rule set.
    Cofide,
    /// istio-iptables REDIRECT mode.
    Istio,
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

impl IptablesArgs {
    fn raw(&self) -> RawOptions {
        RawOptions {
            profile: Some(
                match self.profile {
                    ProfileArg::Cofide => "cofide",
                    ProfileArg::Istio => "istio",
                }
                .to_owned(),
            ),
            proxy_port: self.proxy_port.clone(),
            inbound_port: self.inbound_port.clone(),
            proxy_uid: self.proxy_uid.clone(),
            proxy_gid: self.proxy_gid.clone(),
            inbound_mode: self.inbound_mode.clone(),
            inbound_ports: self.inbound_ports.clone(),
            inbound_ports_exclude: self.inbound_ports_exclude.clone(),
            outbound_cidrs: self.outbound_cidrs.clone(),
            outbound_cidrs_exclude: self.outbound_cidrs_exclude.clone(),
            outbound_ports: self.outbound_ports.clone(),
            outbound_ports_exclude: self.outbound_ports_exclude.clone(),
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            dual_stack: self.dual_stack,
        }
    }
}

/// Runs `ferry iptables`.
pub fn run(args: &IptablesArgs) -> anyhow::Result<()> {
    let runner = Runner::host();
    if args.cleanup {
        // Only the profile's names matter: every flag but --profile is irrelevant here.
        let names = RawOptions {
            profile: args.raw().profile,
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
    let opts = args.raw().validate(&args.resolv_conf)?;
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
