//! Non-Envoy clients against the xDS server: an EDS-only client that sends exactly what
//! cofide-sdk-go sends, clients that NACK (no resend storm; the NACK shows in metrics and
//! logs), and a request for a type ferry does not serve.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use testkit::xds_agent::{Agent, Gw, Ports, agent_doc, host, service_doc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use xds::resources::ResourceType;

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// Everything logged by the process, for assertions on log lines.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Writer(w.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(sub);
        buf
    })
    .clone()
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl Write for Writer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

async fn client(agent: &Agent) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(agent.url())
        .await
        .expect("connect")
}

/// An open SotW stream: a sender for requests and the response stream.
struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(agent: &Agent) -> Sotw {
        let (tx, rx) = mpsc::channel(8);
        let rx = client(agent)
            .await
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open stream")
            .into_inner();
        Sotw { tx, rx }
    }

    async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.expect("send");
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .expect("stream ok")
            .expect("stream open")
    }

    /// `None` if nothing arrives within `d`.
    async fn recv_within(&mut self, d: Duration) -> Option<DiscoveryResponse> {
        tokio::time::timeout(d, self.rx.message())
            .await
            .ok()
            .map(|m| m.expect("stream ok").expect("stream open"))
    }
}

/// cofide-sdk-go's flattening: host, port, weight of every LbEndpoint.
fn flatten(resp: &DiscoveryResponse) -> Vec<(String, u32, u32)> {
    let cla = ClusterLoadAssignment::decode(resp.resources[0].value.as_slice()).expect("CLA");
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        for ep in &loc.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier else {
                panic!("endpoint without address");
            };
            let Some(address::Address::SocketAddress(sa)) =
                e.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                panic!("not a socket address");
            };
            let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                panic!("no port");
            };
            let w = ep
                .load_balancing_weight
                .as_ref()
                .map(|w| w.value)
                .unwrap_or(0);
            out.push((sa.address.clone(), port, w));
        }
    }
    out
}

fn sdk_request(hostname: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "node".into(),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: vec![format!("{hostname}_cluster")],
        ..Default::default()
    }
}

#[tokio::test]
async fn cofide_sdk_style_eds_client_gets_endpoints_and_updates() {
    let ports = Ports::free();
    let a = service_doc(
        "alpha",
        8443,
        "IstioMtls",
        &[
            Gw("istio-eastwestgateway", "10.0.0.1", 15443),
            Gw("istio-ingressgateway", "10.0.0.2", 443),
        ],
    );
    let b = service_doc(
        "bravo",
        9443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "gw.remote.example", 15443)],
    );
    let agent = Agent::start(&format!("{}{a}{b}", agent_doc(ports))).await;

    // One stream per service, as the SDK does.
    let mut alpha = Sotw::open(&agent).await;
    alpha.send(sdk_request(&host("alpha"))).await;
    let mut bravo = Sotw::open(&agent).await;
    bravo.send(sdk_request(&host("bravo"))).await;

    let r = alpha.recv().await;
    assert_eq!(r.type_url, EDS);
    assert_eq!(r.resources.len(), 1);
    assert_eq!(
        flatten(&r),
        vec![("10.0.0.1".into(), 15443, 1), ("10.0.0.2".into(), 443, 1)]
    );
    let rb = bravo.recv().await;
    // A hostname gateway is handed to EDS-only clients as the hostname itself.
    assert_eq!(flatten(&rb), vec![("gw.remote.example".into(), 15443, 1)]);

    // ACK the SDK way: the whole request again, with version and nonce.
    for (s, r, h) in [(&alpha, &r, "alpha"), (&bravo, &rb, "bravo")] {
        let mut ack = sdk_request(&host(h));
        ack.version_info = r.version_info.clone();
        ack.response_nonce = r.nonce.clone();
        s.send(ack).await;
    }
    // An ACK is not answered.
    assert!(
        alpha
            .recv_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    // The gateways change: alpha's stream gets the new endpoints, bravo's nothing.
    let a2 = service_doc(
        "alpha",
        8443,
        "IstioMtls",
        &[Gw("istio-eastwestgateway", "10.0.0.9", 15443)],
    );
    agent.write(&format!("{}{a2}{b}", agent_doc(ports)));
    let r2 = alpha.recv().await;
    assert_eq!(flatten(&r2), vec![("10.0.0.9".into(), 15443, 1)]);
    assert_ne!(r2.version_info, r.version_info);
    assert_ne!(r2.nonce, r.nonce);
    assert!(
        bravo
            .recv_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    // A service the registry does not have: no response (it does not exist yet), and it
    // arrives as soon as it is added.
    let mut charlie = Sotw::open(&agent).await;
    charlie.send(sdk_request(&host("charlie"))).await;
    assert!(
        charlie
            .recv_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    let c = service_doc(
        "charlie",
        7443,
        "Mtls",
        &[Gw("istio-ingressgateway", "10.0.0.3", 443)],
    );
    agent.write(&format!("{}{a2}{b}{c}", agent_doc(ports)));
    let rc = charlie.recv().await;
    assert_eq!(flatten(&rc), vec![("10.0.0.3".into(), 443, 1)]);
}

async fn recv(
    resp: &mut Streaming<DeltaDiscoveryResponse>,
    d: Duration,
) -> Option<DeltaDiscoveryResponse> {
    tokio::time::timeout(d, resp.message())
        .await
        .ok()
        .map(|m| m.unwrap().unwrap())
}

fn nack_status(msg: &str) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3,
        message: msg.into(),
        details: vec![],
    })
}

#[tokio::test]
async fn sotw_nack_is_logged_counted_and_not_resent() {
    let logs = logs();
    let ports = Ports::free();
    let a = service_doc(
        "alpha",
        8443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.1", 15443)],
    );
    let agent = Agent::start(&format!("{}{a}", agent_doc(ports))).await;
    let mut s = Sotw::open(&agent).await;
    let node = Node {
        id: "sotw-nacker".into(),
        ..Default::default()
    };
    s.send(DiscoveryRequest {
        node: Some(node),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await;
    let r = s.recv().await;
    assert_eq!(r.resources.len(), 1);
    // NACK: previous (empty) version, the response's nonce, an error.
    s.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: r.nonce.clone(),
        error_detail: nack_status("test rejects this cluster"),
        ..Default::default()
    })
    .await;
    // No resend storm: nothing comes back.
    assert!(s.recv_within(Duration::from_secs(1)).await.is_none());
    assert_eq!(agent.metrics.nacks(ResourceType::Cluster), 1);
    let text = agent.metrics.encode_text();
    assert!(text.contains("xds_nacks_total{type=\"CDS\"} 1"), "{text}");
    let l = log_text();
    let line = l
        .lines()
        .find(|l| l.contains("sotw-nacker") && l.contains("NACK"))
        .unwrap_or_else(|| panic!("no NACK log line:\n{l}"));
    assert!(line.contains("test rejects this cluster"), "{line}");
    assert!(line.contains(&r.version_info), "{line}");
    assert!(line.contains("CDS"), "{line}");
    drop(logs);

    // The next registry change is pushed (a new version, not the rejected one).
    let b = service_doc(
        "bravo",
        9443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.2", 15443)],
    );
    agent.write(&format!("{}{a}{b}", agent_doc(ports)));
    let r2 = s.recv().await;
    assert_eq!(r2.resources.len(), 2);
    assert_ne!(r2.version_info, r.version_info);
}

#[tokio::test]
async fn delta_nack_is_logged_counted_and_not_resent() {
    let _logs = logs();
    let ports = Ports::free();
    let a = service_doc(
        "alpha",
        8443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.1", 15443)],
    );
    let agent = Agent::start(&format!("{}{a}", agent_doc(ports))).await;
    let (tx, rx) = mpsc::channel(8);
    let mut resp: Streaming<DeltaDiscoveryResponse> = client(&agent)
        .await
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("open")
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "delta-nacker".into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = recv(&mut resp, Duration::from_secs(10))
        .await
        .expect("first response");
    assert_eq!(r.resources.len(), 1);
    tx.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: r.nonce.clone(),
        error_detail: nack_status("delta test rejects"),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(recv(&mut resp, Duration::from_secs(1)).await.is_none());
    assert_eq!(agent.metrics.nacks(ResourceType::Cluster), 1);
    assert!(
        log_text()
            .lines()
            .any(|l| l.contains("delta-nacker") && l.contains("delta test rejects")),
        "no NACK log line"
    );

    // Add bravo and remove alpha: only bravo is sent, alpha is listed as removed.
    let b = service_doc(
        "bravo",
        9443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.2", 15443)],
    );
    agent.write(&format!("{}{b}", agent_doc(ports)));
    let r2 = recv(&mut resp, Duration::from_secs(10))
        .await
        .expect("push");
    let names: Vec<_> = r2.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(names, vec![format!("{}_cluster", host("bravo"))]);
    assert_eq!(
        r2.removed_resources,
        vec![format!("{}_cluster", host("alpha"))]
    );
}

#[tokio::test]
async fn unknown_type_url_gets_a_clear_error() {
    let agent = Agent::start(&agent_doc(Ports::free())).await;
    let mut s = Sotw::open(&agent).await;
    s.send(DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration".into(),
        ..Default::default()
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(10), s.rx.message())
        .await
        .expect("answer")
        .expect_err("an error status");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("does not serve"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("RouteConfiguration"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn standalone_cds_eds_lds_services_answer() {
    use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_client::ListenerDiscoveryServiceClient;

    let ports = Ports::free();
    let a = service_doc(
        "alpha",
        8443,
        "Mtls",
        &[Gw("istio-eastwestgateway", "10.0.0.1", 15443)],
    );
    let agent = Agent::start(&format!("{}{a}", agent_doc(ports))).await;

    // CDS stream: a non-aggregated request may leave type_url empty.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "standalone".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut cds = ClusterDiscoveryServiceClient::connect(agent.url())
        .await
        .unwrap()
        .stream_clusters(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), cds.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.type_url, CDS);
    assert_eq!(r.resources.len(), 1);

    // EDS fetch (unary).
    let f = EndpointDiscoveryServiceClient::connect(agent.url())
        .await
        .unwrap()
        .fetch_endpoints(DiscoveryRequest {
            resource_names: vec![format!("{}_cluster", host("alpha"))],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flatten(&f), vec![("10.0.0.1".into(), 15443, 1)]);

    // LDS delta stream: outbound and dns.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest::default()).await.unwrap();
    let mut lds = ListenerDiscoveryServiceClient::connect(agent.url())
        .await
        .unwrap()
        .delta_listeners(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = recv(&mut lds, Duration::from_secs(10)).await.unwrap();
    let mut names: Vec<_> = r.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    assert_eq!(names, vec!["dns", "outbound"]);

    // A standalone service refuses another type.
    let err = ClusterDiscoveryServiceClient::connect(agent.url())
        .await
        .unwrap()
        .fetch_clusters(DiscoveryRequest {
            type_url: EDS.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn fetch_over_the_name_cap_is_refused_naming_it() {
    use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
    let agent = Agent::start(&agent_doc(Ports::free())).await;
    let names: Vec<String> = (0..100_000).map(|i| format!("n{i}")).collect();
    let err = ClusterDiscoveryServiceClient::connect(agent.url())
        .await
        .unwrap()
        .fetch_clusters(DiscoveryRequest {
            resource_names: names,
            ..Default::default()
        })
        .await
        .expect_err("over the cap");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("16384"), "{}", err.message());
    assert_eq!(agent.metrics.oversized_requests(), 1);
}

#[tokio::test]
async fn a_sotw_nack_that_changes_the_names_is_applied() {
    let ports = Ports::free();
    let gw = [Gw("istio-eastwestgateway", "10.0.0.1", 15443)];
    let a = service_doc("alpha", 8443, "Mtls", &gw);
    let b = service_doc("bravo", 9443, "Mtls", &gw);
    let agent = Agent::start(&format!("{}{a}{b}", agent_doc(ports))).await;
    let mut s = Sotw::open(&agent).await;
    s.send(sdk_request(&host("alpha"))).await;
    let r = s.recv().await;
    // NACK, asking for bravo too: bravo is answered.
    let mut nack = sdk_request(&host("alpha"));
    nack.resource_names
        .push(format!("{}_cluster", host("bravo")));
    nack.response_nonce = r.nonce.clone();
    nack.error_detail = nack_status("rejects alpha");
    s.send(nack.clone()).await;
    let r2 = s.recv().await;
    let cla = ClusterLoadAssignment::decode(r2.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.cluster_name, format!("{}_cluster", host("bravo")));
    // The ACK repeating the names asks nothing new.
    let mut ack = nack;
    ack.error_detail = None;
    ack.response_nonce = r2.nonce.clone();
    ack.version_info = r2.version_info.clone();
    s.send(ack).await;
    assert!(s.recv_within(Duration::from_millis(300)).await.is_none());
}
