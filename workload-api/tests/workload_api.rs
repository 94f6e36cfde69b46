//! The Workload API against the real Rust SPIFFE client (`spiffe` crate): X.509 and JWT
//! SVIDs, bundles, rotation on one stream, the security header, PermissionDenied for an
//! unregistered uid, registration and federated-bundle changes, and restarts.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use spiffe::{JwtSvid, TrustDomain, WorkloadApiClient, X509Source};
use testkit::workload::{Entry, config_yaml, my_uid, raw_client, start};
use tonic::Code;
use workload_api::proto::{
    JwtsvidRequest, ValidateJwtsvidRequest, WitsvidRequest, X509BundlesRequest, X509svidRequest,
};

const T: Duration = Duration::from_secs(20);

fn uid_sel() -> Vec<String> {
    vec![format!("unix:uid:{}", my_uid())]
}

/// A config granting `id` to this test process's uid, with SVIDs living `svid_ttl`.
fn one_entry(dir: &std::path::Path, svid_ttl: &str, id: &str) -> String {
    config_yaml(
        dir,
        svid_ttl,
        &[Entry {
            id,
            selectors: uid_sel(),
            hint: None,
        }],
        &[],
    )
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[tokio::test]
async fn spiffe_client_fetches_svids_and_bundle_and_the_chain_verifies() {
    let d = testkit::tempdir().unwrap();
    let yaml = config_yaml(
        d.path(),
        "1h",
        &[
            Entry {
                id: "spiffe://example.org/first",
                selectors: uid_sel(),
                hint: Some("primary"),
            },
            Entry {
                id: "spiffe://example.org/second",
                selectors: vec![
                    format!("unix:uid:{}", my_uid()),
                    format!("unix:path:{}", std::env::current_exe().unwrap().display()),
                ],
                hint: None,
            },
            Entry {
                id: "spiffe://example.org/not-me",
                selectors: vec![format!("unix:uid:{}", my_uid() + 4242)],
                hint: None,
            },
        ],
        &[],
    );
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let ctx = tokio::time::timeout(T, client.fetch_x509_context())
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<String> = ctx
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/second"]
    );
    let default = ctx.default_svid().unwrap();
    assert_eq!(
        default.spiffe_id().to_string(),
        "spiffe://example.org/first"
    );
    assert_eq!(default.hint(), Some("primary"));

    // The chain verifies against the bundle the client received.
    let bundle = ctx.bundle_set().get(&td()).expect("own bundle");
    let roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    for svid in ctx.svids() {
        let chain: Vec<Vec<u8>> = svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        attest::verify_chain(&chain, &roots, SystemTime::now()).unwrap();
        attest::check_svid_profile(&chain[0]).unwrap();
    }

    // Bundles RPC: keyed spiffe://example.org, concatenated DER.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(
        bundles.get(&td()).unwrap().authorities().len(),
        agent.authority.x509_authorities().len()
    );
    agent.stop().await;
}

#[tokio::test]
async fn x509_stream_sees_rotations_without_reconnecting_and_x509_source_follows() {
    let d = testkit::tempdir().unwrap();
    let yaml = one_entry(d.path(), "4s", "spiffe://example.org/rotating");
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut serials = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while serials.len() < 3 {
            let ctx = stream.next().await.expect("stream stays open").unwrap();
            let leaf = ctx.default_svid().unwrap().leaf().as_bytes().to_vec();
            serials.insert(leaf);
        }
    })
    .await
    .expect("two rotations within 30 s on one stream");

    // The X509Source (the crate's auto-updating source) follows rotations too.
    let source = X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap().leaf().as_bytes().to_vec();
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            updates.changed().await.unwrap();
            if source.svid().unwrap().leaf().as_bytes() != first.as_slice() {
                break;
            }
        }
    })
    .await
    .expect("X509Source sees a rotation");
    source.shutdown().await;
    agent.stop().await;
}

#[tokio::test]
async fn jwt_svid_validates_remotely_and_locally_and_rejects_tampering_and_wrong_audience() {
    let d = testkit::tempdir().unwrap();
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/jwt");
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let svid = client.fetch_jwt_svid(["backend"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/jwt");
    let token = svid.token().to_owned();

    // Through ValidateJWTSVID.
    let v = client.validate_jwt_token("backend", &token).await.unwrap();
    assert_eq!(v.spiffe_id().to_string(), "spiffe://example.org/jwt");
    // Through the crate's own verification, with the JWKS from FetchJWTBundles.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(bundles.get(&td()).is_some());
    let local = JwtSvid::parse_and_validate(&token, &bundles, &["backend"]).unwrap();
    assert_eq!(local.spiffe_id().to_string(), "spiffe://example.org/jwt");

    // Wrong audience: both reject.
    assert!(client.validate_jwt_token("other", &token).await.is_err());
    assert!(JwtSvid::parse_and_validate(&token, &bundles, &["other"]).is_err());
    // Tampered payload: both reject.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut p = parts[1].clone().into_bytes();
    let i = p.len() / 2;
    p[i] = if p[i] == b'A' { b'B' } else { b'A' };
    parts[1] = String::from_utf8(p).unwrap();
    let tampered = parts.join(".");
    let mut raw = raw_client(&agent, true).await;
    let err = raw
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "backend".into(),
            svid: tampered.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(JwtSvid::parse_and_validate(&tampered, &bundles, &["backend"]).is_err());

    // Claims come back as a Struct.
    let ok = raw
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "backend".into(),
            svid: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let claims = ok.claims.unwrap();
    for k in ["sub", "aud", "exp", "iat"] {
        assert!(claims.fields.contains_key(k), "claim {k}");
    }
    // No audience: InvalidArgument.
    let err = raw
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    agent.stop().await;
}

#[tokio::test]
async fn calls_without_the_security_header_are_invalid_and_wit_is_unimplemented() {
    let d = testkit::tempdir().unwrap();
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/x");
    let agent = start(d.path(), &yaml).await;
    let mut bare = raw_client(&agent, false).await;
    let err = bare.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("security header"), "{err}");
    let err = bare
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut ok = raw_client(&agent, true).await;
    let err = ok
        .fetch_witsvid(WitsvidRequest {
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    agent.stop().await;
}

/// Re-executed as a child under another uid by `unregistered_uid_gets_permission_denied`:
/// asks for an X.509-SVID and prints the status code. Does nothing in a normal run.
#[tokio::test]
async fn child_probe_x509() {
    let Ok(ep) = std::env::var("FERRY_WAPI_PROBE") else {
        return;
    };
    let mut c = testkit::workload::raw_client_at(&ep, true).await;
    match c.fetch_x509svid(X509svidRequest {}).await {
        Ok(_) => println!("PROBE-RESULT: ok"),
        Err(e) => println!("PROBE-RESULT: {:?} {}", e.code(), e.message()),
    }
}

#[tokio::test]
async fn unregistered_uid_gets_permission_denied() {
    if !testkit::require(
        "root (to run a child process under another uid)",
        testkit::is_root(),
    ) {
        return;
    }
    // Other uids must reach the socket inside the temp dir.
    let d = testkit::shared_tempdir();
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/root-only");
    let agent = start(d.path(), &yaml).await;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_probe_x509",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("FERRY_WAPI_PROBE", agent.endpoint());
    let out = testkit::workload::run_as_nobody(cmd).await;
    assert!(
        out.contains("PROBE-RESULT: PermissionDenied no identity issued"),
        "child output:\n{out}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn registration_change_and_federated_bundle_change_are_pushed() {
    let d = testkit::tempdir().unwrap();
    // A federated trust domain's bundle: another CA's root as PEM.
    let other = attest::Authority::open(
        attest::AuthorityConfig {
            trust_domain: registry::spiffe::TrustDomain::parse("other.org").unwrap(),
            state_dir: d.path().join("other-ca"),
            root_ttl: Duration::from_secs(3600),
            ca_ttl: Duration::from_secs(600),
        },
        std::sync::Arc::new(attest::SoftwareKeyStore::new(
            d.path().join("other-ca/keys"),
        )),
    )
    .unwrap();
    let bundle_dir = d.path().join("bundles");
    std::fs::create_dir(&bundle_dir).unwrap();
    let bundle_file = bundle_dir.join("other.pem");
    let pem = |ders: &[Vec<u8>]| -> String {
        ders.iter()
            .map(|d| attest::x509::pem_encode("CERTIFICATE", d))
            .collect()
    };
    let other_roots = other.x509_authorities();
    std::fs::write(&bundle_file, pem(&other_roots)).unwrap();
    let one = [Entry {
        id: "spiffe://example.org/one",
        selectors: uid_sel(),
        hint: None,
    }];
    let yaml = config_yaml(
        d.path(),
        "1h",
        &one,
        &[("other.org", bundle_file.as_path())],
    );
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(T, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.svids().len(), 1);
    let other_td = TrustDomain::new("other.org").unwrap();
    assert_eq!(
        first
            .bundle_set()
            .get(&other_td)
            .unwrap()
            .authorities()
            .len(),
        1,
        "federated bundle included"
    );

    // Registration change: a second entry appears in the config file.
    let two = [
        Entry {
            id: "spiffe://example.org/one",
            selectors: uid_sel(),
            hint: None,
        },
        Entry {
            id: "spiffe://example.org/two",
            selectors: uid_sel(),
            hint: None,
        },
    ];
    std::fs::write(
        &agent.config,
        config_yaml(
            d.path(),
            "1h",
            &two,
            &[("other.org", bundle_file.as_path())],
        ),
    )
    .unwrap();
    let ctx = tokio::time::timeout(T, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ctx.svids().len(), 2, "pushed after the registration change");

    // Federated bundle file change: the other trust domain now publishes two roots.
    let mut two_roots = other_roots.clone();
    two_roots.push(agent.authority.x509_authorities()[0].clone());
    std::fs::write(&bundle_file, pem(&two_roots)).unwrap();
    let ctx = tokio::time::timeout(T, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ctx.bundle_set().get(&other_td).unwrap().authorities().len(),
        2
    );

    // The bundles stream carries both trust domains, and skips unchanged messages: after
    // the first message nothing more arrives while nothing changes.
    let mut raw = raw_client(&agent, true).await;
    let mut bs = raw
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let b = bs.message().await.unwrap().unwrap();
    let keys: BTreeSet<&str> = b.bundles.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["spiffe://example.org", "spiffe://other.org"])
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), bs.message())
            .await
            .is_err(),
        "no duplicate bundle message"
    );

    // A rewrite caught half-way (an unparseable file for a moment) or a failed read keeps
    // the last good bundle: nothing is pushed and the trust domain stays.
    std::fs::write(&bundle_file, "-----BEGIN CERT").unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(800), bs.message())
            .await
            .is_err(),
        "an unreadable bundle file must not change what is published"
    );
    let mut again = raw
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let b = again.message().await.unwrap().unwrap();
    assert!(
        b.bundles.contains_key("spiffe://other.org"),
        "the federated trust domain keeps its last good bundle"
    );
    agent.stop().await;
}

#[tokio::test]
async fn restart_keeps_the_root_and_new_svids_verify_against_the_cached_bundle() {
    let d = testkit::tempdir().unwrap();
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/persist");
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let before = client.fetch_x509_context().await.unwrap();
    let cached: Vec<Vec<u8>> = before
        .bundle_set()
        .get(&td())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let socket = agent.socket.clone();
    agent.stop().await;
    assert!(!socket.exists(), "socket removed at shutdown");

    let agent = testkit::workload::start_from(d.path(), &d.path().join("ferry.yaml")).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let after = client.fetch_x509_context().await.unwrap();
    let roots_after: Vec<Vec<u8>> = after
        .bundle_set()
        .get(&td())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(roots_after, cached, "same root after restart");
    let svid = after.default_svid().unwrap();
    assert_ne!(
        svid.leaf().as_bytes(),
        before.default_svid().unwrap().leaf().as_bytes(),
        "re-issued"
    );
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    attest::verify_chain(&chain, &cached, SystemTime::now()).unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let d = testkit::tempdir().unwrap();
    // A stale socket file: bound, then the listener dropped (the file stays).
    let sock = d.path().join("agent.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/x");
    let agent = start(d.path(), &yaml).await;
    let mode = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o666
    );
    // A second server on the same live socket is refused.
    let watcher = registry::config::ConfigWatcher::start(&agent.config)
        .await
        .unwrap();
    let err = workload_api::WorkloadApiServer::start(
        watcher.subscribe(),
        agent.authority.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .unwrap_err();
    assert!(
        matches!(err, workload_api::Error::SocketInUse { .. }),
        "{err}"
    );
    // The first still serves.
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    client.fetch_x509_svid().await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn tcp_endpoint_attests_the_caller_uid() {
    let d = testkit::tempdir().unwrap();
    let port = testkit::free_port();
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/tcp").replace(
        &format!("unix://{}/agent.sock", d.path().display()),
        &format!("tcp://127.0.0.1:{port}"),
    );
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(format!("tcp://127.0.0.1:{port}"))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/tcp");
    agent.stop().await;
}

#[tokio::test]
async fn ca_rotation_is_pushed_and_the_new_chain_verifies_against_the_pushed_bundle() {
    let d = testkit::tempdir().unwrap();
    // Intermediates live 6 s: the next is prepared at once (NotBefore is 10 s back) and
    // takes over at 5/6 of its life, a few seconds in.
    let yaml = one_entry(d.path(), "1h", "spiffe://example.org/ca-rotation")
        .replace("caTtl: 1h", "caTtl: 6s");
    let agent = start(d.path(), &yaml).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(T, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let intermediate = |ctx: &spiffe::X509Context| {
        ctx.default_svid().unwrap().cert_chain()[1]
            .as_bytes()
            .to_vec()
    };
    let first_int = intermediate(&first);
    let rotated = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ctx = stream.next().await.expect("stream open").unwrap();
            if intermediate(&ctx) != first_int {
                return ctx;
            }
        }
    })
    .await
    .expect("a new intermediate is pushed within 30 s");
    let svid = rotated.default_svid().unwrap();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let roots: Vec<Vec<u8>> = rotated
        .bundle_set()
        .get(&td())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    attest::verify_chain(&chain, &roots, SystemTime::now()).unwrap();
    agent.stop().await;
}
