//! `ferry agent`: wires the config watcher to the servers the config enables, reports
//! readiness, and stops them all on SIGTERM/SIGINT. Every task it starts is joined: a
//! server, the translator or the admin endpoint that ends unexpectedly stops the agent
//! with its error rather than vanishing.

use std::sync::Arc;

use anyhow::Context;
use registry::config::ConfigWatcher;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::AgentArgs;
use crate::readiness::Readiness;

const CA: &str = "ca";
const SNAPSHOT: &str = "xds snapshot";
const WORKLOAD_API: &str = "workload api listener";
const XDS: &str = "xds listener";

/// Runs until a signal arrives or a part fails.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let ready = Arc::new(Readiness::waiting_for(&[CA, SNAPSHOT, WORKLOAD_API, XDS]));
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut metrics = prometheus_client::registry::Registry::default();
    // Bound first, so a probe sees "not ready" (and why) while the rest starts.
    let admin = match args.admin {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for --admin on {addr}"))?,
        ),
        None => None,
    };

    let watcher = ConfigWatcher::start(&args.config)
        .await
        .with_context(|| format!("cannot start with config {}", args.config.display()))?;
    let config = watcher.subscribe();

    // The CA in ca.stateDir (key generation and file I/O on the blocking pool).
    let agent = config.borrow().agent.clone();
    let authority = {
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || crate::ca::open(&agent))
            .await
            .context("CA task panicked")??
    };
    // ca.role: root also verifies TPM nodes and certifies their node CAs.
    if let Some(server) =
        crate::ca::node_attestation_server(&agent, &authority, shutdown.clone()).await?
    {
        tasks.spawn(server);
    }
    ready.up(CA);

    // xDS: the registry, translated into Envoy resources, served over ADS (Cofide's :18001).
    let (snapshots, translator) = xds::resources::spawn_translator(config.clone());
    ready.up(SNAPSHOT);
    let xds_server = xds::server::XdsServer::new(snapshots, shutdown.clone());
    xds_server
        .metrics()
        .register(metrics.sub_registry_with_prefix("ferry"));
    // Workload API + Envoy SDS on listen.workloadApi (bound by start).
    let wapi = workload_api::WorkloadApiServer::start(config.clone(), authority, shutdown.clone())
        .context("cannot start the Workload API")?
        .with_sds_metrics(xds_server.metrics());
    metrics
        .sub_registry_with_prefix("ferry_workload_api")
        .register_collector(Box::new(wapi.stats()));
    ready.up(WORKLOAD_API);
    tasks.spawn(async move { wapi.serve().await.context("Workload API server") });

    let xds_addr = config.borrow().agent.listen.xds;
    let xds_listener = tokio::net::TcpListener::bind(xds_addr)
        .await
        .with_context(|| format!("cannot listen for xDS on {xds_addr} (listen.xds)"))?;
    ready.up(XDS);
    tasks.spawn(async move {
        xds_server
            .serve_on(xds_listener)
            .await
            .context("xDS server")
    });

    if let Some(listener) = admin {
        let (ready, stop) = (ready.clone(), shutdown.clone());
        tasks.spawn(async move {
            crate::admin::serve(listener, metrics, ready, stop).await;
            Ok(())
        });
    }

    tracing::info!(config = %args.config.display(), "ferry agent started");
    let mut failure = None;
    tokio::select! {
        s = shutdown_signal() => tracing::info!(signal = s, "shutting down"),
        Some(res) = tasks.join_next() => {
            failure = Some(flatten(res).err().unwrap_or_else(|| anyhow::anyhow!("a server stopped unexpectedly")));
        }
        res = &mut { translator } => {
            failure = Some(match res {
                Ok(()) => anyhow::anyhow!("the xDS translator stopped unexpectedly"),
                Err(e) => anyhow::anyhow!("the xDS translator panicked: {e}"),
            });
        }
    }
    ready.stopping();
    shutdown.cancel();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = flatten(res) {
            failure.get_or_insert(e);
        }
    }
    // Dropping the watcher ends the config updates (and with them the translator).
    drop(watcher);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn flatten(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.context("server task panicked")?
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
