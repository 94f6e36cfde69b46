//! The `ferry` command: argument parsing and wiring only. Every behaviour lives in the
//! library crates, where tests reach it.

mod admin;
mod agent;
mod attest_cmd;
mod bench_cmd;
mod ca;
mod cli;
mod config_cmd;
mod demo;
mod dns_cmd;
mod export_cmd;
mod gateway_cmd;
mod iptables_cmd;
mod logging;
mod proxy_cmd;
mod readiness;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // The demo prints its own lines; its log stays quiet unless asked.
    let level = match &cli.command {
        cli::Command::Demo(_) if cli.log_level == "info" => "warn",
        _ => cli.log_level.as_str(),
    };
    // Held to the end of main: dropping it flushes the log lines still queued.
    let _log = match logging::init(level, cli.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
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
        cli::Command::Iptables(i) => {
            iptables_cmd::run(&i).map(|()| std::process::ExitCode::SUCCESS)
        }
        cli::Command::Attest(a) => attest_cmd::run_attest(a),
        cli::Command::Ca(c) => attest_cmd::run_ca(c),
        cli::Command::Bench(b) => bench_cmd::run(&b.args),
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
        cli::Command::Demo(d) => {
            let rt = tokio::runtime::Runtime::new()?;
            let ok = rt.block_on(demo::run(d))?;
            Ok(if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
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
