//! The far side of a mesh, built from stock parts, so `ferry proxy` is tested against the
//! peers it must interoperate with rather than against itself:
//!
//! - [`gateway_bootstrap`]: an Istio east-west gateway as stock Envoy renders it
//!   (protocols.md §5): a `tls_inspector` listener routing on SNI without terminating
//!   TLS, in AUTO_PASSTHROUGH form (`outbound_.<port>_._.<host>` plus an Istio ALPN) or
//!   PASSTHROUGH form (the bare hostname, any ALPN);
//! - [`inbound_bootstrap`]: stock Envoy as the server's Istio inbound sidecar (§3):
//!   filter chain on the Istio TCP ALPNs, client certificate required, SAN prefix
//!   `spiffe://<td>/`, certificate and roots over SDS from ferry's Workload API. Envoy has
//!   no metadata-exchange filter, so it advertises `h2`/`http/1.1` only and never
//!   negotiates `istio-peer-exchange`;
//! - [`HttpServer`] (plain HTTP/1.1) and [`MtlsServer`] (HTTP over rustls mTLS, the `Mtls`
//!   mode's server app), which record what they saw;
//! - rustls client helpers that speak as a SPIFFE workload ([`client_config`],
//!   [`tls_get`]).
//!
//! Every Envoy config writes one access-log line per connection to its stdout (the
//! [`crate::envoy::Envoy`] log), tagged [`GATEWAY_LOG_TAG`] or [`INBOUND_LOG_TAG`], with
//! `key=value` fields that [`access_lines`] and [`field`] pick apart.

// Test harness: a failed setup is a test failure, loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

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

/// One HTTP request as a test server saw it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The request line, e.g. `GET / HTTP/1.1`.
    pub line: String,
    /// Header lines as `(lowercased name, value)`.
    pub headers: Vec<(String, String)>,
    /// Who connected (for [`MtlsServer`], the TCP peer).
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `METHOD SP target SP HTTP/1.x` with an upper-case ASCII method.
fn well_formed(line: &str) -> bool {
    let parts: Vec<&str> = line.split(' ').collect();
    matches!(parts.as_slice(), [m, t, v]
        if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())
            && !t.is_empty() && v.starts_with("HTTP/1."))
}

/// Reads one HTTP/1.1 request head (and discards a `Content-Length` body), answers `200`
/// with `body` (`400` for a malformed request line) and `Connection: close`. `None` if the peer sent no complete request.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, body: &str) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let req = Request {
        line,
        headers,
        peer: None,
    };
    let want: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - end - 4;
    while have < want {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    // Bytes a proxy should have stripped (a metadata-exchange frame, a TLS record) in
    // front of the request line make it malformed: answer 400 so the client sees it.
    let (status, body) = if well_formed(&req.line) {
        ("200 OK", body.to_owned())
    } else {
        (
            "400 Bad Request",
            format!("malformed request line {:?}", req.line),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await.ok()?;
    let _ = s.shutdown().await;
    Some(req)
}

/// A plain HTTP/1.1 server: answers every well-formed request `200` with the body `pong
/// from <name>` (a malformed one, e.g. with stray proxy bytes in front, `400`) and closes;
/// records each request. Stops when dropped.
pub struct HttpServer {
    addr: SocketAddr,
    name: String,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` (port 0 for any) and serves on it as `name`.
    pub async fn start(name: &str, addr: SocketAddr) -> Result<Self, Error> {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(Error::io(format!("bind HTTP server on {addr}")))?;
        let addr = l.local_addr().map_err(Error::io("HTTP server address"))?;
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let body = format!("pong from {name}");
        let rec = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = l.accept().await {
                let (rec, body) = (rec.clone(), body.clone());
                tokio::spawn(async move {
                    if let Some(mut r) = serve_one(&mut s, &body).await {
                        r.peer = Some(peer);
                        rec.lock().unwrap().push(r);
                    }
                });
            }
        });
        Ok(Self {
            addr,
            name: name.to_owned(),
            requests,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The body every response carries: `pong from <name>`.
    pub fn body(&self) -> String {
        format!("pong from {}", self.name)
    }

    /// The requests served so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`MtlsServer`] saw on one connection.
#[derive(Debug, Clone, Default)]
pub struct MtlsSeen {
    /// The SNI of the ClientHello.
    pub sni: Option<String>,
    /// The ALPN list the client offered.
    pub alpn_offered: Vec<String>,
    /// The URI SANs of the client's leaf certificate (its SPIFFE ID).
    pub peer_uri_sans: Vec<String>,
    /// The request it answered, if the client sent one.
    pub request: Option<Request>,
}

#[derive(Debug)]
struct HelloRecorder {
    key: Arc<rustls::sign::CertifiedKey>,
    hellos: Mutex<Vec<(Option<String>, Vec<String>)>>,
}

impl rustls::server::ResolvesServerCert for HelloRecorder {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let alpn = hello
            .alpn()
            .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
            .unwrap_or_default();
        self.hellos
            .lock()
            .unwrap()
            .push((hello.server_name().map(str::to_owned), alpn));
        Some(self.key.clone())
    }
}

/// The server app of the `Mtls` mode: terminates mTLS itself with its SVID, requires a
/// client certificate chaining to the given roots, answers HTTP/1.1 `200 pong from
/// <name>` inside TLS, and records the SNI, offered ALPN and client URI SANs it saw.
pub struct MtlsServer {
    addr: SocketAddr,
    name: String,
    seen: Arc<Mutex<Vec<MtlsSeen>>>,
    recorder: Arc<HelloRecorder>,
    task: tokio::task::JoinHandle<()>,
}

impl MtlsServer {
    /// Binds `addr` and serves as `name` with `identity` (chain + key), trusting `roots`
    /// for client certificates.
    pub async fn start(
        name: &str,
        addr: SocketAddr,
        identity: Identity,
        roots: RootCertStore,
    ) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = provider
            .key_provider
            .load_private_key(identity.key)
            .map_err(|e| Error::Unexpected(format!("server key: {e}")))?;
        let recorder = Arc::new(HelloRecorder {
            key: Arc::new(rustls::sign::CertifiedKey::new(identity.chain, key)),
            hellos: Mutex::default(),
        });
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| Error::Unexpected(format!("client verifier: {e}")))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Unexpected(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(recorder.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(Error::io(format!("bind mTLS server on {addr}")))?;
        let addr = l.local_addr().map_err(Error::io("mTLS server address"))?;
        let seen: Arc<Mutex<Vec<MtlsSeen>>> = Arc::default();
        let body = format!("pong from {name}");
        let (rec, hellos) = (seen.clone(), recorder.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = l.accept().await {
                let (acceptor, rec, hellos, body) =
                    (acceptor.clone(), rec.clone(), hellos.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = tls.get_ref().1;
                    let peer_uri_sans = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| uri_sans(c))
                        .unwrap_or_default();
                    let (sni, alpn_offered) = hellos
                        .hellos
                        .lock()
                        .unwrap()
                        .last()
                        .cloned()
                        .unwrap_or_default();
                    let request = serve_one(&mut tls, &body).await.map(|mut r| {
                        r.peer = Some(peer);
                        r
                    });
                    rec.lock().unwrap().push(MtlsSeen {
                        sni,
                        alpn_offered,
                        peer_uri_sans,
                        request,
                    });
                });
            }
        });
        Ok(Self {
            addr,
            name: name.to_owned(),
            seen,
            recorder,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The body every response carries: `pong from <name>`.
    pub fn body(&self) -> String {
        format!("pong from {}", self.name)
    }

    /// The completed mTLS connections so far.
    pub fn seen(&self) -> Vec<MtlsSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// Every ClientHello so far as (SNI, offered ALPN), including refused handshakes.
    pub fn hellos(&self) -> Vec<(Option<String>, Vec<String>)> {
        self.recorder.hellos.lock().unwrap().clone()
    }
}

impl Drop for MtlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                out.push((*u).to_owned());
            }
        }
    }
    out
}

/// A certificate chain (leaf first) and its key, as rustls wants them.
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// An X509-SVID from the `spiffe` crate.
    pub fn from_svid(svid: &spiffe::X509Svid) -> Self {
        Self {
            chain: svid
                .cert_chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                svid.private_key().as_bytes().to_vec(),
            )),
        }
    }
}

/// The SVID for `id` from `ctx` (panics, naming what it has, when absent).
pub fn svid(ctx: &spiffe::X509Context, id: &str) -> Identity {
    let s = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == id)
        .unwrap_or_else(|| {
            let have: Vec<String> = ctx
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect();
            panic!("no SVID {id} in the X.509 context (have {have:?})")
        });
    Identity::from_svid(s)
}

/// The roots of `trust_domain`'s bundle in `ctx`.
pub fn roots(ctx: &spiffe::X509Context, trust_domain: &str) -> RootCertStore {
    let td = spiffe::TrustDomain::new(trust_domain).expect("trust domain");
    let bundle = ctx
        .bundle_set()
        .get(&td)
        .unwrap_or_else(|| panic!("no bundle for {trust_domain} in the X.509 context"));
    let mut roots = RootCertStore::empty();
    for a in bundle.authorities() {
        roots
            .add(CertificateDer::from(a.as_bytes().to_vec()))
            .expect("bundle authority parses");
    }
    roots
}

/// Fetches the X.509 context from a Workload API endpoint (`unix:///...`).
pub async fn fetch_context(endpoint: &str) -> spiffe::X509Context {
    let client = spiffe::WorkloadApiClient::connect_to(endpoint.to_owned())
        .await
        .expect("connect to the Workload API");
    client
        .fetch_x509_context()
        .await
        .expect("fetch the X.509 context")
}

/// A server verifier for SPIFFE peers: the chain must lead to `roots` and the leaf's URI
/// SAN must equal `expected_id` (SPIFFE certificates carry no DNS name, so webpki's name
/// check cannot be used).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected_id: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ids = uri_sans(end_entity);
        if ids != [self.expected_id.clone()] {
            return Err(rustls::Error::General(format!(
                "server SPIFFE ID {ids:?}, expected {}",
                self.expected_id
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client config that presents `identity` (if any), accepts only a server whose
/// SPIFFE ID is `expected_server_id` under `roots`, and offers `alpn`.
pub fn client_config(
    identity: Option<Identity>,
    roots: RootCertStore,
    expected_server_id: &str,
    alpn: &[&str],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected_id: expected_server_id.to_owned(),
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// The result of [`tls_get`].
#[derive(Debug, Clone)]
pub struct TlsResponse {
    /// The whole HTTP response (head and body) as text.
    pub text: String,
    /// The negotiated ALPN, if any.
    pub alpn: Option<String>,
}

/// Connects to `addr`, handshakes with SNI `sni` under `cfg`, sends `GET /` and reads the
/// response to the end (10 s at most). An error names the step that failed.
pub async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<TlsResponse, Error> {
    let step = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connect {addr}")))?;
        let name = ServerName::try_from(sni.to_owned())
            .map_err(|e| Error::Unexpected(format!("SNI {sni:?}: {e}")))?;
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(Error::io(format!("TLS handshake with {addr} (SNI {sni})")))?;
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        tls.write_all(
            format!("GET / HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(Error::io("write request over TLS"))?;
        let mut buf = Vec::new();
        // A peer that closes without close_notify still gave us its bytes.
        match tls.read_to_end(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
            Err(e) => return Err(Error::io("read response over TLS")(e)),
        }
        if buf.is_empty() {
            return Err(Error::Unexpected(format!(
                "{addr} closed the TLS connection without a response"
            )));
        }
        Ok(TlsResponse {
            text: String::from_utf8_lossy(&buf).into_owned(),
            alpn,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("an HTTP response over TLS from {addr}"),
            timeout: Duration::from_secs(10),
        })?
}

/// Sends a plain `GET /` to `addr` with `host` as the Host header and returns the whole
/// response as text (10 s at most).
pub async fn plain_get(addr: SocketAddr, host: &str) -> Result<String, Error> {
    let step = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connect {addr}")))?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(Error::io(format!("write to {addr}")))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(Error::io(format!("read from {addr}")))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("an HTTP response from {addr}"),
            timeout: Duration::from_secs(10),
        })?
}

/// The tracing target of ferry's per-connection access-log lines.
pub const FERRY_ACCESS_TARGET: &str = "ferry::access";

/// A child process under test (`ferry agent`, `ferry proxy`) with stdout and stderr in a
/// log file, killed when dropped: the log outlives a crash so a failed assertion can show
/// it.
pub struct Spawned {
    name: String,
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Spawned {
    /// Starts `program args` with `envs` (on top of the inherited environment), logging
    /// to `<log_dir>/<name>.log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Self, Error> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(Error::io(format!("create {name}.log")))?;
        let err = out.try_clone().map_err(Error::io("dup log file"))?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("spawn {name}: {}", program.display())))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log, headed by its name (for assertion messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- {} log (last {n} lines) ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// Its access-log lines (those naming [`FERRY_ACCESS_TARGET`]).
    pub fn access_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(FERRY_ACCESS_TARGET))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until an access-log line satisfies `pred` and returns it.
    pub async fn wait_access(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.access_lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("a matching access-log line from {}", self.name),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `GET admin/ready` answers 200; fails at once if the process exits.
    pub async fn wait_ready(&mut self, admin: SocketAddr, timeout: Duration) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Unexpected(format!(
                    "{} exited ({status}) before it was ready\n{}",
                    self.name,
                    self.log_tail(40)
                )));
            }
            if crate::http::get(admin, "/ready")
                .await
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Unexpected(format!(
                    "{} not ready on http://{admin}/ready after {timeout:?}\n{}",
                    self.name,
                    self.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// A `FederatedService` document (starting with `---`) for `<name>.demo.<agent's trust
/// domain>`: the agent's own trust domain (no annotation), server identity
/// `/ns/demo/sa/<name>`, one east-west gateway at `gateway`.
pub fn own_domain_service(name: &str, port: u16, tls_mode: &str, gateway: SocketAddr) -> String {
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  name: {name}\n  namespace: demo\n  port: {port}\n  exportedTrustDomains: [client.domain]\n  spiffeIDPaths: [/ns/demo/sa/{name}]\n  tlsMode: {tls_mode}\n  gateways:\n    - type: istio-eastwestgateway\n      port: {}\n      ip: {}\n",
        gateway.port(),
        gateway.ip()
    )
}

/// The command line of `ferry proxy` for a test: Workload API socket given, admin and
/// capture listener on free loopback ports, DNS off; more flags with [`ProxyCmd::arg`].
#[derive(Debug, Clone)]
pub struct ProxyCmd {
    /// `--admin`.
    pub admin: SocketAddr,
    /// `--outbound` (the capture listener).
    pub outbound: SocketAddr,
    args: Vec<String>,
}

impl ProxyCmd {
    /// `ferry proxy --workload-api unix://<socket> --admin .. --outbound .. --dns off`.
    pub fn new(workload_socket: &Path) -> Self {
        let admin: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        let outbound: SocketAddr = ([127, 0, 0, 1], crate::free_port()).into();
        let args = [
            "proxy".to_owned(),
            "--workload-api".to_owned(),
            format!("unix://{}", workload_socket.display()),
            "--admin".to_owned(),
            admin.to_string(),
            "--outbound".to_owned(),
            outbound.to_string(),
            "--dns".to_owned(),
            "off".to_owned(),
        ];
        Self {
            admin,
            outbound,
            args: args.into(),
        }
    }

    /// One more `--flag value`.
    pub fn arg(mut self, flag: &str, value: impl std::fmt::Display) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_string());
        self
    }

    /// One more bare `--flag`.
    pub fn flag(mut self, flag: &str) -> Self {
        self.args.push(flag.to_owned());
        self
    }

    /// The arguments, starting with `proxy`.
    pub fn args(&self) -> &[String] {
        &self.args
    }
}

/// The text after `key=` in a log line up to the next `key=` of another field (tracing
/// text values may contain spaces when quoted); `None` if absent.
pub fn log_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').map_or_else(
        || rest.split(' ').next().unwrap_or(rest),
        |q| q.split('"').next().unwrap_or(q),
    );
    Some(rest)
}
