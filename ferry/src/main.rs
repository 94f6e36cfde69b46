//! The `ferry` command: argument parsing and wiring only. Every behaviour lives in the
//! library crates, where tests reach it.

mod admin;
mod agent;
mod ca;
mod cli;
mod config_cmd;
mod dns_cmd;
mod export_cmd;
mod gateway_cmd;
mod logging;
mod proxy_cmd;
mod readiness;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = logging::init(cli.log_level.as_str(), cli.log_format) {
        eprintln!("ferry: {e:#}");
        return std::process::ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cmd: cli::Command) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        cli::Command::Config(c) => config_cmd::run(c),
        cli::Command::Export(e) => export_cmd::run(e),
        cli::Command::Agent(a) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(agent::run(a))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        cli::Command::Dns(d) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(dns_cmd::run(d))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        cli::Command::Gateway(g) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(gateway_cmd::run(g))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        cli::Command::Proxy(p) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(proxy_cmd::run(*p))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
