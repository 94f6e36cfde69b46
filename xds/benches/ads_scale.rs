//! Scale bench for the xDS server: N federated services (default 10,000) pushed to S
//! concurrent ADS streams (default 100), SotW and Delta. Reports time to full sync (every
//! stream has every cluster and every endpoint), latency of a one-service change reaching
//! all streams (p50/p99/max over repeated changes), and the server's RSS.
//!
//! The server runs in a child process (this same binary, `FERRY_BENCH_ROLE=server`) so its
//! RSS is its own. Run: `cargo bench -p xds --bench ads_scale` (env `SERVICES`, `STREAMS`,
//! `CHANGES` override the sizes). All traffic stays on 127.0.0.1.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use registry::config::GatewayAddress;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn config_yaml(n: usize) -> String {
    let mut s = String::from(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\n",
    );
    for i in 0..n {
        let mode = if i % 2 == 0 { "IstioMtls" } else { "Mtls" };
        s.push_str(&format!(
            "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: svc{i}\n  namespace: bench\n  annotations:\n    ferry.dev/trust-domain: local.domain\nspec:\n  name: svc{i}\n  namespace: bench\n  port: 8443\n  exportedTrustDomains: [client.domain]\n  spiffeIDPaths: [/ns/bench/sa/svc{i}]\n  tlsMode: {mode}\n  gateways:\n    - type: istio-eastwestgateway\n      port: 15443\n      ip: 10.{}.{}.1\n",
            (i >> 8) & 255,
            i & 255
        ));
    }
    s
}

fn cluster(i: usize) -> String {
    format!("svc{i}.bench.local.domain_cluster")
}

fn server_main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let n = env_usize("SERVICES", 10_000);
        let t = Instant::now();
        let cfg = registry::config::parse(
            &config_yaml(n),
            std::path::Path::new("bench.yaml"),
            std::path::Path::new("/"),
        )
        .expect("bench config valid")
        .config;
        let parse = t.elapsed();
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(cfg));
        let t = Instant::now();
        let (snapshots, _task) = xds::resources::spawn_translator(rx);
        let translate = t.elapsed();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = xds::server::XdsServer::new(snapshots, shutdown.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(server.serve_on(l));
        println!(
            "PORT {port} parse_ms {} translate_ms {}",
            parse.as_millis(),
            translate.as_millis()
        );
        std::io::stdout().flush().unwrap();
        // Commands arrive one per line; handle them as they come.
        let (ltx, mut lrx) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if ltx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut round = 0u8;
        while let Some(line) = lrx.recv().await {
            let mut parts = line.split_whitespace();
            match (
                parts.next(),
                parts.next().and_then(|k| k.parse::<usize>().ok()),
            ) {
                (Some("change"), Some(k)) => {
                    round = round.wrapping_add(1).max(2);
                    let mut next = (**tx.borrow()).clone();
                    let host = format!("svc{k}.bench.local.domain");
                    let Some(svc) = next.services.iter_mut().find(|s| s.hostname == host) else {
                        break;
                    };
                    svc.gateways[0].address =
                        GatewayAddress::Ip(IpAddr::V4(Ipv4Addr::new(10, 200, round, 1)));
                    tx.send_replace(Arc::new(next));
                }
                _ => break,
            }
        }
        shutdown.cancel();
    });
}

enum Event {
    Synced(Instant),
    Got(usize, String, Instant),
}

type Client = AggregatedDiscoveryServiceClient<tonic::transport::Channel>;

async fn connect(port: u16) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(256 << 20)
}

async fn sotw_stream(id: usize, port: u16, n: usize, ev: mpsc::UnboundedSender<Event>) {
    let mut client = connect(port).await;
    let (tx, rx) = mpsc::channel(8);
    let names: Vec<String> = (0..n).map(cluster).collect();
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: format!("bench-{id}"),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut have: HashSet<String> = HashSet::new();
    let mut clusters_seen = false;
    let mut synced = false;
    let mut eds_requested = false;
    while let Ok(Some(r)) = inbound.message().await {
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
                let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                if synced {
                    let _ = ev.send(Event::Got(id, cla.cluster_name, now));
                } else {
                    have.insert(cla.cluster_name);
                }
            }
        }
        if tx.send(ack).await.is_err() {
            return;
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
}

async fn delta_stream(id: usize, port: u16, n: usize, ev: mpsc::UnboundedSender<Event>) {
    let mut client = connect(port).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("bench-{id}"),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: (0..n).map(cluster).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut clusters: HashSet<String> = HashSet::new();
    let mut endpoints: HashSet<String> = HashSet::new();
    let mut synced = false;
    while let Ok(Some(r)) = inbound.message().await {
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
            return;
        }
        if !synced && clusters.len() == n && endpoints.len() == n {
            synced = true;
            let _ = ev.send(Event::Synced(now));
        }
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    if std::env::var("FERRY_BENCH_ROLE").as_deref() == Ok("server") {
        return server_main();
    }
    let n = env_usize("SERVICES", 10_000);
    let streams = env_usize("STREAMS", 100);
    let changes = env_usize("CHANGES", 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut next_change = 0usize;
    for variant in ["sotw", "delta"] {
        // A fresh server process per variant, so its RSS is that variant's alone.
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .env("FERRY_BENCH_ROLE", "server")
            .env("SERVICES", n.to_string())
            .env("RUST_LOG", "off")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        let port: u16 = first.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        println!("server: {}", first.trim());
        println!("server RSS idle (snapshot built): {} KiB", rss_kib(pid).0);
        let (ev_tx, mut ev) = mpsc::unbounded_channel();
        let start = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|id| {
                let ev_tx = ev_tx.clone();
                if variant == "sotw" {
                    rt.spawn(sotw_stream(id, port, n, ev_tx))
                } else {
                    rt.spawn(delta_stream(id, port, n, ev_tx))
                }
            })
            .collect();
        let mut synced = 0;
        let mut last = start;
        while synced < streams {
            match rt.block_on(ev.recv()) {
                Some(Event::Synced(t)) => {
                    synced += 1;
                    last = last.max(t);
                }
                Some(_) => {}
                None => panic!("streams ended"),
            }
        }
        let sync = last - start;
        let (rss, hwm) = rss_kib(pid);
        let mut lat = Vec::new();
        for _ in 0..changes {
            let k = next_change % n;
            next_change += 1;
            let target = cluster(k);
            let t0 = Instant::now();
            writeln!(stdin, "change {k}").unwrap();
            stdin.flush().unwrap();
            let mut got = HashSet::new();
            while got.len() < streams {
                match rt.block_on(ev.recv()) {
                    Some(Event::Got(id, name, t)) if name == target => {
                        if got.insert(id) {
                            lat.push(t - t0);
                        }
                    }
                    Some(_) => {}
                    None => panic!("streams ended"),
                }
            }
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
        }
        lat.sort();
        println!(
            "{variant}: {n} services x {streams} streams: full sync {:.2} s; one-service change to all streams: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples); server RSS {} MiB (peak {} MiB)",
            sync.as_secs_f64(),
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
            lat.len(),
            rss / 1024,
            hwm / 1024
        );
        for t in tasks {
            t.abort();
        }
        let _ = writeln!(stdin, "quit");
        let _ = child.wait();
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
    }
}
