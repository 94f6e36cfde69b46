//! The admin endpoint (`127.0.0.1:9901` like Envoy's): `/ready`, `/stats/prometheus`
//! and `/config_dump`.
//!
//! `/ready` answers 200 only when the proxy can do its job: an SVID is in hand and, when
//! it follows an xDS server, the xDS state has synced once. `/config_dump` is JSON of the
//! running configuration, the identity, the xDS connection and last NACK, and the active
//! listeners, clusters and endpoints as the data path sees them.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::XdsFeed;
use crate::shared::Shared;

/// What the admin handlers read.
pub struct AdminState {
    /// The proxy's shared state.
    pub shared: Arc<Shared>,
    /// The xDS feed, when following a server.
    pub xds: Option<XdsFeed>,
    /// Prometheus registry (the proxy's metrics plus any the caller added).
    pub registry: Registry,
}

impl AdminState {
    /// `Ok` when ready, else what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.shared.identity.is_ready() {
            missing.push("no X.509-SVID from the Workload API yet".to_owned());
        }
        if let Some(x) = &self.xds
            && !x.state.borrow().synced
        {
            missing.push("xDS state not synced yet".to_owned());
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    fn refresh_gauges(&self) {
        let m = &self.shared.metrics;
        m.ejected.set(self.shared.outliers.ejected() as i64);
        if let Some(x) = &self.xds {
            let state = x.state.borrow().clone();
            m.xds_synced.set(i64::from(state.synced));
            m.xds_updates.set(state.updates as i64);
            m.xds_routes
                .set(state.outbound.as_ref().map_or(0, |o| o.chains.len()) as i64);
            let connected = matches!(
                *x.connection.borrow(),
                xds::client::ConnectionState::Connected
            );
            m.xds_connected.set(i64::from(connected));
        }
    }

    fn config_dump(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct Dump<'a> {
            proxy: &'a crate::config::ProxyConfig,
            identity: Option<String>,
            xds: Option<XdsDump>,
        }
        #[derive(Serialize)]
        struct XdsDump {
            connection: String,
            last_nack: Option<String>,
            state: xds::client::model::XdsState,
        }
        let dump = Dump {
            proxy: &self.shared.config,
            identity: self.shared.identity.spiffe_id(),
            xds: self.xds.as_ref().map(|x| XdsDump {
                connection: format!("{:?}", *x.connection.borrow()),
                last_nack: x.last_nack.borrow().clone(),
                state: (**x.state.borrow()).clone(),
            }),
        };
        serde_json::to_string_pretty(&dump)
    }
}

/// Serves until `stop` fires.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let state = Arc::new(state);
    let (s1, s2, s3) = (state.clone(), state.clone(), state);
    let app = Router::new()
        .route(
            "/ready",
            get(move || async move {
                match s1.readiness() {
                    Ok(()) => (StatusCode::OK, "LIVE\n".to_owned()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("NOT READY: {why}\n"),
                    ),
                }
            }),
        )
        .route(
            "/stats/prometheus",
            get(move || async move {
                s2.refresh_gauges();
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &s2.registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }),
        )
        .route(
            "/config_dump",
            get(move || async move {
                match s3.config_dump() {
                    Ok(j) => ([(header::CONTENT_TYPE, "application/json")], j).into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}
