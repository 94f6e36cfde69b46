//! Stock Envoy with the shared Cofide sidecar bootstrap (SotW) and a DELTA_GRPC variant,
//! driven only by ferry's xDS server: clusters, endpoints and listeners load, hot-reloaded
//! config edits reach Envoy, bad edits change nothing, the Mtls data path works through
//! the `outbound` listener, and Envoy's DNS listener answers federated names with VIPs.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testkit::envoy::Envoy;
use testkit::xds_agent::{Agent, Gw, Ports, agent_doc, echo_server, host, service_doc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_envoy(bin: &std::path::Path, agent: &Agent, delta: bool) -> Envoy {
    let sock = agent.dir.path().join("no-sds.sock");
    if delta {
        let admin = testkit::free_port();
        Envoy::start(
            bin,
            &testkit::envoy::render_sidecar_bootstrap_delta(agent.addr, &sock, admin),
            admin,
        )
        .await
        .expect("envoy starts")
    } else {
        Envoy::start_sidecar(bin, agent.addr, &sock)
            .await
            .expect("envoy starts")
    }
}

/// `name::ip:port` entries Envoy's `/clusters` lists for `cluster`.
fn has_endpoint(clusters: &str, cluster: &str, ep: &str) -> bool {
    clusters
        .lines()
        .any(|l| l.starts_with(&format!("{cluster}::{ep}::")))
}

fn stat(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

async fn registry_follows_config(delta: bool) {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let ports = Ports::free();
    let a_doc = service_doc(
        "alpha",
        8443,
        "Mtls",
        &[
            Gw("istio-eastwestgateway", "127.0.0.21", 15443),
            Gw("istio-ingressgateway", "127.0.0.22", 443),
        ],
    );
    let b_doc = service_doc(
        "bravo",
        9443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "localhost", 15443)],
    );
    let agent = Agent::start(&format!("{}{a_doc}{b_doc}", agent_doc(ports))).await;
    let envoy = start_envoy(&bin, &agent, delta).await;

    let alpha = format!("{}_cluster", host("alpha"));
    let bravo = format!("{}_cluster", host("bravo"));
    let clusters = envoy
        .wait_admin("/clusters", Duration::from_secs(20), |b| {
            has_endpoint(b, &alpha, "127.0.0.21:15443")
                && has_endpoint(b, &alpha, "127.0.0.22:443")
                && has_endpoint(b, &bravo, "127.0.0.1:15443")
        })
        .await
        .expect("clusters with gateway endpoints");
    // Priorities: east-west 0, ingress 1.
    assert!(
        clusters.contains(&format!("{alpha}::127.0.0.22:443::priority::1")),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("{alpha}::127.0.0.21:15443::priority::0")),
        "{clusters}"
    );
    let listeners = envoy
        .wait_admin("/listeners", Duration::from_secs(20), |b| {
            b.contains("outbound::") && b.contains("dns::")
        })
        .await
        .expect("listeners");
    assert!(
        listeners.contains(&format!("outbound::{}", ports.outbound)),
        "{listeners}"
    );
    assert!(
        listeners.contains(&format!("dns::{}", ports.dns)),
        "{listeners}"
    );

    // Add a service: it appears within 1 s.
    let c_doc = service_doc(
        "charlie",
        7443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "127.0.0.23", 15443)],
    );
    let charlie = format!("{}_cluster", host("charlie"));
    let t0 = Instant::now();
    agent.write(&format!("{}{a_doc}{b_doc}{c_doc}", agent_doc(ports)));
    envoy
        .wait_admin("/clusters", Duration::from_secs(10), |b| {
            has_endpoint(b, &charlie, "127.0.0.23:15443")
        })
        .await
        .expect("added service reaches Envoy");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "added service took {took:?} to reach Envoy"
    );

    // Change alpha's gateway: the endpoint moves.
    let a2_doc = service_doc(
        "alpha",
        8443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "127.0.0.31", 15443)],
    );
    agent.write(&format!("{}{a2_doc}{b_doc}{c_doc}", agent_doc(ports)));
    envoy
        .wait_admin("/clusters", Duration::from_secs(10), |b| {
            has_endpoint(b, &alpha, "127.0.0.31:15443") && !b.contains("127.0.0.21:15443")
        })
        .await
        .expect("gateway change reaches Envoy");

    // Change alpha's port: the cluster is replaced while its endpoints stay the same, and
    // the new cluster must finish warming (its EDS assignment must reach it) promptly.
    let a3_doc = a2_doc.replace("port: 8443", "port: 8444");
    let before = stat(
        &envoy.admin_get("/stats").await.expect("stats"),
        "cluster_manager.cds.update_success",
    );
    agent.write(&format!("{}{a3_doc}{b_doc}{c_doc}", agent_doc(ports)));
    envoy
        .wait_admin("/stats", Duration::from_secs(3), |b| {
            stat(b, "cluster_manager.cds.update_success") > before
                && stat(b, "cluster_manager.warming_clusters") == Some(0)
        })
        .await
        .expect("updated cluster warms with its endpoints");
    let clusters = envoy.admin_get("/clusters").await.expect("clusters");
    assert!(
        has_endpoint(&clusters, &alpha, "127.0.0.31:15443"),
        "{clusters}"
    );
    let a2_doc = a3_doc;

    // Remove charlie and bravo: they disappear within 1 s.
    let t0 = Instant::now();
    agent.write(&format!("{}{a2_doc}", agent_doc(ports)));
    envoy
        .wait_admin("/clusters", Duration::from_secs(10), |b| {
            !b.contains(&charlie) && !b.contains(&bravo)
        })
        .await
        .expect("removed services leave Envoy");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "removal took {took:?} to reach Envoy"
    );

    // A bad edit changes nothing: no CDS/LDS update reaches Envoy, and ferry still serves
    // the last good snapshot.
    let stats_before = envoy.admin_get("/stats").await.expect("stats");
    let generation = agent.snapshots.borrow().generation;
    agent.write(&format!(
        "{}{}",
        agent_doc(ports),
        a2_doc.replace("port: 8443", "port: 99999")
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stats_after = envoy.admin_get("/stats").await.expect("stats");
    for s in [
        "cluster_manager.cds.update_success",
        "listener_manager.lds.update_success",
        "cluster_manager.cds.update_attempt",
    ] {
        assert_eq!(stat(&stats_before, s), stat(&stats_after, s), "{s} changed");
    }
    assert_eq!(agent.snapshots.borrow().generation, generation);
    let clusters = envoy.admin_get("/clusters").await.expect("clusters");
    assert!(
        has_endpoint(&clusters, &alpha, "127.0.0.31:15443"),
        "{clusters}"
    );
    // Nothing was rejected along the way.
    let stats = envoy.admin_get("/stats").await.expect("stats");
    assert_eq!(
        stat(&stats, "cluster_manager.cds.update_rejected"),
        Some(0),
        "{}",
        envoy.log_tail(80)
    );
    assert_eq!(
        stat(&stats, "listener_manager.lds.update_rejected"),
        Some(0),
        "{}",
        envoy.log_tail(80)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_envoy_follows_the_registry() {
    registry_follows_config(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_envoy_follows_the_registry() {
    registry_follows_config(true).await;
}

/// Connects to `vip:port` until the tagged greeting and an echo come back.
async fn roundtrip(dst: SocketAddr, tag: &str) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(dst)
        .await
        .map_err(|e| format!("connect {dst}: {e}"))?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; tag.len() + 4];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .map_err(|_| "timed out reading".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let got = String::from_utf8_lossy(&buf).to_string();
    if got == format!("{tag}ping") {
        Ok(())
    } else {
        Err(format!("got {got:?}"))
    }
}

async fn mtls_data_path_and_dns(delta: bool) {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let dig = testkit::require(
        "dig (dnsutils)",
        std::process::Command::new("dig").arg("-v").output().is_ok(),
    );
    // The outbound listener listens on 0.0.0.0:P where P is the service port, so a client
    // connecting to VIP:P reaches it without capture rules, and the filter chain matches
    // the local (= original) destination VIP:P.
    let port = testkit::free_port();
    let ports = Ports {
        outbound: ([0, 0, 0, 0], port).into(),
        dns: ([127, 0, 0, 1], testkit::free_port()).into(),
    };
    let gw = echo_server(([127, 0, 0, 1], 0).into(), "gateway:").await;
    let doc = service_doc(
        "echo",
        port,
        "Mtls",
        &[Gw("istio-eastwestgateway", "127.0.0.1", gw.port())],
    );
    let agent = Agent::start(&format!("{}{doc}", agent_doc(ports))).await;
    let vip = agent.config.borrow().services[0].vip;
    let envoy = start_envoy(&bin, &agent, delta).await;
    envoy
        .wait_admin("/listeners", Duration::from_secs(20), |b| {
            b.contains("outbound::")
        })
        .await
        .expect("outbound listener");
    let dst: SocketAddr = (vip, port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok = loop {
        match roundtrip(dst, "gateway:").await {
            Ok(()) => break Ok(()),
            Err(e) if Instant::now() > deadline => break Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    if let Err(e) = ok {
        panic!(
            "VIP {dst} -> Envoy -> gateway failed: {e}\n{}",
            envoy.log_tail(60)
        );
    }

    // A loopback destination that is not federated is not relayed (no default chain).
    let other: SocketAddr = ([127, 0, 0, 77], port).into();
    assert!(roundtrip(other, "gateway:").await.is_err());

    if dig {
        let out = tokio::process::Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &ports.dns.port().to_string(),
                &host("echo"),
                "A",
                "+short",
                "+time=2",
                "+tries=3",
            ])
            .output()
            .await
            .expect("run dig");
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            answer,
            vip.to_string(),
            "dig stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_envoy_mtls_data_path_and_dns() {
    mtls_data_path_and_dns(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_envoy_mtls_data_path_and_dns() {
    mtls_data_path_and_dns(true).await;
}
