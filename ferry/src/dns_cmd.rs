//! `ferry dns`: the resolver, fed by ferry's ADS client or by the config file.

use std::sync::Arc;

use anyhow::Context;
use dns::answer::Settings;
use dns::metrics::Metrics;
use dns::{DnsTable, Resolver, ResolverConfig};
use registry::config::ConfigWatcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xds::client::{AdsClient, AdsClientConfig, XdsState};

use crate::cli::DnsArgs;

/// Runs the resolver until SIGTERM/SIGINT.
pub async fn run(args: DnsArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let Source {
        table,
        listen: default_listen,
        upstreams: config_upstreams,
        _watcher,
    } = match (&args.xds, &args.config) {
        (Some(url), _) => Source {
            table: from_xds(url, &stop),
            listen: registry::config::defaults::DNS,
            upstreams: Vec::new(),
            _watcher: None,
        },
        (None, Some(path)) => from_config(path).await?,
        (None, None) => anyhow::bail!("give --xds or --config"),
    };

    // Upstreams: --upstream, else the config's dns.upstreams, else resolv.conf.
    let (mut upstreams, mut suffixes) = (args.upstreams, args.search_suffixes);
    if upstreams.is_empty() {
        upstreams = config_upstreams;
    }
    if upstreams.is_empty() || suffixes.is_empty() {
        let (ups, search) = dns::forward::from_resolv_conf(&args.resolv_conf)?;
        if upstreams.is_empty() {
            upstreams = ups;
        }
        if suffixes.is_empty() {
            suffixes = search;
        }
    }
    let mut cfg = ResolverConfig::new(args.listen.unwrap_or(default_listen), upstreams);
    cfg.settings = Settings {
        ttl: args.ttl,
        search_suffixes: suffixes
            .iter()
            .map(|s| registry::hostname::Hostname::new(s.trim_start_matches('.')).into())
            .collect(),
        no_data: match args.no_data {
            crate::cli::NoData::Noerror => dns::answer::NoDataMode::NoError,
            crate::cli::NoData::Nxdomain => dns::answer::NoDataMode::NxDomain,
        },
    };
    cfg.timeout = args.timeout;
    cfg.max_inflight = args.max_inflight;

    let metrics = Arc::new(Metrics::default());
    let resolver = Resolver::bind(cfg, table, metrics.clone())?;
    let mut admin = None;
    if let Some(addr) = args.admin {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(registry.sub_registry_with_prefix("ferry_dns"));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for --admin on {addr}"))?;
        // The resolver's sockets are bound (Resolver::bind): ready from the start.
        let ready = Arc::new(crate::readiness::Readiness::default());
        admin = Some(tokio::spawn(crate::admin::serve(
            listener,
            registry,
            ready,
            stop.clone(),
        )));
    }
    let serving = tokio::spawn(resolver.run(stop.clone()));
    crate::agent::shutdown_signal().await;
    stop.cancel();
    serving.await.context("resolver task failed")?;
    if let Some(admin) = admin {
        admin.await.context("admin task failed")?;
    }
    Ok(())
}

/// The table from ferry's ADS client: the `dns` listener's inline table (the standard
/// `dns_filter` resource a sidecar's Envoy would serve), following xDS updates. The client
/// lives as long as `stop` is not cancelled.
fn from_xds(url: &str, stop: &CancellationToken) -> watch::Receiver<Arc<DnsTable>> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let mut client_cfg = AdsClientConfig::new(url);
    client_cfg.node_id = "ferry-dns".to_owned();
    let client = AdsClient::start(client_cfg, stop.clone());
    dns::follow(client.subscribe(), |state: &XdsState| {
        DnsTable::new(state.dns_table())
    })
}

/// Where the names come from, and what a config file says about listening and upstreams.
struct Source {
    table: watch::Receiver<Arc<DnsTable>>,
    listen: std::net::SocketAddr,
    upstreams: Vec<std::net::SocketAddr>,
    /// Keeps the config watcher (and so the table's updates) alive while serving.
    _watcher: Option<ConfigWatcher>,
}

/// The table from the config file (hot reloaded), with the config's `listen.dns` and
/// `dns.upstreams`.
async fn from_config(path: &std::path::Path) -> anyhow::Result<Source> {
    let watcher = ConfigWatcher::start(path)
        .await
        .with_context(|| format!("cannot start with config {}", path.display()))?;
    let first = watcher.current();
    let table = dns::follow(watcher.subscribe(), DnsTable::from_config);
    Ok(Source {
        table,
        listen: first.agent.listen.dns,
        upstreams: first.agent.dns.upstreams.clone(),
        _watcher: Some(watcher),
    })
}
