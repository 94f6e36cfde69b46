//! The HTTP/2 body of a streaming xDS response, written a chunk at a time.
//!
//! tonic's encoder writes each whole message into one per-stream buffer, and hyper hands
//! that buffer to HTTP/2 at once: during a full sync every stream held its own encoded copy
//! of every resource until the client had read it all. [`GrpcBody`] instead encodes a
//! response lazily, in chunks of about [`CHUNK`] bytes copied from the resources' shared
//! pre-encoded bytes, and hyper asks for the next chunk only when the stream's flow-control
//! window has room: a stream buffers a window's worth of bytes, not a full state.

use std::pin::Pin;
use std::task::{Context, Poll};

use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::http::{self, HeaderMap};

use super::wire::Parts;

/// Target size of one body chunk (an HTTP/2 DATA frame is at most 16 KiB by default).
pub(crate) const CHUNK: usize = 32 << 10;

/// The gRPC message header: compressed flag and big-endian length.
const HEADER: usize = 5;

/// Streams the responses a session sends on its channel as gRPC frames, then the trailers.
pub(crate) struct GrpcBody<M> {
    rx: mpsc::Receiver<Result<M, Status>>,
    /// The message being written and its next part.
    current: Option<(M, usize)>,
    /// How the stream ends, once known; sent after any buffered data.
    end: Option<Status>,
    done: bool,
}

impl<M> GrpcBody<M> {
    /// A body for the responses `rx` yields.
    pub(crate) fn new(rx: mpsc::Receiver<Result<M, Status>>) -> Self {
        GrpcBody {
            rx,
            current: None,
            end: None,
            done: false,
        }
    }
}

/// The trailers that end the response with `status`.
fn trailers(status: &Status) -> http_body::Frame<Bytes> {
    let mut map = HeaderMap::new();
    if let Err(e) = status.add_header(&mut map) {
        tracing::warn!(error = %e, "xds: cannot encode a gRPC status; ending the stream with INTERNAL");
        map.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("13"));
    }
    http_body::Frame::trailers(map)
}

impl<M: Parts + Unpin> http_body::Body for GrpcBody<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut buf = BytesMut::new();
        loop {
            if let Some((msg, next)) = &mut this.current {
                if buf.capacity() == 0 {
                    buf.reserve(CHUNK + CHUNK / 4);
                }
                let parts = msg.parts();
                while *next < parts && buf.len() < CHUNK {
                    msg.write_part(*next, &mut buf);
                    *next += 1;
                }
                if *next >= parts {
                    this.current = None;
                }
                if buf.len() >= CHUNK {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(buf.freeze()))));
                }
                continue;
            }
            if let Some(status) = this.end.take() {
                if !buf.is_empty() {
                    // Data first; the trailers on the next poll.
                    this.end = Some(status);
                    return Poll::Ready(Some(Ok(http_body::Frame::data(buf.freeze()))));
                }
                this.done = true;
                return Poll::Ready(Some(Ok(trailers(&status))));
            }
            // Coalesce responses that are already queued (a change sends clusters, then
            // assignments) into one chunk.
            match this.rx.poll_recv(cx) {
                Poll::Pending if buf.is_empty() => return Poll::Pending,
                Poll::Pending => {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(buf.freeze()))));
                }
                Poll::Ready(Some(Ok(msg))) => match u32::try_from(msg.message_len()) {
                    Ok(len) => {
                        let want = HEADER.saturating_add(len as usize);
                        buf.reserve(want.min(CHUNK + CHUNK / 4));
                        buf.put_u8(0);
                        buf.put_u32(len);
                        this.current = Some((msg, 0));
                    }
                    Err(_) => {
                        this.end = Some(Status::resource_exhausted(
                            "xDS response larger than 4 GiB; cannot frame it",
                        ));
                    }
                },
                Poll::Ready(Some(Err(status))) => this.end = Some(status),
                Poll::Ready(None) => this.end = Some(Status::ok("")),
            }
        }
    }
}

/// The HTTP response of a streaming call whose messages `body` writes.
pub(crate) fn response<M: Parts + Unpin + Send + 'static>(
    body: GrpcBody<M>,
) -> http::Response<tonic::body::Body> {
    let mut res = http::Response::new(tonic::body::Body::new(body));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    res
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use http_body::Body as _;
    use prost::Message;

    use super::*;
    use crate::resources::{Resource, ResourceType};
    use crate::server::wire::SotwResponse;

    fn response(n: usize, nonce: &str) -> SotwResponse {
        let resources = (0..n)
            .map(|i| {
                let name = format!("cluster-{i:05}-{}", "x".repeat(200));
                let c = Cluster {
                    name: name.clone(),
                    ..Default::default()
                };
                Arc::new(Resource::new(name, &c, &i).unwrap())
            })
            .collect();
        SotwResponse {
            version_info: "v".to_owned(),
            resources,
            type_url: ResourceType::Cluster.type_url(),
            nonce: nonce.to_owned(),
        }
    }

    /// Reads every frame of `body`: the data, concatenated, and the trailers.
    async fn drain(mut body: GrpcBody<SotwResponse>) -> (Vec<u8>, Vec<usize>, HeaderMap) {
        let mut data = Vec::new();
        let mut chunks = Vec::new();
        loop {
            let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let frame = frame.unwrap().unwrap();
            match frame.into_data() {
                Ok(d) => {
                    chunks.push(d.len());
                    data.extend_from_slice(&d);
                }
                Err(frame) => return (data, chunks, frame.into_trailers().unwrap()),
            }
        }
    }

    #[tokio::test]
    async fn frames_messages_in_bounded_chunks_then_ok_trailers() {
        let (tx, rx) = mpsc::channel(4);
        let big = response(1000, "1");
        let small = response(1, "2");
        tx.send(Ok(big.clone())).await.unwrap();
        tx.send(Ok(small.clone())).await.unwrap();
        drop(tx);
        let (data, chunks, trailers) = drain(GrpcBody::new(rx)).await;
        assert!(chunks.len() > 3, "{chunks:?}");
        assert!(chunks.iter().all(|c| *c <= CHUNK + 1024), "{chunks:?}");
        let mut rest = data.as_slice();
        for expected in [big, small] {
            assert_eq!(rest[0], 0);
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let msg = DiscoveryResponse::decode(&rest[HEADER..HEADER + len]).unwrap();
            assert_eq!(msg.encode_to_vec(), expected.encode_to_vec());
            rest = &rest[HEADER + len..];
        }
        assert!(rest.is_empty());
        assert_eq!(trailers.get(Status::GRPC_STATUS).unwrap(), "0");
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_status() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(response(1, "1"))).await.unwrap();
        tx.send(Err(Status::invalid_argument("bad type")))
            .await
            .unwrap();
        let (data, _, trailers) = drain(GrpcBody::new(rx)).await;
        assert!(!data.is_empty());
        assert_eq!(trailers.get(Status::GRPC_STATUS).unwrap(), "3");
        assert_eq!(trailers.get("grpc-message").unwrap(), "bad%20type");
    }
}
