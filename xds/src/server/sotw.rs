//! One state-of-the-world stream (`StreamAggregatedResources` or a standalone `Stream*`).
//!
//! Per type the stream remembers the subscription (wildcard or names), the exchange (nonce
//! and version of the last response, see [`super::core`]), and what it last sent per
//! resource. A stale request is ignored. A NACK (`error_detail`) is logged and counted and
//! the rejected version is not re-sent until the registry changes, so a client that
//! rejects a config keeps its last ACKed state without a resend storm; but a NACK's
//! `resource_names` are still the client's subscription (xDS), so a changed subscription
//! is applied and answered. Listener and Cluster responses carry the full state; EDS
//! responses carry only the requested resources that the client has not got in their
//! current version.
//!
//! Work is linear in the request: a subscription change looks up only the names it adds
//! (one map lookup each), not every resource or every subscribed name.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use super::core::{Exchange, Reply, Verdict};
use super::wire::SotwResponse;
use super::{Closed, Protocol, Push, Stream};
use crate::resources::{Resource, ResourceType, Snapshot};

/// The wildcard resource name (xDS).
pub(crate) const WILDCARD: &str = "*";

#[derive(Debug, Default)]
pub(crate) struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Nonce and version of the last response.
    exchange: Exchange,
    /// Resource name -> version last sent (EDS: what the client has, as far as we know).
    sent: HashMap<String, String>,
    /// `resource_names` of the last request, as sent.
    last_names: Vec<String>,
}

/// Which resources a push looks at.
enum Scope<'a> {
    /// Every resource of the type (wildcard subscription, or no change list).
    All,
    /// These names only (a subscription change, or what changed since a snapshot).
    Names(&'a [String]),
}

/// A SotW stream: the shared stream state with this variant's per-type state.
pub(crate) type Session = Stream<SotwResponse, TypeState>;

impl Session {
    async fn handle_request(&mut self, req: DiscoveryRequest) -> Result<(), Closed> {
        let t = self.accept(req.node.as_ref(), &req.type_url).await?;
        self.check_cap(t, req.resource_names.len()).await?;
        let first = self.types[t.index()].is_none();
        let st = self.types[t.index()].get_or_insert_with(TypeState::default);
        let reply = Reply {
            nonce: &req.response_nonce,
            version: &req.version_info,
            error: req.error_detail.as_ref(),
        };
        if self.core.verdict(t.short(), &st.exchange, reply) == Verdict::Stale {
            return Ok(());
        }
        // Fast path: an ACK repeating the previous request's names (SotW clients resend the
        // whole list, 10,000 names for a large mesh) changes nothing.
        if !first && req.resource_names == st.last_names {
            return Ok(());
        }
        // Subscription: an empty first request, or "*", is a wildcard subscription. This
        // applies to NACKs too: their names are the subscription.
        let star = req.resource_names.iter().any(|n| n == WILDCARD);
        let wildcard = star || (req.resource_names.is_empty() && (first || st.wildcard));
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| *n != WILDCARD)
            .cloned()
            .collect();
        st.last_names = req.resource_names;
        let changed = first || wildcard != st.wildcard || names != st.names;
        if !changed {
            return Ok(());
        }
        // Names newly subscribed: only these can need a response (EDS); the others were
        // answered when they were subscribed (or are still in `sent`, which filters them).
        let added: Vec<String> = if st.wildcard {
            names.iter().cloned().collect()
        } else {
            names.difference(&st.names).cloned().collect()
        };
        let newly_wildcard = wildcard && (first || !st.wildcard);
        st.wildcard = wildcard;
        st.names = names;
        // Forget what was sent for names no longer subscribed, so a re-subscription resends.
        if !st.wildcard {
            let keep = &st.names;
            st.sent.retain(|n, _| keep.contains(n));
        }
        let scope = if newly_wildcard {
            Scope::All
        } else {
            Scope::Names(&added)
        };
        self.push_type(t, true, scope).await.map(|_| ())
    }

    /// Sends what the client of type `t` lacks among the resources in `scope`.
    /// `requested`: answering a (new) subscription, where full-state types always get a
    /// response. Returns whether a response was sent.
    async fn push_type(
        &mut self,
        t: ResourceType,
        requested: bool,
        scope: Scope<'_>,
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        let resources: Vec<&Arc<Resource>> = if t.sotw_full_state() {
            if !requested && st.exchange.version() == Some(res.version.as_str()) {
                return Ok(false);
            }
            // Full state: every subscribed resource, whatever the scope.
            if st.wildcard {
                res.resources.values().collect()
            } else {
                self.examined += st.names.len() as u64;
                st.names.iter().filter_map(|n| res.get(n)).collect()
            }
        } else {
            let stale = |r: &&Arc<Resource>| st.sent.get(&r.name) != Some(&r.version);
            let fresh: Vec<_> = match scope {
                Scope::Names(names) => {
                    self.examined += names.len() as u64;
                    let mut unique = HashSet::with_capacity(names.len());
                    names
                        .iter()
                        .filter(|n| unique.insert(n.as_str()))
                        .filter(|n| st.wildcard || st.names.contains(*n))
                        .filter_map(|n| res.get(n))
                        .filter(stale)
                        .collect()
                }
                Scope::All => {
                    self.examined += res.resources.len() as u64;
                    res.resources
                        .values()
                        .filter(|r| st.wildcard || st.names.contains(&r.name))
                        .filter(stale)
                        .collect()
                }
            };
            if fresh.is_empty() {
                return Ok(false);
            }
            for r in &fresh {
                st.sent.insert(r.name.clone(), r.version.clone());
            }
            fresh
        };
        let nonce = self.core.respond(t.short(), &mut st.exchange, &res.version);
        tracing::debug!(r#type = %t, version = %res.version, resources = resources.len(), examined = self.examined, "xds: SotW push");
        let resp = SotwResponse {
            version_info: res.version.clone(),
            resources: resources.into_iter().cloned().collect(),
            type_url: t.type_url(),
            nonce,
        };
        self.tx.send(Ok(resp)).await.map_err(|_| Closed)?;
        Ok(true)
    }
}

impl Protocol for Session {
    type Request = DiscoveryRequest;
    const VARIANT: &'static str = "sotw";

    fn node(&self) -> &str {
        self.core.node()
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Closed> {
        self.handle_request(req).await
    }

    async fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Result<(), Closed> {
        let seen = self.snapshot.generation;
        self.snapshot = snapshot;
        self.push_all(seen).await
    }
}

impl Push for Session {
    async fn push(
        &mut self,
        t: ResourceType,
        initial: bool,
        seen: Option<u64>,
        extra: &[String],
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        match seen.and_then(|g| snap.changed_since(g, t)) {
            Some(changed) if extra.is_empty() => {
                self.push_type(t, initial, Scope::Names(changed)).await
            }
            Some(changed) => {
                let names: Vec<String> = changed.iter().chain(extra).cloned().collect();
                self.push_type(t, initial, Scope::Names(&names)).await
            }
            None => self.push_type(t, initial, Scope::All).await,
        }
    }

    fn forget(&mut self, t: ResourceType, names: &[String]) {
        if let Some(st) = self.types[t.index()].as_mut() {
            for n in names {
                st.sent.remove(n);
            }
        }
    }
}
