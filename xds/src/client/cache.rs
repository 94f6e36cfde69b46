//! What the client has applied, across reconnects: the last-known-good cache, updated one
//! resource at a time so that a rejected resource keeps its previous good version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryResponse, Resource as PbResource};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::watch;

use super::model::{
    DnsListener, Endpoints, GatewayEndpoint, LdsListener, OutboundListener, ResourceError,
    Upstream, XdsState,
};
use crate::resources::{DNS_LISTENER, OUTBOUND_LISTENER};
use crate::type_url;

/// A cluster as applied: the published value (endpoints filled in) and, for an EDS
/// cluster, the EDS resource it takes its endpoints from.
#[derive(Debug, Clone)]
pub(super) struct Applied {
    upstream: Arc<Upstream>,
    eds: Option<String>,
}

/// The last good version of every resource.
#[derive(Debug, Default)]
pub(super) struct Cache {
    /// Clusters by name.
    pub(super) clusters: BTreeMap<String, Applied>,
    /// EDS endpoints by resource name (only those subscribed to).
    endpoints: HashMap<String, Vec<GatewayEndpoint>>,
    outbound: Option<OutboundListener>,
    dns: Option<DnsListener>,
    cds_seen: bool,
    lds_seen: bool,
    updates: u64,
}

impl Cache {
    /// Publishes the current state (every call is one update).
    pub(super) fn publish(&mut self, tx: &watch::Sender<Arc<XdsState>>) {
        tx.send_replace(Arc::new(self.state()));
    }

    /// The state to publish next.
    pub(super) fn state(&mut self) -> XdsState {
        self.updates += 1;
        let endpoints_seen = self
            .clusters
            .values()
            .filter_map(|a| a.eds.as_ref())
            .all(|n| self.endpoints.contains_key(n));
        XdsState {
            outbound: self.outbound.clone(),
            clusters: self
                .clusters
                .iter()
                .map(|(k, a)| (k.clone(), a.upstream.clone()))
                .collect(),
            dns: self.dns.clone(),
            synced: self.cds_seen && self.lds_seen && endpoints_seen,
            updates: self.updates,
        }
    }

    /// The EDS resources to subscribe to.
    pub(super) fn eds_names(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|a| a.eds.clone())
            .collect()
    }

    /// Applies a full-state CDS response: clusters it omits are removed; a cluster that is
    /// rejected keeps its previous version (if any).
    pub(super) fn apply_clusters(&mut self, resp: &DiscoveryResponse) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        let mut next = BTreeMap::new();
        for (i, any) in resp.resources.iter().enumerate() {
            let result = decode::<Cluster>(any, i, type_url::CLUSTER).and_then(|c| {
                let eds = Upstream::eds_resource_name(&c);
                Upstream::try_from(&c)
                    .map(|u| (u, eds))
                    .map_err(|e| (c.name.clone(), e))
            });
            match result {
                Ok((mut upstream, eds)) => {
                    if let Some(eps) = eds.as_ref().and_then(|n| self.endpoints.get(n)) {
                        upstream.endpoints = eps.clone();
                    }
                    let applied = match self.clusters.get(&upstream.name) {
                        // Unchanged: keep the same Arc (readers may compare pointers).
                        Some(prev) if *prev.upstream == upstream && prev.eds == eds => prev.clone(),
                        _ => Applied {
                            upstream: Arc::new(upstream),
                            eds,
                        },
                    };
                    next.insert(applied.upstream.name.clone(), applied);
                }
                Err((name, e)) => {
                    if let Some(prev) = self.clusters.get(&name) {
                        next.insert(name, prev.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.clusters = next;
        self.cds_seen = true;
        let names = self.eds_names();
        self.endpoints.retain(|n, _| names.contains(n));
        errors
    }

    /// Applies a full-state LDS response: `outbound` and `dns` are replaced (or removed
    /// when absent), a rejected one keeps its previous version; others are ignored.
    pub(super) fn apply_listeners(&mut self, resp: &DiscoveryResponse) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        let mut outbound = None;
        let mut dns = None;
        for (i, any) in resp.resources.iter().enumerate() {
            let result = decode::<Listener>(any, i, type_url::LISTENER).and_then(|l| {
                LdsListener::try_from(&l)
                    .map(|d| (l.name.clone(), d))
                    .map_err(|e| (l.name.clone(), e))
            });
            match result {
                Ok((_, LdsListener::Outbound(l))) => outbound = Some(l),
                Ok((_, LdsListener::Dns(l))) => dns = Some(l),
                Ok((name, LdsListener::Ignored)) => {
                    tracing::debug!(listener = %name, "xds client: ignoring a listener that is neither outbound nor dns");
                }
                Err((name, e)) => {
                    match name.as_str() {
                        OUTBOUND_LISTENER => outbound = self.outbound.take(),
                        DNS_LISTENER => dns = self.dns.take(),
                        _ => {}
                    }
                    errors.push(e);
                }
            }
        }
        self.outbound = outbound;
        self.dns = dns;
        self.lds_seen = true;
        errors
    }

    /// Applies an EDS response (only the resources it carries; SotW EDS is not full
    /// state). A rejected assignment keeps the previous endpoints.
    pub(super) fn apply_endpoints(
        &mut self,
        resp: &DiscoveryResponse,
        subscribed: &BTreeSet<String>,
    ) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        for (i, any) in resp.resources.iter().enumerate() {
            let result = decode::<ClusterLoadAssignment>(any, i, type_url::ENDPOINT)
                .and_then(|cla| Endpoints::try_from(&cla).map_err(|e| (cla.cluster_name, e)));
            match result {
                Ok(e) if subscribed.contains(&e.cluster) => {
                    for a in self.clusters.values_mut() {
                        if a.eds.as_ref() == Some(&e.cluster) && a.upstream.endpoints != e.endpoints
                        {
                            let mut u = (*a.upstream).clone();
                            u.endpoints = e.endpoints.clone();
                            a.upstream = Arc::new(u);
                        }
                    }
                    self.endpoints.insert(e.cluster, e.endpoints);
                }
                Ok(e) => {
                    tracing::debug!(cluster = %e.cluster, "xds client: ignoring endpoints it did not ask for");
                }
                Err((_, e)) => errors.push(e),
            }
        }
        errors
    }
}

/// Decodes resource `index` of a response as `P` (type URL `expected`). A resource may
/// come bare or in the `envoy.service.discovery.v3.Resource` wrapper (which names it). A
/// failure names the resource as well as it can be named before decoding: the wrapper's
/// name, else `#<index> of <type>`, so the NACK says which one was rejected (and a named
/// one keeps its previous version).
pub(super) fn decode<P: Message + Default>(
    any: &Any,
    index: usize,
    expected: &'static str,
) -> Result<P, (String, ResourceError)> {
    let unnamed = || format!("#{index} of {}", type_url::message_name(&any.type_url));
    let fail = |name: String, reason: String| {
        let e = ResourceError::Decode {
            name: name.clone(),
            expected: type_url::message_name(expected),
            reason,
        };
        (name, e)
    };
    let (name, inner) = if any.type_url == type_url::RESOURCE {
        match PbResource::decode(any.value.as_slice()) {
            Ok(r) => {
                let name = if r.name.is_empty() { unnamed() } else { r.name };
                (name, r.resource.unwrap_or_default())
            }
            Err(e) => {
                return Err(fail(
                    unnamed(),
                    format!("the Resource wrapper does not decode: {e}"),
                ));
            }
        }
    } else {
        (unnamed(), any.clone())
    };
    if type_url::message_name(&inner.type_url) != type_url::message_name(expected) {
        let reason = format!("type URL is {}", inner.type_url);
        return Err(fail(name, reason));
    }
    P::decode(inner.value.as_slice()).map_err(|e| fail(name, e.to_string()))
}
