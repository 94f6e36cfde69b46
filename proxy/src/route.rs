//! Where a captured outbound connection goes: the pure decision, from the original
//! destination and the current xDS state (no I/O, unit-tested).
//!
//! Order: a filter chain of the `outbound` listener that matches (Envoy's match order:
//! destination port, then longest prefix, then the default chain) names a cluster; an
//! `ORIGINAL_DST` cluster means "where it was going". With no matching chain, loopback
//! destinations (captured because the Cofide rules take all loopback TCP, e.g. an app's
//! `127.0.0.1:6379`) are connected to directly, and anything else follows the outbound
//! policy. A chain naming a cluster that does not exist is refused, as Envoy does.

use std::net::SocketAddr;
use std::sync::Arc;

use xds::client::model::{Discovery, OutboundChain, Upstream, XdsState};

use crate::config::OutboundPolicy;

/// What to do with one outbound connection.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Carry it to one of the cluster's endpoints.
    Cluster {
        /// The matched filter chain.
        chain: &'a OutboundChain,
        /// Its cluster.
        upstream: &'a Arc<Upstream>,
    },
    /// Connect to the original destination itself (plain bytes).
    Direct {
        /// Why: `loopback`, `allow_any`, or `original_dst_cluster`.
        why: &'static str,
        /// The matched chain, if one chose this.
        chain: Option<&'a OutboundChain>,
    },
    /// Close it.
    Refuse {
        /// The metric label.
        reason: &'static str,
        /// For the access log.
        detail: String,
    },
}

/// Decides the fate of a connection to `dst`.
pub fn decide(state: &XdsState, dst: SocketAddr, policy: OutboundPolicy) -> Decision<'_> {
    if let Some(route) = state.route(dst) {
        return match route.cluster {
            Some(upstream) if upstream.discovery == Discovery::OriginalDst => Decision::Direct {
                why: "original_dst_cluster",
                chain: Some(route.chain),
            },
            Some(upstream) => Decision::Cluster {
                chain: route.chain,
                upstream,
            },
            None => Decision::Refuse {
                reason: "unknown_cluster",
                detail: format!(
                    "filter chain {:?} names cluster {:?}, which the xDS server has not sent",
                    route.chain.name, route.chain.cluster
                ),
            },
        };
    }
    if dst.ip().is_loopback() {
        return Decision::Direct {
            why: "loopback",
            chain: None,
        };
    }
    match policy {
        OutboundPolicy::AllowAny => Decision::Direct {
            why: "allow_any",
            chain: None,
        },
        OutboundPolicy::RegistryOnly => Decision::Refuse {
            reason: "registry_only",
            detail: format!(
                "{dst} is not a federated service and the outbound policy is registry-only"
            ),
        },
    }
}
