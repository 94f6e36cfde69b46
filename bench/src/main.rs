//! `ferry-bench`: runs ferry and stock Envoy side by side on the same workload, in the same
//! run, starting every process itself on loopback, and prints the figures as Markdown
//! tables (the README quotes them), JSON (`bench/results/<scenario>.json`, or `--json FILE`)
//! and an SVG chart (`bench/results/<scenario>.svg`, or into `--svg DIR`). `xds` and `svid`
//! measure ferry alone (its xDS server at scale; its Workload API and CA).
//!
//! `ferry bench SCENARIO [ARGS...]` runs it through the `ferry` binary (it execs the
//! `ferry-bench` next to it, or `$FERRY_BENCH`, with `FERRY_BIN` set to itself, so the
//! figures are of that very build):
//!
//! ```sh
//! cargo build --release -p ferry -p bench
//! ./target/release/ferry bench throughput
//! ./target/release/ferry bench memory --connections 1000,10000
//! ./target/release/ferry bench all
//! ./target/release/ferry bench dns
//! ./target/release/ferry bench xds --services 10000 --streams 100
//! ./target/release/ferry bench svid --duration 5
//! ./target/release/ferry bench --help
//! ```
//!
//! `./target/release/ferry-bench ...` is the same harness run directly (it measures
//! `$FERRY_BIN`, else `target/release/ferry`).

mod chart;
mod dns;
mod dnsperf;
mod load;
mod mesh;
mod procs;
mod report;
mod scenarios;
mod svid;
mod xds;

use clap::{Parser, Subcommand};

use crate::scenarios::{Common, ConnectionsArgs, LatencyArgs, MemoryArgs, ThroughputArgs};

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
    /// Proxy RSS idle and with 1,000 and 10,000 idle connections held open through it.
    Memory(MemoryArgs),
    /// throughput, latency, connections and memory with their defaults on one topology
    /// (memory's sizes lowered to what RLIMIT_NOFILE allows), then xds, svid and dns.
    All(Common),
    /// dnsperf against `ferry dns` and Envoy's dns_filter: federated and forwarded names.
    Dns(dns::Args),
    /// ferry's xDS server with N services and S ADS streams (SotW, Delta): full sync, change
    /// fan-out latency, server RSS.
    Xds(xds::Args),
    /// The Workload API of a real `ferry agent` (FetchX509SVID latency and rate) and the
    /// software CA's SVID issuance rate.
    Svid(svid::Args),
    /// The xDS server child of `xds` (commands on stdin).
    #[command(hide = true)]
    XdsServer(xds::ServerArgs),
}

fn runtime(name: &'static str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
}

/// What `RLIMIT_NOFILE` is raised to (soft and hard) when permitted: 10,000 held
/// connections take ~20k descriptors in the harness and as many in each proxy.
const NOFILE: u64 = 262_144;

/// Raises this process's `RLIMIT_NOFILE`, which every process it starts inherits: soft and
/// hard to [`NOFILE`] (capped by `/proc/sys/fs/nr_open`) when permitted (root), else the
/// soft limit to the hard one. A scenario that cannot fit in the result says so.
fn raise_nofile() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE);
    let want = NOFILE.min(nr_open);
    let (soft, mut hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        hard = want;
    }
    let soft = soft.max(want.min(hard));
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok((soft, hard))
}

/// Prints `r`'s table and writes its JSON (to `json`, else `bench/results/<scenario>.json`)
/// and its SVG chart (into `svg`, else `bench/results`).
fn write(
    r: &report::Report,
    json: Option<&std::path::Path>,
    svg: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    println!("{}", r.table());
    let p = r.write_json(json)?;
    eprintln!("wrote {}", p.display());
    let p = r.write_svg(svg)?;
    eprintln!("wrote {}", p.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Before any process is spawned: they inherit it.
    if let Err(e) = raise_nofile() {
        eprintln!("ferry-bench: cannot raise RLIMIT_NOFILE: {e}");
    }
    let cli = Cli::parse();
    if let What::XdsServer(a) = &cli.what {
        return tokio::runtime::Runtime::new()?.block_on(xds::server(a));
    }
    let generator = runtime(GEN_THREADS, 2)?;
    if let What::Dns(a) = &cli.what {
        let r = generator.block_on(dns::run(a))?;
        return write(&r, a.out.json.as_deref(), a.out.svg.as_deref());
    }
    if let What::Xds(a) = &cli.what {
        let r = generator.block_on(xds::run(a))?;
        return write(&r, a.out.json.as_deref(), a.out.svg.as_deref());
    }
    if let What::Svid(a) = &cli.what {
        let r = generator.block_on(svid::run(a))?;
        return write(&r, a.out.json.as_deref(), a.out.svg.as_deref());
    }
    let servers = runtime(SRV_THREADS, 2)?;
    let common = match &cli.what {
        What::Throughput(a) => &a.common,
        What::Latency(a) => &a.common,
        What::Connections(a) => &a.common,
        What::Memory(a) => &a.common,
        What::All(c) => c,
        What::Dns(_) | What::Xds(_) | What::Svid(_) | What::XdsServer(_) => {
            unreachable!("handled above")
        }
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
        _ => common.out.json.clone(),
    };
    let svg_dir = common.out.svg.clone();
    let handle = servers.handle().clone();
    generator.block_on(async move {
        eprintln!("starting direct, ferry and Envoy on loopback ...");
        let m = mesh::Mesh::start(&opts, &handle).await?;
        let reports = match cli.what {
            What::Throughput(a) => vec![scenarios::throughput(&m, &a).await?],
            What::Latency(a) => vec![scenarios::latency(&m, &a).await?],
            What::Connections(a) => vec![scenarios::connections(&m, &a).await?],
            What::Memory(a) => vec![scenarios::memory(&m, &a).await?],
            What::All(c) => {
                let json = c.out.json.clone();
                let c = Common {
                    out: report::Output {
                        json: None,
                        ..c.out.clone()
                    },
                    ..c
                };
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
                    common: c.clone(),
                    connections: 8,
                };
                let svid_args = svid::Args {
                    duration: c.duration,
                    ..svid::Args::default()
                };
                let wanted = [1000, 10_000];
                let sizes = scenarios::fitting_sizes(&m, &wanted);
                if sizes != wanted {
                    eprintln!(
                        "memory: this machine's RLIMIT_NOFILE cannot hold {wanted:?} connections; \
                         measuring {sizes:?}"
                    );
                }
                let dns_args = dns::Args::with_seconds(c.duration.ceil().max(1.0) as u32);
                let mem = MemoryArgs {
                    common: c,
                    connections: sizes,
                    in_flight: 64,
                };
                // Fail now rather than after the other scenarios if memory cannot fit.
                scenarios::memory_fits(&m, &mem)?;
                let r = vec![
                    scenarios::throughput(&m, &t).await?,
                    scenarios::latency(&m, &l).await?,
                    scenarios::connections(&m, &k).await?,
                    scenarios::memory(&m, &mem).await?,
                    xds::run(&xds::Args::default()).await?,
                    svid::run(&svid_args).await?,
                    dns::run(&dns_args).await?,
                ];
                if let Some(path) = json {
                    let all: Vec<_> = r.iter().map(report::Report::json).collect();
                    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
                }
                r
            }
            What::Dns(_) | What::Xds(_) | What::Svid(_) | What::XdsServer(_) => {
                unreachable!("handled above")
            }
        };
        for r in &reports {
            write(r, single_json.as_deref(), svg_dir.as_deref())?;
        }
        anyhow::Ok(())
    })?;
    servers.shutdown_background();
    Ok(())
}
