//! The `ferry` command as a user runs it.

#![allow(clippy::unwrap_used)] // test helper: a failure should panic with its cause

use std::process::Command;

fn ferry(args: &[&str]) -> (i32, String, String) {
    ferry_env(args, None)
}

/// `ferry ARGS` with `FERRY_BENCH` set to `bench`, or removed.
fn ferry_env(args: &[&str], bench: Option<&std::path::Path>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args).current_dir(testkit::workspace_root());
    match bench {
        Some(b) => cmd.env("FERRY_BENCH", b),
        None => cmd.env_remove("FERRY_BENCH"),
    };
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_prints_the_summary_of_the_example() {
    let (code, out, err) = ferry(&["config", "check", "--config", "examples/ferry.yaml"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("trust domain:            client.domain"),
        "{out}"
    );
    assert!(
        out.contains("federated trust domains: local.domain"),
        "{out}"
    );
    assert!(out.contains("server.demo.local.domain:8443"), "{out}");
    assert!(out.contains("tlsMode:  IstioMtls"), "{out}");
    assert!(out.contains("payments.shop.local.domain:9443"), "{out}");
    assert!(out.contains("tlsMode:  Mtls"), "{out}");
    assert!(
        out.contains("gateway:  istio-eastwestgateway 127.0.0.10:15443"),
        "{out}"
    );
    assert!(
        out.contains("gateway:  istio-ingressgateway ingress.local.domain.example:443"),
        "{out}"
    );
}

#[test]
fn config_check_reports_all_five_seeded_mistakes_located() {
    let file = "ferry/tests/data/five-mistakes.yaml";
    let (code, out, err) = ferry(&["config", "check", "--config", file]);
    assert_eq!(code, 1, "{out}\n{err}");
    let prefix = format!("{file}:");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.strip_prefix(&prefix)
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    let expect = [
        format!("{file}:6:15: registrationEntries[0].spiffeId: invalid SPIFFE ID"),
        format!("{file}:7:17: registrationEntries[0].selectors[0]: unknown selector type \"k8s\""),
        format!("{file}:17:9: spec.port: must be 1-65535, got 70000"),
        format!("{file}:19:12: spec.tlsMode: must be Mtls or IstioMtls, got \"mtls\""),
        format!("{file}:21:7: spec.gateways[0]: set exactly one of hostname and ip"),
    ];
    assert_eq!(errors.len(), 5, "{err}");
    for (got, want) in errors.iter().zip(&expect) {
        assert!(got.starts_with(want.as_str()), "got  {got}\nwant {want}…");
    }
    assert!(err.contains("5 error(s), config rejected"), "{err}");
}

#[test]
fn config_vips_lists_every_hostname_in_the_range() {
    let (code, out, err) = ferry(&[
        "config",
        "vips",
        "--config",
        "examples/ferry.yaml",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let map: std::collections::BTreeMap<String, std::net::Ipv4Addr> =
        serde_json::from_str(&out).unwrap();
    assert_eq!(map.len(), 2);
    for vip in map.values() {
        assert_eq!(vip.octets()[0], 127);
        assert!(vip.octets()[1] >= 240, "{vip} outside 127.240.0.0/12");
        assert_ne!(*vip, std::net::Ipv4Addr::LOCALHOST);
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, _, err) = ferry(&["config", "check", "--config", "/nonexistent/ferry.yaml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read config file /nonexistent/ferry.yaml"),
        "{err}"
    );
}

#[test]
fn help_and_version() {
    let (code, out, _) = ferry(&["--help"]);
    assert_eq!(code, 0);
    for word in ["config", "agent", "--log-level", "--log-format"] {
        assert!(out.contains(word), "{out}");
    }
    let (code, out, _) = ferry(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ferry "), "{out}");
}

#[test]
fn bench_runs_the_harness_next_to_ferry_or_says_how_to_build_it() {
    let harness = std::path::Path::new(env!("CARGO_BIN_EXE_ferry")).with_file_name("ferry-bench");
    let (code, out, err) = ferry_env(&["bench", "--help"], None);
    if harness.is_file() {
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("Usage: ferry-bench"), "{out}");
        for scenario in [
            "throughput",
            "latency",
            "connections",
            "memory",
            "xds",
            "dns",
            "svid",
            "all",
        ] {
            assert!(out.contains(scenario), "{out}");
        }
    } else {
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(
            err.contains("the benchmark harness is not installed"),
            "{err}"
        );
        assert!(
            err.contains("cargo build --release -p ferry -p bench"),
            "{err}"
        );
    }
}

#[test]
fn bench_with_a_missing_ferry_bench_is_a_clear_error() {
    let (code, out, err) = ferry_env(
        &["bench", "memory"],
        Some(std::path::Path::new("/nonexistent/ferry-bench")),
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("FERRY_BENCH=/nonexistent/ferry-bench: no such file"),
        "{err}"
    );
    assert!(
        err.contains("cargo build --release -p ferry -p bench"),
        "{err}"
    );
}

#[test]
fn bench_passes_its_arguments_through_and_names_this_ferry() {
    let dir = testkit::tempdir().unwrap();
    let script = dir.path().join("fake-bench");
    std::fs::write(&script, "#!/bin/sh\necho \"FERRY_BIN=$FERRY_BIN\" \"$@\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let args = ["bench", "memory", "--rounds", "1", "--help"];
    // Another test's fork may briefly hold the new script open for writing (ETXTBSY).
    let mut attempt = 0;
    let (code, out, err) = loop {
        let r = ferry_env(&args, Some(&script));
        attempt += 1;
        if r.0 == 0 || attempt == 5 || !r.2.contains("busy") {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        out.trim(),
        format!(
            "FERRY_BIN={} memory --rounds 1 --help",
            env!("CARGO_BIN_EXE_ferry")
        )
    );
}
