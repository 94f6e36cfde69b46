//! The one builder of ferry config files for tests: an `AgentConfig` document built field
//! by field ([`AgentDoc`]) and `FederatedService` documents ([`service_doc`]), rendered as
//! the YAML a user would write, so tests exercise the real loader.

use std::fmt::Display;
use std::path::Path;

/// One registration entry: a SPIFFE ID, its selectors and an optional hint (fields public
/// so tests can write it as a literal).
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// `spiffeId`.
    pub id: &'a str,
    /// `selectors`, e.g. `unix:uid:1000`.
    pub selectors: Vec<String>,
    /// `hint`.
    pub hint: Option<&'a str>,
}

impl<'a> Entry<'a> {
    /// An entry for `id` with `selectors` and no hint.
    pub fn new<S: Into<String>>(id: &'a str, selectors: impl IntoIterator<Item = S>) -> Self {
        Self {
            id,
            selectors: selectors.into_iter().map(Into::into).collect(),
            hint: None,
        }
    }

    /// The same entry with a hint.
    pub fn hint(mut self, hint: &'a str) -> Self {
        self.hint = Some(hint);
        self
    }
}

/// An `AgentConfig` document under construction.
#[derive(Debug, Clone)]
pub struct AgentDoc {
    trust_domain: String,
    listen: Vec<(String, String)>,
    ca: Vec<(String, String)>,
    bundles: Vec<(String, String)>,
    entries: Vec<(String, Vec<String>, Option<String>)>,
    extra: String,
}

impl AgentDoc {
    /// A document for `trust_domain` with every other setting at its default.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            listen: Vec::new(),
            ca: Vec::new(),
            bundles: Vec::new(),
            entries: Vec::new(),
            extra: String::new(),
        }
    }

    /// The Workload API agent layout of a test dir: the socket at `<dir>/agent.sock` and CA
    /// state in `<dir>/ca`.
    pub fn in_dir(trust_domain: &str, dir: &Path) -> Self {
        Self::new(trust_domain)
            .listen(
                "workloadApi",
                format!("unix://{}/agent.sock", dir.display()),
            )
            .ca("stateDir", format!("{}/ca", dir.display()))
    }

    /// `listen.<key>: value` (e.g. `xds`, `dns`, `outbound`, `workloadApi`).
    pub fn listen(mut self, key: &str, value: impl Display) -> Self {
        self.listen.push((key.to_owned(), value.to_string()));
        self
    }

    /// `ca.<key>: value` (e.g. `stateDir`, `caTtl`, `svidTtl`).
    pub fn ca(mut self, key: &str, value: impl Display) -> Self {
        self.ca.push((key.to_owned(), value.to_string()));
        self
    }

    /// `trustBundles.<td>.file: path`.
    pub fn bundle(mut self, trust_domain: &str, file: &Path) -> Self {
        self.bundles
            .push((trust_domain.to_owned(), file.display().to_string()));
        self
    }

    /// One more registration entry.
    pub fn entry(mut self, e: &Entry<'_>) -> Self {
        self.entries.push((
            e.id.to_owned(),
            e.selectors.clone(),
            e.hint.map(str::to_owned),
        ));
        self
    }

    /// Top-level YAML appended verbatim (e.g. `vipRange: ...\n`), for settings without a
    /// builder method.
    pub fn raw(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    /// The document as YAML.
    pub fn render(&self) -> String {
        let mut y = format!(
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: {}\n",
            self.trust_domain
        );
        for (section, fields) in [("listen", &self.listen), ("ca", &self.ca)] {
            if !fields.is_empty() {
                y.push_str(section);
                y.push_str(":\n");
                for (k, v) in fields {
                    y.push_str(&format!("  {k}: {v}\n"));
                }
            }
        }
        if !self.bundles.is_empty() {
            y.push_str("trustBundles:\n");
            for (td, f) in &self.bundles {
                y.push_str(&format!("  {td}:\n    file: {f}\n"));
            }
        }
        if !self.entries.is_empty() {
            y.push_str("registrationEntries:\n");
            for (id, selectors, hint) in &self.entries {
                let sels: Vec<String> = selectors.iter().map(|s| format!("\"{s}\"")).collect();
                y.push_str(&format!(
                    "  - spiffeId: {id}\n    selectors: [{}]\n",
                    sels.join(", ")
                ));
                if let Some(h) = hint {
                    y.push_str(&format!("    hint: {h}\n"));
                }
            }
        }
        y.push_str(&self.extra);
        y
    }
}

/// One gateway of a service: (`istio-eastwestgateway` | `istio-ingressgateway`, `ip:` or
/// `hostname:` value, port).
pub struct Gw<'a>(pub &'a str, pub &'a str, pub u16);

/// A `FederatedService` document (starting with `---`) for `<name>.demo.local.domain`,
/// exported to `client.domain`, server identity `/ns/demo/sa/<name>`.
pub fn service_doc(name: &str, port: u16, tls_mode: &str, gateways: &[Gw<'_>]) -> String {
    let mut s = format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations:\n    ferry.dev/trust-domain: local.domain\nspec:\n  name: {name}\n  namespace: demo\n  port: {port}\n  exportedTrustDomains: [client.domain]\n  spiffeIDPaths: [/ns/demo/sa/{name}]\n  tlsMode: {tls_mode}\n"
    );
    if !gateways.is_empty() {
        s.push_str("  gateways:\n");
        for Gw(kind, addr, port) in gateways {
            let key = if addr.parse::<std::net::IpAddr>().is_ok() {
                "ip"
            } else {
                "hostname"
            };
            s.push_str(&format!(
                "    - type: {kind}\n      port: {port}\n      {key}: {addr}\n"
            ));
        }
    }
    s
}

/// The federated hostname of `service_doc(name, ..)`.
pub fn host(name: &str) -> String {
    format!("{name}.demo.local.domain")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_shape() {
        let y = AgentDoc::in_dir("example.org", Path::new("/d"))
            .ca("svidTtl", "1h")
            .bundle("other.org", Path::new("/b/o.pem"))
            .entry(&Entry::new("spiffe://example.org/a", ["unix:uid:1"]).hint("a"))
            .render();
        assert_eq!(
            y,
            "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: example.org\nlisten:\n  workloadApi: unix:///d/agent.sock\nca:\n  stateDir: /d/ca\n  svidTtl: 1h\ntrustBundles:\n  other.org:\n    file: /b/o.pem\nregistrationEntries:\n  - spiffeId: spiffe://example.org/a\n    selectors: [\"unix:uid:1\"]\n    hint: a\n"
        );
    }
}
