//! The federated name table: hostname -> VIP, with the search-suffix expansions Kubernetes
//! stub resolvers try first. One writer replaces it whole; readers hold an `Arc` snapshot.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Federated hostnames and their VIPs, as the control plane publishes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsTable {
    /// Lowercase, no trailing dot.
    names: HashMap<String, Ipv4Addr>,
}

impl DnsTable {
    /// Builds a table from `(hostname, vip)` pairs; names are case-folded and a trailing dot
    /// is ignored.
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = (S, Ipv4Addr)>) -> Self {
        Self {
            names: entries
                .into_iter()
                .map(|(h, v)| (normalize(h.as_ref()), v))
                .collect(),
        }
    }

    /// The table for a validated ferry config (every federated service's hostname and VIP).
    pub fn from_config(config: &xds::config::Config) -> Self {
        Self::new(config.services.iter().map(|s| (s.hostname.as_str(), s.vip)))
    }

    /// The table the ADS client's current state implies (each cluster's hostname and VIP
    /// from its `ferry` metadata). An empty state (nothing received yet) gives an empty table.
    pub fn from_xds(state: &xds::client::XdsState) -> Self {
        Self::new(
            state
                .services
                .values()
                .map(|s| (s.cluster.hostname.as_str(), s.cluster.vip)),
        )
    }

    /// Number of federated names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no names are federated.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Iterates `(hostname, vip)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Ipv4Addr)> {
        self.names.iter().map(|(h, v)| (h.as_str(), *v))
    }

    /// Looks up `qname` (lowercase, no trailing dot): exactly, or with one of `suffixes`
    /// (e.g. `demo.svc.cluster.local`) removed from its end, as a stub resolver's search
    /// list produces `server.demo.local.domain.demo.svc.cluster.local`.
    pub fn lookup(&self, qname: &str, suffixes: &[String]) -> Option<Ipv4Addr> {
        if let Some(v) = self.names.get(qname) {
            return Some(*v);
        }
        suffixes.iter().find_map(|s| {
            let base = qname.strip_suffix(s.as_str())?.strip_suffix('.')?;
            self.names.get(base).copied()
        })
    }
}

/// Lowercase without the trailing dot: the table's key form.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_case_insensitive_and_search_suffixes() {
        let vip = Ipv4Addr::new(127, 240, 0, 9);
        let t = DnsTable::new([("Server.Demo.Local.Domain.", vip)]);
        let sfx = vec![
            "demo.svc.cluster.local".to_owned(),
            "svc.cluster.local".to_owned(),
        ];
        assert_eq!(t.lookup("server.demo.local.domain", &sfx), Some(vip));
        assert_eq!(
            t.lookup("server.demo.local.domain.demo.svc.cluster.local", &sfx),
            Some(vip)
        );
        assert_eq!(
            t.lookup("server.demo.local.domain.svc.cluster.local", &sfx),
            Some(vip)
        );
        assert_eq!(
            t.lookup("server.demo.local.domain.cluster.local", &sfx),
            None
        );
        // A suffix must be a whole-label suffix.
        assert_eq!(
            t.lookup("server.demo.local.domainsvc.cluster.local", &sfx),
            None
        );
        assert_eq!(t.lookup("other.demo.local.domain", &sfx), None);
    }
}
