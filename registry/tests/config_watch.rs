//! Hot reload of the config file: good edits produce a new snapshot, bad edits keep the
//! last good one.

// Test code: a failed setup is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use registry::config::{Config, ConfigWatcher};

const AGENT: &str =
    "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\n";

fn service(name: &str) -> String {
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  name: {name}\n  namespace: demo\n  port: 8443\n  spiffeIDPaths: [/ns/demo/sa/{name}]\n  tlsMode: Mtls\n  gateways: [{{type: istio-eastwestgateway, port: 15443, ip: 10.0.0.1}}]\n"
    )
}

/// A watcher on a fresh `ferry.yaml` holding `yaml` (the dir lives as long as the result).
async fn watching(yaml: &str) -> (tempfile::TempDir, std::path::PathBuf, ConfigWatcher) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    std::fs::write(&path, yaml).unwrap();
    let w = ConfigWatcher::start(&path).await.unwrap();
    (dir, path, w)
}

/// Waits (5 s at most) for a new snapshot.
async fn published(rx: &mut tokio::sync::watch::Receiver<std::sync::Arc<Config>>) {
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a snapshot within 5 s")
        .expect("watcher alive");
}

/// True when no snapshot is published within 800 ms (debounce + reload take far less).
async fn nothing_published(rx: &mut tokio::sync::watch::Receiver<std::sync::Arc<Config>>) -> bool {
    tokio::time::timeout(Duration::from_millis(800), rx.changed())
        .await
        .is_err()
}

#[tokio::test]
async fn reloads_good_edits_and_keeps_last_good_on_bad_ones() {
    let (dir, path, w) = watching(&format!("{AGENT}{}", service("a"))).await;
    let mut rx = w.subscribe();
    let first = w.current();
    assert_eq!(first.services.len(), 1);
    let vip_a = first.services[0].vip;

    // Add a service: a new snapshot arrives; a's VIP is unchanged.
    std::fs::write(&path, format!("{AGENT}{}{}", service("a"), service("b"))).unwrap();
    published(&mut rx).await;
    let second = rx.borrow_and_update().clone();
    assert_eq!(second.services.len(), 2);
    assert_eq!(second.service("a.demo.client.domain").unwrap().vip, vip_a);

    // A bad edit (renamed via a temp file, as editors do): nothing changes.
    let tmp = dir.path().join(".ferry.yaml.swp");
    std::fs::write(
        &tmp,
        format!("{AGENT}{}", service("c").replace("Mtls", "mtls")),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        nothing_published(&mut rx).await,
        "a bad edit must not publish a snapshot"
    );
    assert_eq!(*w.current(), *second);

    // Fixing it publishes again.
    std::fs::write(&path, format!("{AGENT}{}", service("c"))).unwrap();
    published(&mut rx).await;
    let third = rx.borrow_and_update().clone();
    assert_eq!(third.services.len(), 1);
    assert_eq!(third.services[0].hostname, "c.demo.client.domain");
}

#[tokio::test]
async fn invalid_initial_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    std::fs::write(&path, "kind: AgentConfig\n").unwrap();
    let err = ConfigWatcher::start(&path).await.err().unwrap().to_string();
    assert!(
        err.contains("trustDomain: required field is missing"),
        "{err}"
    );
}

#[tokio::test]
async fn restart_only_settings_are_refused_on_reload() {
    let (_dir, path, w) = watching(&format!("{AGENT}{}", service("a"))).await;
    let mut rx = w.subscribe();
    let first = w.current();

    // A new trust domain (with a service added, so the edit is otherwise a real change):
    // refused as a whole, the last good config keeps serving.
    let moved = AGENT.replace("client.domain", "other.domain");
    std::fs::write(&path, format!("{moved}{}{}", service("a"), service("b"))).unwrap();
    assert!(
        nothing_published(&mut rx).await,
        "a trustDomain change must not be applied"
    );
    assert_eq!(*w.current(), *first);

    // So is a listener or CA change.
    for extra in ["listen:\n  xds: 127.0.0.1:18999\n", "ca:\n  caTtl: 48h\n"] {
        std::fs::write(&path, format!("{AGENT}{extra}{}", service("a"))).unwrap();
        assert!(
            nothing_published(&mut rx).await,
            "{extra:?} must need a restart"
        );
    }

    // A hot-reloadable edit still goes through.
    std::fs::write(&path, format!("{AGENT}{}{}", service("a"), service("b"))).unwrap();
    published(&mut rx).await;
    assert_eq!(rx.borrow_and_update().services.len(), 2);
}

#[test]
fn restart_only_changes_are_named() {
    use registry::config::{parse, restart_only_changes};
    let load = |s: &str| {
        parse(s, std::path::Path::new("f.yaml"), std::path::Path::new("."))
            .unwrap()
            .config
            .agent
    };
    let a = load(AGENT);
    let b = load(&format!(
        "{}listen:\n  dns: 127.0.0.1:5353\nca:\n  svidTtl: 2h\n",
        AGENT.replace("client.domain", "x.domain")
    ));
    assert_eq!(
        restart_only_changes(&a, &b),
        ["trustDomain", "listen.dns", "ca"]
    );
    assert!(restart_only_changes(&a, &a).is_empty());
}
