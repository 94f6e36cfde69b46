//! Translation of the registry (a validated [`Config`]) into Envoy xDS resources: one
//! `Cluster` and one `ClusterLoadAssignment` per imported service, the `outbound` listener
//! that maps `VIP:port` to those clusters, and the `dns` listener that answers every
//! federated hostname with its VIP.
//!
//! Pure code: no sockets, no clocks. The server serves [`Snapshot`]s; one task (see
//! [`spawn_translator`]) is the only writer, and every xDS stream reads the latest
//! `Arc<Snapshot>` from a `watch` channel without taking a lock.

mod cluster;
mod endpoint;
mod listener;
pub mod meta;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use registry::config::Config;

pub use cluster::cluster;
pub use endpoint::load_assignment;
pub use listener::{DNS_LISTENER, OUTBOUND_LISTENER, PASSTHROUGH_CLUSTER, dns_listener};
pub use listener::{outbound_listener, passthrough_cluster};

/// Bumped whenever the translation changes what it emits for the same input, so that a
/// client that reconnects with versions from an older ferry gets the new resources.
const TRANSLATION_REVISION: u32 = 1;

/// The resource types ferry serves. Anything else a client asks for gets a clear error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceType {
    /// CDS: `envoy.config.cluster.v3.Cluster`.
    Cluster,
    /// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    Endpoint,
    /// LDS: `envoy.config.listener.v3.Listener`.
    Listener,
}

impl ResourceType {
    /// Every served type, in the order pushes go out (clusters and endpoints before the
    /// listeners that reference them: make before break).
    pub const ALL: [ResourceType; 3] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
    ];

    /// The type URL on the wire.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
        }
    }

    /// The short name used in logs and metrics labels.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
        }
    }

    /// Whether a SotW response must carry every resource of the type (xDS: Listener and
    /// Cluster), rather than only those that changed.
    pub fn sotw_full_state(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    /// Index into per-type arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// A type URL that ferry does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ferry does not serve xDS type {type_url:?}; it serves {}, {} and {} (check the client's cds_config/lds_config and that nothing else is configured over ADS)",
    ResourceType::Cluster.type_url(),
    ResourceType::Endpoint.type_url(),
    ResourceType::Listener.type_url()
)]
pub struct UnknownTypeUrl {
    /// What the client asked for.
    pub type_url: String,
}

impl FromStr for ResourceType {
    type Err = UnknownTypeUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourceType::ALL
            .into_iter()
            .find(|t| t.type_url() == s)
            .ok_or_else(|| UnknownTypeUrl {
                type_url: s.to_owned(),
            })
    }
}

/// One encoded resource with its content version. Two resources are equal when their
/// names and versions are (the encoding of protobuf maps varies, the content does not).
#[derive(Debug, Clone)]
pub struct Resource {
    /// The resource name (`H_cluster`, `outbound`, `dns`).
    pub name: String,
    /// A hash of everything the resource was built from: equal versions mean equal content.
    pub version: String,
    /// The resource, packed.
    pub any: Any,
    /// The envoy delta `Resource` message (version, `Any`, name), encoded once here and
    /// shared by every stream the resource is sent on.
    wire: Box<[u8]>,
    /// Where the encoded `Any` sits in `wire`.
    any_at: std::ops::Range<usize>,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.version == other.version
    }
}

impl Resource {
    /// Packs `msg`, versioned by a hash of `inputs` (the domain values it was built from).
    /// Hashing inputs rather than encoded bytes keeps versions stable: protobuf maps
    /// (metadata, `Struct`) encode in no fixed order.
    pub fn new<M: Name, I: Serialize + ?Sized>(name: String, msg: &M, inputs: &I) -> Self {
        let version = content_version(M::full_name().as_str(), inputs);
        let any = Any {
            type_url: M::type_url(),
            value: msg.encode_to_vec(),
        };
        let (wire, any_at) =
            crate::server::wire::encode_resource(&name, &version, &any.encode_to_vec());
        Resource {
            name,
            version,
            any,
            wire: wire.into_boxed_slice(),
            any_at,
        }
    }

    /// The encoded envoy delta `Resource` message (`version`, `resource`, `name`).
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The encoded `Any` (what a SotW response lists).
    pub fn any_wire(&self) -> &[u8] {
        self.wire.get(self.any_at.clone()).unwrap_or_default()
    }
}

fn content_version<I: Serialize + ?Sized>(kind: &str, inputs: &I) -> String {
    let mut h = Sha256::new();
    h.update(TRANSLATION_REVISION.to_be_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(kind.as_bytes());
    // Serializing plain config structs to JSON cannot fail; an empty input still hashes.
    h.update(serde_json::to_vec(inputs).unwrap_or_default());
    let d = h.finalize();
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// All resources of one type, by name, with a version for the whole set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    /// The resources, by name.
    pub resources: BTreeMap<String, Arc<Resource>>,
    /// A hash of every (name, version): the SotW `version_info`.
    pub version: String,
}

impl TypeResources {
    fn new(resources: BTreeMap<String, Arc<Resource>>) -> Self {
        // Hashed directly (not through JSON): this runs on every registry change.
        let mut h = Sha256::new();
        for r in resources.values() {
            h.update(r.name.as_bytes());
            h.update([0]);
            h.update(r.version.as_bytes());
            h.update([0]);
        }
        let d = h.finalize();
        TypeResources {
            version: d[..8].iter().map(|b| format!("{b:02x}")).collect(),
            resources,
        }
    }

    /// The resource with this name.
    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }
}

/// Everything ferry serves at one moment: what every xDS stream converges to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Counts snapshots published by this process (for logs; not a wire version).
    pub generation: u64,
    types: [TypeResources; 3],
    /// What changed since the previous snapshot, so that a stream that saw that one can
    /// push a change without scanning every resource.
    changes: Option<Changes>,
}

/// Names added, changed or removed between two consecutive snapshots, per type.
#[derive(Debug, Clone, Default, PartialEq)]
struct Changes {
    from_generation: u64,
    names: [Vec<String>; 3],
}

impl Snapshot {
    /// The resources of one type.
    pub fn of(&self, t: ResourceType) -> &TypeResources {
        &self.types[t.index()]
    }

    /// Total resources over all types.
    pub fn len(&self) -> usize {
        self.types.iter().map(|t| t.resources.len()).sum()
    }

    /// True when nothing is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of type `t` added, changed or removed since snapshot `generation`, when
    /// that is the one just before this (else `None`: compare everything).
    pub fn changed_since(&self, generation: u64, t: ResourceType) -> Option<&[String]> {
        self.changes
            .as_ref()
            .filter(|c| c.from_generation == generation)
            .map(|c| c.names[t.index()].as_slice())
    }

    /// [`Snapshot::changed_since`], or every name of type `t` when the change list does not
    /// reach back to `generation`: the names a stream at `generation` must look at again.
    pub fn changed_or_all(&self, generation: u64, t: ResourceType) -> Vec<String> {
        match self.changed_since(generation, t) {
            Some(names) => names.to_vec(),
            None => self.of(t).resources.keys().cloned().collect(),
        }
    }
}

/// Builds the snapshot for `config`.
pub fn build(config: &Config, generation: u64) -> Snapshot {
    build_from(config, None, generation)
}

/// Builds the snapshot for `config`, reusing the resources of `prev` (built from
/// `prev.0`) for every service that did not change, and records what changed.
fn build_from(config: &Config, prev: Option<(&Config, &Snapshot)>, generation: u64) -> Snapshot {
    let old: HashMap<&str, &registry::config::FederatedService> = prev
        .map(|(c, _)| {
            c.services
                .iter()
                .map(|s| (s.hostname.as_str(), s))
                .collect()
        })
        .unwrap_or_default();
    let reuse =
        |t: ResourceType, name: &str| prev.and_then(|(_, snap)| snap.of(t).get(name).cloned());
    let mut clusters = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for svc in &config.services {
        let same = old.get(svc.hostname.as_str()).is_some_and(|o| *o == svc);
        let name = svc.cluster_name();
        let c = same
            .then(|| reuse(ResourceType::Cluster, &name))
            .flatten()
            .unwrap_or_else(|| Arc::new(cluster(svc)));
        clusters.insert(name.clone(), c);
        let e = same
            .then(|| reuse(ResourceType::Endpoint, &name))
            .flatten()
            .unwrap_or_else(|| Arc::new(load_assignment(svc)));
        endpoints.insert(name, e);
    }
    if config.agent.listen.outbound_passthrough {
        let c = passthrough_cluster();
        clusters.insert(c.name.clone(), Arc::new(c));
    }
    // Listeners depend on the listen addresses and each service's hostname, VIP and port.
    let listener_key = |c: &Config| {
        (
            c.agent.listen.clone(),
            c.services
                .iter()
                .map(|s| (s.hostname.clone(), s.vip, s.port))
                .collect::<Vec<_>>(),
        )
    };
    let mut listeners = BTreeMap::new();
    match prev {
        Some((pc, snap)) if listener_key(pc) == listener_key(config) => {
            listeners = snap.of(ResourceType::Listener).resources.clone();
        }
        _ => {
            for l in [outbound_listener(config), Some(dns_listener(config))]
                .into_iter()
                .flatten()
            {
                listeners.insert(l.name.clone(), Arc::new(l));
            }
        }
    }
    let types = [
        TypeResources::new(clusters),
        TypeResources::new(endpoints),
        TypeResources::new(listeners),
    ];
    let changes = prev.map(|(_, snap)| Changes {
        from_generation: snap.generation,
        names: ResourceType::ALL.map(|t| diff(snap.of(t), &types[t.index()])),
    });
    Snapshot {
        generation,
        types,
        changes,
    }
}

/// Names in `b` that are new or in another version than in `a`, and names gone from `b`.
fn diff(a: &TypeResources, b: &TypeResources) -> Vec<String> {
    if a.version == b.version {
        return Vec::new();
    }
    let mut out: Vec<String> = b
        .resources
        .values()
        .filter(|r| {
            a.resources
                .get(&r.name)
                .is_none_or(|o| o.version != r.version)
        })
        .map(|r| r.name.clone())
        .collect();
    out.extend(
        a.resources
            .keys()
            .filter(|n| !b.resources.contains_key(*n))
            .cloned(),
    );
    out
}

/// Starts the single writer of snapshots: translates every config the watch yields and
/// publishes it. Readers (xDS streams) get the latest snapshot from the returned receiver.
/// The task ends when the config sender is dropped.
pub fn spawn_translator(
    mut config: watch::Receiver<Arc<Config>>,
) -> (watch::Receiver<Arc<Snapshot>>, tokio::task::JoinHandle<()>) {
    let mut current = config.borrow_and_update().clone();
    let first = build(&current, 1);
    tracing::info!(
        resources = first.len(),
        "xds: translated the registry into the first snapshot"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    let task = tokio::spawn(async move {
        let mut generation = 1;
        while config.changed().await.is_ok() {
            let cfg = config.borrow_and_update().clone();
            let prev = tx.borrow().clone();
            let next = build_from(&cfg, Some((&current, &prev)), generation + 1);
            current = cfg;
            if prev.types == next.types {
                continue;
            }
            generation += 1;
            tracing::info!(
                generation,
                clusters = next.of(ResourceType::Cluster).resources.len(),
                listeners = next.of(ResourceType::Listener).resources.len(),
                "xds: registry changed, publishing a new snapshot"
            );
            tx.send_replace(Arc::new(next));
        }
    });
    (rx, task)
}
