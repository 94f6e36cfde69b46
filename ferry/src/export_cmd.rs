//! `ferry export`: the Istio objects a serving zone applies, from `registry::istio_export`.

use std::process::ExitCode;

use registry::config::{ConfigError, Loaded, load};
use registry::istio_export::{ExportOptions, export, own_services, to_yaml};

use crate::cli::ExportArgs;

/// Prints the YAML on stdout; an invalid config or a service that cannot be exported is
/// reported on stderr (every problem) with exit code 1.
pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
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
    let opts = ExportOptions {
        gateway_namespace: args.namespace_of_gateway,
        gateway_selector: args.gateway_selector,
        gateway_port: args.gateway_port,
    };
    let objs = match export(&config, &opts) {
        Ok(o) => o,
        Err(errors) => {
            for e in &errors {
                eprintln!("ferry export: {e}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    if own_services(&config).next().is_none() {
        eprintln!(
            "ferry export: no FederatedService of trust domain {} in {} (imported services, with another ferry.dev/trust-domain, are not exported)",
            config.agent.trust_domain,
            args.config.display()
        );
    }
    print!("{}", to_yaml(&objs)?);
    Ok(ExitCode::SUCCESS)
}
