//! The federated name table: hostname -> VIP, with the search-suffix expansions Kubernetes
//! stub resolvers try first. One writer replaces it whole; readers hold an `Arc` snapshot.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use registry::hostname::Hostname;
use tokio::sync::watch;

/// Federated hostnames and their VIPs, as the control plane publishes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsTable {
    /// Lowercase, no trailing dot.
    names: HashMap<Hostname, Ipv4Addr>,
}

impl DnsTable {
    /// Builds a table from `(hostname, vip)` pairs; names are case-folded and a trailing dot
    /// is ignored.
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = (S, Ipv4Addr)>) -> Self {
        Self {
            names: entries
                .into_iter()
                .map(|(h, v)| (Hostname::new(h.as_ref()), v))
                .collect(),
        }
    }

    /// The table for a validated ferry config (every federated service's hostname and VIP).
    pub fn from_config(config: &registry::config::Config) -> Self {
        Self::new(config.services.iter().map(|s| (s.hostname.as_str(), s.vip)))
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

/// Keeps a table current from any published state (a config snapshot, an xDS client's
/// state, a proxy's listeners): `build` turns each new `T` into the table the resolver
/// serves. The returned receiver is what [`crate::Resolver::bind`] takes; the copying task
/// ends when `source`'s sender is dropped, so the caller decides its lifetime by keeping the
/// publisher alive. This is how the resolver is embedded without knowing where names come
/// from.
pub fn follow<T>(
    mut source: watch::Receiver<Arc<T>>,
    build: fn(&T) -> DnsTable,
) -> watch::Receiver<Arc<DnsTable>>
where
    T: Send + Sync + 'static,
{
    let first = build(&source.borrow_and_update());
    tracing::info!(names = first.len(), "federated names loaded");
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while source.changed().await.is_ok() {
            let table = build(&source.borrow_and_update());
            if **tx.borrow() == table {
                continue;
            }
            tracing::info!(names = table.len(), "federated names updated");
            tx.send_replace(Arc::new(table));
            if tx.is_closed() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follow_rebuilds_on_change_and_ends_with_the_source() {
        let vip = |n| Ipv4Addr::new(127, 240, 0, n);
        let (tx, rx) = watch::channel(Arc::new(vec![("a.example", vip(1))]));
        let mut table = follow(rx, |v: &Vec<(&'static str, Ipv4Addr)>| {
            DnsTable::new(v.iter().copied())
        });
        assert_eq!(
            table.borrow_and_update().lookup("a.example", &[]),
            Some(vip(1))
        );
        tx.send_replace(Arc::new(vec![("a.example", vip(1)), ("b.example", vip(2))]));
        table.changed().await.unwrap();
        assert_eq!(
            table.borrow_and_update().lookup("b.example", &[]),
            Some(vip(2))
        );
        drop(tx);
        // The copying task ends with its source; the receiver then sees the channel closed.
        assert!(table.changed().await.is_err());
    }

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
