//! `ferry agent --config FILE` serves the SPIFFE Workload API on `listen.workloadApi`:
//! it replaces a stale socket file, answers the real `spiffe` client, and on SIGTERM stops
//! cleanly and removes its socket.

mod common;
use std::time::Duration;

#[tokio::test]
async fn agent_serves_the_workload_api_and_stops_on_sigterm() {
    let dir = testkit::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let sock = dir.path().join("agent.sock");
    // A stale socket left by a crashed agent: nothing listens on it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let cfg = dir.path().join("ferry.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\nlisten:\n  xds: 127.0.0.1:{xds}\n  dns: 127.0.0.1:{dns}\n  workloadApi: unix://{d}/agent.sock\nca:\n  stateDir: {d}/ca\nregistrationEntries:\n  - spiffeId: spiffe://client.domain/app\n    selectors: [\"unix:uid:{uid}\"]\n",
            xds = testkit::free_port(),
            dns = testkit::free_port(),
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry agent");

    let endpoint = format!("unix://{d}/agent.sock");
    let mut svid = None;
    for _ in 0..200 {
        if let Ok(c) = spiffe::WorkloadApiClient::connect_to(&endpoint).await
            && let Ok(s) = c.fetch_x509_svid().await
        {
            svid = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let svid = svid.expect("ferry agent serves the Workload API within 20 s");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://client.domain/app");

    let status = common::sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed on shutdown");
    // The CA state stays for the next start: key files are private.
    for k in std::fs::read_dir(dir.path().join("ca/keys")).unwrap() {
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&k.unwrap().metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }
}
