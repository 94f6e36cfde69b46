//! Sessions driven in-process (no sockets): the work a request causes, and the gauge.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::codec::Codec;
use tonic_prost::ProstCodec;

use super::wire::{DeltaResponse, SotwResponse};
use super::*;
use crate::resources::{Resource, ResourceType, Snapshot};

const CLUSTERS: usize = 10_000;

fn name(i: usize) -> String {
    format!("svc{i}_cluster")
}

fn resource(n: String) -> Resource {
    let c = Cluster {
        name: n.clone(),
        ..Default::default()
    };
    Resource::new(n.clone(), &c, &n).unwrap()
}

/// A server context over a snapshot with `CLUSTERS` clusters and as many assignments
/// (the assignments are clusters too: only names and versions matter here).
fn ctx() -> Arc<Ctx> {
    ctx_and_publisher().0
}

/// [`ctx`] with the snapshot sender (while it lives, a driven stream keeps running).
fn ctx_and_publisher() -> (Arc<Ctx>, watch::Sender<Arc<Snapshot>>) {
    let all = || (0..CLUSTERS).map(|i| resource(name(i))).collect::<Vec<_>>();
    let snap = Snapshot::from_resources(1, [all(), all(), Vec::new()]);
    let (tx, snapshots) = watch::channel(Arc::new(snap));
    let ctx = Arc::new(Ctx {
        snapshots,
        metrics: Arc::default(),
        shutdown: CancellationToken::new(),
        next_stream: AtomicU64::new(1),
    });
    (ctx, tx)
}

fn delta(
    ctx: &Arc<Ctx>,
) -> (
    delta::Session,
    mpsc::Receiver<Result<DeltaResponse, tonic::Status>>,
) {
    let (tx, rx) = mpsc::channel(1024);
    (delta::Session::new(ctx.clone(), 1, None, None, tx), rx)
}

fn sub(names: &[String], unsub: &[String], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ResourceType::Endpoint.type_url().into(),
        resource_names_subscribe: names.to_vec(),
        resource_names_unsubscribe: unsub.to_vec(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_one_name_delta_subscribe_looks_at_one_name() {
    let ctx = ctx();
    let (mut s, mut rx) = delta(&ctx);
    let first: Vec<String> = (0..5_000).map(name).collect();
    s.on_request(sub(&first, &[], "")).await.unwrap();
    let r = rx.recv().await.unwrap().unwrap();
    assert_eq!(r.resources.len(), 5_000);
    for i in 5_000..5_100 {
        let before = s.examined;
        s.on_request(sub(&[name(i)], &[], &r.nonce)).await.unwrap();
        assert!(
            s.examined - before <= 1,
            "subscribing one name examined {} names",
            s.examined - before
        );
        let r = rx.recv().await.unwrap().unwrap();
        assert_eq!(r.resources.len(), 1);
    }
    let before = s.examined;
    for i in 0..100 {
        s.on_request(sub(&[], &[name(i)], "")).await.unwrap();
    }
    assert_eq!(s.examined, before, "an unsubscribe pushes nothing");
    assert!(rx.try_recv().is_err(), "no response to an unsubscribe");
    // A re-subscription is answered again.
    s.on_request(sub(&[name(0)], &[], "")).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().unwrap().resources.len(), 1);
}

#[tokio::test]
async fn a_delta_nack_still_changes_the_subscription() {
    let ctx = ctx();
    let (mut s, mut rx) = delta(&ctx);
    s.on_request(sub(&[name(1)], &[], "")).await.unwrap();
    let r = rx.recv().await.unwrap().unwrap();
    let mut nack = sub(&[name(2)], &[name(1)], &r.nonce);
    nack.error_detail = Some(RpcStatus::default());
    s.on_request(nack).await.unwrap();
    let r2 = rx.recv().await.unwrap().unwrap();
    assert_eq!(r2.resources[0].name, name(2));
    assert_eq!(ctx.metrics.nacks(ResourceType::Endpoint), 1);
}

fn sotw_req(names: &[String], nonce: &str, nack: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ResourceType::Endpoint.type_url().into(),
        resource_names: names.to_vec(),
        response_nonce: nonce.into(),
        error_detail: nack.then(RpcStatus::default),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_sotw_request_adding_one_name_looks_at_that_name() {
    let ctx = ctx();
    let (tx, mut rx) = mpsc::channel::<Result<SotwResponse, tonic::Status>>(1024);
    let mut s = sotw::Session::new(ctx.clone(), 1, None, None, tx);
    let mut names: Vec<String> = (0..5_000).map(name).collect();
    s.on_request(sotw_req(&names, "", false)).await.unwrap();
    let mut r = rx.recv().await.unwrap().unwrap();
    for i in 5_000..5_050 {
        names.push(name(i));
        let before = s.examined;
        s.on_request(sotw_req(&names, &r.nonce, false))
            .await
            .unwrap();
        assert!(s.examined - before <= 1, "{}", s.examined - before);
        r = rx.recv().await.unwrap().unwrap();
        assert_eq!(r.resources.len(), 1);
    }
}

#[tokio::test]
async fn a_sotw_nack_with_new_names_is_applied_and_answered() {
    let ctx = ctx();
    let (tx, mut rx) = mpsc::channel::<Result<SotwResponse, tonic::Status>>(16);
    let mut s = sotw::Session::new(ctx.clone(), 1, None, None, tx);
    s.on_request(sotw_req(&[name(1)], "", false)).await.unwrap();
    let r = rx.recv().await.unwrap().unwrap();
    // NACK the response but ask for one more name: the new name is answered.
    s.on_request(sotw_req(&[name(1), name(2)], &r.nonce, true))
        .await
        .unwrap();
    let r2 = rx.recv().await.unwrap().unwrap();
    assert_eq!(r2.resources.len(), 1);
    assert_eq!(r2.resources[0].name, name(2));
    // The ACK that follows repeats the names: nothing more.
    s.on_request(sotw_req(&[name(1), name(2)], &r2.nonce, false))
        .await
        .unwrap();
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn requests_over_the_cap_end_the_stream_naming_it() {
    let ctx = ctx();
    let many: Vec<String> = (0..MAX_NAMES_PER_REQUEST + 1).map(name).collect();
    let (tx, mut rx) = mpsc::channel::<Result<SotwResponse, tonic::Status>>(16);
    let mut s = sotw::Session::new(ctx.clone(), 1, None, None, tx);
    assert!(s.on_request(sotw_req(&many, "", false)).await.is_err());
    let e = rx.recv().await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("16384"), "{}", e.message());

    let (mut d, mut rx) = delta(&ctx);
    assert!(d.on_request(sub(&many, &[], "")).await.is_err());
    let e = rx.recv().await.unwrap().unwrap_err();
    assert!(e.message().contains("16384"), "{}", e.message());
    assert_eq!(ctx.metrics.oversized_requests(), 2);
}

#[test]
fn fetch_selects_by_lookup_deduplicated_and_capped() {
    let ctx = ctx();
    let snap = ctx.snapshots.borrow().clone();
    let res = snap.of(ResourceType::Cluster);
    let names = vec![name(3), name(1), name(3), "nope".to_owned(), name(1)];
    let got: Vec<String> = select(res, &names)
        .unwrap()
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(got, [name(3), name(1)]);
    assert_eq!(select(res, &[]).unwrap().len(), CLUSTERS);
    let many = vec![name(1); 100_000];
    let e = select(res, &many).unwrap_err();
    assert_eq!(e.count, 100_000);
}

/// A request body that never yields: the client neither sends nor hangs up.
struct Silent;

impl http_body::Body for Silent {
    type Data = prost::bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Poll::Pending
    }
}

#[tokio::test]
async fn a_cancelled_session_releases_the_streams_gauge() {
    let (ctx, _publisher) = ctx_and_publisher();
    let (s, _rx) = delta(&ctx);
    assert_eq!(ctx.metrics.open_streams("delta"), 1);
    let decoder = ProstCodec::<DeltaResponse, DeltaDiscoveryRequest>::default().decoder();
    let inbound = Streaming::new_request(decoder, Silent, None, None);
    let task = tokio::spawn(drive(s, ctx.clone(), inbound));
    tokio::task::yield_now().await;
    assert_eq!(ctx.metrics.open_streams("delta"), 1);
    task.abort();
    let _ = task.await;
    assert_eq!(ctx.metrics.open_streams("delta"), 0);
}
