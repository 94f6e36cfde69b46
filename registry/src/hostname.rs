//! [`Hostname`]: a DNS name in the one form ferry stores and compares — ASCII lowercase,
//! without the trailing dot. Federated hostnames, gateway hostnames, DNS table keys and xDS
//! lookups all normalise through [`Hostname::new`], so `Server.Demo.Local.Domain.` and
//! `server.demo.local.domain` are the same key everywhere, decided in one place.

use std::borrow::Borrow;
use std::fmt;

use serde::Serialize;

/// A normalised DNS name (see the module doc). Derefs to `str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Hostname(String);

/// Why a string is not a DNS hostname.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a valid DNS name: {0:?} (labels of letters, digits and '-', each 1-63 long, at most 253 in all)"
)]
pub struct HostnameError(pub String);

impl Hostname {
    /// Normalises `name` (lowercase, trailing dot removed) without judging it: for lookups
    /// of names that arrive from the network, which simply will not match when malformed.
    pub fn new(name: &str) -> Self {
        Self(name.trim_end_matches('.').to_ascii_lowercase())
    }

    /// Normalises and checks `name` as a DNS hostname (RFC 1123 labels): for names that
    /// configure something.
    pub fn parse(name: &str) -> Result<Self, HostnameError> {
        let h = Self::new(name);
        let ok = !h.0.is_empty()
            && h.0.len() <= 253
            && h.0.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if ok {
            Ok(h)
        } else {
            Err(HostnameError(name.to_owned()))
        }
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Hostname {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Hostname {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Hostname {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Same as [`Hostname::new`]: normalises, does not validate.
impl From<&str> for Hostname {
    fn from(name: &str) -> Self {
        Hostname::new(name)
    }
}

impl From<Hostname> for String {
    fn from(h: Hostname) -> String {
        h.0
    }
}

impl PartialEq<str> for Hostname {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for Hostname {
    fn eq(&self, other: &String) -> bool {
        self.0 == *other
    }
}

impl PartialEq<&str> for Hostname {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_once_and_checks_labels() {
        assert_eq!(
            Hostname::new("Server.Demo.Local.Domain."),
            "server.demo.local.domain"
        );
        assert_eq!(
            Hostname::parse("GW.example.com.").map(String::from),
            Ok("gw.example.com".to_owned())
        );
        for bad in ["", ".", "a..b", "-a.b", "a-.b", "a_b.c", &"a".repeat(64)] {
            assert!(Hostname::parse(bad).is_err(), "{bad:?}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(Hostname::parse(&long).is_err());
    }
}
