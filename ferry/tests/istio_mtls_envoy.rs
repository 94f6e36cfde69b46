//! The whole IstioMtls client side with real peers: `ferry agent` serves xDS and the
//! Workload API/SDS; stock Envoy with the shared sidecar bootstrap gets its clusters,
//! listeners and its SVID from it; a client connecting to the service's VIP reaches a
//! rustls server standing in for the remote Istio sidecar, which checks the SNI
//! (`outbound_.P_._.H`), the Istio ALPN list, and the client's SPIFFE ID; Envoy checks the
//! server's SPIFFE ID against the exact SAN from `spiffeIDPaths`.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://client.domain/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://client.domain/ns/demo/sa/server";

/// What the server saw in the ClientHello.
#[derive(Debug, Default, Clone)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<String>,
}

/// The client's URI SANs and the negotiated ALPN, per accepted connection.
type Peer = (Vec<String>, Option<String>);

#[derive(Debug)]
struct Recorder {
    key: Arc<CertifiedKey>,
    seen: Mutex<Vec<Hello>>,
}

impl ResolvesServerCert for Recorder {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let h = Hello {
            sni: hello.server_name().map(str::to_owned),
            alpn: hello
                .alpn()
                .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
                .unwrap_or_default(),
        };
        self.seen.lock().unwrap().push(h);
        Some(self.key.clone())
    }
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_envoy_originates_istio_mtls_with_the_svid_from_ferry() {
    istio_mtls(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_envoy_originates_istio_mtls_with_the_svid_from_ferry() {
    istio_mtls(true).await;
}

async fn istio_mtls(delta: bool) {
    let Some(bin) = testkit::envoy::require() else {
        return;
    };
    let dir = testkit::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let xds_port = testkit::free_port();
    let svc_port = testkit::free_port();
    let dns_port = testkit::free_port();
    let uid = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    let uid = uid.unwrap();
    let me = std::env::current_exe().unwrap();

    // The stand-in for the remote Istio sidecar: binds first so its port is known.
    let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_port = gw.local_addr().unwrap().port();

    let cfg = dir.path().join("ferry.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\nlisten:\n  xds: 127.0.0.1:{xds_port}\n  workloadApi: unix://{d}/agent.sock\n  outbound: 0.0.0.0:{svc_port}\n  dns: 127.0.0.1:{dns_port}\nca:\n  stateDir: {d}/ca\nregistrationEntries:\n  - spiffeId: {CLIENT_ID}\n    selectors: [\"unix:uid:{uid}\"]\n  - spiffeId: {SERVER_ID}\n    selectors: [\"unix:uid:{uid}\", \"unix:path:{}\"]\n---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: server\n  namespace: demo\nspec:\n  name: server\n  namespace: demo\n  port: {svc_port}\n  exportedTrustDomains: [client.domain]\n  spiffeIDPaths: [/ns/demo/sa/server]\n  tlsMode: IstioMtls\n  gateways:\n    - type: istio-eastwestgateway\n      port: {gw_port}\n      ip: 127.0.0.1\n",
            me.display()
        ),
    )
    .unwrap();
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry agent");
    let xds: SocketAddr = ([127, 0, 0, 1], xds_port).into();
    testkit::wait_for_port(xds, Duration::from_secs(20))
        .await
        .expect("xDS port open");
    let socket = dir.path().join("agent.sock");
    testkit::wait_until("the Workload API socket", Duration::from_secs(20), || {
        let s = socket.clone();
        async move { s.exists() }
    })
    .await
    .expect("workload API socket");

    // The server's SVID and our trust bundle, from the same agent.
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let ctx = client.fetch_x509_context().await.unwrap();
    let svid = ctx
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == SERVER_ID)
        .expect("the test process holds the server SVID")
        .clone();
    let td = spiffe::TrustDomain::new("client.domain").unwrap();
    let bundle = ctx.bundle_set().get(&td).expect("own bundle");
    let mut roots = RootCertStore::empty();
    for a in bundle.authorities() {
        roots
            .add(CertificateDer::from(a.as_bytes().to_vec()))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        )))
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let recorder = Arc::new(Recorder {
        key: Arc::new(CertifiedKey::new(chain, key)),
        seen: Mutex::new(Vec::new()),
    });
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(recorder.clone());
    // What an Istio sidecar's TCP chain advertises (protocols.md section 3).
    server_cfg.alpn_protocols = vec![
        b"istio-peer-exchange".to_vec(),
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
    ];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let peers: Arc<Mutex<Vec<Peer>>> = Arc::default();
    let peers2 = peers.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = gw.accept().await {
            let acceptor = acceptor.clone();
            let peers = peers2.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let ids = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| uri_sans(c))
                    .unwrap_or_default();
                let alpn = conn
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                peers.lock().unwrap().push((ids, alpn));
                let _ = tls.write_all(b"istio-server:").await;
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let envoy = if delta {
        let admin = testkit::free_port();
        testkit::envoy::Envoy::start(
            &bin,
            &testkit::envoy::render_sidecar_bootstrap_delta(xds, &socket, admin),
            admin,
        )
        .await
    } else {
        testkit::envoy::Envoy::start_sidecar(&bin, xds, &socket).await
    }
    .expect("envoy starts");
    let hostname = "server.demo.client.domain";
    envoy
        .wait_admin("/listeners", Duration::from_secs(30), |b| {
            b.contains("outbound::")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The VIP, as the agent allocated it (and as Envoy's DNS listener answers it).
    let state = {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let c = xds::client::AdsClient::start(
            xds::client::AdsClientConfig::new(format!("http://{xds}")),
            shutdown.clone(),
        );
        let s = tokio::time::timeout(Duration::from_secs(10), c.wait_synced())
            .await
            .expect("synced");
        shutdown.cancel();
        s
    };
    let vip = state.resolve(hostname).expect("VIP");
    let dst: SocketAddr = (vip, svc_port).into();

    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(dst).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            let mut buf = vec![0u8; "istio-server:ping".len()];
            tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf))
                .await
                .ok()?
                .ok()?;
            Some(String::from_utf8_lossy(&buf).into_owned())
        };
        if let Some(g) = attempt.await {
            break g;
        }
        if Instant::now() > deadline {
            panic!(
                "no round trip through Envoy to the mTLS server; hellos {:?}; envoy log:\n{}",
                recorder.seen.lock().unwrap(),
                envoy.log_tail(80)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got, "istio-server:ping");

    let hello = recorder.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        hello.sni.as_deref(),
        Some(format!("outbound_.{svc_port}_._.{hostname}").as_str())
    );
    assert_eq!(hello.alpn, vec!["istio-peer-exchange", "istio"]);
    let (ids, alpn) = peers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(ids, vec![CLIENT_ID.to_owned()], "client SPIFFE ID");
    assert_eq!(alpn.as_deref(), Some("istio-peer-exchange"));

    let _ = agent.start_kill();
}
