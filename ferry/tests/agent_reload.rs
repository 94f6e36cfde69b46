//! `ferry agent` hot reload seen from outside, as an operator would: `/ready` turns 200
//! once everything is up; reading the config (`cat ferry.yaml`) is not an edit; a bad
//! edit is reported once, not once per inotify event; an edit of a restart-only setting is
//! refused with a message saying so, and the agent keeps serving.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;
use std::process::Stdio;
use std::time::Duration;

fn count(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[tokio::test]
async fn reads_are_not_edits_bad_edits_are_logged_once_and_restart_only_edits_are_refused() {
    let dir = testkit::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let xds = testkit::free_port();
    let cfg = dir.path().join("ferry.yaml");
    let agent = |td: &str| {
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: {td}\nlisten:\n  xds: 127.0.0.1:{xds}\n  workloadApi: unix://{d}/agent.sock\nca:\n  stateDir: {d}/ca\n"
        )
    };
    std::fs::write(&cfg, agent("client.domain")).unwrap();
    let log = dir.path().join("agent.log");
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], testkit::free_port()).into();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "--log-format",
            "text",
            "agent",
            "--admin",
            &admin.to_string(),
            "--config",
        ])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry agent");

    testkit::wait_until("/ready answers 200", Duration::from_secs(20), || async {
        testkit::http::get(admin, "/ready")
            .await
            .is_ok_and(|r| r.status == 200 && r.body == "LIVE\n")
    })
    .await
    .unwrap();
    // Workload API connection counters are scraped with the xDS metrics.
    let m = testkit::http::get(admin, "/metrics").await.unwrap();
    for name in [
        "ferry_workload_api_connections_accepted_total",
        "ferry_workload_api_connections_rejected_over_limit_total 0",
        "ferry_xds_oversized_requests_total 0",
    ] {
        assert!(
            m.body.contains(name),
            "{name} missing from /metrics:\n{}",
            m.body
        );
    }
    let lines_when_ready = std::fs::read_to_string(&log).unwrap().lines().count();

    // Someone reads the config, many times: nothing is re-read, nothing is logged.
    for _ in 0..20 {
        std::fs::read_to_string(&cfg).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        lines_when_ready,
        "reading the config must not make the agent log: {}",
        std::fs::read_to_string(&log).unwrap()
    );

    // A bad edit in place: rejected once, and reads afterwards do not repeat it.
    std::fs::write(
        &cfg,
        agent("client.domain").replace("ferry.dev/v1alpha1", "v9"),
    )
    .unwrap();
    testkit::wait_for_log(&log, "config edit rejected", Duration::from_secs(5))
        .await
        .unwrap();
    for _ in 0..20 {
        std::fs::read_to_string(&cfg).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(count(&log, "config edit rejected"), 1);

    // A trustDomain change: refused, named, and the agent stays ready.
    std::fs::write(&cfg, agent("other.domain")).unwrap();
    testkit::wait_for_log(&log, "restart ferry to apply them", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("changed=trustDomain"),
        "the refused setting is named"
    );
    let r = testkit::http::get(admin, "/ready").await.unwrap();
    assert_eq!(r.status, 200);

    let status = common::sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
}
