//! `ferry agent`: wires the config watcher to the servers the config enables, and stops
//! them all on SIGTERM/SIGINT.

use anyhow::Context;
use registry::config::ConfigWatcher;
use tokio_util::sync::CancellationToken;

use crate::cli::AgentArgs;

/// Runs until a signal arrives or a server fails.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let watcher = ConfigWatcher::start(&args.config)
        .await
        .with_context(|| format!("cannot start with config {}", args.config.display()))?;
    let config = watcher.subscribe();
    let shutdown = CancellationToken::new();
    let mut servers: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    // Workload API + Envoy SDS on listen.workloadApi, backed by the CA in ca.stateDir.
    let agent = config.borrow().agent.clone();
    let authority = tokio::task::spawn_blocking(move || crate::ca::open(&agent))
        .await
        .context("CA task panicked")??;
    let wapi = workload_api::WorkloadApiServer::start(config.clone(), authority, shutdown.clone())
        .context("cannot start the Workload API")?;
    servers.spawn(async move { wapi.serve().await.context("Workload API server") });

    // xDS: the registry, translated into Envoy resources, served over ADS (Cofide's :18001).
    let (snapshots, _translator) = xds::resources::spawn_translator(config.clone());
    let xds_server = xds::server::XdsServer::new(snapshots, shutdown.clone());
    let xds_addr = config.borrow().agent.listen.xds;
    if let Some(addr) = args.admin {
        let mut registry = prometheus_client::registry::Registry::default();
        xds_server
            .metrics()
            .register(registry.sub_registry_with_prefix("ferry"));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for --admin on {addr}"))?;
        tokio::spawn(crate::admin::serve(listener, registry, shutdown.clone()));
    }
    servers.spawn(async move { xds_server.serve(xds_addr).await.context("xDS server") });

    tracing::info!(config = %args.config.display(), "ferry agent started");
    tokio::select! {
        s = shutdown_signal() => tracing::info!(signal = s, "shutting down"),
        Some(res) = servers.join_next() => {
            shutdown.cancel();
            res.context("server task panicked")?.context("server failed")?;
        }
    }
    shutdown.cancel();
    while let Some(res) = servers.join_next().await {
        res.context("server task panicked")??;
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, naming which.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, only a failing server stops the agent.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
