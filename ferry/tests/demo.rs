//! `ferry demo`, as a newcomer runs it: five rounds in each tlsMode with both SPIFFE IDs
//! and the exchanged metadata, exit 0, no files left behind; a second demo on the same
//! ports names the busy one.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

fn demo(base: u16, count: u32) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.args([
        "demo",
        "--count",
        &count.to_string(),
        "--base-port",
        &base.to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    c
}

/// A base port with 11 free ports after it.
fn free_base() -> u16 {
    for _ in 0..50 {
        let base = 20000 + (rand_u16() % 20000);
        if (0..11).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u16
}

fn demo_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ferry-demo-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_rounds_in_each_tls_mode_then_exit_0_and_a_second_demo_names_the_busy_port() {
    let before = demo_dirs();
    let base = free_base();
    let first = demo(base, 5).spawn().unwrap();
    // While the first runs, a second on the same ports fails and names the port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = tokio::time::timeout(Duration::from_secs(30), demo(base, 1).output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains(&format!("127.0.0.1:{base}")) && err.contains("in use"),
        "{err}"
    );

    let out = tokio::time::timeout(Duration::from_secs(120), first.wait_with_output())
        .await
        .expect("the demo ends after its rounds")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let client = "spiffe://other1.domain/ns/demo/sa/client";
    for round in 1..=5 {
        let istio =
            format!("[{round}] IstioMtls {client} -> spiffe://local.domain/ns/demo/sa/server");
        let mtls =
            format!("[{round}] Mtls      {client} -> spiffe://local.domain/ns/demo/sa/mtls-server");
        assert!(stdout.contains(&istio), "{istio}\n{stdout}");
        assert!(stdout.contains(&mtls), "{mtls}\n{stdout}");
    }
    assert_eq!(
        stdout.matches("peer metadata: name=server-5d8f7c-x2x4q namespace=demo workload=server identity=spiffe://local.domain/ns/demo/sa/server").count(),
        5,
        "{stdout}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
    // Nothing left behind: no demo dir, no child listening.
    assert_eq!(demo_dirs(), before);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", base))
            .await
            .is_err()
    );
}
