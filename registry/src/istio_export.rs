//! The Istio resources a *server* cluster needs so that other trust zones can reach the
//! services it exports, as the Cofide Agent creates them: what `ferry export` prints.
//!
//! Input: the [`FederatedService`]s of the config whose server trust domain is our own (the
//! ones this zone serves; imported services carry another trust domain in the
//! `ferry.dev/trust-domain` annotation and are skipped). Output, per service, in this order:
//!
//! - `ServiceEntry` (networking.istio.io/v1) in the service's namespace: host
//!   `{name}.{namespace}.{trust domain}`, `location: MESH_INTERNAL` (Istio's AUTO_PASSTHROUGH
//!   gateway builds filter chains only for services that are *not* mesh-external),
//!   `resolution: STATIC` with a `workloadSelector` on `spec.workloadLabels` so the
//!   endpoints are the server's own pods. The port is `tcp-<port>`/`TCP` for `IstioMtls`
//!   (the server sidecar's TCP mTLS chain matches the ALPN `istio-peer-exchange`/`istio` that
//!   ferry and Istio TCP clients offer) and `tls-<port>`/`TLS` for `Mtls`. `IstioMtls` also
//!   lists the server's SPIFFE IDs as `subjectAltNames`.
//! - `PeerAuthentication` (security.istio.io/v1) in the service's namespace, selecting the
//!   workload labels: `IstioMtls` gets `mtls.mode: STRICT` (only Istio mTLS reaches the app).
//!   `Mtls` gets `portLevelMtls: {<port>: DISABLE}`: the app terminates mTLS itself, end to
//!   end with the remote client, so its sidecar must never terminate TLS on that port.
//!   `PERMISSIVE` is not enough: it still sends TLS that offers an Istio ALPN into the
//!   sidecar's mTLS chain, which would terminate it and hand the app plaintext; `DISABLE`
//!   makes the sidecar pass the port's bytes through as opaque TCP, and makes in-mesh
//!   clients' auto-mTLS send the app's own TLS unwrapped. Istio requires a selector with
//!   `portLevelMtls`, one more reason `spec.workloadLabels` must not be empty.
//! - `Gateway` (networking.istio.io/v1) in the east-west gateway's namespace, on its
//!   selector, port 15443 (`TLS`): `tls.mode: AUTO_PASSTHROUGH` with the exact hostname for
//!   `IstioMtls` (Istio then matches the SNI `outbound_.<port>_._.<hostname>` plus an Istio
//!   ALPN and splices to the service), `PASSTHROUGH` with `<namespace>/<hostname>` for
//!   `Mtls` (only a VirtualService of the service's namespace may bind it).
//! - `VirtualService` (networking.istio.io/v1), for `Mtls` only: a `tls` route matching SNI
//!   = hostname on the gateway port, to the ServiceEntry host and port. AUTO_PASSTHROUGH
//!   needs none: the SNI names the destination.
//!
//! The objects are plain JSON values (what YAML and the schema test both read); names are
//! `ferry-<name>-<namespace>` so they never collide across namespaces in the gateway's.
//! Pure code: no I/O.

use serde_json::{Value, json};

use crate::config::{Config, FederatedService, ServerIdentity, TlsMode};

/// Where the east-west gateway runs and how its pods are selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Namespace of the east-west gateway, where the `Gateway` objects go (Istio's default
    /// install: `istio-system`).
    pub gateway_namespace: String,
    /// The gateway pods' labels, `key=value` (Istio's east-west gateway: `istio=eastwestgateway`).
    pub gateway_selector: Vec<(String, String)>,
    /// The gateway's TLS port (Istio's east-west gateway: 15443).
    pub gateway_port: u16,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            gateway_namespace: "istio-system".to_owned(),
            gateway_selector: vec![("istio".to_owned(), "eastwestgateway".to_owned())],
            gateway_port: 15443,
        }
    }
}

/// Why a service cannot be exported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// Without workload labels there is nothing to select the server pods with: the
    /// ServiceEntry would have no endpoints and the PeerAuthentication would cover the
    /// whole namespace.
    #[error(
        "FederatedService {namespace}/{name} ({hostname}) has no spec.workloadLabels: the ServiceEntry and PeerAuthentication select the server pods by them; add the labels of the server pods"
    )]
    NoWorkloadLabels {
        /// `metadata.namespace`.
        namespace: String,
        /// `metadata.name`.
        name: String,
        /// The federated hostname.
        hostname: String,
    },
    /// `--gateway-selector` was empty: the Gateway would select every gateway pod.
    #[error(
        "the gateway selector is empty: give the east-west gateway's labels, e.g. istio=eastwestgateway"
    )]
    EmptyGatewaySelector,
}

/// The label every exported object carries, so `kubectl delete -l` can remove them.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ferry");

/// The services this zone serves: those whose server trust domain is our own.
pub fn own_services(config: &Config) -> impl Iterator<Item = &FederatedService> {
    config
        .services
        .iter()
        .filter(|s| s.server_trust_domain == config.agent.trust_domain)
}

/// The Istio objects for every own service, in hostname order; every problem is reported
/// at once.
pub fn export(config: &Config, opts: &ExportOptions) -> Result<Vec<Value>, Vec<ExportError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    if opts.gateway_selector.is_empty() {
        errors.push(ExportError::EmptyGatewaySelector);
    }
    for svc in own_services(config) {
        match export_service(svc, opts) {
            Ok(objs) => out.extend(objs),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The Istio objects for one service (see the module doc).
pub fn export_service(
    svc: &FederatedService,
    opts: &ExportOptions,
) -> Result<Vec<Value>, ExportError> {
    if svc.workload_labels.is_empty() {
        return Err(ExportError::NoWorkloadLabels {
            namespace: svc.object_namespace.clone(),
            name: svc.object_name.clone(),
            hostname: svc.hostname.to_string(),
        });
    }
    let name = format!("ferry-{}-{}", svc.name, svc.namespace);
    let host = svc.hostname.to_string();
    let labels = json!({ MANAGED_BY.0: MANAGED_BY.1 });
    let annotations =
        json!({ "ferry.dev/hostname": host, "ferry.dev/tls-mode": svc.tls_mode.to_string() });
    let meta = |namespace: &str| {
        json!({
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        })
    };
    let selector: serde_json::Map<String, Value> = svc
        .workload_labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let gw_selector: serde_json::Map<String, Value> = opts
        .gateway_selector
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();

    let (port_name, protocol) = match svc.tls_mode {
        TlsMode::IstioMtls => (format!("tcp-{}", svc.port), "TCP"),
        TlsMode::Mtls => (format!("tls-{}", svc.port), "TLS"),
    };
    let mut se_spec = json!({
        "hosts": [host],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{ "number": svc.port, "name": port_name, "protocol": protocol }],
        "workloadSelector": { "labels": selector },
    });
    if let (TlsMode::IstioMtls, ServerIdentity::Exact(ids)) = (svc.tls_mode, &svc.server_identity) {
        se_spec["subjectAltNames"] = ids.iter().map(|i| Value::String(i.to_string())).collect();
    }
    let service_entry = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": meta(&svc.namespace),
        "spec": se_spec,
    });

    let pa_spec = match svc.tls_mode {
        TlsMode::IstioMtls => json!({
            "selector": { "matchLabels": selector },
            "mtls": { "mode": "STRICT" },
        }),
        TlsMode::Mtls => json!({
            "selector": { "matchLabels": selector },
            "portLevelMtls": { svc.port.to_string(): { "mode": "DISABLE" } },
        }),
    };
    let peer_authentication = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": meta(&svc.namespace),
        "spec": pa_spec,
    });

    let (tls_mode, gw_host, gw_port_name) = match svc.tls_mode {
        TlsMode::IstioMtls => ("AUTO_PASSTHROUGH", host.clone(), "tls-auto-passthrough"),
        TlsMode::Mtls => (
            "PASSTHROUGH",
            format!("{}/{}", svc.namespace, host),
            "tls-passthrough",
        ),
    };
    let gateway = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": meta(&opts.gateway_namespace),
        "spec": {
            "selector": gw_selector,
            "servers": [{
                "port": { "number": opts.gateway_port, "name": gw_port_name, "protocol": "TLS" },
                "hosts": [gw_host],
                "tls": { "mode": tls_mode },
            }],
        },
    });

    let mut objs = vec![service_entry, peer_authentication, gateway];
    if svc.tls_mode == TlsMode::Mtls {
        objs.push(json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": meta(&svc.namespace),
            "spec": {
                "hosts": [host],
                "gateways": [format!("{}/{}", opts.gateway_namespace, name)],
                "tls": [{
                    "match": [{ "port": opts.gateway_port, "sniHosts": [host] }],
                    "route": [{ "destination": { "host": host, "port": { "number": svc.port } } }],
                }],
            },
        }));
    }
    Ok(objs)
}

/// Renders objects as one multi-document YAML stream (`---` between documents).
pub fn to_yaml(objs: &[Value]) -> Result<String, serde_yaml::Error> {
    let mut s = String::new();
    for o in objs {
        s.push_str("---\n");
        s.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use super::*;

    const CONFIG: &str = r#"
apiVersion: ferry.dev/v1alpha1
kind: AgentConfig
trustDomain: local.domain
---
apiVersion: registry.cofide.io/v1alpha1
kind: FederatedService
metadata: { name: server, namespace: demo }
spec:
  name: server
  namespace: demo
  port: 8443
  exportedTrustDomains: [other1.domain]
  workloadLabels: { app: server }
  spiffeIDPaths: [/ns/demo/sa/server]
  tlsMode: IstioMtls
---
apiVersion: registry.cofide.io/v1alpha1
kind: FederatedService
metadata: { name: payments, namespace: shop }
spec:
  name: payments
  namespace: shop
  port: 9443
  exportedTrustDomains: [other1.domain]
  workloadLabels: { app: payments }
  spiffeIDPaths: [/ns/shop/sa/payments]
  tlsMode: Mtls
---
apiVersion: registry.cofide.io/v1alpha1
kind: FederatedService
metadata:
  name: imported
  namespace: demo
  annotations: { ferry.dev/trust-domain: other1.domain }
spec:
  name: imported
  namespace: demo
  port: 443
  exportedTrustDomains: [local.domain]
  spiffeIDPaths: [/x]
  tlsMode: Mtls
  gateways: [{ type: istio-eastwestgateway, port: 15443, ip: 10.0.0.1 }]
"#;

    fn config(src: &str) -> Config {
        crate::config::parse(src, Path::new("t.yaml"), Path::new("."))
            .unwrap()
            .config
    }

    fn kinds(objs: &[Value]) -> Vec<String> {
        objs.iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn own_services_only_in_hostname_order() {
        let objs = export(&config(CONFIG), &ExportOptions::default()).unwrap();
        assert_eq!(
            kinds(&objs),
            [
                "ServiceEntry/ferry-payments-shop",
                "PeerAuthentication/ferry-payments-shop",
                "Gateway/ferry-payments-shop",
                "VirtualService/ferry-payments-shop",
                "ServiceEntry/ferry-server-demo",
                "PeerAuthentication/ferry-server-demo",
                "Gateway/ferry-server-demo",
            ]
        );
    }

    #[test]
    fn istio_mtls_is_strict_and_auto_passthrough() {
        let objs = export(&config(CONFIG), &ExportOptions::default()).unwrap();
        let se = &objs[4];
        assert_eq!(se["metadata"]["namespace"], "demo");
        assert_eq!(se["spec"]["hosts"][0], "server.demo.local.domain");
        assert_eq!(se["spec"]["location"], "MESH_INTERNAL");
        assert_eq!(se["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            se["spec"]["subjectAltNames"][0],
            "spiffe://local.domain/ns/demo/sa/server"
        );
        assert_eq!(objs[5]["spec"]["mtls"]["mode"], "STRICT");
        assert_eq!(objs[5]["spec"]["selector"]["matchLabels"]["app"], "server");
        let gw = &objs[6];
        assert_eq!(gw["metadata"]["namespace"], "istio-system");
        assert_eq!(gw["spec"]["selector"]["istio"], "eastwestgateway");
        assert_eq!(gw["spec"]["servers"][0]["port"]["number"], 15443);
        assert_eq!(gw["spec"]["servers"][0]["tls"]["mode"], "AUTO_PASSTHROUGH");
        assert_eq!(
            gw["spec"]["servers"][0]["hosts"][0],
            "server.demo.local.domain"
        );
    }

    #[test]
    fn mtls_is_disabled_on_its_port_and_passthrough_with_a_route() {
        let objs = export(&config(CONFIG), &ExportOptions::default()).unwrap();
        assert_eq!(objs[0]["spec"]["ports"][0]["protocol"], "TLS");
        assert_eq!(objs[1]["spec"]["portLevelMtls"]["9443"]["mode"], "DISABLE");
        assert!(objs[1]["spec"].get("mtls").is_none());
        assert_eq!(objs[2]["spec"]["servers"][0]["tls"]["mode"], "PASSTHROUGH");
        assert_eq!(
            objs[2]["spec"]["servers"][0]["hosts"][0],
            "shop/payments.shop.local.domain"
        );
        let vs = &objs[3];
        assert_eq!(
            vs["spec"]["gateways"][0],
            "istio-system/ferry-payments-shop"
        );
        assert_eq!(
            vs["spec"]["tls"][0]["match"][0]["sniHosts"][0],
            "payments.shop.local.domain"
        );
        assert_eq!(vs["spec"]["tls"][0]["match"][0]["port"], 15443);
        assert_eq!(
            vs["spec"]["tls"][0]["route"][0]["destination"]["port"]["number"],
            9443
        );
    }

    #[test]
    fn options_move_the_gateway() {
        let opts = ExportOptions {
            gateway_namespace: "gw".into(),
            gateway_selector: vec![("app".into(), "ew".into())],
            gateway_port: 16443,
        };
        let objs = export(&config(CONFIG), &opts).unwrap();
        assert_eq!(objs[2]["metadata"]["namespace"], "gw");
        assert_eq!(objs[2]["spec"]["selector"]["app"], "ew");
        assert_eq!(objs[3]["spec"]["gateways"][0], "gw/ferry-payments-shop");
        assert_eq!(objs[3]["spec"]["tls"][0]["match"][0]["port"], 16443);
    }

    #[test]
    fn every_problem_at_once() {
        let src = CONFIG.replace("workloadLabels: { app: server }", "");
        let src = src.replace("workloadLabels: { app: payments }", "");
        let opts = ExportOptions {
            gateway_selector: vec![],
            ..ExportOptions::default()
        };
        let errs = export(&config(&src), &opts).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(errs[0], ExportError::EmptyGatewaySelector);
        assert!(errs[1].to_string().contains("payments.shop.local.domain"));
    }

    #[test]
    fn yaml_is_multi_document() {
        let objs = export(&config(CONFIG), &ExportOptions::default()).unwrap();
        let y = to_yaml(&objs).unwrap();
        assert_eq!(y.matches("---\n").count(), objs.len());
        assert!(y.contains("kind: VirtualService"));
    }
}
