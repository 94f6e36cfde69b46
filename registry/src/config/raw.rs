//! The YAML shapes exactly as written, before validation. Enums, ports and addresses are
//! kept as plain strings and integers here so that validation can report every mistake
//! at once with its own message, instead of serde stopping at the first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `kind: AgentConfig`, ferry's own format: unknown fields are rejected.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawAgentConfig {
    /// Checked before deserializing; kept so `deny_unknown_fields` accepts it.
    #[allow(dead_code)]
    pub api_version: Option<String>,
    /// Likewise.
    #[allow(dead_code)]
    pub kind: Option<String>,
    #[allow(dead_code)]
    #[serde(default)]
    pub metadata: Option<serde_yaml::Value>,
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub ca: RawCa,
    #[serde(default)]
    pub trust_bundles: BTreeMap<String, RawBundle>,
    #[serde(default)]
    pub registration_entries: Vec<RawEntry>,
    pub vip_range: Option<String>,
    #[serde(default)]
    pub dns: RawDns,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawDns {
    #[serde(default)]
    pub upstreams: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawListen {
    pub xds: Option<String>,
    pub workload_api: Option<String>,
    pub dns: Option<String>,
    pub outbound: Option<String>,
    pub outbound_passthrough: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawCa {
    pub backend: Option<String>,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub tpm: RawTpm,
    pub ca_ttl: Option<String>,
    pub svid_ttl: Option<String>,
    pub jwt_svid_ttl: Option<String>,
    pub fallback: Option<String>,
    pub role: Option<String>,
    pub upstream: Option<String>,
    pub upstream_bundle: Option<PathBuf>,
    pub node_attestation: Option<RawNodeAttestation>,
    pub issuance: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawNodeAttestation {
    pub listen: Option<String>,
    #[serde(default)]
    pub manufacturer_cas: Vec<PathBuf>,
    pub node_ca_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawTpm {
    pub tcti: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawBundle {
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawEntry {
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub selectors: Vec<String>,
    pub hint: Option<String>,
    pub ttl: Option<String>,
}

/// `kind: FederatedService` in the `registry.cofide.io/v1alpha1` CRD shape. Fields the CRD
/// has but ferry does not use are accepted and ignored, as Kubernetes would accept them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawFederatedService {
    #[serde(default)]
    pub metadata: RawMeta,
    pub spec: Option<RawSpec>,
    #[serde(default)]
    pub status: RawStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawSpec {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    #[serde(default)]
    pub exported_trust_domains: Vec<String>,
    #[serde(default)]
    pub workload_labels: BTreeMap<String, String>,
    #[serde(rename = "spiffeIDPaths")]
    pub spiffe_id_paths: Option<Vec<String>>,
    pub tls_mode: Option<String>,
    pub gateways: Option<Vec<RawGateway>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawGateway {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub port: Option<i64>,
    pub hostname: Option<String>,
    pub ip: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawStatus {
    #[serde(default)]
    pub gateway_entries: Vec<RawGateway>,
}
