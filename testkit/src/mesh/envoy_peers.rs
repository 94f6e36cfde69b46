//! Stock Envoy as the Istio east-west gateway and as the Istio inbound sidecar: bootstrap
//! renderers and access-log parsing.

// Test harness: a failed setup is a test failure, loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

/// Every ALPN an Istio east-west gateway accepts as "this is an Istio mTLS peer"
/// (protocols.md §5), in the order its filter chain lists them.
pub const ISTIO_ALPNS: [&str; 5] = [
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// What an Istio client offers on a TCP cluster (protocols.md §3).
pub const ISTIO_TCP_CLIENT_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];

/// The marker at the start of the gateway's access-log lines.
pub const GATEWAY_LOG_TAG: &str = "ACCESS gateway";

/// The marker at the start of the inbound sidecar's access-log lines.
pub const INBOUND_LOG_TAG: &str = "ACCESS inbound";

/// The SNI an Istio client sends to reach `host:port` through an AUTO_PASSTHROUGH gateway.
pub fn auto_passthrough_sni(port: u16, host: &str) -> String {
    format!("outbound_.{port}_._.{host}")
}

/// One SNI route of the gateway: connections whose ClientHello names `server_name` (and,
/// when `istio_alpn_required`, offers one of [`ISTIO_ALPNS`]) are TCP-proxied to
/// `upstream`, TLS untouched.
#[derive(Debug, Clone)]
pub struct GatewayRoute {
    /// The exact SNI to match.
    pub server_name: String,
    /// AUTO_PASSTHROUGH (true) also requires an Istio ALPN; PASSTHROUGH (false) does not.
    pub istio_alpn_required: bool,
    /// Where matching connections go.
    pub upstream: SocketAddr,
}

impl GatewayRoute {
    /// An AUTO_PASSTHROUGH route for the federated `host:port`.
    pub fn auto_passthrough(port: u16, host: &str, upstream: SocketAddr) -> Self {
        Self {
            server_name: auto_passthrough_sni(port, host),
            istio_alpn_required: true,
            upstream,
        }
    }

    /// A PASSTHROUGH route for `host` (the `Mtls` mode: the client's own TLS).
    pub fn passthrough(host: &str, upstream: SocketAddr) -> Self {
        Self {
            server_name: host.to_owned(),
            istio_alpn_required: false,
            upstream,
        }
    }
}

fn admin_yaml(admin_port: u16) -> String {
    format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}\n"
    )
}

fn socket_address(a: SocketAddr) -> String {
    format!(
        "socket_address: {{ address: \"{}\", port_value: {} }}",
        a.ip(),
        a.port()
    )
}

fn static_cluster(name: &str, a: SocketAddr) -> String {
    format!(
        r#"    - name: {name}
      type: STATIC
      connect_timeout: 2s
      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    {}
"#,
        socket_address(a)
    )
}

/// A `tcp_proxy` network filter to `cluster` with a stdout access log in `format`.
fn tcp_proxy(stat_prefix: &str, cluster: &str, format: &str) -> String {
    format!(
        r#"          filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
                stat_prefix: {stat_prefix}
                cluster: {cluster}
                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                      log_format:
                        text_format_source:
                          inline_string: "{format}\n"
"#
    )
}

const TLS_INSPECTOR: &str = r#"      listener_filters:
        - name: envoy.filters.listener.tls_inspector
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
"#;

/// The bootstrap of an Istio-style east-west gateway on `listen` (admin on `admin_port`):
/// one filter chain per route, matched on the exact SNI (and the Istio ALPNs for
/// AUTO_PASSTHROUGH routes), TCP-proxied to a STATIC cluster without terminating TLS. A
/// ClientHello that matches no route (unknown SNI, or no Istio ALPN where required) is
/// closed by Envoy. Access log: `ACCESS gateway sni=... upstream=... ...` on stdout.
pub fn gateway_bootstrap(listen: SocketAddr, admin_port: u16, routes: &[GatewayRoute]) -> String {
    let format = format!(
        "{GATEWAY_LOG_TAG} sni=%REQUESTED_SERVER_NAME% upstream=%UPSTREAM_HOST% downstream=%DOWNSTREAM_REMOTE_ADDRESS% received=%BYTES_RECEIVED% sent=%BYTES_SENT% flags=%RESPONSE_FLAGS%"
    );
    let mut chains = String::new();
    let mut clusters = String::new();
    for (i, r) in routes.iter().enumerate() {
        let cluster = format!("route_{i}");
        let alpn = if r.istio_alpn_required {
            let list: Vec<String> = ISTIO_ALPNS.iter().map(|p| format!("\"{p}\"")).collect();
            format!("            application_protocols: [{}]\n", list.join(", "))
        } else {
            String::new()
        };
        chains.push_str(&format!(
            "        - filter_chain_match:\n            transport_protocol: tls\n            server_names: [\"{}\"]\n{alpn}",
            r.server_name
        ));
        chains.push_str(&tcp_proxy(&format!("gateway_{i}"), &cluster, &format));
        clusters.push_str(&static_cluster(&cluster, r.upstream));
    }
    format!(
        r#"node: {{ id: gateway, cluster: istio-eastwestgateway }}
{admin}static_resources:
  listeners:
    - name: gateway
      address:
        {listen}
{TLS_INSPECTOR}      filter_chains:
{chains}  clusters:
{clusters}"#,
        admin = admin_yaml(admin_port),
        listen = socket_address(listen),
    )
}

/// An SDS secret reference to `name` over the `sds-grpc` cluster, as a one-line YAML flow
/// mapping (so it fits any indentation).
fn sds_config(name: &str) -> String {
    format!(
        "{{ name: {name}, sds_config: {{ resource_api_version: V3, api_config_source: {{ api_type: GRPC, transport_api_version: V3, grpc_services: [{{ envoy_grpc: {{ cluster_name: sds-grpc }} }}] }} }} }}"
    )
}

/// The bootstrap of stock Envoy as an Istio inbound sidecar on `listen` (admin on
/// `admin_port`): `tls_inspector`, one filter chain for clients offering
/// `istio-peer-exchange` or `istio`, mTLS terminated with the SVID from SDS `default` and
/// the roots from SDS `ROOTCA` (both from the ferry Workload API at `workload_socket`),
/// client certificate required with a URI SAN under `spiffe://<trust_domain>/`, then
/// `tcp_proxy` to `app`. It advertises `h2`/`http/1.1` only (no MX filter). Access log:
/// `ACCESS inbound peer=<client URI SAN> sni=... ...` on stdout.
pub fn inbound_bootstrap(
    listen: SocketAddr,
    admin_port: u16,
    workload_socket: &Path,
    trust_domain: &str,
    app: SocketAddr,
) -> String {
    let format = format!(
        "{INBOUND_LOG_TAG} peer=%DOWNSTREAM_PEER_URI_SAN% local=%DOWNSTREAM_LOCAL_URI_SAN% sni=%REQUESTED_SERVER_NAME% tls=%DOWNSTREAM_TLS_VERSION% upstream=%UPSTREAM_HOST% received=%BYTES_RECEIVED% sent=%BYTES_SENT% flags=%RESPONSE_FLAGS%"
    );
    let alpn: Vec<String> = ISTIO_TCP_CLIENT_ALPN
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    format!(
        r#"node: {{ id: "sidecar~127.0.0.1~server.demo~demo.svc.cluster.local", cluster: server.demo }}
{admin}static_resources:
  listeners:
    - name: virtualInbound
      address:
        {listen}
{TLS_INSPECTOR}      filter_chains:
        - filter_chain_match:
            transport_protocol: tls
            application_protocols: [{alpn}]
          transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                tls_params:
                  tls_minimum_protocol_version: TLSv1_2
                  tls_maximum_protocol_version: TLSv1_3
                alpn_protocols: ["h2", "http/1.1"]
                tls_certificate_sds_secret_configs:
                  - {cert}
                combined_validation_context:
                  default_validation_context:
                    match_typed_subject_alt_names:
                      - san_type: URI
                        matcher: {{ prefix: "spiffe://{trust_domain}/" }}
                  validation_context_sds_secret_config: {roots}
{proxy}  clusters:
{app_cluster}    - name: sds-grpc
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: sds-grpc
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    pipe: {{ path: "{socket}" }}
"#,
        admin = admin_yaml(admin_port),
        listen = socket_address(listen),
        alpn = alpn.join(", "),
        cert = sds_config("default"),
        roots = sds_config("ROOTCA"),
        proxy = tcp_proxy("inbound", "inbound_app", &format),
        app_cluster = static_cluster("inbound_app", app),
        socket = workload_socket.display(),
    )
}

/// The access-log lines tagged `tag` in an Envoy log (lines starting with it; Envoy's own
/// debug lines that quote the format are left out).
pub fn access_lines(log: &str, tag: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.starts_with(tag))
        .map(str::to_owned)
        .collect()
}

/// The value of `key=` in an access-log line (up to the next space).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}
