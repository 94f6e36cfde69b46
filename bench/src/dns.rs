//! The DNS benchmark: `ferry dns` and Envoy's `dns_filter` serve the same federated table
//! and forward other names to the same loopback upstream; dnsperf drives each in turn,
//! alternating rounds so machine noise hits both alike.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use testkit::config::{AgentDoc, Gw, service_doc};
use testkit::dns::Upstream;

use crate::dnsperf::{self, Summary};
use crate::mesh::Variant;
use crate::procs::{ferry_binary, rss_kib};
use crate::report::Report;

/// `ferry-bench dns` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per dnsperf run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Rounds (each runs every server on every workload once).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Federated services in the table.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// dnsperf client sockets.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// dnsperf queries in flight.
    #[arg(long, default_value_t = 100)]
    outstanding: u32,
    /// Worker threads for both servers (Envoy --concurrency, ferry UDP workers follow cores).
    #[arg(long, default_value_t = 2)]
    concurrency: u32,
    #[command(flatten)]
    pub out: crate::report::Output,
}

impl Args {
    /// The defaults with `seconds` per dnsperf run, for `all`.
    pub fn with_seconds(seconds: u32) -> Self {
        Self {
            seconds,
            rounds: 2,
            services: 100,
            clients: 8,
            outstanding: 100,
            concurrency: 2,
            out: crate::report::Output::default(),
        }
    }
}

/// The agent config of `services` federated names `svc<i>.demo.local.domain`.
fn config_yaml(services: usize) -> String {
    let docs: String = (0..services)
        .map(|i| {
            let gw = [Gw("istio-eastwestgateway", "127.0.0.10", 15443)];
            service_doc(&format!("svc{i}"), 8443, "IstioMtls", &gw)
        })
        .collect();
    AgentDoc::new("client.domain").raw(&docs).render()
}

/// Envoy's DNS filter with the same table, TTL and upstream as ferry's resolver.
fn envoy_bootstrap(
    config: &registry::config::Config,
    listen: SocketAddr,
    upstream: SocketAddr,
    admin: u16,
) -> String {
    let mut domains = String::new();
    for s in &config.services {
        let _ = write!(
            domains,
            "\n                - name: {}\n                  answer_ttl: 30s\n                  endpoint: {{ address_list: {{ address: [\"{}\"] }} }}",
            s.hostname, s.vip
        );
    }
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
    - name: dns
      address: {{ socket_address: {{ protocol: UDP, address: {ip}, port_value: {port} }} }}
      listener_filters:
        - name: envoy.filters.udp.dns_filter
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig
            stat_prefix: dns
            case_insensitive: true
            server_config:
              inline_dns_table:
                virtual_domains:{domains}
            client_config:
              resolver_timeout: 2s
              max_pending_lookups: 1024
              typed_dns_resolver_config:
                name: envoy.network.dns_resolver.cares
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
                  resolvers: [{{ socket_address: {{ address: {uip}, port_value: {uport} }} }}]
                  use_resolvers_as_fallback: false
"#,
        ip = listen.ip(),
        port = listen.port(),
        uip = upstream.ip(),
        uport = upstream.port(),
    )
}

/// Runs the benchmark: per workload, queries per second, mean latency and lost queries of
/// ferry and Envoy (means over the rounds), and each server's RSS after the run.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    let ferry = ferry_binary()?;
    let envoy_bin =
        testkit::envoy::binary().context("no stock Envoy: run ./scripts/install-peers.sh")?;
    let upstream = Upstream::start().await?;
    let dir = testkit::tempdir()?;
    let cfg_path = dir.path().join("ferry.yaml");
    std::fs::write(&cfg_path, config_yaml(args.services))?;
    let config = registry::config::load(&cfg_path)?.config;

    let ferry_addr: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let mut ferry_proc = tokio::process::Command::new(&ferry)
        .args(["--log-level", "warn", "dns", "--config"])
        .arg(&cfg_path)
        .args([
            "--listen",
            &ferry_addr.to_string(),
            "--upstream",
            &upstream.addr().to_string(),
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn ferry dns")?;
    testkit::wait_for_port(ferry_addr, Duration::from_secs(10)).await?;

    let envoy_addr: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let admin = testkit::free_port();
    let envoy = testkit::envoy::Envoy::start_with_args(
        &envoy_bin,
        &envoy_bootstrap(&config, envoy_addr, upstream.addr(), admin),
        admin,
        &[
            "--concurrency",
            &args.concurrency.to_string(),
            "--log-level",
            "warn",
        ],
    )
    .await?;
    envoy
        .wait_admin("/listeners", Duration::from_secs(10), |b| {
            b.contains("dns::")
        })
        .await?;

    let fed = dir.path().join("federated.txt");
    let names: String = config
        .services
        .iter()
        .map(|s| format!("{} A\n", s.hostname))
        .collect();
    std::fs::write(&fed, names)?;
    let fwd = dir.path().join("forwarded.txt");
    std::fs::write(&fwd, "www.upstream.test A\ntxt.upstream.test A\n")?;

    let servers = [("ferry", ferry_addr), ("envoy", envoy_addr)];
    let workloads = [("federated names", &fed), ("forwarded names", &fwd)];
    let mut results: Vec<Vec<Vec<Summary>>> =
        vec![vec![Vec::new(); servers.len()]; workloads.len()];
    for round in 0..args.rounds {
        for (w, (_, data)) in workloads.iter().enumerate() {
            // Alternate which server goes first so drift hits both.
            let order: Vec<usize> = if round % 2 == 0 {
                vec![0, 1]
            } else {
                vec![1, 0]
            };
            for s in order {
                let r = dnsperf::run(
                    servers[s].1,
                    data,
                    args.seconds,
                    args.clients,
                    args.outstanding,
                )?;
                results[w][s].push(r);
            }
        }
    }
    let ferry_rss = ferry_proc.id().and_then(rss_kib);
    let envoy_rss = envoy.pid().and_then(rss_kib);
    let _ = ferry_proc.kill().await;

    eprintln!(
        "dnsperf: {} s x {} rounds, {} clients, {} outstanding, {} federated names, {} cores",
        args.seconds,
        args.rounds,
        args.clients,
        args.outstanding,
        args.services,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut report = Report::new("dns");
    let variants = [Variant::Ferry, Variant::Envoy];
    for (w, (wname, _)) in workloads.iter().enumerate() {
        let case = wname.replace(' ', "-");
        for (s, v) in variants.iter().enumerate() {
            for r in &results[w][s] {
                report.record(&case, "queries_per_s", true, *v, r.qps);
                report.record(&case, "avg_latency_us", false, *v, r.avg_latency * 1e6);
                report.record(&case, "lost_queries", false, *v, r.lost as f64);
            }
        }
    }
    for (v, rss) in variants.iter().zip([ferry_rss, envoy_rss]) {
        if let Some(k) = rss {
            report.record("after-run", "rss_mib", false, *v, k as f64 / 1024.0);
        }
    }
    upstream.stop().await;
    Ok(report)
}
