//! One state-of-the-world stream (`StreamAggregatedResources` or a standalone `Stream*`).
//!
//! Per type the stream remembers the subscription (wildcard or names), the nonce and
//! version of the last response, and what it last sent per resource. A request whose nonce
//! is not the latest is stale and ignored; a NACK (`error_detail`) is logged and counted
//! and nothing is re-sent until the registry changes again, so a client that rejects a
//! config keeps its last ACKed state without a resend storm. Listener and Cluster
//! responses carry the full state; EDS responses carry only the requested resources that
//! the client has not got in their current version.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use super::wire::SotwResponse;
use super::{Closed, Protocol, Push, Stream};
use crate::resources::{ResourceType, Snapshot};

/// The wildcard resource name (xDS).
pub(crate) const WILDCARD: &str = "*";

#[derive(Debug, Default)]
pub(crate) struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Type version of the last response (full-state types).
    sent_version: Option<String>,
    /// Resource name -> version last sent (EDS: what the client has, as far as we know).
    sent: HashMap<String, String>,
    /// Nonce of the last response; the next ACK/NACK must carry it.
    nonce: String,
    /// `resource_names` of the last request, as sent.
    last_names: Vec<String>,
}

/// A SotW stream: the shared stream state with this variant's per-type state.
pub(crate) type Session = Stream<SotwResponse, TypeState>;

impl Session {
    async fn handle_request(&mut self, req: DiscoveryRequest) -> Result<(), Closed> {
        let t = self.accept(req.node.as_ref(), &req.type_url).await?;
        let first = self.types[t.index()].is_none();
        let st = self.types[t.index()].get_or_insert_with(TypeState::default);
        if !first && req.response_nonce != st.nonce {
            // Stale: answers a response the client has since been superseded by.
            tracing::debug!(stream = self.id, node = %self.node, r#type = %t, nonce = %req.response_nonce, "xds: ignoring stale request");
            return Ok(());
        }
        if let Some(err) = &req.error_detail {
            self.ctx.metrics.nack(t);
            tracing::warn!(
                stream = self.id,
                node = %self.node,
                r#type = %t,
                rejected_version = st.sent_version.as_deref().unwrap_or(""),
                kept_version = %req.version_info,
                code = err.code,
                message = %err.message,
                "xds: client NACKed the config; it keeps its last accepted version and ferry will not resend until the registry changes"
            );
        } else if !req.response_nonce.is_empty() {
            self.ctx.metrics.ack(t);
            tracing::debug!(stream = self.id, node = %self.node, r#type = %t, version = %req.version_info, "xds: ACK");
        }
        // Fast path: an ACK repeating the previous request's names (SotW clients resend the
        // whole list, 10,000 names for a large mesh) changes nothing.
        if !first && req.resource_names == st.last_names {
            return Ok(());
        }
        st.last_names = req.resource_names.clone();
        // Subscription: an empty first request, or "*", is a wildcard subscription.
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard = names.contains(WILDCARD) || (names.is_empty() && (first || st.wildcard));
        let names: BTreeSet<String> = names.into_iter().filter(|n| n != WILDCARD).collect();
        let changed = first || wildcard != st.wildcard || names != st.names;
        if !changed || req.error_detail.is_some() {
            return Ok(());
        }
        st.wildcard = wildcard;
        st.names = names;
        // Forget what was sent for names no longer subscribed, so a re-subscription resends.
        if !st.wildcard {
            let keep = &st.names;
            st.sent.retain(|n, _| keep.contains(n));
        }
        self.push_type(t, true, None, &[]).await.map(|_| ())
    }

    /// Sends what the client of type `t` lacks. `requested`: answering a (new)
    /// subscription, where full-state types always get a response. `seen`: the generation
    /// the stream had, so only the names changed since then (and `extra`) need a look.
    /// Returns whether a response was sent.
    async fn push_type(
        &mut self,
        t: ResourceType,
        requested: bool,
        seen: Option<u64>,
        extra: &[String],
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        let subscribed =
            |r: &&Arc<crate::resources::Resource>| st.wildcard || st.names.contains(&r.name);
        let resources: Vec<_> = if t.sotw_full_state() {
            if !requested && st.sent_version.as_deref() == Some(res.version.as_str()) {
                return Ok(false);
            }
            res.resources.values().filter(subscribed).collect()
        } else {
            let stale =
                |r: &&Arc<crate::resources::Resource>| st.sent.get(&r.name) != Some(&r.version);
            let mut unique = std::collections::HashSet::new();
            let fresh: Vec<_> = match seen.and_then(|g| snap.changed_since(g, t)) {
                Some(names) => names
                    .iter()
                    .chain(extra)
                    .filter(|n| unique.insert(n.as_str()))
                    .filter_map(|n| res.get(n))
                    .filter(subscribed)
                    .filter(stale)
                    .collect(),
                None => res
                    .resources
                    .values()
                    .filter(subscribed)
                    .filter(stale)
                    .collect(),
            };
            if fresh.is_empty() {
                return Ok(false);
            }
            fresh
        };
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        if !t.sotw_full_state() {
            for r in &resources {
                st.sent.insert(r.name.clone(), r.version.clone());
            }
        }
        st.sent_version = Some(res.version.clone());
        st.nonce = nonce.clone();
        tracing::debug!(stream = self.id, node = %self.node, r#type = %t, version = %res.version, resources = resources.len(), "xds: SotW push");
        let resp = SotwResponse {
            version_info: res.version.clone(),
            resources: resources.into_iter().cloned().collect(),
            type_url: t.type_url(),
            nonce,
        };
        self.ctx.metrics.response(t);
        self.tx.send(Ok(resp)).await.map_err(|_| Closed)?;
        Ok(true)
    }
}

impl Protocol for Session {
    type Request = DiscoveryRequest;
    const VARIANT: &'static str = "sotw";

    fn id(&self) -> u64 {
        self.id
    }

    fn node(&self) -> &str {
        &self.node
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
        self.push_type(t, initial, seen, extra).await
    }

    fn forget(&mut self, t: ResourceType, names: &[String]) {
        if let Some(st) = self.types[t.index()].as_mut() {
            for n in names {
                st.sent.remove(n);
            }
        }
    }
}
