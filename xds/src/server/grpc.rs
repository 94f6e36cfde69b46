//! gRPC method routing for ADS and the standalone CDS, EDS and LDS services.
//!
//! The same paths, request types and semantics as envoy-types' generated servers, but the
//! responses are [`SotwResponse`] and [`DeltaResponse`], which encode from the resources'
//! shared pre-encoded bytes instead of an owned `DiscoveryResponse` per stream.

use std::convert::Infallible;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tonic::codec::Codec;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use super::XdsServer;
use super::body::{self, GrpcBody};
use super::wire::SotwResponse;
use crate::resources::ResourceType;

/// Largest request accepted on ADS (a SotW EDS request lists every cluster name).
const ADS_MAX_DECODING: usize = 16 << 20;

/// The methods of one xDS service.
#[derive(Debug, Clone, Copy)]
struct Methods {
    sotw: &'static str,
    delta: &'static str,
    /// The unary `Fetch*` (standalone services only).
    fetch: Option<&'static str>,
    /// The type a standalone service serves; `None` for ADS.
    fixed: Option<ResourceType>,
    max_decoding: Option<usize>,
}

/// Routes one service's calls to the server's streams.
#[derive(Debug, Clone)]
struct Route {
    server: XdsServer,
    methods: Methods,
}

struct Fetch(XdsServer, ResourceType);

impl UnaryService<DiscoveryRequest> for Fetch {
    type Response = SotwResponse;
    type Future = BoxFuture<Response<SotwResponse>, Status>;

    fn call(&mut self, req: Request<DiscoveryRequest>) -> Self::Future {
        let res = self.0.fetch(self.1, req.into_inner());
        Box::pin(async move { res })
    }
}

/// The request stream of a streaming call, decoded with prost as tonic would.
fn inbound<B, T>(req: http::Request<B>, max_decoding: Option<usize>) -> Request<Streaming<T>>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    T: prost::Message + Default + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let decoder = ProstCodec::<SotwResponse, T>::default().decoder();
    let stream = Streaming::new_request(decoder, body, None, max_decoding);
    Request::from_http(http::Request::from_parts(parts, stream))
}

impl Route {
    fn call<B>(
        &self,
        req: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let m = self.methods;
        let server = self.server.clone();
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        if method == m.sotw {
            Box::pin(async move {
                let req = inbound::<_, DiscoveryRequest>(req, m.max_decoding);
                Ok(body::response(GrpcBody::new(
                    server.start_sotw(req, m.fixed),
                )))
            })
        } else if method == m.delta {
            Box::pin(async move {
                let req = inbound::<_, DeltaDiscoveryRequest>(req, m.max_decoding);
                Ok(body::response(GrpcBody::new(
                    server.start_delta(req, m.fixed),
                )))
            })
        } else if let (Some(fetch), Some(t)) = (m.fetch, m.fixed)
            && method == fetch
        {
            Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<SotwResponse, DiscoveryRequest>::default())
                    .apply_max_message_size_config(m.max_decoding, None);
                Ok(grpc.unary(Fetch(server, t), req).await)
            })
        } else {
            Box::pin(async move { Ok(Status::unimplemented("").into_http()) })
        }
    }
}

/// Defines one routed service: its gRPC name and methods.
macro_rules! service {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $methods:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub(crate) struct $ty(Route);

        impl $ty {
            pub(crate) fn new(server: XdsServer) -> Self {
                $ty(Route {
                    server,
                    methods: $methods,
                })
            }
        }

        impl NamedService for $ty {
            const NAME: &'static str = $name;
        }

        impl<B> Service<http::Request<B>> for $ty
        where
            B: Body + Send + 'static,
            B::Error: Into<StdError> + Send + 'static,
        {
            type Response = http::Response<tonic::body::Body>;
            type Error = Infallible;
            type Future = BoxFuture<Self::Response, Infallible>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<B>) -> Self::Future {
                self.0.call(req)
            }
        }
    };
}

/// The standalone methods of the service serving `t`.
const fn standalone(
    sotw: &'static str,
    delta: &'static str,
    fetch: &'static str,
    t: ResourceType,
) -> Methods {
    Methods {
        sotw,
        delta,
        fetch: Some(fetch),
        fixed: Some(t),
        max_decoding: None,
    }
}

service!(
    /// `envoy.service.discovery.v3.AggregatedDiscoveryService` (ADS).
    Ads,
    "envoy.service.discovery.v3.AggregatedDiscoveryService",
    Methods {
        sotw: "StreamAggregatedResources",
        delta: "DeltaAggregatedResources",
        fetch: None,
        fixed: None,
        max_decoding: Some(ADS_MAX_DECODING),
    }
);
service!(
    /// `envoy.service.cluster.v3.ClusterDiscoveryService` (CDS).
    Cds,
    "envoy.service.cluster.v3.ClusterDiscoveryService",
    standalone(
        "StreamClusters",
        "DeltaClusters",
        "FetchClusters",
        ResourceType::Cluster
    )
);
service!(
    /// `envoy.service.endpoint.v3.EndpointDiscoveryService` (EDS).
    Eds,
    "envoy.service.endpoint.v3.EndpointDiscoveryService",
    standalone(
        "StreamEndpoints",
        "DeltaEndpoints",
        "FetchEndpoints",
        ResourceType::Endpoint
    )
);
service!(
    /// `envoy.service.listener.v3.ListenerDiscoveryService` (LDS).
    Lds,
    "envoy.service.listener.v3.ListenerDiscoveryService",
    standalone(
        "StreamListeners",
        "DeltaListeners",
        "FetchListeners",
        ResourceType::Listener
    )
);
