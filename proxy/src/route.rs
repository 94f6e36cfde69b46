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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use xds::client::model::OutboundListener;

    use super::*;

    fn chain(name: &str, prefix: &str, port: Option<u16>, cluster: &str) -> OutboundChain {
        OutboundChain {
            name: name.to_owned(),
            prefixes: vec![prefix.parse().unwrap()],
            port,
            cluster: cluster.to_owned(),
            stat_prefix: name.to_owned(),
            idle_timeout: None,
        }
    }

    fn upstream(name: &str, discovery: Discovery) -> (String, Arc<Upstream>) {
        let u = Upstream {
            name: name.to_owned(),
            discovery,
            connect_timeout: Duration::from_secs(5),
            tls: None,
            endpoints: Vec::new(),
        };
        (name.to_owned(), Arc::new(u))
    }

    /// A federated service on 127.240.0.1:8443, the agent's loopback passthrough chain
    /// (127/8 -> ORIGINAL_DST) absent, and a chain whose cluster never arrived.
    fn state() -> XdsState {
        XdsState {
            outbound: Some(OutboundListener {
                name: "outbound".to_owned(),
                address: "0.0.0.0:10000".parse().unwrap(),
                chains: vec![
                    chain("svc", "127.240.0.1/32", Some(8443), "svc_cluster"),
                    chain("ghost", "127.240.0.2/32", Some(8443), "ghost_cluster"),
                    chain("pass", "10.0.0.0/8", None, "passthrough"),
                ],
                default_chain: None,
            }),
            clusters: BTreeMap::from([
                upstream("svc_cluster", Discovery::Eds),
                upstream("passthrough", Discovery::OriginalDst),
            ]),
            dns: None,
            synced: true,
            updates: 1,
        }
    }

    fn dst(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_federated_destination_goes_to_its_cluster() {
        let s = state();
        match decide(&s, dst("127.240.0.1:8443"), OutboundPolicy::RegistryOnly) {
            Decision::Cluster { chain, upstream } => {
                assert_eq!(chain.name, "svc");
                assert_eq!(upstream.name, "svc_cluster");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_original_dst_cluster_means_direct() {
        let s = state();
        assert!(matches!(
            decide(&s, dst("10.1.2.3:5432"), OutboundPolicy::RegistryOnly),
            Decision::Direct {
                why: "original_dst_cluster",
                chain: Some(_)
            }
        ));
    }

    #[test]
    fn a_chain_naming_a_missing_cluster_is_refused() {
        let s = state();
        assert!(matches!(
            decide(&s, dst("127.240.0.2:8443"), OutboundPolicy::AllowAny),
            Decision::Refuse {
                reason: "unknown_cluster",
                ..
            }
        ));
    }

    #[test]
    fn unrouted_loopback_is_direct_whatever_the_policy() {
        let s = state();
        for policy in [OutboundPolicy::AllowAny, OutboundPolicy::RegistryOnly] {
            assert!(matches!(
                decide(&s, dst("127.0.0.1:6379"), policy),
                Decision::Direct {
                    why: "loopback",
                    chain: None
                }
            ));
            // The VIP on another port is not the service.
            assert!(matches!(
                decide(&s, dst("127.240.0.1:80"), policy),
                Decision::Direct {
                    why: "loopback",
                    ..
                }
            ));
        }
        assert!(matches!(
            decide(&s, dst("[::1]:6379"), OutboundPolicy::RegistryOnly),
            Decision::Direct {
                why: "loopback",
                ..
            }
        ));
    }

    #[test]
    fn other_destinations_follow_the_policy() {
        let s = state();
        assert!(matches!(
            decide(&s, dst("192.0.2.7:443"), OutboundPolicy::AllowAny),
            Decision::Direct {
                why: "allow_any",
                chain: None
            }
        ));
        assert!(matches!(
            decide(&s, dst("192.0.2.7:443"), OutboundPolicy::RegistryOnly),
            Decision::Refuse {
                reason: "registry_only",
                ..
            }
        ));
        // Nothing from xDS yet: the same rules.
        let empty = XdsState::default();
        assert!(matches!(
            decide(&empty, dst("192.0.2.7:443"), OutboundPolicy::RegistryOnly),
            Decision::Refuse { .. }
        ));
    }
}
