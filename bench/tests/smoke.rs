//! Every data-path scenario of `ferry-bench` runs end to end with tiny sizes: the whole
//! topology starts (two agents, `ferry proxy`, stock Envoy), traffic passes through every
//! variant, and the JSON report has the shape tools read. Never asserts a speed.
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

fn run(scenario: &str, extra: &[&str]) {
    let (Some(ferry), Some(_envoy)) = (ferry_binary(), testkit::envoy::require()) else {
        return;
    };
    let dir = testkit::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-bench"))
        .args([scenario, "--duration", "0.3", "--rounds", "1", "--json"])
        .arg(&json)
        .arg("--svg")
        .arg(dir.path())
        .args(extra)
        .env("FERRY_BIN", &ferry)
        .output()
        .expect("run ferry-bench");
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
        for key in ["case", "metric", "higher_is_better", "ratio_ferry_envoy"] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        // Every variant carried traffic: the first metric of each case has all three.
        if row["metric"] == rows[0]["metric"] {
            for v in ["direct", "ferry", "envoy"] {
                assert!(row[v].as_f64().is_some_and(|x| x > 0.0), "{v} in {row}");
            }
        }
    }
    let svg = std::fs::read_to_string(dir.path().join(format!("{scenario}.svg"))).unwrap();
    assert!(svg.contains("<svg") && svg.contains(scenario));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| case | metric | direct | ferry | envoy | ferry/envoy |"));
}

#[test]
fn throughput_runs_through_every_variant() {
    run("throughput", &["--connections", "1,2"]);
}

#[test]
fn latency_runs_through_every_variant() {
    run("latency", &[]);
}

#[test]
fn connections_runs_through_every_variant() {
    run("connections", &["--connections", "2"]);
}
