//! SPIFFE identity types: trust domains and SPIFFE IDs, parsed per the SPIFFE-ID
//! specification (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! These live here, beside the config model that first needs them, and are shared by
//! every ferry crate that handles identities (CA, Workload API, xDS translation).

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps a SPIFFE ID (as a URI) at 2048 bytes.
const MAX_ID_LEN: usize = 2048;
/// The SPIFFE spec caps a trust domain name at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid trust domain or SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string was empty.
    #[error("empty")]
    Empty,
    /// The ID did not start with `spiffe://` (the scheme must be lowercase).
    #[error("scheme must be \"spiffe://\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// A character outside `[a-z0-9._-]` in the trust domain (this also rejects
    /// uppercase letters, ports and userinfo).
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes and underscores (found {found:?})"
    )]
    BadTrustDomainChar {
        /// The offending character.
        found: char,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// A path segment was empty (`//` or a trailing `/`).
    #[error("path cannot contain empty segments or a trailing slash")]
    EmptySegment,
    /// A path segment was `.` or `..`.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// A character outside `[A-Za-z0-9._-]` in the path (this also rejects query and fragment).
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes and underscores (found {found:?})"
    )]
    BadPathChar {
        /// The offending character.
        found: char,
    },
    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

/// A SPIFFE trust domain such as `example.org`: the root of trust every SPIFFE ID
/// in it is issued under.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain name, also accepting the `spiffe://<td>` form (as go-spiffe does).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.starts_with(SCHEME) {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar { found: '/' });
            }
            return Ok(id.trust_domain().clone());
        }
        validate_trust_domain(s)?;
        Ok(Self(s.to_owned()))
    }

    /// The bare name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain as a SPIFFE ID URI, `spiffe://<td>`: the key of bundle maps in
    /// the Workload API and the SDS resource name of its validation context.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// A SPIFFE ID in this trust domain with the given path (leading slash optional).
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        let path = path.strip_prefix('/').unwrap_or(path);
        SpiffeId::parse(&format!("{SCHEME}{}/{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A SPIFFE ID, `spiffe://<trust domain>/<path>`: the identity of a workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or starting with `/`.
    path: String,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, enforcing every rule of the SPIFFE-ID spec.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain: TrustDomain(td.to_owned()),
            path: path.to_owned(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain.0, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::Empty);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(found) => Err(SpiffeIdError::BadTrustDomainChar { found }),
        None => Ok(()),
    }
}

/// Validates a path that is empty or starts with `/`.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            _ => {}
        }
        if let Some(found) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar { found });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_from_the_spec() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/ns/default/sa/frontend",
            "spiffe://staging.example.org/payments/mysql",
            "spiffe://k8s-west.example.com/service",
            "spiffe://trust_domain-1.local/Path_With.Mixed-Case/x",
            "spiffe://1.2.3.4/workload",
        ] {
            // A bare trailing slash is an empty segment and must fail; everything else parses.
            let r = SpiffeId::parse(s);
            if s == "spiffe://example.org/" {
                assert_eq!(r, Err(SpiffeIdError::EmptySegment));
            } else {
                let id = r.unwrap_or_else(|e| panic!("{s}: {e}"));
                assert_eq!(id.to_string(), s);
            }
        }
    }

    #[test]
    fn invalid_ids_from_the_spec() {
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", SpiffeIdError::Empty),
            ("http://example.org/a", SpiffeIdError::WrongScheme),
            ("SPIFFE://example.org/a", SpiffeIdError::WrongScheme),
            ("spiffe:/example.org/a", SpiffeIdError::WrongScheme),
            ("spiffe://", SpiffeIdError::MissingTrustDomain),
            ("spiffe:///path", SpiffeIdError::MissingTrustDomain),
            (
                "spiffe://Example.org/a",
                SpiffeIdError::BadTrustDomainChar { found: 'E' },
            ),
            (
                "spiffe://example.org:8080/a",
                SpiffeIdError::BadTrustDomainChar { found: ':' },
            ),
            (
                "spiffe://user@example.org/a",
                SpiffeIdError::BadTrustDomainChar { found: '@' },
            ),
            ("spiffe://example.org//a", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/./a", SpiffeIdError::DotSegment),
            ("spiffe://example.org/a/..", SpiffeIdError::DotSegment),
            (
                "spiffe://example.org/a?x=1",
                SpiffeIdError::BadPathChar { found: '?' },
            ),
            (
                "spiffe://example.org/a#frag",
                SpiffeIdError::BadPathChar { found: '#' },
            ),
            (
                "spiffe://example.org/a%20b",
                SpiffeIdError::BadPathChar { found: '%' },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse(s).as_ref(), Err(want), "{s}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert_eq!(
            SpiffeId::parse(&long_td),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
    }

    #[test]
    fn trust_domain_forms() {
        let td = TrustDomain::parse("example.org").unwrap();
        assert_eq!(TrustDomain::parse("spiffe://example.org").unwrap(), td);
        assert_eq!(td.id_string(), "spiffe://example.org");
        assert!(TrustDomain::parse("spiffe://example.org/x").is_err());
        assert!(TrustDomain::parse("Example.org").is_err());
        assert!(TrustDomain::parse("example.org:443").is_err());
        assert!(TrustDomain::parse("").is_err());
        assert_eq!(
            td.id("/ns/a/sa/b").unwrap().to_string(),
            "spiffe://example.org/ns/a/sa/b"
        );
        assert_eq!(
            td.id("ns/a/sa/b").unwrap().to_string(),
            "spiffe://example.org/ns/a/sa/b"
        );
    }
}
