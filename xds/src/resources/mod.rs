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
use prost::{DecodeError, Message, Name};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use registry::config::Config;

use crate::type_url;

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
            ResourceType::Cluster => type_url::CLUSTER,
            ResourceType::Endpoint => type_url::ENDPOINT,
            ResourceType::Listener => type_url::LISTENER,
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
        match s {
            type_url::CLUSTER => Ok(ResourceType::Cluster),
            type_url::ENDPOINT => Ok(ResourceType::Endpoint),
            type_url::LISTENER => Ok(ResourceType::Listener),
            _ => Err(UnknownTypeUrl {
                type_url: s.to_owned(),
            }),
        }
    }
}

/// One encoded resource with its content version. Two resources are equal when their
/// names and versions are (the encoding of protobuf maps varies, the content does not).
///
/// Only the encoded bytes are kept (one copy, shared by every stream); tools and tests read
/// the message back with [`Resource::decode`].
#[derive(Debug, Clone)]
pub struct Resource {
    /// The resource name (`H_cluster`, `outbound`, `dns`).
    pub name: String,
    /// A hash of everything the resource was built from: equal versions mean equal content.
    pub version: String,
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

/// A resource could not be versioned: the domain values it is built from did not
/// serialise, so there is nothing meaningful to hash. The resource is left out of the
/// snapshot (and logged) rather than served under a version that would collide.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot version xDS resource {name:?}: its inputs do not serialise ({source}); it is left out of what ferry serves (this is a ferry bug, please report it)"
)]
pub struct VersionError {
    /// The resource name.
    pub name: String,
    /// The serialisation error.
    pub source: serde_json::Error,
}

impl Resource {
    /// Packs `msg`, versioned by a hash of `inputs` (the domain values it was built from).
    /// Hashing inputs rather than encoded bytes keeps versions stable: protobuf maps
    /// (metadata, `Struct`) encode in no fixed order.
    pub fn new<M: Name, I: Serialize + ?Sized>(
        name: String,
        msg: &M,
        inputs: &I,
    ) -> Result<Self, VersionError> {
        let version = match content_version(M::full_name().as_str(), inputs) {
            Ok(v) => v,
            Err(source) => return Err(VersionError { name, source }),
        };
        let any = Any {
            type_url: M::type_url(),
            value: msg.encode_to_vec(),
        };
        let (wire, any_at) =
            crate::server::wire::encode_resource(&name, &version, &any.encode_to_vec());
        Ok(Resource {
            name,
            version,
            wire: wire.into_boxed_slice(),
            any_at,
        })
    }

    /// The encoded envoy delta `Resource` message (`version`, `resource`, `name`).
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The encoded `Any` (what a SotW response lists).
    pub fn any_wire(&self) -> &[u8] {
        self.wire.get(self.any_at.clone()).unwrap_or_default()
    }

    /// The packed message as an `Any`, decoded from the shared bytes.
    pub fn any(&self) -> Result<Any, DecodeError> {
        Any::decode(self.any_wire())
    }

    /// The message itself, decoded from the shared bytes (for tools and tests; the server
    /// only ever sends the bytes).
    pub fn decode<M: Message + Default>(&self) -> Result<M, DecodeError> {
        M::decode(self.any()?.value.as_slice())
    }
}

/// Feeds what is written into a hash (so inputs are hashed without a JSON copy).
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn content_version<I: Serialize + ?Sized>(
    kind: &str,
    inputs: &I,
) -> Result<String, serde_json::Error> {
    let mut h = Sha256::new();
    h.update(TRANSLATION_REVISION.to_be_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(kind.as_bytes());
    serde_json::to_writer(HashWriter(&mut h), inputs)?;
    let d = h.finalize();
    Ok(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Keeps a built resource, or logs why it could not be built and leaves it out.
fn built(r: Result<Resource, VersionError>) -> Option<Arc<Resource>> {
    match r {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::error!(error = %e, "xds: resource left out");
            None
        }
    }
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
    /// A snapshot of the given resources per type (tests build large synthetic ones).
    #[cfg(test)]
    pub(crate) fn from_resources(generation: u64, types: [Vec<Resource>; 3]) -> Snapshot {
        Snapshot {
            generation,
            types: types.map(|rs| {
                TypeResources::new(
                    rs.into_iter()
                        .map(|r| (r.name.clone(), Arc::new(r)))
                        .collect(),
                )
            }),
            changes: None,
        }
    }

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
            .or_else(|| built(cluster(svc)));
        let e = same
            .then(|| reuse(ResourceType::Endpoint, &name))
            .flatten()
            .or_else(|| built(load_assignment(svc)));
        if let Some(c) = c {
            clusters.insert(name.clone(), c);
        }
        if let Some(e) = e {
            endpoints.insert(name, e);
        }
    }
    if config.agent.listen.outbound_passthrough
        && let Some(c) = built(passthrough_cluster())
    {
        clusters.insert(c.name.clone(), c);
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
            let outbound = outbound_listener(config).transpose();
            for l in [outbound, Some(dns_listener(config))]
                .into_iter()
                .flatten()
                .filter_map(built)
            {
                listeners.insert(l.name.clone(), l);
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
