//! Parity: for the same ferry config, stock Envoy's `dns_filter` (fed by `ferry agent`'s
//! xDS) and `ferry dns` (fed by the same xDS through ferry's ADS client) give the same
//! answers for every federated name.

#![allow(clippy::unwrap_used)] // test setup: a failure should panic with its cause

mod common;
use std::net::SocketAddr;
use std::time::Duration;

use testkit::dns::{DigAnswer, dig, dig_available};

fn config(
    dir: &std::path::Path,
    xds: SocketAddr,
    envoy_dns: SocketAddr,
    upstream: SocketAddr,
) -> String {
    let mut s = format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\nlisten:\n  xds: {xds}\n  dns: {envoy_dns}\n  workloadApi: unix://{}/agent.sock\nca:\n  stateDir: {}/ca\ndns:\n  upstreams: [\"{upstream}\"]\n",
        dir.display(),
        dir.display()
    );
    for (name, ns) in [("server", "demo"), ("payments", "shop"), ("api", "demo")] {
        s.push_str(&format!(
            "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{ferry.dev/trust-domain: local.domain}}}}\nspec: {{name: {name}, namespace: {ns}, port: 9443, spiffeIDPaths: [/ns/{ns}/sa/{name}], tlsMode: Mtls, gateways: [{{type: istio-eastwestgateway, port: 15443, ip: 127.0.0.10}}]}}\n"
        ));
    }
    s
}

/// The parts of an answer both must agree on.
fn key(a: &DigAnswer) -> (String, Vec<(String, u32, String, String)>) {
    let mut answers = a.answers.clone();
    answers.sort();
    (a.status.clone(), answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_dns_filter_and_ferry_dns_agree_on_federated_names() {
    let Some(envoy_bin) = testkit::envoy::require() else {
        return;
    };
    if !testkit::require("dig (Debian package dnsutils)", dig_available()) {
        return;
    }
    let dir = testkit::tempdir().unwrap();
    let xds: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let envoy_dns: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let ferry_dns: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let ferry_nx: SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let path = dir.path().join("ferry.yaml");
    let upstream = testkit::dns::Upstream::start().await.unwrap();
    std::fs::write(&path, config(dir.path(), xds, envoy_dns, upstream.addr())).unwrap();

    let mut agent = common::spawn_ferry(["agent", "--config", path.to_str().unwrap()]);
    testkit::wait_for_port(xds, Duration::from_secs(15))
        .await
        .unwrap();
    let envoy =
        testkit::envoy::Envoy::start_sidecar(&envoy_bin, xds, &dir.path().join("agent.sock"))
            .await
            .unwrap();
    envoy
        .wait_admin("/listeners", Duration::from_secs(20), |b| {
            b.contains("dns::")
        })
        .await
        .unwrap();
    let _dns = common::spawn_ferry([
        "dns",
        "--xds",
        &format!("http://{xds}"),
        "--listen",
        &ferry_dns.to_string(),
        "--upstream",
        &upstream.addr().to_string(),
        "--search-suffix",
        "svc.cluster.local",
    ]);

    let names = [
        "server.demo.local.domain",
        "payments.shop.local.domain",
        "API.Demo.Local.Domain.",
    ];
    // Both have learned the names once each answers the first one.
    for server in [envoy_dns, ferry_dns] {
        testkit::wait_until(
            &format!("{server} answers"),
            Duration::from_secs(20),
            || async move {
                dig(server, names[0], "A", &[])
                    .await
                    .is_ok_and(|a| !a.answers.is_empty())
            },
        )
        .await
        .unwrap();
    }
    let vips = common::vips(&path);
    for name in names {
        let e = dig(envoy_dns, name, "A", &[]).await.unwrap();
        let f = dig(ferry_dns, name, "A", &[]).await.unwrap();
        assert_eq!(
            key(&e),
            key(&f),
            "A {name}\nenvoy:\n{}\nferry:\n{}",
            e.raw,
            f.raw
        );
        let want = &vips[&name.trim_end_matches('.').to_ascii_lowercase()];
        assert_eq!(&f.answers[0].3, want, "{}", f.raw);
    }
    // AAAA: no data from either. Envoy says NXDOMAIN; ferry by default says NOERROR (RFC
    // 8020: the name exists) and, with --no-data nxdomain, exactly what Envoy says.
    let _ferry_nx = common::spawn_ferry([
        "dns",
        "--xds",
        &format!("http://{xds}"),
        "--listen",
        &ferry_nx.to_string(),
        "--upstream",
        &upstream.addr().to_string(),
        "--search-suffix",
        "svc.cluster.local",
        "--no-data",
        "nxdomain",
    ]);
    testkit::wait_until(
        "ferry --no-data nxdomain answers",
        Duration::from_secs(20),
        || async move {
            dig(ferry_nx, names[0], "A", &[])
                .await
                .is_ok_and(|a| !a.answers.is_empty())
        },
    )
    .await
    .unwrap();
    for name in names {
        let e = dig(envoy_dns, name, "AAAA", &[]).await.unwrap();
        let f = dig(ferry_dns, name, "AAAA", &[]).await.unwrap();
        let n = dig(ferry_nx, name, "AAAA", &[]).await.unwrap();
        assert!(
            e.answers.is_empty() && f.answers.is_empty(),
            "{}\n{}",
            e.raw,
            f.raw
        );
        assert_eq!(f.status, "NOERROR", "{}", f.raw);
        assert_eq!(
            key(&e),
            key(&n),
            "AAAA {name}\nenvoy:\n{}\nferry --no-data nxdomain:\n{}",
            e.raw,
            n.raw
        );
    }

    // Names that are not federated: both resolve them through the same upstream (the
    // config's dns.upstreams reach Envoy over LDS), and pass NXDOMAIN through.
    let values = |a: &DigAnswer| {
        let mut v: Vec<(String, String)> = a
            .answers
            .iter()
            .map(|r| (r.2.clone(), r.3.clone()))
            .collect();
        v.sort();
        (a.status.clone(), v)
    };
    for name in ["www.upstream.test", "nope.upstream.test"] {
        let e = dig(envoy_dns, name, "A", &[]).await.unwrap();
        let f = dig(ferry_dns, name, "A", &[]).await.unwrap();
        assert_eq!(
            values(&e),
            values(&f),
            "A {name}\nenvoy:\n{}\nferry:\n{}",
            e.raw,
            f.raw
        );
    }
    let w = dig(ferry_dns, "www.upstream.test", "A", &[]).await.unwrap();
    assert_eq!(
        w.answers[0].3,
        testkit::dns::UPSTREAM_WWW.to_string(),
        "{}",
        w.raw
    );

    // The control plane goes away: the last names learned keep serving.
    agent.kill().await.unwrap();
    agent.wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let f = dig(ferry_dns, names[0], "A", &[]).await.unwrap();
    assert_eq!(
        f.answers[0].3, vips[names[0]],
        "still serving without xDS: {}",
        f.raw
    );
}
