//! The data-path scenarios (`throughput`, `latency`, `connections`, `memory`): each case
//! runs through direct, ferry and Envoy in turn, the order rotating every round so machine
//! drift hits all three alike; CPU of the proxy and of the harness is read from /proc around
//! each run, and the proxy's resident memory for `memory`.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::mesh::{Mesh, Mode, Variant};
use crate::procs::{cpu_seconds, own_threads_cpu, rollup_kib, rss_kib};
use crate::report::Report;
use crate::{GEN_THREADS, SRV_THREADS, load};

/// Options every data-path scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Seconds per measurement (one case through one variant).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Rounds; each runs every case through every variant once.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Stock Envoy (default `$FERRY_ENVOY`, else `.venv/bin/envoy`).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Envoy worker threads (`--concurrency`); ferry's runtime follows the cores.
    #[arg(long, default_value_t = 2)]
    pub envoy_concurrency: usize,
    /// Make the TLS server pick the cipher suite itself (AES-128-GCM first) instead of
    /// honouring the proxy's order (by default each proxy gets its own first choice).
    #[arg(long)]
    pub server_cipher_order: bool,
    #[command(flatten)]
    pub out: crate::report::Output,
}

/// `throughput` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub common: Common,
    /// Parallel connections per case (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub connections: Vec<usize>,
}

/// `latency` options.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections, each one request in flight (closed loop, max rate).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Request and response size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Fixed request rates per connection to run besides max rate (comma-separated;
    /// 0 = max rate only).
    #[arg(long, value_delimiter = ',', default_value = "0,1000")]
    pub rates: Vec<f64>,
}

/// `connections` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Parallel connect loops.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

/// `memory` options.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub common: Common,
    /// Idle connections held open through the proxy, per case (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub connections: Vec<usize>,
    /// Connections being opened at once while building up a case.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
}

/// The variants in the order of `round` (rotated, so none always goes first).
fn order(round: usize) -> [Variant; 3] {
    let mut v = Variant::ALL;
    v.rotate_left(round % 3);
    v
}

fn progress(round: usize, rounds: usize, case: &str, v: Variant) {
    eprint!(
        "\r\x1b[K[round {}/{rounds}] {case} via {}",
        round + 1,
        v.name()
    );
    let _ = std::io::stderr().flush();
}

/// CPU seconds of the proxy (if any) and of the harness (generator, servers) in a run.
struct Cpu {
    pid: Option<u32>,
    proxy: f64,
    generator: f64,
    servers: f64,
}

impl Cpu {
    fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            proxy: pid.and_then(cpu_seconds).unwrap_or(0.0),
            generator: own_threads_cpu(GEN_THREADS),
            servers: own_threads_cpu(SRV_THREADS),
        }
    }

    /// (proxy, generator, servers) seconds since [`Cpu::start`].
    fn stop(self) -> (Option<f64>, f64, f64) {
        let proxy = self.pid.and_then(cpu_seconds).map(|now| now - self.proxy);
        (
            proxy,
            own_threads_cpu(GEN_THREADS) - self.generator,
            own_threads_cpu(SRV_THREADS) - self.servers,
        )
    }
}

/// Bulk transfer: Gbit/s, proxy CPU s/GB, harness CPU s/GB.
pub async fn throughput(mesh: &Mesh, args: &ThroughputArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("throughput");
    let d = Duration::from_secs_f64(args.common.duration);
    for round in 0..args.common.rounds {
        for mode in Mode::ALL {
            for &n in &args.connections {
                let case = format!("{}-{n}conn", mode.name());
                for v in order(round) {
                    progress(round, args.common.rounds, &case, v);
                    let cpu = Cpu::start(mesh.pid(v));
                    let t = load::throughput(mesh.target(v, mode), n, d).await?;
                    let (proxy, generator, servers) = cpu.stop();
                    let gb = t.bytes as f64 / 1e9;
                    r.record(
                        &case,
                        "gbit_per_s",
                        true,
                        v,
                        gb * 8.0 / t.elapsed.as_secs_f64(),
                    );
                    if let Some(p) = proxy {
                        r.record(&case, "proxy_cpu_s_per_gb", false, v, p / gb);
                    }
                    r.record(&case, "generator_cpu_s_per_gb", false, v, generator / gb);
                    r.record(&case, "server_cpu_s_per_gb", false, v, servers / gb);
                }
            }
        }
    }
    eprintln!();
    Ok(r)
}

/// 1 KiB request/response at max rate and at fixed rates: p50/p90/p99/p99.9 and what each
/// proxy adds over direct (per round, against that round's direct run).
pub async fn latency(mesh: &Mesh, args: &LatencyArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("latency");
    let d = Duration::from_secs_f64(args.common.duration);
    let quantiles = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];
    for round in 0..args.common.rounds {
        for (mode, &rate) in Mode::ALL
            .iter()
            .flat_map(|m| args.rates.iter().map(move |r| (*m, r)))
        {
            let pace = if rate > 0.0 {
                format!("{rate:.0}rps")
            } else {
                "max".to_owned()
            };
            let case = format!(
                "{}-{}B-{}conn-{pace}",
                mode.name(),
                args.size,
                args.connections
            );
            let mut direct = [0.0; 4];
            let mut added = Vec::new();
            for v in order(round) {
                progress(round, args.common.rounds, &case, v);
                let cpu = Cpu::start(mesh.pid(v));
                let h = load::latency(mesh.target(v, mode), args.connections, args.size, rate, d)
                    .await?;
                let (proxy, generator, _) = cpu.stop();
                let rps = h.len() as f64 / d.as_secs_f64();
                r.record(&case, "requests_per_s", true, v, rps);
                r.record(
                    &case,
                    "generator_cpu_util",
                    false,
                    v,
                    generator / d.as_secs_f64(),
                );
                if let Some(p) = proxy {
                    r.record(
                        &case,
                        "proxy_cpu_us_per_request",
                        false,
                        v,
                        p * 1e6 / h.len().max(1) as f64,
                    );
                }
                let qs = quantiles.map(|(_, q)| h.value_at_quantile(q) as f64);
                if v == Variant::Direct {
                    direct = qs;
                } else {
                    added.push((v, qs));
                }
                for ((name, _), q) in quantiles.iter().zip(qs) {
                    r.record(&case, metric_us(name), false, v, q);
                }
            }
            for (v, qs) in added {
                for (i, (name, _)) in quantiles.iter().enumerate() {
                    r.record(&case, added_metric(name), false, v, qs[i] - direct[i]);
                }
            }
        }
    }
    eprintln!();
    Ok(r)
}

fn metric_us(q: &str) -> &'static str {
    match q {
        "p50" => "p50_us",
        "p90" => "p90_us",
        "p99" => "p99_us",
        _ => "p99.9_us",
    }
}

fn added_metric(q: &str) -> &'static str {
    match q {
        "p50" => "p50_added_us",
        "p90" => "p90_added_us",
        "p99" => "p99_added_us",
        _ => "p99.9_added_us",
    }
}

/// New connections per second (each a full mTLS handshake at the proxy for `IstioMtls`:
/// the server resumes no session), their time to first echoed byte, and proxy CPU per
/// connection.
pub async fn connections(mesh: &Mesh, args: &ConnectionsArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("connections");
    let d = Duration::from_secs_f64(args.common.duration);
    for round in 0..args.common.rounds {
        for mode in Mode::ALL {
            let case = format!("{}-{}parallel", mode.name(), args.connections);
            let mut direct_p50 = 0.0;
            let mut added = Vec::new();
            for v in order(round) {
                progress(round, args.common.rounds, &case, v);
                let cpu = Cpu::start(mesh.pid(v));
                let (n, elapsed, h) =
                    load::connections(mesh.target(v, mode), args.connections, d).await?;
                let (proxy, generator, _) = cpu.stop();
                r.record(
                    &case,
                    "connections_per_s",
                    true,
                    v,
                    n as f64 / elapsed.as_secs_f64(),
                );
                let p50 = h.value_at_quantile(0.5) as f64;
                r.record(&case, "connect_p50_us", false, v, p50);
                r.record(
                    &case,
                    "connect_p99_us",
                    false,
                    v,
                    h.value_at_quantile(0.99) as f64,
                );
                r.record(
                    &case,
                    "generator_cpu_util",
                    false,
                    v,
                    generator / elapsed.as_secs_f64(),
                );
                if let Some(p) = proxy {
                    r.record(
                        &case,
                        "proxy_cpu_us_per_connection",
                        false,
                        v,
                        p * 1e6 / n.max(1) as f64,
                    );
                }
                if v == Variant::Direct {
                    direct_p50 = p50;
                } else {
                    added.push((v, p50));
                }
                // Let TIME_WAIT and the proxies' closing connections settle between runs.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for (v, p50) in added {
                r.record(&case, "handshake_added_p50_us", false, v, p50 - direct_p50);
            }
        }
    }
    eprintln!();
    Ok(r)
}

/// File descriptors a process may open besides those it has open now and the held
/// connections' (a log line, a `/proc` read, an xDS reconnect).
const FD_SLACK: u64 = 64;

/// How long the connections stay open and idle before RSS is read.
const HOLD_SETTLE: Duration = Duration::from_secs(1);

/// The soft `RLIMIT_NOFILE` of `pid`, from /proc (`Max open files`).
fn nofile_limit(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Open file descriptors of `pid` (its sockets, mostly).
fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Fails, naming the limit, unless the harness (client and server end of each connection)
/// and the proxy `pid` (`per_conn` descriptors each: at least the downstream and upstream
/// sockets, more if the proxy keeps, say, splice pipes) can both hold `n` connections on
/// top of what they have open now.
fn check_fds(n: usize, per_conn: f64, v: Variant, pid: u32) -> anyhow::Result<()> {
    for (who, p, per) in [
        ("ferry-bench".to_owned(), std::process::id(), 2.0),
        (format!("the {} proxy (pid {pid})", v.name()), pid, per_conn),
    ] {
        let limit = nofile_limit(p).with_context(|| format!("RLIMIT_NOFILE of {who}"))?;
        let open = open_fds(p).with_context(|| format!("open descriptors of {who}"))? as u64;
        let need = open + (per * n as f64).ceil() as u64 + FD_SLACK;
        anyhow::ensure!(
            limit >= need,
            "holding {n} connections needs about {need} file descriptors in {who} ({open} \
             open + {per:.1} per connection), but its RLIMIT_NOFILE is {limit} (ferry-bench \
             raises it to 262144 where setrlimit permits, else to the hard limit): raise the \
             hard limit (`ulimit -Hn`, as root) or pass --connections of at most {}",
            (limit.saturating_sub(open + FD_SLACK) as f64 / per) as u64
        );
    }
    Ok(())
}

/// Fails, naming the limit, before anything is measured, unless the largest
/// `--connections` fits in the harness and in every proxy (see [`check_fds`]).
pub fn memory_fits(mesh: &Mesh, args: &MemoryArgs) -> anyhow::Result<()> {
    let n = args.connections.iter().copied().max().unwrap_or(0);
    for v in Variant::ALL {
        if let Some(pid) = mesh.pid(v) {
            check_fds(n, 2.0, v, pid)?;
        }
    }
    Ok(())
}

/// `wanted` with each size that would not fit (see [`check_fds`]) lowered to the largest
/// multiple of 500 that does: what `all` measures on a machine whose descriptor limit is
/// below 10,000 held connections (the case names carry the sizes measured).
pub fn fitting_sizes(mesh: &Mesh, wanted: &[usize]) -> Vec<usize> {
    let fits = |n: usize| {
        Variant::ALL
            .iter()
            .filter_map(|&v| mesh.pid(v).map(|pid| (v, pid)))
            .all(|(v, pid)| check_fds(n, 2.0, v, pid).is_ok())
    };
    wanted
        .iter()
        .map(|&want| {
            let mut n = want;
            while n > 500 && !fits(n) {
                n = (n - 1) / 500 * 500;
            }
            n
        })
        .collect()
}

/// After the held connections closed: waits until the proxy's open descriptors stop
/// falling (at least a second, at most ten), so its next case starts from rest.
async fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut last = open_fds(pid);
    let mut steady = 0;
    while steady < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = open_fds(pid);
        steady = if now >= last { steady + 1 } else { 0 };
        last = now;
    }
}

/// A fresh source address in 127.10/16 for each batch of held connections, so batches
/// (variants, modes, rounds) never compete for one address's ephemeral ports or meet
/// another's TIME_WAIT.
fn source_address(batch: usize) -> Ipv4Addr {
    let b = batch % (250 * 250);
    Ipv4Addr::new(127, 10, (b / 250) as u8, (b % 250 + 1) as u8)
}

/// The proxy's resident memory in KiB, or an error naming it.
fn rss(v: Variant, pid: u32) -> anyhow::Result<u64> {
    rss_kib(pid).with_context(|| format!("no VmRSS for the {} proxy (pid {pid})", v.name()))
}

/// Resident memory of each proxy idle and with N idle connections held open through it
/// (fully established end to end, the upstream mTLS handshake done for `IstioMtls`), and
/// what each held connection costs over idle. Direct has no proxy and records nothing.
///
/// The proxies are not restarted between cases, and an allocator keeps some of what the
/// closed connections freed: so the idle figure is taken once, before the first held
/// connection, and the cases run from the smallest footprint up (N ascending, `Mtls`
/// before `IstioMtls`), each reusing what the one before left behind rather than adding
/// to it. `rss_after_close_mib` shows what stayed resident once a case's connections
/// closed; rounds after the first measure proxies that have held the largest case.
/// `fds_per_connection` is what each held connection costs in descriptors (the next,
/// larger case is refused up front, naming the limit, when it would not fit).
pub async fn memory(mesh: &Mesh, args: &MemoryArgs) -> anyhow::Result<Report> {
    memory_fits(mesh, args)?;
    let mut r = Report::new("memory");
    let mut sizes = args.connections.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut idle: [Option<u64>; 3] = [None; 3];
    // Descriptors per held connection, per variant and mode, as measured so far.
    let mut fds_rate = std::collections::HashMap::new();
    let mut batch = 0;
    for round in 0..args.common.rounds {
        for v in order(round) {
            let Some(pid) = mesh.pid(v) else {
                continue;
            };
            let slot = v as usize;
            let idle_kib = match idle[slot] {
                Some(k) => k,
                None => {
                    progress(round, args.common.rounds, "idle", v);
                    let k = rss(v, pid)?;
                    r.record("idle", "rss_mib", false, v, k as f64 / 1024.0);
                    for (field, metric) in [("Pss", "pss_mib"), ("Anonymous", "anon_mib")] {
                        if let Some(kib) = rollup_kib(pid, field) {
                            r.record("idle", metric, false, v, kib as f64 / 1024.0);
                        }
                    }
                    idle[slot] = Some(k);
                    k
                }
            };
            for &n in sizes.iter().filter(|&&n| n > 0) {
                for mode in [Mode::Mtls, Mode::IstioMtls] {
                    let case = format!("{}-{n}conn", mode.name());
                    progress(round, args.common.rounds, &case, v);
                    let rate = fds_rate.get(&(slot, mode.name())).copied();
                    check_fds(n, rate.unwrap_or(2.0), v, pid)?;
                    let fds_before = open_fds(pid).unwrap_or(0);
                    batch += 1;
                    let held = load::hold(
                        mesh.target(v, mode),
                        source_address(batch),
                        n,
                        args.in_flight,
                    )
                    .await
                    .with_context(|| {
                        let hint = match v {
                            Variant::Envoy if n > 1024 => {
                                " (stock Envoy's default cluster circuit breaker allows 1024 \
                                 upstream connections; ferry agent's clusters raise it as \
                                 Istio's do: is this an older agent?)"
                            }
                            _ => "",
                        };
                        format!("{case} via {}{hint}", v.name())
                    })?;
                    tokio::time::sleep(HOLD_SETTLE).await;
                    let kib = rss(v, pid)?;
                    let fds = open_fds(pid).unwrap_or(0).saturating_sub(fds_before);
                    drop(held);
                    let per_conn = fds as f64 / n as f64;
                    fds_rate.insert((slot, mode.name()), per_conn);
                    r.record(&case, "fds_per_connection", false, v, per_conn);
                    r.record(&case, "rss_mib", false, v, kib as f64 / 1024.0);
                    r.record(
                        &case,
                        "kib_per_idle_connection",
                        false,
                        v,
                        (kib as f64 - idle_kib as f64) / n as f64,
                    );
                    settle(pid).await;
                    r.record(
                        &case,
                        "rss_after_close_mib",
                        false,
                        v,
                        rss(v, pid)? as f64 / 1024.0,
                    );
                }
            }
        }
    }
    eprintln!();
    Ok(r)
}
