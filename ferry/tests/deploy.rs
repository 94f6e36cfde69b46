//! Packaging, checked offline: `deploy/` and `deploy/example/` render with `kubectl
//! kustomize`; every object validates strictly against the Kubernetes schemas shipped by
//! PyPI's kubernetes-validate (FederatedService objects against the CRD's own
//! openAPIV3Schema); the ConfigMap's embedded config passes `ferry config check`; the
//! pieces the Cofide conventions fix (Service `cofide-agent-xds`/`grpc-xds` 18001, the
//! injected pod's init container and UID 1337 sidecar) are what they must be; and the
//! Dockerfile has the structure its header promises (it is not built here: no registry
//! network).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure panics with its cause

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The Kubernetes version the manifests are validated against (shipped by
/// kubernetes-validate 1.37, which install-peers pins).
const K8S_VERSION: &str = "1.33.0";

fn kubectl() -> Option<String> {
    let k = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let ok = Command::new(&k)
        .args(["kustomize", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    testkit::require("kubectl with kustomize (Debian kubernetes-client)", ok).then_some(k)
}

fn python() -> Option<PathBuf> {
    let py = testkit::workspace_root().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args([
            "-c",
            "import kubernetes_validate, jsonschema, yaml, referencing",
        ])
        .status()
        .is_ok_and(|s| s.success());
    testkit::require(".venv python with kubernetes-validate", ok).then_some(py)
}

/// `kubectl kustomize <dir>` (relative to the workspace), as YAML.
fn render(kubectl: &str, dir: &str) -> String {
    let out = Command::new(kubectl)
        .args(["kustomize", dir])
        .current_dir(testkit::workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Multi-document YAML as JSON values (PyYAML does the parsing).
fn objects(py: &Path, yaml: &str) -> Vec<Value> {
    let out = run_with_stdin(
        Command::new(py).args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ]),
        yaml,
    );
    assert!(out.0, "{}", out.1);
    serde_json::from_str(&out.1).unwrap()
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
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

/// `validate-manifests.py k8s` on the given documents, with the CRDs from `crds`.
fn validate(py: &Path, crds: &str, docs: &[&str]) -> (bool, String) {
    let dir = testkit::tempdir().unwrap();
    let crds_file = dir.path().join("crds.yaml");
    std::fs::write(&crds_file, crds).unwrap();
    let mut cmd = Command::new(py);
    cmd.arg(testkit::workspace_root().join("scripts/validate-manifests.py"))
        .args(["k8s", K8S_VERSION])
        .arg(&crds_file);
    for (i, d) in docs.iter().enumerate() {
        let f = dir.path().join(format!("doc{i}.yaml"));
        std::fs::write(&f, d).unwrap();
        cmd.arg(f);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {objs:#?}"))
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} {name} in {pod_spec:#}"))
}

#[test]
fn manifests_render_and_validate_offline() {
    let (Some(k), Some(py)) = (kubectl(), python()) else {
        return;
    };
    let base = render(&k, "deploy");
    let example = render(&k, "deploy/example");
    let (ok, report) = validate(&py, &base, &[&base, &example]);
    assert!(ok, "{report}");
    assert!(
        report.contains("ok   FederatedService/demo/server (CRD schema)"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "ok   Deployment/cofide/ferry-agent (Kubernetes {K8S_VERSION} (strict))"
        )),
        "{report}"
    );
    assert_eq!(report.matches("ok   ").count(), 12, "{report}");
}

#[test]
fn validation_is_strict() {
    let (Some(k), Some(py)) = (kubectl(), python()) else {
        return;
    };
    let base = render(&k, "deploy");
    let example = render(&k, "deploy/example");
    for (doc, from, to) in [
        (&base, "containerPort: 18001", "containerPorts: 18001"),
        (&example, "runAsUser: 1337", "runAsUser: \"1337\""),
        (&example, "tlsMode: IstioMtls", "tlsMode: istioMtls"),
        (&example, "port: 8443", "port: 70000"),
        (&example, "spiffeIDPaths:", "spiffeIdPaths:"),
        (
            &example,
            "hostname: eastwest.local.domain.example",
            "hostname: eastwest.local.domain.example\n      ip: 10.0.0.1",
        ),
    ] {
        let bad = doc.replacen(from, to, 1);
        assert_ne!(&bad, doc, "{from} not found");
        let (ok, report) = validate(&py, &base, &[&bad]);
        assert!(!ok, "{from} -> {to} passed:\n{report}");
    }
}

#[test]
fn the_configmap_config_passes_ferry_config_check() {
    let (Some(k), Some(py)) = (kubectl(), python()) else {
        return;
    };
    let objs = objects(&py, &render(&k, "deploy"));
    let cm = find(&objs, "ConfigMap", "ferry-config");
    let config = cm["data"]["ferry.yaml"].as_str().unwrap();
    let dir = testkit::tempdir().unwrap();
    let file = dir.path().join("ferry.yaml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("server.demo.local.domain:8443"), "{stdout}");
    // The agent serves the sidecars of other pods: xDS must listen beyond loopback.
    assert!(stdout.contains("xds: 0.0.0.0:18001"), "{stdout}");

    // The example FederatedService applied to the cluster is the one the agent reads.
    let example = objects(&py, &render(&k, "deploy/example"));
    let in_config = objects(&py, config);
    let fs = |objs: &[Value]| find(objs, "FederatedService", "server").clone();
    assert_eq!(fs(&example)["spec"], fs(&in_config)["spec"]);
}

#[test]
fn agent_follows_the_cofide_conventions() {
    let (Some(k), Some(py)) = (kubectl(), python()) else {
        return;
    };
    let objs = objects(&py, &render(&k, "deploy"));
    for o in &objs {
        let kind = o["kind"].as_str().unwrap();
        let cluster_scoped = [
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        if !cluster_scoped.contains(&kind) {
            assert_eq!(o["metadata"]["namespace"], "cofide", "{o:#}");
        }
    }
    let svc = find(&objs, "Service", "cofide-agent-xds");
    assert_eq!(svc["spec"]["ports"][0]["name"], "grpc-xds");
    assert_eq!(svc["spec"]["ports"][0]["port"], 18001);
    let deploy = find(&objs, "Deployment", "ferry-agent");
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .map(|v| serde_json::json!({ "app.kubernetes.io/name": v }))
            .unwrap()
    );
    let pod = &deploy["spec"]["template"]["spec"];
    let agent = container(pod, "containers", "agent");
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..3], ["agent", "--config", "/etc/ferry/ferry.yaml"]);
    assert!(args.contains(&"--admin"), "{args:?}");
    assert_eq!(pod["serviceAccountName"], "ferry-agent");

    let role = find(&objs, "ClusterRole", "ferry-agent");
    assert_eq!(
        role["rules"][0],
        serde_json::json!({
            "apiGroups": ["registry.cofide.io"],
            "resources": ["federatedservices"],
            "verbs": ["get", "list", "watch"],
        })
    );
    let binding = find(&objs, "ClusterRoleBinding", "ferry-agent");
    assert_eq!(binding["subjects"][0]["namespace"], "cofide");

    let crd = find(
        &objs,
        "CustomResourceDefinition",
        "federatedservices.registry.cofide.io",
    );
    assert_eq!(crd["spec"]["group"], "registry.cofide.io");
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut fields: Vec<&str> = spec["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "exportedTrustDomains",
            "gateways",
            "name",
            "namespace",
            "port",
            "spiffeIDPaths",
            "tlsMode",
            "workloadLabels"
        ]
    );
    assert_eq!(
        spec["properties"]["tlsMode"]["enum"],
        serde_json::json!(["Mtls", "IstioMtls"])
    );
}

#[test]
fn example_pod_is_injected_as_spiffe_enable_does() {
    let (Some(k), Some(py)) = (kubectl(), python()) else {
        return;
    };
    let objs = objects(&py, &render(&k, "deploy/example"));
    let pod = &find(&objs, "Pod", "client")["spec"];

    let init = container(pod, "initContainers", "ferry-init");
    assert_eq!(
        init["args"],
        serde_json::json!(["iptables", "--profile", "cofide"])
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    let caps = &init["securityContext"]["capabilities"]["add"];
    assert_eq!(caps, &serde_json::json!(["NET_ADMIN", "NET_RAW"]));

    let proxy = container(pod, "containers", "ferry-proxy");
    assert_eq!(
        proxy["args"],
        serde_json::json!([
            "proxy",
            "--xds",
            "cofide-agent-xds.cofide.svc.cluster.local:18001"
        ])
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["runAsGroup"], 1337);
    let env = proxy["env"].as_array().unwrap();
    assert!(
        env.contains(&serde_json::json!({
            "name": "SPIFFE_ENDPOINT_SOCKET",
            "value": "unix:///spiffe-workload-api/spire-agent.sock",
        })),
        "{env:?}"
    );
    let mount = &proxy["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/spiffe-workload-api");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["csi"]["driver"], "csi.spiffe.io");

    // The app must not run as the proxy's UID, or its traffic would escape the capture.
    let app = container(pod, "containers", "app");
    assert_ne!(app["securityContext"]["runAsUser"], 1337);
}

/// The flags the manifests pass exist in the binary they run.
#[test]
fn manifest_flags_exist_in_the_binary() {
    for (cmd, flags) in [
        ("agent", &["--config", "--admin"][..]),
        ("proxy", &["--xds", "--workload-api"][..]),
        ("iptables", &["--profile", "cofide"][..]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([cmd, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for f in flags {
            assert!(help.contains(f), "ferry {cmd} has no {f}:\n{help}");
        }
        assert!(
            help.contains("SPIFFE_ENDPOINT_SOCKET") || cmd != "proxy",
            "{help}"
        );
    }
}

/// The Dockerfile is not built here (no registry network); its structure is checked.
#[test]
fn dockerfile_structure() {
    let text = std::fs::read_to_string(testkit::workspace_root().join("Dockerfile")).unwrap();
    // Join continuation lines, drop comments, split into stages at FROM.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut stages: Vec<(String, Vec<&str>)> = Vec::new();
    for l in lines {
        if let Some(from) = l.strip_prefix("FROM ") {
            stages.push((from.to_owned(), Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push(l);
        }
    }
    let names: Vec<&str> = stages.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(stages.len(), 3, "{names:?}");

    let (builder, body) = &stages[0];
    assert!(
        builder.contains("rust:") && builder.ends_with(" AS builder"),
        "{builder}"
    );
    assert!(
        body.iter()
            .any(|l| l.contains("cargo build --release --locked -p ferry")),
        "{body:?}"
    );

    let (init, body) = &stages[1];
    assert!(init.ends_with(" AS init"), "{init}");
    assert!(
        body.iter()
            .any(|l| l.contains("nftables") && l.contains("iptables"))
    );

    // The default image is the last stage: the binary and CA certificates only.
    let (runtime, body) = &stages[2];
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-debian12"),
        "{runtime}"
    );
    assert!(!body.iter().any(|l| l.starts_with("RUN ")), "{body:?}");
    let copies: Vec<&&str> = body.iter().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(
        copies,
        [&"COPY --from=builder /out/ferry /usr/local/bin/ferry"]
    );
    assert!(body.contains(&"USER 1337:1337"), "{body:?}");
    assert!(
        body.contains(&r#"ENTRYPOINT ["/usr/local/bin/ferry"]"#),
        "{body:?}"
    );

    let ignore = std::fs::read_to_string(testkit::workspace_root().join(".dockerignore")).unwrap();
    for p in ["target/", ".venv/", ".git/"] {
        assert!(ignore.lines().any(|l| l == p), "{p} not in .dockerignore");
    }
}
