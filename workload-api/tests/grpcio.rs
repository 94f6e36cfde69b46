//! The real grpcio (grpc C-core) Python client, default channel options, over the Unix
//! socket: every Workload API method and every SDS method. C-core sends the socket path,
//! percent-encoded, as `:authority`; without ferry's shim h2 resets those streams with
//! PROTOCOL_ERROR (the control test shows it on a bare tonic server, so this file also
//! tells us when h2 starts accepting such authorities and the shim can go).
//!
//! Needs `.venv` with grpcio and grpcio-tools (`scripts/install-peers.sh`); under CI=true a
//! missing one fails.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use serde_json::Value;
use testkit::workload::{Entry, config_yaml, my_uid, start};
use xds::type_url::SECRET as SECRET_TYPE;

fn python() -> PathBuf {
    testkit::workspace_root().join(".venv/bin/python")
}

fn helper() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/grpcio_client.py")
}

fn proto_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto")
}

/// True when `.venv` has grpcio and grpcio-tools (fails under CI when not).
fn have_grpcio() -> bool {
    let ok = std::process::Command::new(python())
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    testkit::require(
        "grpcio and grpcio-tools in .venv (scripts/install-peers.sh)",
        ok,
    )
}

/// Runs the helper against `target` and parses its JSON.
async fn run_client(target: &str, out_dir: &Path, sds_hex: &str, probe: bool) -> Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(helper())
        .arg(target)
        .arg(proto_dir())
        .arg(out_dir)
        .arg(sds_hex)
        .kill_on_drop(true);
    if probe {
        cmd.arg("probe");
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("grpcio client finishes within 120 s")
        .expect("spawn python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn sds_request() -> String {
    let req = DiscoveryRequest {
        node: Some(Node {
            id: "grpcio".into(),
            ..Node::default()
        }),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE.into(),
        ..DiscoveryRequest::default()
    };
    req.encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn secret_names(v: &Value) -> Vec<String> {
    let hex = v["response"].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let resp = DiscoveryResponse::decode(&bytes[..]).unwrap();
    assert_eq!(resp.type_url, SECRET_TYPE);
    let mut names: Vec<String> = resp
        .resources
        .iter()
        .map(|a| {
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(
                &a.value[..],
            )
            .unwrap()
            .name
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn grpcio_calls_every_workload_api_and_sds_method_over_the_unix_socket() {
    if !have_grpcio() {
        return;
    }
    let d = testkit::tempdir().unwrap();
    let id = "spiffe://example.org/grpcio";
    let yaml = config_yaml(
        d.path(),
        "1h",
        &[Entry {
            id,
            selectors: vec![format!("unix:uid:{}", my_uid())],
            hint: None,
        }],
        &[],
    );
    let agent = start(d.path(), &yaml).await;
    let sock = agent.socket.display().to_string();
    let sds = sds_request();
    // Both spellings grpc accepts for an absolute path: unix:/abs and unix:///abs.
    for target in [format!("unix:{sock}"), format!("unix://{sock}")] {
        let r = run_client(&target, &d.path().join("stubs"), &sds, false).await;
        let ok = |m: &str| {
            assert_eq!(r[m]["ok"], Value::Bool(true), "{target} {m}: {}", r[m]);
            &r[m]
        };
        assert_eq!(ok("FetchX509SVID")["spiffe_ids"][0], id);
        assert_eq!(
            ok("FetchX509Bundles")["trust_domains"][0],
            "spiffe://example.org"
        );
        assert_eq!(ok("FetchJWTSVID")["spiffe_id"], id);
        assert_eq!(
            ok("FetchJWTBundles")["trust_domains"][0],
            "spiffe://example.org"
        );
        assert_eq!(ok("ValidateJWTSVID")["spiffe_id"], id);
        assert_eq!(r["FetchJWTSVID_without_header"]["code"], "INVALID_ARGUMENT");
        assert_eq!(secret_names(ok("FetchSecrets")), ["ROOTCA", "default"]);
        assert_eq!(secret_names(ok("StreamSecrets")), ["ROOTCA", "default"]);
        // Delta SDS is not served: the call reaches the service and is refused by it,
        // not by h2 (which would say INTERNAL / protocol error).
        assert_eq!(
            r["DeltaSecrets"]["code"], "UNIMPLEMENTED",
            "{}",
            r["DeltaSecrets"]
        );
    }
    agent.stop().await;
}

/// The control: a bare tonic server (no shim) on a Unix socket refuses grpcio's calls.
/// If this starts failing, h2 accepts percent-encoded authorities and the shim may go.
#[tokio::test]
async fn without_the_shim_h2_refuses_grpcio() {
    if !have_grpcio() {
        return;
    }
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
    let d = testkit::tempdir().unwrap();
    let sock = d.path().join("bare.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(bare::Bare))
            .serve_with_incoming(incoming),
    );
    let r = run_client(
        &format!("unix:{}", sock.display()),
        &d.path().join("stubs"),
        &sds_request(),
        true,
    )
    .await;
    let jwt = &r["FetchJWTSVID"];
    assert_eq!(jwt["ok"], Value::Bool(false), "{jwt}");
    // A service that exists nowhere would be UNIMPLEMENTED; h2 kills the stream first.
    assert_ne!(jwt["code"], "UNIMPLEMENTED", "{jwt}");
    server.abort();
}

mod bare {
    //! An SDS service that answers nothing: the bare server only needs some service.
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Request, Response, Status, Streaming};

    pub struct Bare;

    #[tonic::async_trait]
    impl SecretDiscoveryService for Bare {
        type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;
        type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

        async fn delta_secrets(
            &self,
            _: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
            Err(Status::unimplemented("bare"))
        }

        async fn stream_secrets(
            &self,
            _: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamSecretsStream>, Status> {
            Err(Status::unimplemented("bare"))
        }

        async fn fetch_secrets(
            &self,
            _: Request<DiscoveryRequest>,
        ) -> Result<Response<DiscoveryResponse>, Status> {
            Err(Status::unimplemented("bare"))
        }
    }
}
