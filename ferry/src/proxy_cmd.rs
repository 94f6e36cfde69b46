//! `ferry proxy`: flags -> `proxy::ProxyConfig`, then the xDS client, the Workload API
//! identity and the proxy itself; SIGTERM/SIGINT drain and exit 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use proxy::metadata::{MetadataSettings, ProcessEnv};
use proxy::orig_dst::Conntrack;
use proxy::{InboundConfig, Limits, OutboundPolicy, Proxy, ProxyConfig, Shared, XdsFeed};
use tokio_util::sync::CancellationToken;
use xds::client::{AdsClient, AdsClientConfig};

use crate::cli::{OutboundPolicyArg, ProxyArgs};

/// `ADDR` or `off`.
fn optional_addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("--{flag} {value:?} is neither IP:PORT nor off"))
}

/// `host:port` or `http://host:port` -> a URI tonic accepts.
fn xds_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Runs the proxy until SIGTERM/SIGINT, then drains.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let outbound = optional_addr("outbound", &args.outbound)?;
    let dns = optional_addr("dns", &args.dns)?;
    let admin = optional_addr("admin", &args.admin)?;
    let inbound = match (args.inbound, args.inbound_app) {
        (Some(listen), Some(app)) => Some(InboundConfig { listen, app }),
        _ => None,
    };
    if args.xds.is_none() && inbound.is_none() {
        anyhow::bail!(
            "give --xds (outbound routes) or --inbound/--inbound-app (server sidecar), or both"
        );
    }
    // Without an xDS server there is nothing to route or resolve: inbound only.
    let (outbound, dns) = if args.xds.is_some() {
        (outbound, dns)
    } else {
        (None, None)
    };
    let (mut dns_upstreams, mut dns_search) = (args.dns_upstreams.clone(), Vec::new());
    if dns.is_some() && dns_upstreams.is_empty() {
        let (ups, search) = dns::forward::from_resolv_conf(Path::new("/etc/resolv.conf"))
            .context("reading upstream resolvers from /etc/resolv.conf (or give --dns-upstream)")?;
        dns_upstreams = ups;
        dns_search = search;
    }
    let config = ProxyConfig {
        outbound,
        bind_vips: args.bind_vips,
        inbound,
        dns,
        dns_upstreams,
        dns_search,
        admin,
        outbound_policy: match args.outbound_policy {
            OutboundPolicyArg::AllowAny => OutboundPolicy::AllowAny,
            OutboundPolicyArg::RegistryOnly => OutboundPolicy::RegistryOnly,
        },
        drain_time: args.drain_time,
        limits: Limits {
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
            ..Limits::default()
        },
    };

    let stop = CancellationToken::new();
    let identity = proxy::identity::Identity::connect(&args.workload_api, args.svid_timeout)
        .await
        .with_context(|| {
            format!(
                "getting an X.509-SVID from the Workload API at {}",
                args.workload_api
            )
        })?;
    tracing::info!(
        spiffe_id = identity.spiffe_id().as_deref().unwrap_or("-"),
        "X.509-SVID in hand"
    );

    let client = args.xds.as_deref().map(|addr| {
        let mut cfg = AdsClientConfig::new(xds_uri(addr));
        cfg.node_id = args.node_id.clone();
        cfg.node_cluster = args.node_cluster.clone();
        AdsClient::start(cfg, stop.clone())
    });
    let feed = client.as_ref().map(|c| XdsFeed {
        state: c.subscribe(),
        connection: c.connection(),
        last_nack: c.last_nack(),
    });
    let metadata = MetadataSettings {
        workload_name: args.workload_name.clone(),
        namespace: args.namespace.clone(),
        cluster_id: args.cluster_id.clone(),
        labels: args.labels.clone(),
        name: args.pod_name.clone(),
    };
    let shared = Arc::new(Shared::new(
        config,
        identity,
        Arc::new(proxy::metrics::Metrics::default()),
        proxy::balance::Outliers::new(proxy::balance::OutlierConfig::default()),
        metadata,
        Box::new(ProcessEnv),
    ));
    let running = Proxy::start(shared, feed, Arc::new(Conntrack), Registry::default()).await?;

    let signal = crate::agent::shutdown_signal().await;
    tracing::info!(signal, "draining");
    running.shutdown().await;
    stop.cancel();
    tracing::info!("ferry proxy stopped");
    Ok(())
}
