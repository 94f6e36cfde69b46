//! `filter_metadata["ferry"]` on each cluster: the facts a non-Envoy consumer (ferry's own
//! proxy and DNS) needs that Envoy's own fields do not carry, such as the VIP.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

/// The `filter_metadata` namespace ferry writes.
pub const NAMESPACE: &str = "ferry";
/// Key: the federated hostname (string).
pub const HOSTNAME: &str = "hostname";
/// Key: the service port (number).
pub const PORT: &str = "port";
/// Key: the loopback VIP (string).
pub const VIP: &str = "vip";
/// Key: `Mtls` or `IstioMtls` (string).
pub const TLS_MODE: &str = "tlsMode";

/// A `Struct` value holding a string.
pub fn string(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// A `Struct` value holding a number.
pub fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// Metadata with `fields` under the `ferry` namespace.
pub fn ferry(fields: impl IntoIterator<Item = (&'static str, Value)>) -> Metadata {
    let fields = fields
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect::<HashMap<_, _>>();
    Metadata {
        filter_metadata: HashMap::from([(NAMESPACE.to_owned(), Struct { fields })]),
        ..Default::default()
    }
}

/// The string at `key` in ferry's namespace.
pub fn get_string<'a>(m: Option<&'a Metadata>, key: &str) -> Option<&'a str> {
    match m?
        .filter_metadata
        .get(NAMESPACE)?
        .fields
        .get(key)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

/// The number at `key` in ferry's namespace.
pub fn get_number(m: Option<&Metadata>, key: &str) -> Option<f64> {
    match m?
        .filter_metadata
        .get(NAMESPACE)?
        .fields
        .get(key)?
        .kind
        .as_ref()?
    {
        Kind::NumberValue(n) => Some(*n),
        _ => None,
    }
}
