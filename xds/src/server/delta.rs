//! One incremental stream (`DeltaAggregatedResources` or a standalone `Delta*`).
//!
//! Per type the stream tracks the subscription and, per resource, the version the client
//! has (seeded from `initial_resource_versions` on reconnect). A push sends only resources
//! whose version differs and lists in `removed_resources` those the client has that no
//! longer exist, so unchanged resources are never re-sent. A NACK is logged and counted;
//! the rejected versions are not re-sent until the registry changes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::sotw::WILDCARD;
use super::wire::DeltaResponse;
use super::{Closed, Protocol, Push, Stream};
use crate::resources::{ResourceType, Snapshot};

#[derive(Debug, Default)]
pub(crate) struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Resource name -> version the client has.
    has: HashMap<String, String>,
    /// Names subscribed explicitly that do not exist and were reported removed.
    reported_missing: BTreeSet<String>,
    /// Nonce of the last response.
    nonce: String,
}

/// A Delta stream: the shared stream state with this variant's per-type state.
pub(crate) type Session = Stream<DeltaResponse, TypeState>;

impl Session {
    async fn handle_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Closed> {
        let t = self.accept(req.node.as_ref(), &req.type_url).await?;
        let first = self.types[t.index()].is_none();
        let st = self.types[t.index()].get_or_insert_with(TypeState::default);
        if first {
            st.has = req.initial_resource_versions.clone();
        }
        if !req.response_nonce.is_empty() {
            if let Some(err) = &req.error_detail {
                self.ctx.metrics.nack(t);
                tracing::warn!(
                    stream = self.id,
                    node = %self.node,
                    r#type = %t,
                    nonce = %req.response_nonce,
                    code = err.code,
                    message = %err.message,
                    "xds: client NACKed a Delta response; it keeps its previous resources and ferry will not resend them until the registry changes"
                );
            } else {
                self.ctx.metrics.ack(t);
            }
        }
        let mut changed = first;
        if first && req.resource_names_subscribe.is_empty() {
            st.wildcard = true;
        }
        for n in &req.resource_names_subscribe {
            if n == WILDCARD {
                changed |= !st.wildcard;
                st.wildcard = true;
            } else {
                changed |= st.names.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                changed |= st.wildcard;
                st.wildcard = false;
            } else if st.names.remove(n) {
                st.reported_missing.remove(n);
                if !st.wildcard {
                    st.has.remove(n);
                }
                changed = true;
            }
        }
        if changed {
            self.push_type(t, first, None, &[]).await.map(|_| ())
        } else {
            Ok(())
        }
    }

    /// Sends the resources of type `t` the client lacks or has in another version, and the
    /// names it has that are gone. `initial`: the first request, always answered for a
    /// wildcard subscription so the client's initial fetch completes.
    /// `seen`: the generation the stream had; when the snapshot knows what changed since,
    /// only those names are examined.
    /// `extra`: more names to look at (clusters to re-warm). Returns whether a response
    /// was sent.
    async fn push_type(
        &mut self,
        t: ResourceType,
        initial: bool,
        seen: Option<u64>,
        extra: &[String],
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        if let Some(names) = seen.and_then(|g| snap.changed_since(g, t)) {
            let mut unique = std::collections::HashSet::new();
            let updated: Vec<_> = names
                .iter()
                .chain(extra)
                .filter(|n| unique.insert(n.as_str()))
                .filter_map(|n| res.get(n))
                .filter(|r| {
                    (st.wildcard || st.names.contains(&r.name))
                        && st.has.get(&r.name) != Some(&r.version)
                })
                .cloned()
                .collect();
            let removed: Vec<String> = names
                .iter()
                .filter(|n| !res.resources.contains_key(*n) && st.has.contains_key(*n))
                .cloned()
                .collect();
            return self.send(t, updated, removed).await;
        }
        let subscribed = |name: &str| st.wildcard || st.names.contains(name);
        let updated: Vec<_> = res
            .resources
            .values()
            .filter(|r| subscribed(&r.name) && st.has.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        let mut removed: Vec<String> = st
            .has
            .keys()
            .filter(|n| !res.resources.contains_key(*n))
            .cloned()
            .collect();
        // Tell the client once that a name it asked for does not exist (so it does not
        // wait for its initial fetch timeout).
        let missing: Vec<String> = st
            .names
            .iter()
            .filter(|n| {
                !res.resources.contains_key(*n)
                    && !st.has.contains_key(*n)
                    && !st.reported_missing.contains(*n)
            })
            .cloned()
            .collect();
        st.reported_missing
            .retain(|n| !res.resources.contains_key(n));
        st.reported_missing.extend(missing.iter().cloned());
        removed.extend(missing);
        if updated.is_empty() && removed.is_empty() && !(initial && st.wildcard) {
            return Ok(false);
        }
        self.send_always(t, updated, removed).await
    }

    /// Sends a response if there is anything in it.
    async fn send(
        &mut self,
        t: ResourceType,
        updated: Vec<Arc<crate::resources::Resource>>,
        removed: Vec<String>,
    ) -> Result<bool, Closed> {
        if updated.is_empty() && removed.is_empty() {
            return Ok(false);
        }
        self.send_always(t, updated, removed).await
    }

    /// Records what the client will have and sends the response.
    async fn send_always(
        &mut self,
        t: ResourceType,
        updated: Vec<Arc<crate::resources::Resource>>,
        removed: Vec<String>,
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        for r in &updated {
            st.has.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            st.has.remove(n);
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        st.nonce = nonce.clone();
        tracing::debug!(stream = self.id, node = %self.node, r#type = %t, updated = updated.len(), removed = removed.len(), "xds: Delta push");
        let resp = DeltaResponse {
            system_version_info: res.version.clone(),
            resources: updated,
            type_url: t.type_url(),
            nonce,
            removed_resources: removed,
        };
        self.ctx.metrics.response(t);
        self.tx.send(Ok(resp)).await.map_err(|_| Closed)?;
        Ok(true)
    }
}

impl Protocol for Session {
    type Request = DeltaDiscoveryRequest;
    const VARIANT: &'static str = "delta";

    fn id(&self) -> u64 {
        self.id
    }

    fn node(&self) -> &str {
        &self.node
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Closed> {
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
                st.has.remove(n);
            }
        }
    }
}
