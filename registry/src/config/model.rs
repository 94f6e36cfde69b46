//! The validated config: what every ferry component reads. Only `load` builds these, so a
//! value of these types has passed every check in `validate`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::hostname::Hostname;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The API version of ferry's own `AgentConfig` document.
pub const AGENT_API_VERSION: &str = "ferry.dev/v1alpha1";
/// The API version of Cofide's `FederatedService` CRD.
pub const FEDERATED_SERVICE_API_VERSION: &str = "registry.cofide.io/v1alpha1";
/// Annotation naming the trust domain of the server behind an imported service.
pub const TRUST_DOMAIN_ANNOTATION: &str = "ferry.dev/trust-domain";

/// One complete, validated config file: the agent's settings plus every imported service,
/// each already given its VIP.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The `AgentConfig` document.
    pub agent: AgentConfig,
    /// The `FederatedService` documents, sorted by hostname.
    pub services: Vec<FederatedService>,
}

impl Config {
    /// The service with this hostname (case-insensitive, trailing dot allowed).
    pub fn service(&self, hostname: &str) -> Option<&FederatedService> {
        let h = Hostname::new(hostname);
        self.services.iter().find(|s| s.hostname == h)
    }

    /// The trust domains other than our own that the config mentions: bundles given and
    /// server trust domains of imported services.
    pub fn federated_trust_domains(&self) -> Vec<TrustDomain> {
        let mut tds: Vec<TrustDomain> = self
            .agent
            .trust_bundles
            .keys()
            .cloned()
            .chain(self.services.iter().map(|s| s.server_trust_domain.clone()))
            .filter(|td| *td != self.agent.trust_domain)
            .collect();
        tds.sort();
        tds.dedup();
        tds
    }
}

/// ferry's own settings for one trust zone (`kind: AgentConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Our own trust domain: the one our CA issues identities in.
    pub trust_domain: TrustDomain,
    /// Where each server listens.
    pub listen: Listen,
    /// The CA behind the Workload API.
    pub ca: CaConfig,
    /// Trust bundles of other trust domains, read from files.
    pub trust_bundles: BTreeMap<TrustDomain, BundleSource>,
    /// Which workloads get which SPIFFE IDs.
    pub registration_entries: Vec<RegistrationEntry>,
    /// The loopback range VIPs are allocated from.
    pub vip_range: Ipv4Net,
    /// Local DNS settings shared by ferry's resolver and the `dns` listener given to Envoy.
    pub dns: DnsSettings,
}

/// DNS settings that must be the same for every resolver serving this zone's names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsSettings {
    /// Where names that are not federated are resolved; empty means the host's
    /// `/etc/resolv.conf` nameservers.
    pub upstreams: Vec<SocketAddr>,
}

/// Listen addresses of the agent's servers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listen {
    /// The xDS (ADS) gRPC server; Cofide's convention is port 18001.
    pub xds: SocketAddr,
    /// The Workload API (and SDS) endpoint.
    pub workload_api: Endpoint,
    /// The local DNS resolver; also the address of the `dns` listener served over LDS.
    pub dns: SocketAddr,
    /// The sidecar's outbound listener (LDS `outbound`); Cofide's convention is port 10000.
    pub outbound: SocketAddr,
    /// Whether the outbound listener forwards loopback connections that are not to a
    /// federated VIP to their original destination (the capture rules send all loopback
    /// TCP there). Off by default: ferry is not an open relay.
    pub outbound_passthrough: bool,
}

/// A gRPC endpoint as SPIFFE_ENDPOINT_SOCKET spells it: `unix:///path` or `tcp://ip:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Endpoint {
    /// A Unix domain socket at this absolute path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

impl Endpoint {
    /// Parses `unix:///abs/path` or `tcp://ip:port` (the forms the SPIFFE Workload API
    /// endpoint spec allows).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(format!(
                    "unix socket path must be absolute (unix:///path), got {s:?}"
                ));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            return a
                .parse::<SocketAddr>()
                .map(Endpoint::Tcp)
                .map_err(|_| format!("tcp endpoint must be tcp://<ip>:<port>, got {s:?}"));
        }
        Err(format!(
            "endpoint must start with unix:// or tcp://, got {s:?}"
        ))
    }
}

/// Where the CA keeps its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaBackend {
    /// Keys in memory, persisted 0600 under `stateDir`.
    Software,
    /// The issuing key lives in a TPM.
    Tpm,
}

impl fmt::Display for CaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaBackend::Software => "software",
            CaBackend::Tpm => "tpm",
        })
    }
}

/// What `ca.backend: tpm` does without a usable TPM. The default refuses to start: a node
/// that silently signs with a software key would defeat the point of the TPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaFallback {
    /// Refuse to start, naming the TCTI and the error.
    None,
    /// Log the TPM error and run with software keys.
    Software,
}

/// The agent's role in the CA hierarchy (issue 12, node attestation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaRole {
    /// Its own root (the default; no attestation).
    Standalone,
    /// The trust domain's root: verifies TPM nodes and signs their node CAs.
    Root,
    /// A node whose TPM-held CA is certified by the root at `ca.upstream` after attestation.
    Node,
}

/// How X.509-SVIDs are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaIssuance {
    /// The CA (TPM) key certifies a short-lived in-memory issuing CA that signs SVIDs (the
    /// default: one TPM signature per issuing CA, not per SVID).
    IssuingCa,
    /// The CA (TPM) key signs every SVID.
    Direct,
}

/// The CA's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaConfig {
    /// Key storage backend.
    pub backend: CaBackend,
    /// Directory holding CA state (certificates, 0600 key files).
    pub state_dir: PathBuf,
    /// The TPM's TCTI string (e.g. `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`).
    pub tpm_tcti: String,
    /// What to do when `backend: tpm` finds no usable TPM (`ca.fallback`).
    pub fallback: CaFallback,
    /// This agent's place in the trust domain's CA hierarchy (`ca.role`).
    pub role: CaRole,
    /// The root agent's node-attestation endpoint (`ca.upstream`, `https://host:port`),
    /// required for `role: node`.
    pub upstream: Option<String>,
    /// The trust domain's root certificates (PEM file, `ca.upstreamBundle`), required for
    /// `role: node`: the node trusts the root's node-attestation endpoint only if its TLS
    /// certificate chains to one of them, and checks its node CA against them.
    pub upstream_bundle: Option<PathBuf>,
    /// How the root verifies TPM nodes (`ca.nodeAttestation`), present exactly with
    /// `role: root`.
    pub node_attestation: Option<NodeAttestation>,
    /// How SVIDs are signed (`ca.issuance`).
    pub issuance: CaIssuance,
    /// Lifetime of CA certificates.
    #[serde(with = "humantime_serde_compat")]
    pub ca_ttl: Duration,
    /// Default lifetime of X.509-SVIDs.
    #[serde(with = "humantime_serde_compat")]
    pub svid_ttl: Duration,
    /// Default lifetime of JWT-SVIDs.
    #[serde(with = "humantime_serde_compat")]
    pub jwt_svid_ttl: Duration,
}

/// The root's node-attestation service (`ca.nodeAttestation`, with `ca.role: root`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAttestation {
    /// Where the gRPC-over-TLS node-attestation API listens.
    pub listen: SocketAddr,
    /// PEM files of the TPM manufacturers' CAs an EK certificate must chain to.
    pub manufacturer_cas: Vec<PathBuf>,
    /// Lifetime of the node CA certificates the root signs (nodes re-attest before
    /// expiry).
    #[serde(with = "humantime_serde_compat")]
    pub node_ca_ttl: Duration,
}

/// Where a federated trust domain's bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleSource {
    /// A file holding PEM certificates or a SPIFFE bundle (JWKS).
    pub file: PathBuf,
}

/// A workload selector, SPIRE unix-attestor style (`unix:uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum Selector {
    /// `unix:uid:<n>`: the caller's user id.
    Uid(u32),
    /// `unix:gid:<n>`: the caller's group id.
    Gid(u32),
    /// `unix:user:<name>`: the caller's user, by name.
    User(String),
    /// `unix:group:<name>`: the caller's group, by name.
    Group(String),
    /// `unix:path:<abs path>`: the caller's executable.
    Path(PathBuf),
    /// `unix:sha256:<hex>`: the SHA-256 of the caller's executable.
    Sha256(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(n) => write!(f, "unix:uid:{n}"),
            Selector::Gid(n) => write!(f, "unix:gid:{n}"),
            Selector::User(n) => write!(f, "unix:user:{n}"),
            Selector::Group(n) => write!(f, "unix:group:{n}"),
            Selector::Path(p) => write!(f, "unix:path:{}", p.display()),
            Selector::Sha256(h) => write!(f, "unix:sha256:{h}"),
        }
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl Selector {
    /// Parses `unix:<type>:<value>`; the error says what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(kind), Some(ty), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "selector must look like unix:<type>:<value>, got {s:?}"
            ));
        };
        if kind != "unix" {
            return Err(format!(
                "unknown selector type {kind:?} in {s:?}: only unix selectors are supported"
            ));
        }
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{s:?}: {ty} must be a number"))
        };
        match ty {
            "uid" => num(value).map(Selector::Uid),
            "gid" => num(value).map(Selector::Gid),
            "user" if !value.is_empty() => Ok(Selector::User(value.to_owned())),
            "group" if !value.is_empty() => Ok(Selector::Group(value.to_owned())),
            "path" if value.starts_with('/') => Ok(Selector::Path(PathBuf::from(value))),
            "sha256" if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(Selector::Sha256(value.to_ascii_lowercase()))
            }
            "user" | "group" | "path" | "sha256" => Err(format!("{s:?}: bad value for unix:{ty}")),
            _ => Err(format!(
                "unknown selector type \"unix:{ty}\" in {s:?}: expected one of unix:uid, unix:gid, unix:user, unix:group, unix:path, unix:sha256"
            )),
        }
    }
}

/// Grants `spiffe_id` to every caller matching all `selectors`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationEntry {
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// All must match the caller.
    pub selectors: Vec<Selector>,
    /// Optional hint passed to the workload with the SVID.
    pub hint: Option<String>,
    /// SVID lifetime overriding the CA default.
    #[serde(with = "humantime_serde_compat::option")]
    pub ttl: Option<Duration>,
}

/// How a client-side proxy carries connections to the service (the CRD's `tlsMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TlsMode {
    /// The app does its own mTLS; ferry forwards the bytes untouched.
    Mtls,
    /// ferry originates mTLS as an Istio peer.
    IstioMtls,
}

/// The CRD spells `tlsMode` exactly `Mtls` or `IstioMtls`; the error says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be Mtls or IstioMtls, got {0:?}")]
pub struct TlsModeError(pub String);

impl std::str::FromStr for TlsMode {
    type Err = TlsModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Mtls" => Ok(TlsMode::Mtls),
            "IstioMtls" => Ok(TlsMode::IstioMtls),
            other => Err(TlsModeError(other.to_owned())),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Mtls => "Mtls",
            TlsMode::IstioMtls => "IstioMtls",
        })
    }
}

/// Which Istio gateway fronts the service remotely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum GatewayType {
    /// `istio-eastwestgateway`: preferred (priority 0).
    #[serde(rename = "istio-eastwestgateway")]
    EastWest,
    /// `istio-ingressgateway`: fallback (priority 1).
    #[serde(rename = "istio-ingressgateway")]
    Ingress,
}

impl fmt::Display for GatewayType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GatewayType::EastWest => "istio-eastwestgateway",
            GatewayType::Ingress => "istio-ingressgateway",
        })
    }
}

/// A gateway's address: a DNS name or an IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayAddress {
    /// Resolved by the consumer.
    Hostname(Hostname),
    /// Used as is.
    Ip(IpAddr),
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayAddress::Hostname(h) => f.write_str(h),
            GatewayAddress::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            GatewayAddress::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A remote gateway through which the service is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    /// Which kind of Istio gateway.
    #[serde(rename = "type")]
    pub kind: GatewayType,
    /// Its port.
    pub port: u16,
    /// Its address.
    pub address: GatewayAddress,
}

/// The server SPIFFE IDs a client accepts for a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ServerIdentity {
    /// Exactly these IDs (from `spiffeIDPaths`).
    Exact(Vec<SpiffeId>),
    /// Any ID in the server's trust domain (`spiffeIDPaths` absent).
    AnyInTrustDomain,
}

/// An imported service: one `FederatedService` document, validated, with its VIP.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FederatedService {
    /// `metadata.name`.
    pub object_name: String,
    /// `metadata.namespace` (default `default`).
    pub object_namespace: String,
    /// `spec.name`.
    pub name: String,
    /// `spec.namespace`.
    pub namespace: String,
    /// `spec.port`.
    pub port: u16,
    /// `spec.exportedTrustDomains`.
    pub exported_trust_domains: Vec<TrustDomain>,
    /// `spec.workloadLabels`.
    pub workload_labels: BTreeMap<String, String>,
    /// `spec.tlsMode`.
    pub tls_mode: TlsMode,
    /// `spec.gateways` if given, else `status.gatewayEntries`.
    pub gateways: Vec<Gateway>,
    /// The trust domain of the server (annotation `ferry.dev/trust-domain`, default ours).
    pub server_trust_domain: TrustDomain,
    /// The identities the server may present.
    pub server_identity: ServerIdentity,
    /// `{name}.{namespace}.{server trust domain}`, lowercase.
    pub hostname: Hostname,
    /// The loopback VIP clients reach the service on.
    pub vip: Ipv4Addr,
}

impl FederatedService {
    /// Istio's SNI for an AUTO_PASSTHROUGH gateway: `outbound_.<port>_._.<hostname>`.
    pub fn istio_sni(&self) -> String {
        format!("outbound_.{}_._.{}", self.port, self.hostname)
    }

    /// The Cofide Agent's cluster name for this service, `<hostname>_cluster`.
    pub fn cluster_name(&self) -> String {
        format!("{}_cluster", self.hostname)
    }
}

/// Serde glue: durations as humantime strings (`1h`, `30s`).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

/// Default values, in one place so docs and code agree.
pub mod defaults {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
    use std::time::Duration;

    /// xDS: Cofide's port 18001 on loopback.
    pub const XDS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18001));
    /// Workload API socket.
    pub const WORKLOAD_API: &str = "unix:///run/ferry/agent.sock";
    /// DNS resolver: the Cofide/Istio port 15053 on loopback.
    pub const DNS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053));
    /// Sidecar outbound listener: the Cofide port 10000 on all addresses.
    pub const OUTBOUND: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 10000));
    /// CA state directory.
    pub const STATE_DIR: &str = "/var/lib/ferry";
    /// The root's node-attestation API (`ca.nodeAttestation.listen`).
    pub const NODE_ATTESTATION: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 18443));
    /// TPM resource manager device.
    pub const TPM_TCTI: &str = "device:/dev/tpmrm0";
    /// SPIRE's default CA lifetime.
    pub const CA_TTL: Duration = Duration::from_secs(24 * 3600);
    /// SPIRE's default X.509-SVID lifetime.
    pub const SVID_TTL: Duration = Duration::from_secs(3600);
    /// SPIRE's default JWT-SVID lifetime.
    pub const JWT_SVID_TTL: Duration = Duration::from_secs(300);
    /// VIP range: a /12 of loopback, far from 127.0.0.1.
    pub const VIP_RANGE: &str = "127.240.0.0/12";
}
