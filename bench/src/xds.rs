//! The xDS server at scale: N federated services (default 10,000) pushed to S concurrent
//! ADS streams (default 100), SotW and Delta. Measures the time to full sync (every stream
//! has every cluster and every endpoint), the latency of a one-service change reaching all
//! streams (p50/p99/max over `--changes` changes), and the server's RSS and peak RSS.
//!
//! The server runs in a child process (`ferry-bench xds-server`, hidden) holding the
//! services in `xds::resources` and serving them with `xds::server`, so its RSS is its own;
//! a fresh one per protocol. It takes commands on stdin, one per line: `change K` moves
//! service K's gateway (a new endpoint), anything else stops it. All traffic stays on
//! 127.0.0.1.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message as _;
use registry::config::GatewayAddress;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use testkit::config::{AgentDoc, Gw, host, service_doc};

use crate::mesh::Variant;
use crate::procs::status_kib;
use crate::report::Report;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// How long full sync, or one change reaching every stream, may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// `ferry-bench xds` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Federated services the server holds.
    #[arg(long, default_value_t = 10_000)]
    pub services: usize,
    /// Concurrent ADS streams (each subscribes to every cluster and endpoint).
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// One-service changes whose fan-out to all streams is timed, per protocol.
    #[arg(long, default_value_t = 20)]
    pub changes: usize,
    #[command(flatten)]
    pub out: crate::report::Output,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            services: 10_000,
            streams: 100,
            changes: 20,
            out: crate::report::Output::default(),
        }
    }
}

/// `ferry-bench xds-server` options (the child process of `xds`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Federated services to hold.
    #[arg(long)]
    pub services: usize,
}

/// The agent config of `n` federated services `svc<i>.demo.local.domain`, half
/// `IstioMtls`, each behind its own gateway IP.
fn config_yaml(n: usize) -> String {
    let services: String = (0..n)
        .map(|i| {
            let mode = if i % 2 == 0 { "IstioMtls" } else { "Mtls" };
            let ip = format!("10.{}.{}.1", (i >> 8) & 255, i & 255);
            let gw = [Gw("istio-eastwestgateway", &ip, 15443)];
            service_doc(&format!("svc{i}"), 8443, mode, &gw)
        })
        .collect();
    AgentDoc::new("client.domain").raw(&services).render()
}

fn cluster(i: usize) -> String {
    format!("{}_cluster", host(&format!("svc{i}")))
}

/// The child: builds the snapshot of `args.services` services, serves ADS on a free
/// loopback port, prints `PORT <port> parse_ms <ms> translate_ms <ms>`, then applies the
/// commands on stdin until one is not `change K` or stdin closes.
pub async fn server(args: &ServerArgs) -> anyhow::Result<()> {
    let n = args.services;
    let t = Instant::now();
    let cfg = registry::config::parse(
        &config_yaml(n),
        std::path::Path::new("bench.yaml"),
        std::path::Path::new("/"),
    )
    .context("the generated config")?
    .config;
    let parse = t.elapsed();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(cfg));
    let t = Instant::now();
    let (snapshots, _task) = xds::resources::spawn_translator(rx);
    let translate = t.elapsed();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = xds::server::XdsServer::new(snapshots, shutdown.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(server.serve_on(l));
    let mut out = tokio::io::stdout();
    out.write_all(
        format!(
            "PORT {port} parse_ms {} translate_ms {}\n",
            parse.as_millis(),
            translate.as_millis()
        )
        .as_bytes(),
    )
    .await?;
    out.flush().await?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut round = 0u8;
    while let Some(line) = lines.next_line().await? {
        let mut parts = line.split_whitespace();
        let (Some("change"), Some(k)) = (
            parts.next(),
            parts.next().and_then(|k| k.parse::<usize>().ok()),
        ) else {
            break;
        };
        round = round.wrapping_add(1).max(2);
        let mut next = (**tx.borrow()).clone();
        let host = host(&format!("svc{k}"));
        let svc = next
            .services
            .iter_mut()
            .find(|s| s.hostname == host)
            .with_context(|| format!("no service {host}"))?;
        let gw = svc
            .gateways
            .first_mut()
            .with_context(|| format!("{host} has no gateway"))?;
        gw.address = GatewayAddress::Ip(IpAddr::V4(Ipv4Addr::new(10, 200, round, 1)));
        tx.send_replace(Arc::new(next));
    }
    shutdown.cancel();
    Ok(())
}

/// What a stream tells the harness.
enum Event {
    /// It has every cluster and every endpoint.
    Synced(Instant),
    /// After sync, stream `id` received the endpoints of this cluster.
    Got(usize, String, Instant),
    /// Stream `id` failed.
    Failed(usize, String),
}

type Client = AggregatedDiscoveryServiceClient<tonic::transport::Channel>;

async fn connect(port: u16) -> anyhow::Result<Client> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await
        .with_context(|| format!("connect to the xDS server on port {port}"))?;
    Ok(AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(256 << 20))
}

/// The node of stream `id` (its first request names it).
fn node(id: usize) -> Option<Node> {
    Some(Node {
        id: format!("bench-{id}"),
        ..Default::default()
    })
}

/// A State-of-the-World stream: CDS, then EDS for every cluster, ACKing each response.
async fn sotw_stream(
    id: usize,
    port: u16,
    n: usize,
    ev: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let mut client = connect(port).await?;
    let (tx, rx) = mpsc::channel(8);
    let names: Vec<String> = (0..n).map(cluster).collect();
    tx.send(DiscoveryRequest {
        node: node(id),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await?;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut have: HashSet<String> = HashSet::new();
    let mut clusters_seen = false;
    let mut synced = false;
    let mut eds_requested = false;
    while let Some(r) = inbound.message().await? {
        let now = Instant::now();
        let mut ack = DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        };
        if r.type_url == CDS {
            clusters_seen = r.resources.len() == n;
        } else {
            ack.resource_names = names.clone();
            for any in &r.resources {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice())?;
                if synced {
                    let _ = ev.send(Event::Got(id, cla.cluster_name, now));
                } else {
                    have.insert(cla.cluster_name);
                }
            }
        }
        if tx.send(ack).await.is_err() {
            return Ok(());
        }
        if r.type_url == CDS && !eds_requested {
            eds_requested = true;
            let _ = tx
                .send(DiscoveryRequest {
                    type_url: EDS.into(),
                    resource_names: names.clone(),
                    ..Default::default()
                })
                .await;
        }
        if !synced && clusters_seen && have.len() == n {
            synced = true;
            let _ = ev.send(Event::Synced(now));
        }
    }
    Ok(())
}

/// A Delta stream: subscribes to all clusters (wildcard) and every endpoint at once.
async fn delta_stream(
    id: usize,
    port: u16,
    n: usize,
    ev: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let mut client = connect(port).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: node(id),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await?;
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: (0..n).map(cluster).collect(),
        ..Default::default()
    })
    .await?;
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut clusters: HashSet<String> = HashSet::new();
    let mut endpoints: HashSet<String> = HashSet::new();
    let mut synced = false;
    while let Some(r) = inbound.message().await? {
        let now = Instant::now();
        for res in &r.resources {
            if synced {
                if r.type_url == EDS {
                    let _ = ev.send(Event::Got(id, res.name.clone(), now));
                }
            } else if r.type_url == CDS {
                clusters.insert(res.name.clone());
            } else {
                endpoints.insert(res.name.clone());
            }
        }
        let ack = DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return Ok(());
        }
        if !synced && clusters.len() == n && endpoints.len() == n {
            synced = true;
            let _ = ev.send(Event::Synced(now));
        }
    }
    Ok(())
}

/// The `p` quantile of sorted, non-empty `sorted` (nearest rank).
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The next event, or an error if the streams all ended, one failed or none came in time.
async fn next_event(
    ev: &mut mpsc::UnboundedReceiver<Event>,
    waiting_for: &str,
) -> anyhow::Result<Event> {
    match tokio::time::timeout(STEP_TIMEOUT, ev.recv()).await {
        Err(_) => anyhow::bail!("no {waiting_for} after {STEP_TIMEOUT:?}"),
        Ok(None) => anyhow::bail!("every ADS stream ended before {waiting_for}"),
        Ok(Some(Event::Failed(id, e))) => anyhow::bail!("ADS stream {id}: {e}"),
        Ok(Some(e)) => Ok(e),
    }
}

/// Runs SotW then Delta, each against a fresh server child.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.services > 0 && args.streams > 0,
        "--services and --streams must be at least 1"
    );
    let (n, streams) = (args.services, args.streams);
    let mut report = Report::new("xds");
    let exe = std::env::current_exe().context("current_exe")?;
    let mut next_change = 0usize;
    for protocol in ["SotW", "Delta"] {
        let case = format!("{protocol}-{n}svc-{streams}streams");
        eprintln!("{case}: starting the server ...");
        // A fresh server process per protocol, so its RSS is that protocol's alone.
        let mut child = tokio::process::Command::new(&exe)
            .args(["xds-server", "--services", &n.to_string()])
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn ferry-bench xds-server")?;
        let pid = child.id().context("the xds-server child has no pid")?;
        let stdout = child.stdout.take().context("xds-server stdout")?;
        let mut stdin = child.stdin.take().context("xds-server stdin")?;
        let mut first = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut first)
            .await?;
        let port: u16 = first
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("xds-server said {first:?}, not PORT <port>"))?;
        eprintln!(
            "{case}: server {} (RSS {} KiB with the snapshot built)",
            first.trim(),
            status_kib(pid, "VmRSS").unwrap_or(0)
        );

        let (ev_tx, mut ev) = mpsc::unbounded_channel();
        let start = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|id| {
                let ev = ev_tx.clone();
                tokio::spawn(async move {
                    let r = if protocol == "SotW" {
                        sotw_stream(id, port, n, &ev).await
                    } else {
                        delta_stream(id, port, n, &ev).await
                    };
                    if let Err(e) = r {
                        let _ = ev.send(Event::Failed(id, format!("{e:#}")));
                    }
                })
            })
            .collect();
        drop(ev_tx);
        let mut synced = 0;
        let mut last = start;
        while synced < streams {
            if let Event::Synced(t) = next_event(&mut ev, "full sync").await? {
                synced += 1;
                last = last.max(t);
            }
        }
        let sync = last - start;
        let rss = status_kib(pid, "VmRSS").context("VmRSS of xds-server")?;
        eprintln!("{case}: full sync in {:.2} s", sync.as_secs_f64());

        let mut lat = Vec::new();
        for _ in 0..args.changes {
            let k = next_change % n;
            next_change += 1;
            let target = cluster(k);
            let t0 = Instant::now();
            stdin.write_all(format!("change {k}\n").as_bytes()).await?;
            stdin.flush().await?;
            let mut got = HashSet::new();
            while got.len() < streams {
                match next_event(&mut ev, "change").await? {
                    Event::Got(id, name, t) if name == target && got.insert(id) => {
                        lat.push(t - t0);
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let peak = status_kib(pid, "VmHWM").context("VmHWM of xds-server")?;
        lat.sort();

        let v = Variant::Ferry;
        report.record(&case, "full_sync_s", false, v, sync.as_secs_f64());
        if let Some(max) = lat.last() {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            report.record(&case, "change_p50_ms", false, v, ms(pct(&lat, 0.5)));
            report.record(&case, "change_p99_ms", false, v, ms(pct(&lat, 0.99)));
            report.record(&case, "change_max_ms", false, v, ms(*max));
        }
        report.record(&case, "server_rss_mib", false, v, rss as f64 / 1024.0);
        report.record(&case, "server_peak_rss_mib", false, v, peak as f64 / 1024.0);

        for t in tasks {
            t.abort();
        }
        let _ = stdin.write_all(b"quit\n").await;
        drop(stdin);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(report)
}
