//! Every scenario of `ferry-bench` but `dns` and `all` runs end to end with tiny sizes: for
//! the data-path ones the whole topology starts (two agents, `ferry proxy`, stock Envoy) and
//! traffic passes through every variant; `xds` and `svid` measure ferry alone. The JSON
//! report has the shape tools read and the SVG chart is written. Never asserts a speed.
//!
//! Needs a ferry binary (`$FERRY_BIN`, else `target/release/ferry`, else
//! `target/debug/ferry`, else the one built beside `ferry-bench`) and stock Envoy; either
//! missing fails under `CI=true`.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;

fn ferry_binary() -> Option<PathBuf> {
    let root = testkit::workspace_root();
    // `cargo test --workspace` builds `ferry` beside `ferry-bench`, wherever the target
    // dir is (CARGO_TARGET_DIR may put it outside the workspace).
    let sibling = std::path::Path::new(env!("CARGO_BIN_EXE_ferry-bench")).with_file_name("ferry");
    let found = std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain(["target/release/ferry", "target/debug/ferry"].map(|p| root.join(p)))
        .chain([sibling])
        .find(|p| p.is_file());
    testkit::require(
        "a ferry binary (cargo build -p ferry, or $FERRY_BIN)",
        found.is_some(),
    )
    .then_some(found)?
}

/// Which variants a scenario's first metric must have a value for in every case (the
/// others may be empty).
const ALL_THREE: &[&str] = &["direct", "ferry", "envoy"];
/// Proxies only (`memory`: direct has no proxy to measure).
const PROXIES: &[&str] = &["ferry", "envoy"];
/// ferry only (`xds`, `svid`: no Envoy or direct counterpart).
const FERRY: &[&str] = &["ferry"];

/// Runs the data-path `scenario` (the whole topology: ferry and Envoy) for 0.3 s, 1 round.
fn run(scenario: &str, extra: &[&str], carried: &[&str]) {
    let (Some(ferry), Some(_envoy)) = (ferry_binary(), testkit::envoy::require()) else {
        return;
    };
    let mut args = vec!["--duration", "0.3", "--rounds", "1"];
    args.extend_from_slice(extra);
    run_with(scenario, &args, carried, Some(&ferry));
}

/// Runs `ferry-bench scenario args...` (with `FERRY_BIN` = `ferry` if given), its JSON and
/// SVG into a temp dir, and checks the report's shape: every case's first metric has a
/// positive value for each of `carried`.
fn run_with(scenario: &str, args: &[&str], carried: &[&str], ferry: Option<&PathBuf>) {
    let dir = testkit::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-bench"));
    cmd.arg(scenario)
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(dir.path());
    if let Some(f) = ferry {
        cmd.env("FERRY_BIN", f);
    }
    let out = cmd.output().expect("run ferry-bench");
    assert!(
        out.status.success(),
        "ferry-bench {scenario} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["scenario"], scenario);
    assert!(report["machine"]["cores"].as_u64().unwrap() > 0);
    let rows = report["results"].as_array().unwrap();
    assert!(!rows.is_empty());
    for row in rows {
        for key in [
            "case",
            "metric",
            "higher_is_better",
            "direct",
            "ferry",
            "envoy",
            "ratio_ferry_envoy",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        // Every variant measured carried traffic: the first metric of each case has a value
        // for each.
        if row["metric"] == rows[0]["metric"] {
            for v in carried {
                assert!(row[v].as_f64().is_some_and(|x| x > 0.0), "{v} in {row}");
            }
        }
        // A ferry-only scenario leaves the other columns empty.
        if carried == FERRY {
            assert!(row["envoy"].is_null() && row["direct"].is_null(), "{row}");
        }
    }
    let svg = std::fs::read_to_string(dir.path().join(format!("{scenario}.svg"))).unwrap();
    assert!(svg.contains("<svg") && svg.contains(scenario));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| case | metric | direct | ferry | envoy | ferry/envoy |"));
}

#[test]
fn throughput_runs_through_every_variant() {
    run("throughput", &["--connections", "1,2"], ALL_THREE);
}

#[test]
fn latency_runs_through_every_variant() {
    run("latency", &[], ALL_THREE);
}

#[test]
fn connections_runs_through_every_variant() {
    run("connections", &["--connections", "2"], ALL_THREE);
}

#[test]
fn memory_holds_connections_through_both_proxies() {
    run("memory", &["--connections", "50"], PROXIES);
}

#[test]
fn xds_syncs_and_fans_out_a_change() {
    // Needs neither ferry nor Envoy: the server is ferry-bench's own child.
    run_with(
        "xds",
        &["--services", "200", "--streams", "5", "--changes", "3"],
        FERRY,
        None,
    );
}

#[test]
fn svid_fetches_from_a_real_agent() {
    let Some(ferry) = ferry_binary() else {
        return;
    };
    run_with("svid", &["--duration", "0.3"], FERRY, Some(&ferry));
}
