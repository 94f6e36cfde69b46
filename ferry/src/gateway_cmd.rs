//! `ferry gateway`: the server side's SNI router, routes from the zone's config file
//! (watched: edits apply without restart), SIGTERM/SIGINT drain.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use proxy::gateway::{self, GatewayLimits, GatewayMetrics, RouteTable};
use registry::config::ConfigWatcher;
use tokio_util::sync::CancellationToken;

use crate::cli::GatewayArgs;

/// Runs the gateway until a signal arrives.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let watcher = ConfigWatcher::start(&args.config)
        .await
        .with_context(|| format!("loading {}", args.config.display()))?;
    let backends: HashMap<String, String> = args.backends.iter().cloned().collect();
    let table = move |c: &registry::config::Config| RouteTable::from_config(c, &backends);
    let mut config = watcher.subscribe();
    let first = Arc::new(table(&config.borrow_and_update()));
    for (sni, r) in &first.routes {
        tracing::info!(%sni, backend = %r.backend, istio_alpn_required = r.istio_alpn_required, "gateway route");
    }
    let (tx, rx) = tokio::sync::watch::channel(first);
    let stop = CancellationToken::new();
    let follow = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = config.changed() => if r.is_err() { break },
                }
                let t = table(&config.borrow_and_update());
                tracing::info!(routes = t.routes.len(), "gateway routes updated");
                tx.send_replace(Arc::new(t));
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let metrics = Arc::new(GatewayMetrics::default());
    if let Some(addr) = args.admin {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--admin)"))?;
        let ready = Arc::new(crate::readiness::Readiness::waiting_for(&["listener"]));
        ready.up("listener");
        tokio::spawn(crate::admin::serve(l, registry, ready, stop.clone()));
    }
    tracing::info!(listen = %args.listen, "ferry gateway serving");
    let serve = tokio::spawn(gateway::serve(
        listener,
        rx,
        metrics,
        GatewayLimits::default(),
        stop.clone(),
        args.drain_time,
    ));
    let signal = crate::agent::shutdown_signal().await;
    tracing::info!(signal, "draining");
    stop.cancel();
    let _ = serve.await;
    let _ = follow.await;
    Ok(())
}
