//! Starting and stopping a proxy: bind every listener first (so a port in use is an error
//! naming it, before anything serves), then run the accept loops, the VIP manager, DNS and
//! admin; on stop, close the listeners, let open connections drain for the drain time,
//! then close what is left.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xds::client::ConnectionState;
use xds::client::model::XdsState;

use crate::admin::{self, AdminState};
use crate::orig_dst::OrigDst;
use crate::outbound::{self, ListenerKind};
use crate::shared::Shared;
use crate::{inbound, vips};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; is another proxy or Envoy using it?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The DNS resolver could not start.
    #[error("DNS on {addr}: {source}")]
    Dns {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: dns::DnsError,
    },
    /// Outbound or DNS is configured without an xDS server to route from.
    #[error("{what} needs routes from an xDS server: give --xds")]
    NoXds {
        /// What needs it.
        what: &'static str,
    },
}

/// The xDS client's outputs the proxy follows.
#[derive(Debug, Clone)]
pub struct XdsFeed {
    /// The latest state.
    pub state: watch::Receiver<Arc<XdsState>>,
    /// Connection state, for admin.
    pub connection: watch::Receiver<ConnectionState>,
    /// The last NACK sent, for admin.
    pub last_nack: watch::Receiver<Option<String>>,
}

/// A started proxy: its bound addresses and the handle to stop it.
#[derive(Debug)]
pub struct Proxy {
    /// The capture listener's address.
    pub outbound: Option<SocketAddr>,
    /// The inbound listener's address.
    pub inbound: Option<SocketAddr>,
    /// The DNS address.
    pub dns: Option<SocketAddr>,
    /// The admin address.
    pub admin: Option<SocketAddr>,
    shared: Arc<Shared>,
    accept_stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

/// Counts every NACK the xDS client sends (`ferry_proxy_xds_nacks_total`) and logs it.
async fn count_nacks(
    mut last: watch::Receiver<Option<String>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = last.changed() => if r.is_err() { return },
        }
        if let Some(message) = last.borrow_and_update().as_deref() {
            shared.metrics.xds_nacks.inc();
            tracing::warn!(%message, "rejected part of an xDS update; the last good version keeps serving");
        }
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, what, source })
}

impl Proxy {
    /// Binds and starts everything `shared.config` asks for.
    pub async fn start(
        shared: Arc<Shared>,
        xds: Option<XdsFeed>,
        orig_dst: Arc<dyn OrigDst>,
        mut registry: Registry,
    ) -> Result<Proxy, StartError> {
        let cfg = shared.config.clone();
        let accept_stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        shared.metrics.register(&mut registry);

        if let Some(feed) = &xds {
            tasks.spawn(count_nacks(
                feed.last_nack.clone(),
                shared.clone(),
                accept_stop.clone(),
            ));
        }
        let mut out = None;
        if let Some(addr) = cfg.outbound {
            let feed = xds.as_ref().ok_or(StartError::NoXds {
                what: "the outbound listener",
            })?;
            let l = bind(addr, "outbound").await?;
            out = l.local_addr().ok();
            tasks.spawn(outbound::serve(
                l,
                ListenerKind::Capture,
                orig_dst.clone(),
                feed.state.clone(),
                shared.clone(),
                accept_stop.clone(),
            ));
        }
        if cfg.bind_vips {
            let feed = xds.as_ref().ok_or(StartError::NoXds {
                what: "--bind-vips",
            })?;
            tasks.spawn(vips::manage(
                feed.state.clone(),
                shared.clone(),
                accept_stop.clone(),
            ));
        }
        let mut inb = None;
        if let Some(i) = cfg.inbound.clone() {
            let l = bind(i.listen, "inbound").await?;
            inb = l.local_addr().ok();
            tasks.spawn(inbound::serve(l, i, shared.clone(), accept_stop.clone()));
        }
        let mut dns_addr = None;
        if let Some(addr) = cfg.dns {
            let feed = xds.as_ref().ok_or(StartError::NoXds { what: "DNS" })?;
            let table = dns::follow(feed.state.clone(), |s: &XdsState| {
                dns::DnsTable::new(s.dns_table().into_iter().map(|(h, ip)| (h.to_string(), ip)))
            });
            let mut rc = dns::ResolverConfig::new(addr, cfg.dns_upstreams.clone());
            rc.settings.search_suffixes = cfg
                .dns_search
                .iter()
                .map(|s| registry::hostname::Hostname::new(s.trim_start_matches('.')).into())
                .collect();
            let metrics = Arc::new(dns::metrics::Metrics::default());
            metrics.register(&mut registry);
            let resolver = dns::Resolver::bind(rc, table, metrics)
                .map_err(|source| StartError::Dns { addr, source })?;
            dns_addr = Some(resolver.local_addr());
            tasks.spawn(resolver.run(accept_stop.clone()));
        }
        let mut admin_addr = None;
        if let Some(addr) = cfg.admin {
            let l = bind(addr, "admin").await?;
            admin_addr = l.local_addr().ok();
            let state = AdminState {
                shared: shared.clone(),
                xds: xds.clone(),
                registry,
            };
            // Admin keeps answering during the drain; it stops with the force-close.
            tasks.spawn(admin::serve(l, state, shared.force_close.clone()));
        }
        tracing::info!(
            outbound = ?out, inbound = ?inb, dns = ?dns_addr, admin = ?admin_addr,
            bind_vips = cfg.bind_vips, policy = ?cfg.outbound_policy,
            "ferry proxy started"
        );
        Ok(Proxy {
            outbound: out,
            inbound: inb,
            dns: dns_addr,
            admin: admin_addr,
            shared,
            accept_stop,
            tasks,
        })
    }

    /// Stops accepting, waits up to the drain time for open connections, closes the rest,
    /// and returns when every task has ended.
    pub async fn shutdown(mut self) {
        let drain = self.shared.config.drain_time;
        self.accept_stop.cancel();
        self.shared.tracker.close();
        let open = self.shared.tracker.len();
        tracing::info!(open_connections = open, drain = ?drain, "draining");
        if tokio::time::timeout(drain, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open_connections = self.shared.tracker.len(),
                "drain time over; closing the remaining connections"
            );
        }
        self.shared.force_close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.tracker.wait()).await;
        while self.tasks.join_next().await.is_some() {}
    }
}
