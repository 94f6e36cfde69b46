//! One incremental stream (`DeltaAggregatedResources` or a standalone `Delta*`).
//!
//! Per type the stream tracks the subscription and, per resource, the version the client
//! has (seeded from `initial_resource_versions` on reconnect). A push sends only resources
//! whose version differs and lists in `removed_resources` those the client has that no
//! longer exist, so unchanged resources are never re-sent. A NACK is logged and counted;
//! the rejected versions are not re-sent until the registry changes, but the NACK's
//! subscribe and unsubscribe lists apply like any request's.
//!
//! Work follows the change: a subscribe looks up only the names it adds, an unsubscribe
//! touches only the names it removes; only a new wildcard subscription (or the first
//! request's `initial_resource_versions`) looks at everything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::core::{Exchange, MAX_NAMES_PER_REQUEST, Reply};
use super::sotw::WILDCARD;
use super::wire::DeltaResponse;
use super::{Closed, Protocol, Push, Stream};
use crate::resources::{Resource, ResourceType, Snapshot};

#[derive(Debug, Default)]
pub(crate) struct TypeState {
    wildcard: bool,
    names: HashSet<String>,
    /// Resource name -> version the client has.
    has: HashMap<String, String>,
    /// Names subscribed explicitly that do not exist and were reported removed.
    reported_missing: HashSet<String>,
    /// Nonce of the last response.
    exchange: Exchange,
}

/// A Delta stream: the shared stream state with this variant's per-type state.
pub(crate) type Session = Stream<DeltaResponse, TypeState>;

impl Session {
    async fn handle_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Closed> {
        let t = self.accept(req.node.as_ref(), &req.type_url).await?;
        let count = (req.resource_names_subscribe.len() + req.resource_names_unsubscribe.len())
            .max(req.initial_resource_versions.len());
        self.check_cap(t, count).await?;
        let first = self.types[t.index()].is_none();
        let st = self.types[t.index()].get_or_insert_with(TypeState::default);
        if first {
            st.has = req.initial_resource_versions;
        }
        // Counts and logs ACKs and NACKs; a stale or NACKing request's subscription changes
        // still apply (Delta subscriptions are not tied to nonces).
        let reply = Reply {
            nonce: &req.response_nonce,
            version: "",
            error: req.error_detail.as_ref(),
        };
        self.core.verdict(t.short(), &st.exchange, reply);
        let mut newly_wildcard = first && req.resource_names_subscribe.is_empty();
        let mut added = Vec::new();
        for n in req.resource_names_subscribe {
            if n == WILDCARD {
                newly_wildcard |= !st.wildcard;
            } else if !st.names.contains(&n) {
                st.names.insert(n.clone());
                added.push(n);
            }
        }
        if newly_wildcard {
            st.wildcard = true;
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                if st.wildcard {
                    st.wildcard = false;
                    // The client drops what only the wildcard gave it.
                    let names = &st.names;
                    st.has.retain(|n, _| names.contains(n));
                }
            } else if st.names.remove(n) {
                st.reported_missing.remove(n);
                if !st.wildcard {
                    st.has.remove(n);
                }
            }
        }
        if st.names.len() > MAX_NAMES_PER_REQUEST {
            let count = st.names.len();
            return self.check_cap(t, count).await;
        }
        if newly_wildcard {
            self.push_all_of(t, first).await.map(|_| ())
        } else if first {
            // Explicit names on the first request: those, and what the client says it has.
            self.push_names(t, &added, true).await.map(|_| ())
        } else if !added.is_empty() {
            self.push_names(t, &added, false).await.map(|_| ())
        } else {
            Ok(())
        }
    }

    /// Sends what the client lacks among `names` (newly subscribed): resources it does not
    /// have in their current version, and, once, the names that do not exist (so it does
    /// not wait for its initial fetch timeout). `with_has`: also report removed every
    /// resource the client says it has that no longer exists (first request).
    async fn push_names(
        &mut self,
        t: ResourceType,
        names: &[String],
        with_has: bool,
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        self.examined += names.len() as u64;
        let mut updated = Vec::new();
        let mut removed = Vec::new();
        for n in names {
            match res.get(n) {
                Some(r) if st.has.get(n) != Some(&r.version) => updated.push(r.clone()),
                Some(_) => {}
                // Gone but the client has it: reported below when `with_has`.
                None if st.has.contains_key(n) => {
                    if !with_has {
                        removed.push(n.clone());
                    }
                }
                None => {
                    if st.reported_missing.insert(n.clone()) {
                        removed.push(n.clone());
                    }
                }
            }
        }
        if with_has {
            self.examined += st.has.len() as u64;
            removed.extend(
                st.has
                    .keys()
                    .filter(|n| !res.resources.contains_key(*n))
                    .cloned(),
            );
        }
        self.send(t, updated, removed, false).await
    }

    /// Sends every subscribed resource the client lacks or has in another version, and
    /// the names it has that are gone: for a new wildcard subscription. `initial`: the
    /// first request, answered even when empty so the client's initial fetch completes.
    async fn push_all_of(&mut self, t: ResourceType, initial: bool) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        self.examined += (res.resources.len() + st.has.len() + st.names.len()) as u64;
        let updated: Vec<_> = res
            .resources
            .values()
            .filter(|r| st.has.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        let mut removed: Vec<String> = st
            .has
            .keys()
            .filter(|n| !res.resources.contains_key(*n))
            .cloned()
            .collect();
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
        st.reported_missing.extend(missing.iter().cloned());
        removed.extend(missing);
        self.send(t, updated, removed, initial).await
    }

    /// Sends the resources of type `t` in `names` (what changed since a snapshot, and
    /// `extra` clusters to re-warm) that the client lacks, and lists the changed names it
    /// has that are gone.
    async fn push_changed(
        &mut self,
        t: ResourceType,
        names: &[String],
        extra: &[String],
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        self.examined += (names.len() + extra.len()) as u64;
        let mut unique = HashSet::with_capacity(names.len() + extra.len());
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
        self.send(t, updated, removed, false).await
    }

    /// Records what the client will have and sends the response, if there is anything in
    /// it (or `always`).
    async fn send(
        &mut self,
        t: ResourceType,
        updated: Vec<Arc<Resource>>,
        removed: Vec<String>,
        always: bool,
    ) -> Result<bool, Closed> {
        if updated.is_empty() && removed.is_empty() && !always {
            return Ok(false);
        }
        let snap = self.snapshot.clone();
        let res = snap.of(t);
        let Some(st) = self.types[t.index()].as_mut() else {
            return Ok(false);
        };
        for r in &updated {
            st.has.insert(r.name.clone(), r.version.clone());
            st.reported_missing.remove(&r.name);
        }
        for n in &removed {
            st.has.remove(n);
        }
        let nonce = self.core.respond(t.short(), &mut st.exchange, &res.version);
        tracing::debug!(r#type = %t, updated = updated.len(), removed = removed.len(), examined = self.examined, "xds: Delta push");
        let resp = DeltaResponse {
            system_version_info: res.version.clone(),
            resources: updated,
            type_url: t.type_url(),
            nonce,
            removed_resources: removed,
        };
        self.tx.send(Ok(resp)).await.map_err(|_| Closed)?;
        Ok(true)
    }
}

impl Protocol for Session {
    type Request = DeltaDiscoveryRequest;
    const VARIANT: &'static str = "delta";

    fn node(&self) -> &str {
        self.core.node()
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
        _initial: bool,
        seen: Option<u64>,
        extra: &[String],
    ) -> Result<bool, Closed> {
        let snap = self.snapshot.clone();
        match seen.and_then(|g| snap.changed_since(g, t)) {
            Some(names) => self.push_changed(t, names, extra).await,
            None => self.push_every(t).await,
        }
    }

    fn forget(&mut self, t: ResourceType, names: &[String]) {
        if let Some(st) = self.types[t.index()].as_mut() {
            for n in names {
                st.has.remove(n);
            }
        }
    }
}

impl Session {
    /// A push with no change list to go by: compares every subscribed resource.
    async fn push_every(&mut self, t: ResourceType) -> Result<bool, Closed> {
        let wildcard = self.types[t.index()].as_ref().is_some_and(|s| s.wildcard);
        if wildcard {
            return self.push_all_of(t, false).await;
        }
        let names: Vec<String> = self.types[t.index()]
            .as_ref()
            .map(|s| s.names.iter().cloned().collect())
            .unwrap_or_default();
        self.push_names(t, &names, true).await
    }
}
