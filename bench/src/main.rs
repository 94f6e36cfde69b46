//! `ferry-bench`: runs ferry and stock Envoy side by side on the same workload, in the same
//! run, and prints the figures as a Markdown table (the README quotes them).
//!
//! ```sh
//! cargo build --release -p ferry && cargo run --release -p bench -- dns
//! ```

mod dns;
mod dnsperf;
mod procs;

use clap::{Parser, Subcommand};

/// ferry against stock Envoy, same machine, same run.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", version)]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// dnsperf against `ferry dns` and Envoy's dns_filter: federated and forwarded names.
    Dns(dns::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.what {
        What::Dns(a) => rt.block_on(dns::run(a)),
    }
}
