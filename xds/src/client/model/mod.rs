//! What ferry's data plane (proxy and DNS) needs from xDS, as plain domain types decoded
//! from the standard Envoy resources a Cofide sidecar receives: the data path never touches
//! protobuf, and nothing here reads ferry-only metadata, so ferry's proxy can stand in for
//! Envoy under any control plane that emits this subset.
//!
//! - LDS `outbound`: filter chains matched on destination prefix and port, each ending in a
//!   `tcp_proxy` to one cluster ([`OutboundListener`]);
//! - LDS `dns`: the `dns_filter`'s inline table ([`DnsListener`]);
//! - CDS: clusters with their discovery type and `UpstreamTlsContext` ([`Upstream`]);
//! - EDS: priorities and weights ([`GatewayEndpoint`]).
//!
//! Each resource converts with `TryFrom`; a field ferry cannot honour is a
//! [`ResourceError`] naming the resource and the field, so the client NACKs that resource
//! alone and keeps serving its previous version.

mod cluster;
mod listener;
mod state;

#[cfg(test)]
mod tests;

pub use cluster::{Discovery, Endpoints, GatewayEndpoint, IstioTls, ServerIdMatch, Upstream};
pub use listener::{DnsListener, LdsListener, OutboundChain, OutboundListener};
pub use state::{Route, XdsState};

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// The kinds of resource the client decodes, for error messages an operator can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ResourceKind {
    /// CDS `Cluster`.
    Cluster,
    /// LDS `Listener`.
    Listener,
    /// EDS `ClusterLoadAssignment`.
    Endpoints,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Cluster => "cluster",
            ResourceKind::Listener => "listener",
            ResourceKind::Endpoints => "endpoints",
        })
    }
}

/// Why a resource from the server could not be used. The resource is rejected (NACKed)
/// alone; the others in the same response still apply, and the previous good version of
/// the rejected one keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// The `Any` did not decode as the expected message.
    #[error("resource {name:?} does not decode as {expected}: {reason}")]
    Decode {
        /// The resource name, if known (else `#<index> of <type>`).
        name: String,
        /// The message type expected.
        expected: &'static str,
        /// The protobuf error.
        reason: String,
    },
    /// The resource uses a feature ferry's proxy does not implement; serving it anyway
    /// would route differently from Envoy.
    #[error("{kind} {name:?}: {field} is not supported by ferry proxy{}", detail_suffix(.detail))]
    Unsupported {
        /// What kind of resource.
        kind: ResourceKind,
        /// Its name.
        name: String,
        /// The field path, e.g. `filter_chains[2].filter_chain_match.server_names`.
        field: String,
        /// More about the value (may be empty).
        detail: String,
    },
    /// A field ferry needs is missing or malformed.
    #[error("{kind} {name:?}: {field} is missing or invalid ({detail})")]
    Invalid {
        /// What kind of resource.
        kind: ResourceKind,
        /// Its name.
        name: String,
        /// The field path.
        field: String,
        /// What was wrong.
        detail: String,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

impl ResourceError {
    /// The name of the rejected resource (to keep its previous version serving).
    pub fn resource_name(&self) -> &str {
        match self {
            ResourceError::Decode { name, .. }
            | ResourceError::Unsupported { name, .. }
            | ResourceError::Invalid { name, .. } => name,
        }
    }

    /// The field path named by the error (empty for decode failures).
    pub fn field(&self) -> &str {
        match self {
            ResourceError::Decode { .. } => "",
            ResourceError::Unsupported { field, .. } | ResourceError::Invalid { field, .. } => {
                field
            }
        }
    }
}

/// Builds errors about one resource without repeating its kind and name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    kind: ResourceKind,
    name: &'a str,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(kind: ResourceKind, name: &'a str) -> Self {
        Ctx { kind, name }
    }

    pub(crate) fn unsupported(
        self,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> ResourceError {
        ResourceError::Unsupported {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(
        self,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> ResourceError {
        ResourceError::Invalid {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            detail: detail.into(),
        }
    }

    /// A protobuf `Duration` as a std one; negative or out of range is invalid.
    pub(crate) fn duration(
        self,
        field: &str,
        d: &envoy_types::pb::google::protobuf::Duration,
    ) -> Result<Duration, ResourceError> {
        let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000);
        match (u64::try_from(d.seconds), nanos) {
            (Ok(s), Some(n)) => Ok(Duration::new(s, n)),
            _ => Err(self.invalid(
                field,
                format!("{}s {}ns is not a duration", d.seconds, d.nanos),
            )),
        }
    }
}

/// The message name of a type URL (`type.googleapis.com/a.b.C` -> `a.b.C`).
pub(crate) fn message_name(type_url: &str) -> &str {
    crate::type_url::message_name(type_url)
}
