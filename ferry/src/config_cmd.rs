//! `ferry config check` and `ferry config vips`.

use std::fmt::Write as _;
use std::process::ExitCode;

use registry::config::{Config, ConfigError, Loaded, ServerIdentity, load};

use crate::cli::ConfigCommand;

/// Runs a `ferry config` subcommand; invalid config is reported on stderr with exit code 1.
pub fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    let (args, vips_only) = match &cmd {
        ConfigCommand::Check(a) => (a, false),
        ConfigCommand::Vips(a) => (a, true),
    };
    let Loaded { config, warnings } = match load(&args.config) {
        Ok(l) => l,
        Err(ConfigError::Invalid { file, errors }) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "{}: {} error(s), config rejected",
                file.display(),
                errors.len()
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let out = match (vips_only, args.json) {
        (false, false) => summary(&config),
        (true, false) => vips(&config),
        (false, true) => serde_json::to_string_pretty(&config)? + "\n",
        (true, true) => {
            let map: std::collections::BTreeMap<_, _> = config
                .services
                .iter()
                .map(|s| (s.hostname.clone(), s.vip.to_string()))
                .collect();
            serde_json::to_string_pretty(&map)? + "\n"
        }
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn summary(c: &Config) -> String {
    let mut s = String::new();
    let a = &c.agent;
    let feds: Vec<String> = c
        .federated_trust_domains()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let _ = writeln!(s, "trust domain:            {}", a.trust_domain);
    let _ = writeln!(
        s,
        "federated trust domains: {}",
        if feds.is_empty() {
            "(none)".to_owned()
        } else {
            feds.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "xds: {}  workload API: {}  dns: {}",
        a.listen.xds, a.listen.workload_api, a.listen.dns
    );
    let _ = writeln!(s, "CA: {} in {}", a.ca.backend, a.ca.state_dir.display());
    let _ = writeln!(
        s,
        "registration entries:    {}",
        a.registration_entries.len()
    );
    let _ = writeln!(s, "federated services:      {}", c.services.len());
    for svc in &c.services {
        let _ = writeln!(s, "  {}:{}", svc.hostname, svc.port);
        let _ = writeln!(s, "    tlsMode:  {}", svc.tls_mode);
        let _ = writeln!(s, "    vip:      {}", svc.vip);
        let ids = match &svc.server_identity {
            ServerIdentity::Exact(ids) => ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            ServerIdentity::AnyInTrustDomain => format!("any in {}", svc.server_trust_domain),
        };
        let _ = writeln!(s, "    server:   {ids}");
        if svc.gateways.is_empty() {
            let _ = writeln!(s, "    gateways: (none yet)");
        }
        for g in &svc.gateways {
            let _ = writeln!(s, "    gateway:  {} {}:{}", g.kind, g.address, g.port);
        }
    }
    s
}

fn vips(c: &Config) -> String {
    let width = c
        .services
        .iter()
        .map(|s| s.hostname.len())
        .max()
        .unwrap_or(0);
    c.services
        .iter()
        .map(|s| format!("{:width$}  {}\n", s.hostname, s.vip))
        .collect()
}
