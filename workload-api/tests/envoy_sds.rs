//! Stock Envoy as the SDS client of the Workload API socket: it gets its listener
//! certificate (`default`) and trust bundle (`ALL`, or `ROOTCA` as plain `trusted_ca` when
//! its node metadata disables the SPIFFE validator) through the `sds-grpc` pipe cluster,
//! completes an mTLS handshake with a client holding another SVID from the same agent, and
//! after a rotation its admin `/certs` shows the new serial.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use testkit::workload::{Entry, config_yaml, my_uid, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENVOY_ID: &str = "spiffe://example.org/envoy";
const CLIENT_ID: &str = "spiffe://example.org/client";

/// Verifies the server as a SPIFFE client does: chain to the bundle, expected URI SAN.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Vec<Vec<u8>>,
    expect: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.to_vec()];
        chain.extend(intermediates.iter().map(|c| c.to_vec()));
        attest::verify_chain(&chain, &self.roots, SystemTime::now())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let id = attest::check_svid_profile(&chain[0])
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if id.to_string() != self.expect {
            return Err(rustls::Error::General(format!("unexpected server ID {id}")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

fn bootstrap(admin: u16, port: u16, socket: &std::path::Path, plain: bool) -> String {
    let sds = "sds_config: {resource_api_version: V3, api_config_source: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: sds-grpc}}]}}";
    let (meta, validation) = if plain {
        (
            "  metadata: {disable_spiffe_cert_validation: true}\n",
            "ROOTCA",
        )
    } else {
        ("", "ALL")
    };
    format!(
        r#"node:
  id: sds-test
  cluster: sds-test
{meta}admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "hello over mTLS"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: default
              {sds}
            validation_context_sds_secret_config:
              name: {validation}
              {sds}
  clusters:
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: sds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{pipe: {{path: {socket}}}}}}}
"#,
        socket = socket.display()
    )
}

/// One mTLS request to Envoy with the given client SVID; returns the HTTP response text.
async fn mtls_get(
    port: u16,
    roots: Vec<Vec<u8>>,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeVerifier {
        roots,
        expect: ENVOY_ID.to_owned(),
        provider: provider.clone(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from("envoy.test").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: envoy.test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The serial numbers Envoy's admin `/certs` lists.
async fn envoy_serials(envoy: &testkit::envoy::Envoy) -> Vec<String> {
    let certs = envoy.admin_get("/certs").await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap_or_default();
    let mut out = Vec::new();
    for c in v["certificates"].as_array().into_iter().flatten() {
        for cc in c["cert_chain"].as_array().into_iter().flatten() {
            if let Some(s) = cc["serial_number"].as_str() {
                out.push(s.to_owned());
            }
        }
    }
    out
}

async fn envoy_gets_certs_over_sds(plain: bool) {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let d = testkit::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let yaml = config_yaml(
        d.path(),
        "4s",
        &[
            Entry {
                id: ENVOY_ID,
                selectors: vec![
                    format!("unix:uid:{}", my_uid()),
                    format!(
                        "unix:path:{}",
                        testkit::envoy::executable(&bin)
                            .expect("the envoy binary behind .venv/bin/envoy")
                            .display()
                    ),
                ],
                hint: None,
            },
            Entry {
                id: CLIENT_ID,
                selectors: vec![
                    format!("unix:uid:{}", my_uid()),
                    format!("unix:path:{}", me.display()),
                ],
                hint: None,
            },
        ],
        &[],
    );
    let agent = start(d.path(), &yaml).await;
    let (admin, port) = (testkit::free_port(), testkit::free_port());
    let envoy =
        testkit::envoy::Envoy::start(&bin, &bootstrap(admin, port, &agent.socket, plain), admin)
            .await
            .unwrap();
    // The listener comes up only once both secrets arrived over SDS.
    testkit::wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail(60)));

    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let ctx = client.fetch_x509_context().await.unwrap();
    let svid = ctx.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), CLIENT_ID);
    let roots = agent.authority.x509_authorities();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let key = svid.private_key().as_bytes().to_vec();

    let resp = mtls_get(port, roots.clone(), Some((chain, key)))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail(60)));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("hello over mTLS"), "{resp}");
    // Without a client certificate Envoy refuses.
    assert!(mtls_get(port, roots.clone(), None).await.is_err());

    // Rotation: the SVID TTL is 4 s, so Envoy gets a new certificate over SDS.
    let mut first = Vec::new();
    testkit::wait_until(
        "Envoy /certs lists a certificate",
        Duration::from_secs(20),
        || {
            let e = &envoy;
            async move { !envoy_serials(e).await.is_empty() }
        },
    )
    .await
    .unwrap();
    first.extend(envoy_serials(&envoy).await);
    testkit::wait_until(
        "a new serial in Envoy /certs",
        Duration::from_secs(30),
        || {
            let (e, first) = (&envoy, &first);
            async move {
                let now = envoy_serials(e).await;
                !now.is_empty() && now.iter().any(|s| !first.contains(s))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail(60)));

    // A fresh client SVID still completes the handshake after rotation.
    let svid = client.fetch_x509_svid().await.unwrap();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let resp = mtls_get(
        port,
        roots,
        Some((chain, svid.private_key().as_bytes().to_vec())),
    )
    .await
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(envoy);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mtls_with_spiffe_validator_from_sds() {
    envoy_gets_certs_over_sds(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mtls_with_plain_trusted_ca_when_node_metadata_asks() {
    envoy_gets_certs_over_sds(true).await;
}
