//! The admin endpoint: `/metrics` in Prometheus text format and `/ready`.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::readiness::Readiness;

/// Serves the admin endpoint on `listener` until `stop` is cancelled: `/metrics`, and
/// `/ready` answering 200 `LIVE` when `ready` says so, else 503 naming what is missing.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) {
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.check() {
                        Ok(()) => (StatusCode::OK, "LIVE\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("NOT READY: {why}\n"),
                        ),
                    }
                }
            }),
        );
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "admin endpoint serving /metrics and /ready");
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}
