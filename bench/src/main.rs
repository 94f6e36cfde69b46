//! `ferry-bench`: runs ferry and stock Envoy side by side on the same workload, in the same
//! run, starting every process itself on loopback, and prints the figures as Markdown
//! tables (the README quotes them) and JSON (`bench/results/<scenario>.json`).
//!
//! ```sh
//! cargo build --release -p ferry -p bench
//! ./target/release/ferry-bench throughput
//! ./target/release/ferry-bench dns
//! ```

mod dns;
mod dnsperf;
mod load;
mod mesh;
mod procs;
mod report;
mod scenarios;

use clap::{Parser, Subcommand};

use crate::scenarios::{Common, ConnectionsArgs, LatencyArgs, ThroughputArgs};

/// Name prefix of the load generator's threads (their CPU is reported).
pub const GEN_THREADS: &str = "bench-gen";
/// Name prefix of the sink/echo/TLS servers' threads.
pub const SRV_THREADS: &str = "bench-srv";

/// ferry against stock Envoy, same machine, same run.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", version)]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Bulk transfer, 1 and 8 connections, IstioMtls and Mtls: Gbit/s and CPU per GB.
    Throughput(ThroughputArgs),
    /// 1 KiB request/response at max and fixed rate: percentiles and what each proxy adds over direct.
    Latency(LatencyArgs),
    /// New connections per second, a full mTLS handshake at the proxy each (IstioMtls).
    Connections(ConnectionsArgs),
    /// throughput, latency and connections with their defaults on one topology.
    All(Common),
    /// dnsperf against `ferry dns` and Envoy's dns_filter: federated and forwarded names.
    Dns(dns::Args),
}

fn runtime(name: &'static str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let generator = runtime(GEN_THREADS, 2)?;
    if let What::Dns(a) = cli.what {
        return generator.block_on(dns::run(a));
    }
    let servers = runtime(SRV_THREADS, 2)?;
    let common = match &cli.what {
        What::Throughput(a) => &a.common,
        What::Latency(a) => &a.common,
        What::Connections(a) => &a.common,
        What::All(c) => c,
        What::Dns(_) => unreachable!("handled above"),
    };
    let opts = mesh::Options {
        ferry: procs::ferry_binary()?,
        envoy: procs::envoy_binary(common.envoy.as_deref())?,
        envoy_concurrency: common.envoy_concurrency,
        server_cipher_order: common.server_cipher_order,
    };
    // `all` writes each scenario to its default path and the whole set to `--json`.
    let single_json = match &cli.what {
        What::All(_) => None,
        _ => common.json.clone(),
    };
    let handle = servers.handle().clone();
    generator.block_on(async move {
        eprintln!("starting direct, ferry and Envoy on loopback ...");
        let m = mesh::Mesh::start(&opts, &handle).await?;
        let reports = match cli.what {
            What::Throughput(a) => vec![scenarios::throughput(&m, &a).await?],
            What::Latency(a) => vec![scenarios::latency(&m, &a).await?],
            What::Connections(a) => vec![scenarios::connections(&m, &a).await?],
            What::All(c) => {
                let json = c.json.clone();
                let c = Common { json: None, ..c };
                let t = ThroughputArgs {
                    common: c.clone(),
                    connections: vec![1, 8],
                };
                let l = LatencyArgs {
                    common: c.clone(),
                    connections: 1,
                    size: 1024,
                    rates: vec![0.0, 1000.0],
                };
                let k = ConnectionsArgs {
                    common: c,
                    connections: 8,
                };
                let r = vec![
                    scenarios::throughput(&m, &t).await?,
                    scenarios::latency(&m, &l).await?,
                    scenarios::connections(&m, &k).await?,
                ];
                if let Some(path) = json {
                    let all: Vec<_> = r.iter().map(report::Report::json).collect();
                    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
                }
                r
            }
            What::Dns(_) => unreachable!("handled above"),
        };
        for r in &reports {
            println!("{}", r.table());
            let p = r.write_json(single_json.as_deref())?;
            eprintln!("wrote {}", p.display());
        }
        anyhow::Ok(())
    })?;
    servers.shutdown_background();
    Ok(())
}
