//! `ferry dns`: the resolver, fed from the config file.

use std::sync::Arc;

use anyhow::Context;
use dns::answer::Settings;
use dns::metrics::Metrics;
use dns::{DnsTable, Resolver, ResolverConfig};
use tokio_util::sync::CancellationToken;
use xds::config::ConfigWatcher;

use crate::cli::DnsArgs;

/// Runs the resolver until SIGTERM/SIGINT.
pub async fn run(args: DnsArgs) -> anyhow::Result<()> {
    let watcher = ConfigWatcher::start(&args.config)
        .with_context(|| format!("cannot start with config {}", args.config.display()))?;
    let mut config = watcher.subscribe();
    let first = config.borrow_and_update().clone();

    let (mut upstreams, mut suffixes) = (args.upstreams, args.search_suffixes);
    if upstreams.is_empty() || suffixes.is_empty() {
        let (ups, search) = dns::forward::from_resolv_conf(&args.resolv_conf)?;
        if upstreams.is_empty() {
            upstreams = ups;
        }
        if suffixes.is_empty() {
            suffixes = search;
        }
    }
    let mut cfg = ResolverConfig::new(args.listen.unwrap_or(first.agent.listen.dns), upstreams);
    cfg.settings = Settings {
        ttl: args.ttl,
        search_suffixes: suffixes
            .iter()
            .map(|s| dns::table::normalize(s.trim_start_matches('.')))
            .collect(),
    };
    cfg.timeout = args.timeout;
    cfg.max_inflight = args.max_inflight;

    let (table_tx, table_rx) = tokio::sync::watch::channel(Arc::new(DnsTable::from_config(&first)));
    let resolver = Resolver::bind(cfg, table_rx, Arc::new(Metrics::default()))?;
    tracing::info!(names = first.services.len(), "federated names loaded");

    // The config watcher is the one writer of the table.
    tokio::spawn(async move {
        let _watcher = watcher;
        while config.changed().await.is_ok() {
            let table = DnsTable::from_config(&config.borrow_and_update());
            tracing::info!(names = table.len(), "federated names updated");
            table_tx.send_replace(Arc::new(table));
        }
    });

    let stop = CancellationToken::new();
    let serving = tokio::spawn(resolver.run(stop.clone()));
    crate::agent::shutdown_signal().await;
    stop.cancel();
    serving.await.context("resolver task failed")?;
    Ok(())
}
