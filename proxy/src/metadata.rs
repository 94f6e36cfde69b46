//! ferry's own peer metadata: what the proxy announces in Istio's metadata exchange
//! (protocols.md §4-5), so Istio peers label their telemetry with the right workload.
//!
//! Sources, first hit wins per field: the binary's flags ([`MetadataSettings`]), then the
//! environment the Istio injector (or a hand-written pod spec) sets, then defaults:
//!
//! | field | env | default |
//! |---|---|---|
//! | NAME | `POD_NAME`, `HOSTNAME` | the kernel's hostname, else `unknown` |
//! | NAMESPACE | `POD_NAMESPACE` | `default` |
//! | WORKLOAD_NAME | `ISTIO_META_WORKLOAD_NAME` | NAME without a Deployment's `-<rs hash>-<pod hash>` |
//! | CLUSTER_ID | `ISTIO_META_CLUSTER_ID` | `Kubernetes` |
//! | OWNER | `ISTIO_META_OWNER` | `kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<workload>` |
//! | REGION, AVAILABILITY_ZONE | `ISTIO_META_REGION`, `ISTIO_META_AVAILABILITY_ZONE` (**ferry:** Istio takes locality from the node) | absent |
//! | LABELS | `ISTIO_METAJSON_LABELS` (a JSON object), then `--label` flags on top | `service.istio.io/canonical-name`/`-revision` filled as Istio does |
//! | IDENTITY | the SVID's SPIFFE ID, passed in | |
//! | id | `INSTANCE_IP` for the address | `sidecar~<ip or 0.0.0.0>~<name>.<ns>~<ns>.svc.cluster.local` |
//!
//! The environment is read through [`Env`] so tests pass a map instead of mutating the
//! process environment.

use std::collections::BTreeMap;

use crate::mx::PeerMetadata;

/// Metadata given on the command line; each field overrides the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetadataSettings {
    /// `WORKLOAD_NAME`.
    pub workload_name: Option<String>,
    /// `NAMESPACE`.
    pub namespace: Option<String>,
    /// `CLUSTER_ID`.
    pub cluster_id: Option<String>,
    /// `LABELS` entries (`--label k=v`), applied over the environment's.
    pub labels: Vec<(String, String)>,
    /// `NAME` (the pod name).
    pub name: Option<String>,
}

/// Read access to environment variables, so the metadata rules are testable without
/// touching the process environment.
pub trait Env {
    /// The variable's value, `None` when unset.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment. `HOSTNAME` falls back to the kernel's hostname, which shells
/// export but container runtimes do not always.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().or_else(|| {
            (key == "HOSTNAME")
                .then(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .flatten()
                .map(|h| h.trim().to_owned())
        })
    }
}

/// Tests and embedders: a map is an environment.
impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// Istio's label keys for the canonical service, which its telemetry reads.
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// See [`CANONICAL_NAME`].
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

/// A non-empty value: empty flags and variables count as unset.
fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

/// `server-6b7c9-x2x4q` -> `server`: a Deployment's pod name is
/// `<deployment>-<replicaset hash>-<5 chars>`. Other names are kept whole.
pub fn workload_from_pod_name(name: &str) -> &str {
    fn hashy(s: &str) -> bool {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    }
    let mut parts = name.rsplitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(pod), Some(rs), Some(base))
            if pod.len() == 5
                && (5..=10).contains(&rs.len())
                && hashy(pod)
                && hashy(rs)
                && !base.is_empty() =>
        {
            base
        }
        _ => name,
    }
}

/// Builds the metadata ferry announces, from flags, environment and the SVID's SPIFFE ID.
pub fn own_metadata(settings: &MetadataSettings, identity: &str, env: &dyn Env) -> PeerMetadata {
    let var = |k: &str| non_empty(env.var(k));
    let name = non_empty(settings.name.clone())
        .or_else(|| var("POD_NAME"))
        .or_else(|| var("HOSTNAME"))
        .unwrap_or_else(|| "unknown".to_owned());
    let namespace = non_empty(settings.namespace.clone())
        .or_else(|| var("POD_NAMESPACE"))
        .unwrap_or_else(|| "default".to_owned());
    let workload_name = non_empty(settings.workload_name.clone())
        .or_else(|| var("ISTIO_META_WORKLOAD_NAME"))
        .unwrap_or_else(|| workload_from_pod_name(&name).to_owned());
    let cluster_id = non_empty(settings.cluster_id.clone())
        .or_else(|| var("ISTIO_META_CLUSTER_ID"))
        .unwrap_or_else(|| "Kubernetes".to_owned());
    let owner = var("ISTIO_META_OWNER").unwrap_or_else(|| {
        format!("kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{workload_name}")
    });

    let mut labels = BTreeMap::new();
    if let Some(json) = var("ISTIO_METAJSON_LABELS") {
        match serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&json) {
            Ok(map) => {
                for (k, v) in map {
                    match v {
                        serde_json::Value::String(s) => {
                            labels.insert(k, s);
                        }
                        other => {
                            labels.insert(k, other.to_string());
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "ISTIO_METAJSON_LABELS is not a JSON object of strings; ignoring it (set labels with --label k=v)"
            ),
        }
    }
    for (k, v) in &settings.labels {
        labels.insert(k.clone(), v.clone());
    }
    if !labels.contains_key(CANONICAL_NAME) {
        let canonical = labels
            .get("app.kubernetes.io/name")
            .or_else(|| labels.get("app"))
            .cloned()
            .unwrap_or_else(|| workload_name.clone());
        labels.insert(CANONICAL_NAME.to_owned(), canonical);
    }
    if !labels.contains_key(CANONICAL_REVISION) {
        let revision = labels
            .get("app.kubernetes.io/version")
            .or_else(|| labels.get("version"))
            .cloned()
            .unwrap_or_else(|| "latest".to_owned());
        labels.insert(CANONICAL_REVISION.to_owned(), revision);
    }

    let ip = var("INSTANCE_IP").unwrap_or_else(|| "0.0.0.0".to_owned());
    let id = format!("sidecar~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local");
    PeerMetadata {
        name,
        namespace,
        workload_name,
        cluster_id,
        identity: identity.to_owned(),
        labels,
        owner,
        region: var("ISTIO_META_REGION").unwrap_or_default(),
        availability_zone: var("ISTIO_META_AVAILABILITY_ZONE").unwrap_or_default(),
        id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const ID: &str = "spiffe://local.domain/ns/demo/sa/client";

    #[test]
    fn pod_names() {
        assert_eq!(workload_from_pod_name("server-6b7c9-x2x4q"), "server");
        assert_eq!(
            workload_from_pod_name("ping-pong-server-5d8f7b9c4-abcde"),
            "ping-pong-server"
        );
        assert_eq!(workload_from_pod_name("web-0"), "web-0");
        assert_eq!(workload_from_pod_name("my-host"), "my-host");
        assert_eq!(workload_from_pod_name("a-b-c"), "a-b-c");
        assert_eq!(workload_from_pod_name("x-ABCDE-fghij"), "x-ABCDE-fghij");
    }

    #[test]
    fn defaults_from_a_bare_environment() {
        let m = own_metadata(
            &MetadataSettings::default(),
            ID,
            &env(&[("HOSTNAME", "box")]),
        );
        assert_eq!(m.name, "box");
        assert_eq!(m.namespace, "default");
        assert_eq!(m.workload_name, "box");
        assert_eq!(m.cluster_id, "Kubernetes");
        assert_eq!(m.identity, ID);
        assert_eq!(
            m.owner,
            "kubernetes://apis/apps/v1/namespaces/default/deployments/box"
        );
        assert_eq!(
            m.id,
            "sidecar~0.0.0.0~box.default~default.svc.cluster.local"
        );
        assert_eq!(m.labels[CANONICAL_NAME], "box");
        assert_eq!(m.labels[CANONICAL_REVISION], "latest");
        assert_eq!(m.region, "");
        let m = own_metadata(&MetadataSettings::default(), ID, &env(&[]));
        assert_eq!(m.name, "unknown");
    }

    #[test]
    fn environment_as_istio_injects_it() {
        let e = env(&[
            ("POD_NAME", "client-6b7c9-x2x4q"),
            ("POD_NAMESPACE", "demo"),
            ("INSTANCE_IP", "10.1.2.3"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_REGION", "eu-west-1"),
            ("ISTIO_META_AVAILABILITY_ZONE", "eu-west-1a"),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"client","version":"v2"}"#,
            ),
        ]);
        let m = own_metadata(&MetadataSettings::default(), ID, &e);
        assert_eq!(m.name, "client-6b7c9-x2x4q");
        assert_eq!(m.workload_name, "client");
        assert_eq!(m.namespace, "demo");
        assert_eq!(m.cluster_id, "east");
        assert_eq!(m.region, "eu-west-1");
        assert_eq!(m.availability_zone, "eu-west-1a");
        assert_eq!(
            m.owner,
            "kubernetes://apis/apps/v1/namespaces/demo/deployments/client"
        );
        assert_eq!(
            m.id,
            "sidecar~10.1.2.3~client-6b7c9-x2x4q.demo~demo.svc.cluster.local"
        );
        assert_eq!(m.labels["app"], "client");
        assert_eq!(m.labels[CANONICAL_NAME], "client");
        assert_eq!(m.labels[CANONICAL_REVISION], "v2");
    }

    #[test]
    fn flags_win() {
        let e = env(&[
            ("POD_NAME", "envname"),
            ("POD_NAMESPACE", "envns"),
            ("ISTIO_META_WORKLOAD_NAME", "envwl"),
            (
                "ISTIO_META_OWNER",
                "kubernetes://apis/apps/v1/namespaces/x/statefulsets/y",
            ),
            ("ISTIO_METAJSON_LABELS", r#"{"app":"env","team":"a"}"#),
        ]);
        let s = MetadataSettings {
            workload_name: Some("wl".into()),
            namespace: Some("ns".into()),
            cluster_id: Some("c1".into()),
            labels: vec![("app".into(), "flag".into())],
            name: Some("pod".into()),
        };
        let m = own_metadata(&s, ID, &e);
        assert_eq!((m.name.as_str(), m.namespace.as_str()), ("pod", "ns"));
        assert_eq!(m.workload_name, "wl");
        assert_eq!(m.cluster_id, "c1");
        assert_eq!(
            m.owner,
            "kubernetes://apis/apps/v1/namespaces/x/statefulsets/y"
        );
        assert_eq!(m.labels["app"], "flag");
        assert_eq!(m.labels["team"], "a");
        assert_eq!(m.labels[CANONICAL_NAME], "flag");
        // Empty flags count as unset.
        let s = MetadataSettings {
            namespace: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(own_metadata(&s, ID, &e).namespace, "envns");
    }

    #[test]
    fn bad_labels_json_is_ignored() {
        let e = env(&[("ISTIO_METAJSON_LABELS", "not json"), ("POD_NAME", "p")]);
        let m = own_metadata(&MetadataSettings::default(), ID, &e);
        assert_eq!(m.labels.len(), 2, "{:?}", m.labels);
    }

    #[test]
    fn encodes_and_decodes() {
        let m = own_metadata(&MetadataSettings::default(), ID, &env(&[("POD_NAME", "p")]));
        let frame = crate::mx::encode_frame(&m);
        assert_eq!(
            crate::mx::decode_body(&frame[crate::mx::HEADER_LEN..]).unwrap(),
            m
        );
    }
}
