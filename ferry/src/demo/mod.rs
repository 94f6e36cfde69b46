//! `ferry demo`: the whole mission on one machine, no root, no flags, every port on
//! loopback. Two trust domains (`local.domain` serving, `other1.domain` calling), an agent
//! per zone with the bundles exchanged, `ferry gateway` for `local.domain`, `ferry proxy
//! --inbound` in front of a plain HTTP ping-pong server (`IstioMtls`), a server doing its
//! own mTLS with its SVID (`Mtls`), the client-side `ferry proxy --bind-vips` with DNS, and
//! clients that resolve the federated names through ferry's DNS. Every second one line
//! per tlsMode: client SPIFFE ID -> server SPIFFE ID, the peer metadata exchanged, the
//! round-trip time. Every ferry part runs as a child process of this one (the real
//! commands); the demo's own workloads run in-process. Ctrl-C or `--count N` stops it all
//! and removes its files.

mod apps;
mod children;
mod topology;

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use children::Children;
use topology::{
    CLIENT_ID, CLIENT_TD, ISTIO_HOST, MTLS_HOST, MTLS_SERVER_ID, Ports, SERVER_TD, SERVICE_PORT,
    Zone, loopback,
};

/// Runs the demo; `Ok(true)` when every round succeeded.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let ports = Ports::from(args.base_port)?;
    // Ports first, so a second demo (or anything else) in the way is named at once.
    for (what, addr) in ports.tcp() {
        std::net::TcpListener::bind(addr).with_context(|| {
            format!("port {addr} ({what}) is in use: is another ferry demo running? Move every port with --base-port")
        })?;
    }
    std::net::UdpSocket::bind(loopback(ports.dns)).with_context(|| {
        format!(
            "port {} (client DNS, udp) is in use; move every port with --base-port",
            loopback(ports.dns)
        )
    })?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("creating the demo's temp dir")?;
    let server = Zone::new(dir.path(), SERVER_TD);
    let client = Zone::new(dir.path(), CLIENT_TD);
    let uid = nix::unistd::geteuid().as_raw();
    for (td, zone) in [(SERVER_TD, &server), (CLIENT_TD, &client)] {
        create_ca(td, zone).with_context(|| format!("creating the {td} CA"))?;
    }
    std::fs::write(
        &server.config,
        topology::server_config(&server, &client, &ports, uid),
    )?;
    std::fs::write(
        &client.config,
        topology::client_config(&client, &server, &ports, uid),
    )?;
    let vips = service_vips(&client)?;
    for (host, vip) in &vips {
        let addr = std::net::SocketAddr::from((*vip, SERVICE_PORT));
        std::net::TcpListener::bind(addr).with_context(|| {
            format!("{addr} (the VIP of {host}) is in use: is another ferry demo running?")
        })?;
    }

    let stop = CancellationToken::new();
    let app = TcpListener::bind(loopback(ports.app))
        .await
        .context("ping-pong app port")?;
    let mtls_app = TcpListener::bind(loopback(ports.mtls_app))
        .await
        .context("Mtls app port")?;
    let mut kids = Children::new(dir.path());
    let outcome = async {
        kids.start_zones(&server, &client, &ports).await?;
        kids.start_data_plane(&server, &client, &ports).await?;
        let server_identity = apps::identity(&server.socket, Some(MTLS_SERVER_ID)).await?;
        let client_identity = apps::identity(&client.socket, None).await?;
        tokio::spawn(apps::ping_pong_server(app, stop.clone()));
        tokio::spawn(apps::mtls_server(mtls_app, server_identity, stop.clone()));
        println!(
            "ferry demo: {CLIENT_TD} calls {ISTIO_HOST}:{SERVICE_PORT} (IstioMtls) and {MTLS_HOST}:{SERVICE_PORT} (Mtls)"
        );
        println!(
            "  through ferry proxy (client, DNS {}), ferry gateway ({}), ferry proxy --inbound ({}); logs in {}",
            loopback(ports.dns),
            loopback(ports.gateway),
            loopback(ports.inbound),
            dir.path().display()
        );
        rounds(&args, &ports, &kids, &client_identity).await
    };
    let result = tokio::select! {
        r = outcome => r,
        _ = crate::agent::shutdown_signal() => {
            println!("ferry demo: stopping");
            Ok(true)
        }
    };
    if let Ok(false) | Err(_) = result {
        eprintln!("{}", kids.log_tails(15));
    }
    stop.cancel();
    kids.stop().await;
    drop(dir);
    result
}

/// Creates a zone's CA before its agent runs (the agent reopens the same state) and writes
/// its bundle where the other zone's config points.
fn create_ca(td: &str, zone: &Zone) -> anyhow::Result<()> {
    let zdir = zone.config.parent().context("zone dir")?;
    std::fs::create_dir_all(zdir)?;
    let minimal = zdir.join("ca-only.yaml");
    std::fs::write(
        &minimal,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: {td}\nca:\n  stateDir: {}\n",
            zone.state.display()
        ),
    )?;
    let loaded = registry::config::load(&minimal).map_err(|e| anyhow::anyhow!("{e}"))?;
    let authority = crate::ca::open(&loaded.config.agent)?;
    let pem: String = authority
        .x509_authorities()
        .into_iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der)))
        .collect();
    std::fs::write(&zone.bundle, pem)?;
    std::fs::remove_file(&minimal)?;
    Ok(())
}

/// The VIPs the client zone allocates to the two services.
fn service_vips(client: &Zone) -> anyhow::Result<Vec<(String, std::net::Ipv4Addr)>> {
    let loaded = registry::config::load(&client.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(loaded
        .config
        .services
        .iter()
        .map(|s| (s.hostname.to_string(), s.vip))
        .collect())
}

async fn rounds(
    args: &DemoArgs,
    ports: &Ports,
    kids: &Children,
    client_identity: &proxy::identity::Identity,
) -> anyhow::Result<bool> {
    let dns = loopback(ports.dns);
    let mut all_ok = true;
    let mut round = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        round += 1;
        // IstioMtls: plain HTTP from the app; ferry's sidecar upgrades it.
        let t = Instant::now();
        let istio = async {
            let vip = apps::resolve(dns, ISTIO_HOST).await?;
            let (local, body) = apps::plain_get((vip, SERVICE_PORT).into(), ISTIO_HOST).await?;
            let rtt = t.elapsed();
            let access = kids
                .client_access_for(local, Duration::from_secs(3))
                .await?;
            anyhow::Ok((rtt, body, access))
        }
        .await;
        match istio {
            Ok((rtt, body, a)) => println!(
                "[{round}] IstioMtls {CLIENT_ID} -> {}  rtt={:.1}ms  \"{body}\"\n      peer metadata: {}",
                a.peer_id,
                rtt.as_secs_f64() * 1e3,
                a.peer_meta
            ),
            Err(e) => {
                all_ok = false;
                println!("[{round}] IstioMtls FAILED: {e:#}");
            }
        }
        // Mtls: the client does its own mTLS; ferry forwards the bytes untouched.
        let t = Instant::now();
        let mtls = async {
            let vip = apps::resolve(dns, MTLS_HOST).await?;
            let (server_id, body) =
                apps::mtls_get((vip, SERVICE_PORT).into(), client_identity).await?;
            anyhow::Ok((t.elapsed(), server_id, body))
        }
        .await;
        match mtls {
            Ok((rtt, server_id, body)) => println!(
                "[{round}] Mtls      {CLIENT_ID} -> {server_id}  rtt={:.1}ms  \"{body}\"",
                rtt.as_secs_f64() * 1e3
            ),
            Err(e) => {
                all_ok = false;
                println!("[{round}] Mtls FAILED: {e:#}");
            }
        }
        if args.count.is_some_and(|n| round >= n) {
            return Ok(all_ok);
        }
    }
}
