//! `ferry export` as a user runs it, its output checked against Istio's API: every object
//! validates against the strict subsets of Istio's CRD schemas in `tests/data/istio-crds/`
//! (see `scripts/validate-manifests.py subset` for how they are checked against upstream).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure panics with its cause

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn ferry(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .current_dir(testkit::workspace_root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The project's Python (`.venv`, set up by `scripts/install-peers.sh`) when it has
/// jsonschema and PyYAML.
fn python() -> Option<PathBuf> {
    let py = testkit::workspace_root().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import jsonschema, yaml, referencing"])
        .status()
        .is_ok_and(|s| s.success());
    testkit::require(
        ".venv python with jsonschema (pip install kubernetes-validate)",
        ok,
    )
    .then_some(py)
}

/// Runs `validate-manifests.py istio` on `yaml`; returns (success, report).
fn validate_istio(py: &PathBuf, yaml: &str) -> (bool, String) {
    let root = testkit::workspace_root();
    let mut child = Command::new(py)
        .arg(root.join("scripts/validate-manifests.py"))
        .arg("istio")
        .arg(root.join("ferry/tests/data/istio-crds"))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const FIXTURE: &str = "ferry/tests/data/export-server.yaml";

#[test]
fn every_exported_object_validates_against_istio_schemas() {
    let (code, out, err) = ferry(&["export", "--config", FIXTURE]);
    assert_eq!(code, 0, "{out}\n{err}");
    for kind in [
        "kind: ServiceEntry",
        "kind: PeerAuthentication",
        "kind: Gateway",
        "kind: VirtualService",
        "mode: AUTO_PASSTHROUGH",
        "mode: PASSTHROUGH",
        "mode: STRICT",
        "mode: DISABLE",
    ] {
        assert!(out.contains(kind), "{kind} missing:\n{out}");
    }
    assert!(
        !out.contains("client-api"),
        "imported service exported:\n{out}"
    );
    assert_eq!(out.matches("---\n").count(), 7, "{out}");
    let Some(py) = python() else { return };
    let (ok, report) = validate_istio(&py, &out);
    assert!(ok, "{report}\n{out}");
    assert_eq!(report.matches("ok   ").count(), 7, "{report}");
}

#[test]
fn the_schemas_reject_a_misspelt_field_or_a_wrong_value() {
    let (code, out, err) = ferry(&["export", "--config", FIXTURE]);
    assert_eq!(code, 0, "{out}\n{err}");
    let Some(py) = python() else { return };
    for (from, to) in [
        ("sniHosts:", "sniHost:"),
        ("mode: AUTO_PASSTHROUGH", "mode: AUTOPASSTHROUGH"),
        ("workloadSelector:", "workloadSelectors:"),
        ("location: MESH_INTERNAL", "location: INTERNAL"),
        (
            "apiVersion: security.istio.io/v1",
            "apiVersion: security.istio.io/v2",
        ),
    ] {
        let bad = out.replacen(from, to, 1);
        assert_ne!(bad, out, "{from} not in the output");
        let (ok, report) = validate_istio(&py, &bad);
        assert!(!ok, "{from} -> {to} passed:\n{report}");
    }
}

#[test]
fn gateway_options_move_the_gateway() {
    let (code, out, err) = ferry(&[
        "export",
        "--config",
        FIXTURE,
        "--namespace-of-gateway",
        "mesh-gw",
        "--gateway-selector",
        "app=ew,istio=eastwestgateway",
        "--gateway-port",
        "16443",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("namespace: mesh-gw"), "{out}");
    assert!(out.contains("- mesh-gw/ferry-payments-shop"), "{out}");
    assert!(out.contains("number: 16443"), "{out}");
    assert!(out.contains("app: ew"), "{out}");
}

#[test]
fn a_service_without_workload_labels_is_refused_by_name() {
    let dir = testkit::tempdir().unwrap();
    let src = std::fs::read_to_string(testkit::workspace_root().join(FIXTURE)).unwrap();
    let cfg = dir.path().join("ferry.yaml");
    std::fs::write(&cfg, src.replace("workloadLabels: { app: payments }", "")).unwrap();
    let (code, out, err) = ferry(&["export", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("shop/payments (payments.shop.local.domain) has no spec.workloadLabels"),
        "{err}"
    );
}

#[test]
fn an_invalid_config_is_reported_not_exported() {
    let (code, out, err) = ferry(&["export", "--config", "ferry/tests/data/five-mistakes.yaml"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("config rejected"), "{err}");
}

#[test]
fn a_client_only_zone_exports_nothing_and_says_why() {
    let (code, out, err) = ferry(&["export", "--config", "examples/ferry.yaml"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("no FederatedService of trust domain client.domain"),
        "{err}"
    );
}
