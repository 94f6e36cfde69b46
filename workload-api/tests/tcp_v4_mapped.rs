//! `tcp://` endpoints and IPv4-mapped IPv6 addresses: grpc C-core dials 127.0.0.1 from an
//! AF_INET6 socket (`::ffff:127.0.0.1`), and a dual-stack listener sees IPv4 clients as
//! `::ffff:a.b.c.d`, while the kernel lists each socket in `/proc/net/tcp` or `tcp6` by
//! the family it was created with. The caller's uid must be found either way.

// Test code: unwrap on setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use testkit::workload::{Entry, Header, config_yaml, my_uid, start};
use workload_api::proto::X509svidRequest;
use workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;

const T: Duration = Duration::from_secs(20);

fn have_ipv6() -> bool {
    let ok = std::net::TcpListener::bind("[::1]:0").is_ok();
    testkit::require("IPv6 on loopback", ok)
}

/// A config serving the Workload API on `listen`, granting an id to this uid.
fn yaml(dir: &std::path::Path, listen: &str) -> String {
    config_yaml(
        dir,
        "1h",
        &[Entry {
            id: "spiffe://example.org/tcp",
            selectors: vec![format!("unix:uid:{}", my_uid())],
            hint: None,
        }],
        &[],
    )
    .replace(&format!("unix://{}/agent.sock", dir.display()), listen)
}

/// Dials `uri` (the socket family follows the address) and fetches the X.509-SVID.
async fn fetch_via(uri: String) -> Result<String, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .unwrap()
        .connect_timeout(T)
        .connect()
        .await
        .unwrap();
    let mut c = SpiffeWorkloadApiClient::with_interceptor(channel, Header(true));
    let mut stream = tokio::time::timeout(T, c.fetch_x509svid(X509svidRequest {}))
        .await
        .expect("answered in time")?
        .into_inner();
    let first = tokio::time::timeout(T, stream.message())
        .await
        .expect("first message in time")?
        .expect("a message");
    Ok(first.svids[0].spiffe_id.clone())
}

/// A dual-stack listener (`[::]`) and a client on an AF_INET socket: accepted as
/// `::ffff:127.0.0.1`, listed in `/proc/net/tcp` as 127.0.0.1.
#[tokio::test]
async fn ipv4_client_of_a_dual_stack_listener_is_attested() {
    if !have_ipv6() {
        return;
    }
    let d = testkit::tempdir().unwrap();
    let port = testkit::free_port();
    let agent = start(d.path(), &yaml(d.path(), &format!("tcp://[::]:{port}"))).await;
    let id = fetch_via(format!("http://127.0.0.1:{port}")).await.unwrap();
    assert_eq!(id, "spiffe://example.org/tcp");
    agent.stop().await;
}

/// An AF_INET6 client through `::ffff:127.0.0.1`, as grpc C-core connects: to an IPv4
/// listener (accepted as 127.0.0.1, listed in `/proc/net/tcp6` as mapped) and to a
/// dual-stack one. Needs the `tcp_owner` patch in attestor.rs (see the issue 9 report):
/// the lookup must search `/proc/net/tcp6` for the mapped form of an IPv4 address.
#[tokio::test]
async fn ipv6_socket_client_through_a_v4_mapped_address_is_attested() {
    if !have_ipv6() {
        return;
    }
    for listen in ["127.0.0.1", "[::]"] {
        let d = testkit::tempdir().unwrap();
        let port = testkit::free_port();
        let agent = start(d.path(), &yaml(d.path(), &format!("tcp://{listen}:{port}"))).await;
        let id = fetch_via(format!("http://[::ffff:127.0.0.1]:{port}"))
            .await
            .unwrap_or_else(|e| panic!("listener {listen}: {e}"));
        assert_eq!(id, "spiffe://example.org/tcp");
        agent.stop().await;
    }
}
