//! Turns the raw YAML documents into a validated [`Config`], collecting every mistake
//! (with its file, line, column and field path) instead of stopping at the first.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::Diagnostic;
use super::model::*;
use super::positions::{self, DocPositions, Position};
use super::raw::*;
use crate::hostname::Hostname;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::vip;

/// Collects diagnostics for one file.
struct Ctx<'a> {
    file: &'a Path,
    base_dir: &'a Path,
    docs: Vec<DocPositions>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn diag(&self, doc: usize, path: &str, message: String) -> Diagnostic {
        let position = self
            .docs
            .get(doc)
            .map(|d| d.find(path))
            .unwrap_or(Position { line: 1, column: 1 });
        Diagnostic {
            file: self.file.to_owned(),
            position,
            path: path.to_owned(),
            message,
        }
    }

    fn err(&mut self, doc: usize, path: &str, message: impl Into<String>) {
        let d = self.diag(doc, path, message.into());
        self.errors.push(d);
    }

    fn warn(&mut self, doc: usize, path: &str, message: impl Into<String>) {
        let d = self.diag(doc, path, message.into());
        self.warnings.push(d);
    }

    fn required<T>(&mut self, doc: usize, path: &str, v: Option<T>) -> Option<T> {
        if v.is_none() {
            self.err(doc, path, "required field is missing");
        }
        v
    }

    fn port(&mut self, doc: usize, path: &str, v: Option<i64>) -> Option<u16> {
        let v = self.required(doc, path, v)?;
        match u16::try_from(v) {
            Ok(p) if p != 0 => Some(p),
            _ => {
                self.err(doc, path, format!("must be 1-65535, got {v}"));
                None
            }
        }
    }

    fn duration(&mut self, doc: usize, path: &str, v: Option<&str>, default: Duration) -> Duration {
        let Some(s) = v else { return default };
        match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(doc, path, "must be longer than zero");
                default
            }
            Err(e) => {
                self.err(
                    doc,
                    path,
                    format!("not a duration like 30s, 1h or 24h ({e}), got {s:?}"),
                );
                default
            }
        }
    }

    fn socket_addr(
        &mut self,
        doc: usize,
        path: &str,
        v: Option<&str>,
        default: SocketAddr,
    ) -> SocketAddr {
        let Some(s) = v else { return default };
        s.parse().unwrap_or_else(|_| {
            self.err(doc, path, format!("must be an ip:port address, got {s:?}"));
            default
        })
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// What `build` yields: the config and any warnings.
pub(crate) type Built = (Config, Vec<Diagnostic>);

/// Parses and validates `src` (the contents of `file`); relative paths in it are taken
/// relative to `base_dir`.
pub(crate) fn build(src: &str, file: &Path, base_dir: &Path) -> Result<Built, Vec<Diagnostic>> {
    let docs = match positions::index(src) {
        Ok(d) => d,
        Err((position, message)) => {
            return Err(vec![Diagnostic {
                file: file.to_owned(),
                position,
                path: String::new(),
                message: format!("YAML syntax error: {message}"),
            }]);
        }
    };
    let mut cx = Ctx {
        file,
        base_dir,
        docs,
        errors: Vec::new(),
        warnings: Vec::new(),
    };

    let mut agents: Vec<(usize, RawAgentConfig)> = Vec::new();
    let mut services: Vec<(usize, RawFederatedService)> = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(src).enumerate() {
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                let mut d = cx.diag(i, "", format!("YAML error: {e}"));
                if let Some(loc) = e.location() {
                    d.position = Position {
                        line: loc.line(),
                        column: loc.column(),
                    };
                }
                cx.errors.push(d);
                // A scanner error leaves the document stream where it was: serde_yaml's
                // iterator then yields the same error forever (found by the config_load
                // fuzz target: one 0x1A byte grew the error list until memory ran out).
                // Nothing after a broken document can be read reliably; stop here.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let (kind, api) = (field("kind"), field("apiVersion"));
        match kind.as_deref() {
            Some("AgentConfig") => {
                check_api_version(&mut cx, i, api.as_deref(), AGENT_API_VERSION);
                if let Some(raw) = typed(&mut cx, i, value) {
                    agents.push((i, raw));
                }
            }
            Some("FederatedService") => {
                check_api_version(&mut cx, i, api.as_deref(), FEDERATED_SERVICE_API_VERSION);
                if let Some(raw) = typed(&mut cx, i, value) {
                    services.push((i, raw));
                }
            }
            Some(other) => cx.err(
                i,
                "kind",
                format!("unknown kind {other:?}: expected AgentConfig or FederatedService"),
            ),
            None => cx.err(
                i,
                "kind",
                "required field is missing (AgentConfig or FederatedService)",
            ),
        }
    }

    let agent = match agents.as_slice() {
        [] => {
            if cx.errors.is_empty() {
                cx.err(0, "", "no AgentConfig document: one `kind: AgentConfig` with `trustDomain` is required");
            }
            None
        }
        [(i, raw), rest @ ..] => {
            for (j, _) in rest {
                cx.err(
                    *j,
                    "kind",
                    format!(
                        "only one AgentConfig is allowed (the first is document {})",
                        i + 1
                    ),
                );
            }
            agent_config(&mut cx, *i, raw)
        }
    };

    // Services are checked even when the AgentConfig is invalid, so that every mistake is
    // reported at once; without a valid own trust domain, a placeholder stands in for
    // hostnames of services that do not name their server's trust domain (the result is
    // an error either way, so the placeholder never escapes).
    let placeholder = TrustDomain::parse("agent-config-invalid.invalid").ok();
    let scope = match &agent {
        Some(a) => Some((&a.trust_domain, a.vip_range)),
        None => placeholder
            .as_ref()
            .zip(defaults::VIP_RANGE.parse::<Ipv4Net>().ok()),
    };
    let mut built = Vec::new();
    if let Some((own, vip_range)) = scope {
        let mut seen: BTreeMap<Hostname, usize> = BTreeMap::new();
        for (i, raw) in &services {
            if let Some(svc) = federated_service(&mut cx, *i, raw, own) {
                if let Some(first) = seen.get(&svc.hostname) {
                    let line = cx
                        .docs
                        .get(*first)
                        .map(|d| d.find("spec").line)
                        .unwrap_or(0);
                    cx.err(
                        *i,
                        "spec.name",
                        format!(
                            "duplicate hostname {} (already defined at line {line})",
                            svc.hostname
                        ),
                    );
                    continue;
                }
                seen.insert(svc.hostname.clone(), *i);
                built.push(svc);
            }
        }
        match vip::allocate(vip_range, built.iter().map(|s| s.hostname.as_str())) {
            Ok(vips) => {
                for s in &mut built {
                    if let Some(v) = vips.get(s.hostname.as_str()) {
                        s.vip = *v;
                    }
                }
            }
            Err(e) => {
                let doc = agents.first().map(|(i, _)| *i).unwrap_or(0);
                cx.err(doc, "vipRange", e.to_string());
            }
        }
    }

    match agent {
        Some(agent) if cx.errors.is_empty() => {
            built.sort_by(|a, b| a.hostname.cmp(&b.hostname));
            Ok((
                Config {
                    agent,
                    services: built,
                },
                cx.warnings,
            ))
        }
        _ => {
            cx.errors
                .sort_by_key(|d| (d.position.line, d.position.column));
            Err(cx.errors)
        }
    }
}

fn check_api_version(cx: &mut Ctx, doc: usize, got: Option<&str>, want: &str) {
    match got {
        Some(v) if v == want => {}
        Some(v) => cx.err(doc, "apiVersion", format!("must be {want}, got {v:?}")),
        None => cx.err(
            doc,
            "apiVersion",
            format!("required field is missing (must be {want})"),
        ),
    }
}

/// Deserializes a document into its raw shape; a type mistake is reported at its field.
fn typed<T: serde::de::DeserializeOwned>(
    cx: &mut Ctx,
    doc: usize,
    value: serde_yaml::Value,
) -> Option<T> {
    match serde_path_to_error::deserialize(value) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            cx.err(doc, &path, e.into_inner().to_string());
            None
        }
    }
}

fn agent_config(cx: &mut Ctx, i: usize, raw: &RawAgentConfig) -> Option<AgentConfig> {
    let trust_domain = cx
        .required(i, "trustDomain", raw.trust_domain.as_deref())
        .and_then(|s| match TrustDomain::parse(s) {
            Ok(td) => Some(td),
            Err(e) => {
                cx.err(i, "trustDomain", format!("invalid trust domain {s:?}: {e}"));
                None
            }
        });

    let l = &raw.listen;
    let xds = cx.socket_addr(i, "listen.xds", l.xds.as_deref(), defaults::XDS);
    let dns = cx.socket_addr(i, "listen.dns", l.dns.as_deref(), defaults::DNS);
    let outbound = cx.socket_addr(
        i,
        "listen.outbound",
        l.outbound.as_deref(),
        defaults::OUTBOUND,
    );
    let workload_api =
        match Endpoint::parse(l.workload_api.as_deref().unwrap_or(defaults::WORKLOAD_API)) {
            Ok(e) => e,
            Err(msg) => {
                cx.err(i, "listen.workloadApi", msg);
                Endpoint::Unix(PathBuf::from("/run/ferry/agent.sock"))
            }
        };

    let c = &raw.ca;
    let backend = match c.backend.as_deref() {
        None | Some("software") => CaBackend::Software,
        Some("tpm") => CaBackend::Tpm,
        Some(other) => {
            cx.err(
                i,
                "ca.backend",
                format!("must be software or tpm, got {other:?}"),
            );
            CaBackend::Software
        }
    };
    let tpm_tcti = c
        .tpm
        .tcti
        .clone()
        .unwrap_or_else(|| defaults::TPM_TCTI.to_owned());
    if tpm_tcti.trim().is_empty() {
        cx.err(i, "ca.tpm.tcti", "must not be empty");
    } else if !["device", "tabrmd", "swtpm", "mssim"]
        .iter()
        .any(|k| tpm_tcti == *k || tpm_tcti.starts_with(&format!("{k}:")))
    {
        cx.err(
            i,
            "ca.tpm.tcti",
            format!(
                "must be device:<path>, tabrmd[:<conf>], swtpm:host=<h>,port=<p> or mssim:host=<h>,port=<p>, got {tpm_tcti:?}"
            ),
        );
    }
    let fallback = match c.fallback.as_deref() {
        None | Some("none") => CaFallback::None,
        Some("software") => CaFallback::Software,
        Some(other) => {
            cx.err(
                i,
                "ca.fallback",
                format!("must be none or software, got {other:?}"),
            );
            CaFallback::None
        }
    };
    if fallback == CaFallback::Software && backend != CaBackend::Tpm {
        cx.err(i, "ca.fallback", "only applies to ca.backend: tpm");
    }
    if fallback == CaFallback::Software && c.role.as_deref() == Some("node") {
        cx.err(
            i,
            "ca.fallback",
            "software does not apply to ca.role: node (the root certifies only TPM-held node CAs)",
        );
    }
    let role = match c.role.as_deref() {
        None | Some("standalone") => CaRole::Standalone,
        Some("root") => CaRole::Root,
        Some("node") => CaRole::Node,
        Some(other) => {
            cx.err(
                i,
                "ca.role",
                format!("must be standalone, root or node, got {other:?}"),
            );
            CaRole::Standalone
        }
    };
    let upstream = c.upstream.clone();
    match (&upstream, role) {
        (None, CaRole::Node) => cx.err(
            i,
            "ca.upstream",
            "is required with ca.role: node (the root's node-attestation address, https://host:port)",
        ),
        (Some(_), CaRole::Standalone | CaRole::Root) => cx.err(
            i,
            "ca.upstream",
            "only applies to ca.role: node",
        ),
        (Some(u), CaRole::Node) if !u.starts_with("https://") || u.len() <= "https://".len() => {
            cx.err(i, "ca.upstream", format!("must be https://host:port, got {u:?}"))
        }
        _ => {}
    }
    let ca_ttl = cx.duration(i, "ca.caTtl", c.ca_ttl.as_deref(), defaults::CA_TTL);
    let upstream_bundle = c.upstream_bundle.as_deref().map(|p| cx.resolve(p));
    match (&upstream_bundle, role) {
        (None, CaRole::Node) => cx.err(
            i,
            "ca.upstreamBundle",
            "is required with ca.role: node (a PEM file with the trust domain's root certificates: the node trusts the root's TLS certificate and its node CA only under them)",
        ),
        (Some(_), CaRole::Standalone | CaRole::Root) => cx.err(
            i,
            "ca.upstreamBundle",
            "only applies to ca.role: node",
        ),
        _ => {}
    }
    let node_attestation = match (&c.node_attestation, role) {
        (None, CaRole::Root) => {
            cx.err(
                i,
                "ca.nodeAttestation",
                "is required with ca.role: root (at least manufacturerCas: the TPM manufacturer CA PEM files EK certificates must chain to)",
            );
            None
        }
        (Some(_), CaRole::Standalone | CaRole::Node) => {
            cx.err(i, "ca.nodeAttestation", "only applies to ca.role: root");
            None
        }
        (Some(n), CaRole::Root) => {
            let listen = cx.socket_addr(
                i,
                "ca.nodeAttestation.listen",
                n.listen.as_deref(),
                defaults::NODE_ATTESTATION,
            );
            if n.manufacturer_cas.is_empty() {
                cx.err(
                    i,
                    "ca.nodeAttestation.manufacturerCas",
                    "must name at least one PEM file (the TPM manufacturers' CAs; without one no node can attest)",
                );
            }
            let manufacturer_cas = n.manufacturer_cas.iter().map(|p| cx.resolve(p)).collect();
            let node_ca_ttl = cx.duration(
                i,
                "ca.nodeAttestation.nodeCaTtl",
                n.node_ca_ttl.as_deref(),
                ca_ttl,
            );
            Some(NodeAttestation {
                listen,
                manufacturer_cas,
                node_ca_ttl,
            })
        }
        (None, _) => None,
    };
    if role == CaRole::Node && backend != CaBackend::Tpm {
        cx.err(
            i,
            "ca.role",
            "node needs ca.backend: tpm (the root certifies a TPM-held node CA)",
        );
    }
    let issuance = match c.issuance.as_deref() {
        None | Some("issuing-ca") => CaIssuance::IssuingCa,
        Some("direct") => CaIssuance::Direct,
        Some(other) => {
            cx.err(
                i,
                "ca.issuance",
                format!("must be issuing-ca or direct, got {other:?}"),
            );
            CaIssuance::IssuingCa
        }
    };
    let ca = CaConfig {
        backend,
        fallback,
        role,
        upstream,
        upstream_bundle,
        node_attestation,
        issuance,
        state_dir: cx.resolve(
            c.state_dir
                .as_deref()
                .unwrap_or(Path::new(defaults::STATE_DIR)),
        ),
        tpm_tcti,
        ca_ttl,
        svid_ttl: cx.duration(i, "ca.svidTtl", c.svid_ttl.as_deref(), defaults::SVID_TTL),
        jwt_svid_ttl: cx.duration(
            i,
            "ca.jwtSvidTtl",
            c.jwt_svid_ttl.as_deref(),
            defaults::JWT_SVID_TTL,
        ),
    };

    let mut trust_bundles = BTreeMap::new();
    for (td, b) in &raw.trust_bundles {
        let path = format!("trustBundles.{td}");
        let td = match TrustDomain::parse(td) {
            Ok(td) => td,
            Err(e) => {
                cx.err(i, &path, format!("invalid trust domain {td:?}: {e}"));
                continue;
            }
        };
        let Some(file) = cx.required(i, &format!("{path}.file"), b.file.as_deref()) else {
            continue;
        };
        let file = cx.resolve(file);
        if let Err(msg) = check_bundle_file(&file) {
            cx.err(i, &format!("{path}.file"), msg);
        }
        trust_bundles.insert(td, BundleSource { file });
    }

    let mut registration_entries = Vec::new();
    for (n, e) in raw.registration_entries.iter().enumerate() {
        let path = format!("registrationEntries[{n}]");
        let id = cx
            .required(i, &format!("{path}.spiffeId"), e.spiffe_id.as_deref())
            .and_then(|s| match SpiffeId::parse(s) {
                Ok(id) => Some(id),
                Err(err) => {
                    cx.err(
                        i,
                        &format!("{path}.spiffeId"),
                        format!("invalid SPIFFE ID {s:?}: {err}"),
                    );
                    None
                }
            });
        if let (Some(id), Some(td)) = (&id, &trust_domain)
            && id.trust_domain() != td
        {
            cx.err(
                i,
                &format!("{path}.spiffeId"),
                format!("{id} is not in this agent's trust domain {td}"),
            );
        }
        if e.selectors.is_empty() {
            cx.err(
                i,
                &format!("{path}.selectors"),
                "at least one selector is required",
            );
        }
        let mut selectors = Vec::new();
        for (k, s) in e.selectors.iter().enumerate() {
            match Selector::parse(s) {
                Ok(sel) => selectors.push(sel),
                Err(msg) => cx.err(i, &format!("{path}.selectors[{k}]"), msg),
            }
        }
        let ttl = e
            .ttl
            .as_deref()
            .map(|t| cx.duration(i, &format!("{path}.ttl"), Some(t), defaults::SVID_TTL));
        if let Some(spiffe_id) = id {
            registration_entries.push(RegistrationEntry {
                spiffe_id,
                selectors,
                hint: e.hint.clone(),
                ttl,
            });
        }
    }

    let vip_range = match raw
        .vip_range
        .as_deref()
        .unwrap_or(defaults::VIP_RANGE)
        .parse::<Ipv4Net>()
    {
        Ok(r) => r,
        Err(_) => {
            cx.err(
                i,
                "vipRange",
                format!(
                    "must be an IPv4 CIDR such as {}, got {:?}",
                    defaults::VIP_RANGE,
                    raw.vip_range
                ),
            );
            // Keep checking the rest of the document against the default range.
            defaults::VIP_RANGE.parse::<Ipv4Net>().ok()?
        }
    };

    let mut dns_settings = DnsSettings::default();
    for (n, u) in raw.dns.upstreams.iter().enumerate() {
        let parsed = u
            .parse::<SocketAddr>()
            .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
        match parsed {
            Ok(a) => dns_settings.upstreams.push(a),
            Err(_) => cx.err(
                i,
                &format!("dns.upstreams[{n}]"),
                format!("must be an IP or ip:port (port 53 when omitted), got {u:?}"),
            ),
        }
    }

    Some(AgentConfig {
        trust_domain: trust_domain?,
        listen: Listen {
            xds,
            workload_api,
            dns,
            outbound,
            outbound_passthrough: l.outbound_passthrough.unwrap_or(false),
        },
        ca,
        trust_bundles,
        registration_entries,
        vip_range,
        dns: dns_settings,
    })
}

/// A bundle file must be readable and hold PEM certificates or a SPIFFE bundle (JWKS).
fn check_bundle_file(file: &Path) -> Result<(), String> {
    let bytes = std::fs::read(file)
        .map_err(|e| format!("cannot read bundle file {}: {e}", file.display()))?;
    crate::bundle::detect(&bytes)
        .map(|_| ())
        .map_err(|e| format!("bundle file {} {e}", file.display()))
}

fn federated_service(
    cx: &mut Ctx,
    i: usize,
    raw: &RawFederatedService,
    own: &TrustDomain,
) -> Option<FederatedService> {
    let errors_before = cx.errors.len();
    let spec = cx.required(i, "spec", raw.spec.as_ref())?;
    let name = dns_label(cx, i, "spec.name", spec.name.as_deref());
    let namespace = dns_label(cx, i, "spec.namespace", spec.namespace.as_deref());
    let port = cx.port(i, "spec.port", spec.port);
    let tls_mode = cx
        .required(i, "spec.tlsMode", spec.tls_mode.as_deref())
        .and_then(|m| match m.parse::<TlsMode>() {
            Ok(m) => Some(m),
            Err(e) => {
                cx.err(i, "spec.tlsMode", e.to_string());
                None
            }
        });

    let annotation_path = format!("metadata.annotations.{TRUST_DOMAIN_ANNOTATION}");
    let server_trust_domain = match raw.metadata.annotations.get(TRUST_DOMAIN_ANNOTATION) {
        None => own.clone(),
        Some(s) => match TrustDomain::parse(s) {
            Ok(td) => td,
            Err(e) => {
                cx.err(
                    i,
                    &annotation_path,
                    format!("invalid trust domain {s:?}: {e}"),
                );
                own.clone()
            }
        },
    };

    let mut exported_trust_domains = Vec::new();
    for (n, td) in spec.exported_trust_domains.iter().enumerate() {
        match TrustDomain::parse(td) {
            Ok(td) => exported_trust_domains.push(td),
            Err(e) => cx.err(
                i,
                &format!("spec.exportedTrustDomains[{n}]"),
                format!("invalid trust domain {td:?}: {e}"),
            ),
        }
    }

    let server_identity = match &spec.spiffe_id_paths {
        None => {
            cx.warn(
                i,
                "spec",
                format!("spec.spiffeIDPaths is missing: any SPIFFE ID of trust domain {server_trust_domain} will be accepted as the server"),
            );
            ServerIdentity::AnyInTrustDomain
        }
        Some(paths) if paths.is_empty() => {
            cx.err(i, "spec.spiffeIDPaths", "must have at least 1 item");
            ServerIdentity::AnyInTrustDomain
        }
        Some(paths) => {
            let mut ids = Vec::new();
            for (n, p) in paths.iter().enumerate() {
                match server_trust_domain.id(p) {
                    Ok(id) => ids.push(id),
                    Err(e) => cx.err(
                        i,
                        &format!("spec.spiffeIDPaths[{n}]"),
                        format!("{p:?} does not make a valid SPIFFE ID: {e}"),
                    ),
                }
            }
            ServerIdentity::Exact(ids)
        }
    };

    let mut gateways = gateways(
        cx,
        i,
        "spec.gateways",
        spec.gateways.as_deref().unwrap_or_default(),
    );
    if gateways.is_empty() {
        gateways = gateways_from_status(cx, i, &raw.status.gateway_entries);
    }
    let hostname = match (&name, &namespace) {
        (Some(n), Some(ns)) => Hostname::new(&format!("{n}.{ns}.{server_trust_domain}")),
        _ => Hostname::default(),
    };
    if gateways.is_empty() && !hostname.is_empty() {
        cx.warn(i, "spec", format!("{hostname} has no gateways yet (spec.gateways and status.gatewayEntries are empty): it gets a VIP but no endpoints"));
    }

    if cx.errors.len() != errors_before {
        return None;
    }
    Some(FederatedService {
        object_name: raw.metadata.name.clone().unwrap_or_default(),
        object_namespace: raw
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: name?,
        namespace: namespace?,
        port: port?,
        exported_trust_domains,
        workload_labels: spec.workload_labels.clone(),
        tls_mode: tls_mode?,
        gateways,
        server_trust_domain,
        server_identity,
        hostname,
        vip: std::net::Ipv4Addr::UNSPECIFIED,
    })
}

fn gateways_from_status(cx: &mut Ctx, i: usize, raw: &[RawGateway]) -> Vec<Gateway> {
    gateways(cx, i, "status.gatewayEntries", raw)
}

fn gateways(cx: &mut Ctx, i: usize, base: &str, raw: &[RawGateway]) -> Vec<Gateway> {
    let mut out = Vec::new();
    for (n, g) in raw.iter().enumerate() {
        let path = format!("{base}[{n}]");
        let kind = match cx.required(i, &format!("{path}.type"), g.kind.as_deref()) {
            Some("istio-eastwestgateway") => Some(GatewayType::EastWest),
            Some("istio-ingressgateway") => Some(GatewayType::Ingress),
            Some(other) => {
                cx.err(
                    i,
                    &format!("{path}.type"),
                    format!("must be istio-ingressgateway or istio-eastwestgateway, got {other:?}"),
                );
                None
            }
            None => None,
        };
        let port = cx.port(i, &format!("{path}.port"), g.port);
        let address = match (g.hostname.as_deref(), g.ip.as_deref()) {
            (Some(_), Some(_)) => {
                cx.err(i, &path, "set exactly one of hostname and ip, not both");
                None
            }
            (None, None) => {
                cx.err(i, &path, "one of hostname or ip is required");
                None
            }
            (Some(h), None) => match Hostname::parse(h) {
                Ok(h) => Some(GatewayAddress::Hostname(h)),
                Err(e) => {
                    cx.err(i, &format!("{path}.hostname"), e.to_string());
                    None
                }
            },
            (None, Some(ip)) => match ip.parse::<IpAddr>() {
                Ok(ip) => Some(GatewayAddress::Ip(ip)),
                Err(_) => {
                    cx.err(
                        i,
                        &format!("{path}.ip"),
                        format!("not an IP address: {ip:?}"),
                    );
                    None
                }
            },
        };
        if let (Some(kind), Some(port), Some(address)) = (kind, port, address) {
            out.push(Gateway {
                kind,
                port,
                address,
            });
        }
    }
    out
}

/// `spec.name` and `spec.namespace` become DNS labels of the hostname.
fn dns_label(cx: &mut Ctx, i: usize, path: &str, v: Option<&str>) -> Option<String> {
    let v = cx.required(i, path, v)?;
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Some(v.to_owned())
    } else {
        cx.err(
            i,
            path,
            format!(
                "must be a DNS label (lowercase letters, digits and '-', at most 63), got {v:?}"
            ),
        );
        None
    }
}
