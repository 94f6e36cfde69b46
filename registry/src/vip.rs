//! Loopback VIP allocation: every federated hostname gets its own address inside the
//! configured range, so the original destination of a captured connection names the
//! service.
//!
//! # Scheme
//!
//! The candidate for a hostname `h` on probe `i` is
//! `network + (u64 from the first 8 bytes of SHA-256(lowercase(h) || ":" || i)) mod size`,
//! where `size` is the number of addresses in the range. The network address, the
//! broadcast address and `127.0.0.1` are never used. Hostnames are placed in lexicographic
//! order, each taking its first candidate (probe 0, 1, 2, ...) not already taken.
//!
//! So a hostname's VIP depends only on its own name unless another hostname that sorts
//! before it hashes to the same address (about `n²/2^21` expected collisions for `n`
//! services in the default /12). That is the recorded collision rule: on a collision the
//! lexicographically smaller hostname keeps the address and the other moves to its next
//! probe. Adding or removing services therefore never moves an existing VIP, except in
//! that collision case, and the same set of hostnames always yields the same VIPs whatever
//! the document order.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

/// Why VIPs could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    /// The range is outside 127.0.0.0/8.
    #[error("vipRange {0} is not inside loopback 127.0.0.0/8")]
    NotLoopback(Ipv4Net),
    /// More services than usable addresses.
    #[error("vipRange {range} has {usable} usable addresses but {wanted} services need one")]
    Exhausted {
        /// The range.
        range: Ipv4Net,
        /// Addresses available.
        usable: u64,
        /// Services needing one.
        wanted: usize,
    },
}

/// After this many hash probes, fall back to a linear scan (only tiny ranges get there).
const MAX_PROBES: u32 = 64;

/// Allocates a VIP for every hostname (see the module docs for the scheme).
pub fn allocate<'a>(
    range: Ipv4Net,
    hostnames: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, Ipv4Addr>, VipError> {
    let range = range.trunc();
    if !Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8)
        .map(|lo| lo.contains(&range))
        .unwrap_or(false)
    {
        return Err(VipError::NotLoopback(range));
    }
    let mut names: Vec<String> = hostnames
        .into_iter()
        .map(|h| String::from(crate::hostname::Hostname::new(h)))
        .collect();
    names.sort();
    names.dedup();

    let size = 1u64 << (32 - range.prefix_len());
    let base = u32::from(range.network());
    let reserved = |a: u32| {
        a == base
            || u64::from(a) == u64::from(base) + size - 1
            || a == u32::from(Ipv4Addr::LOCALHOST)
    };
    let reserved_in_range = [
        base,
        base + (size - 1) as u32,
        u32::from(Ipv4Addr::LOCALHOST),
    ]
    .into_iter()
    .collect::<HashSet<_>>()
    .into_iter()
    .filter(|a| range.contains(&Ipv4Addr::from(*a)))
    .count() as u64;
    let usable = size.saturating_sub(reserved_in_range);
    if names.len() as u64 > usable {
        return Err(VipError::Exhausted {
            range,
            usable,
            wanted: names.len(),
        });
    }

    let mut taken = HashSet::with_capacity(names.len());
    let mut out = BTreeMap::new();
    for name in names {
        let mut chosen = None;
        for probe in 0..MAX_PROBES {
            let a = base + (hash(&name, probe) % size) as u32;
            if !reserved(a) && !taken.contains(&a) {
                chosen = Some(a);
                break;
            }
        }
        let a = match chosen {
            Some(a) => a,
            None => {
                // Linear scan from the first candidate; `usable` guarantees a free slot.
                let start = hash(&name, 0) % size;
                (0..size)
                    .map(|i| base + ((start + i) % size) as u32)
                    .find(|a| !reserved(*a) && !taken.contains(a))
                    .ok_or(VipError::Exhausted {
                        range,
                        usable,
                        wanted: taken.len() + 1,
                    })?
            }
        };
        taken.insert(a);
        out.insert(name, Ipv4Addr::from(a));
    }
    Ok(out)
}

fn hash(name: &str, probe: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b":");
    h.update(probe.to_string().as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> Ipv4Net {
        "127.240.0.0/12".parse().unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("svc{i}.ns.example.org")).collect()
    }

    #[test]
    fn unique_in_range_never_localhost() {
        let n = names(5000);
        let vips = allocate(range(), n.iter().map(String::as_str)).unwrap();
        assert_eq!(vips.len(), 5000);
        let set: HashSet<_> = vips.values().collect();
        assert_eq!(set.len(), 5000);
        for v in vips.values() {
            assert!(range().contains(v));
            assert_ne!(*v, Ipv4Addr::LOCALHOST);
            assert_ne!(*v, range().network());
            assert_ne!(*v, range().broadcast());
        }
    }

    #[test]
    fn stable_under_add_remove_and_reorder() {
        let n = names(200);
        let all = allocate(range(), n.iter().map(String::as_str)).unwrap();
        // Remove every third service: the rest keep their VIPs.
        let fewer: Vec<&str> = n.iter().step_by(3).map(String::as_str).collect();
        let some = allocate(range(), fewer.iter().copied()).unwrap();
        for (h, v) in &some {
            assert_eq!(all[h], *v, "{h} moved on removal");
        }
        // Add new services: existing ones keep theirs.
        let more: Vec<String> = n
            .iter()
            .cloned()
            .chain(names(400).into_iter().skip(200))
            .collect();
        let grown = allocate(range(), more.iter().map(String::as_str)).unwrap();
        for (h, v) in &all {
            assert_eq!(grown[h], *v, "{h} moved on addition");
        }
        // Reorder and change case/trailing dots: identical.
        let shuffled: Vec<String> = n
            .iter()
            .rev()
            .map(|h| format!("{}.", h.to_uppercase()))
            .collect();
        assert_eq!(
            allocate(range(), shuffled.iter().map(String::as_str)).unwrap(),
            all
        );
    }

    #[test]
    fn collision_rule_smaller_name_keeps_the_slot() {
        // In a /29 (6 usable, 127.0.0.1 not inside) collisions are certain; every name
        // still gets a distinct address and the smallest name always gets its probe-0 slot.
        let r: Ipv4Net = "127.250.0.0/29".parse().unwrap();
        let n = names(6);
        let vips = allocate(r, n.iter().map(String::as_str)).unwrap();
        assert_eq!(vips.values().collect::<HashSet<_>>().len(), 6);
        let mut sorted = n.clone();
        sorted.sort();
        let first = &sorted[0];
        let size = 8u64;
        let mut probe0 = None;
        for p in 0..MAX_PROBES {
            let a = u32::from(r.network()) + (hash(first, p) % size) as u32;
            if a != u32::from(r.network()) && a != u32::from(r.broadcast()) {
                probe0 = Some(Ipv4Addr::from(a));
                break;
            }
        }
        assert_eq!(Some(vips[first.as_str()]), probe0);
        assert!(matches!(
            allocate(r, names(7).iter().map(String::as_str)),
            Err(VipError::Exhausted {
                usable: 6,
                wanted: 7,
                ..
            })
        ));
    }

    #[test]
    fn localhost_excluded_and_range_checked() {
        let r: Ipv4Net = "127.0.0.0/30".parse().unwrap();
        // .0 network, .3 broadcast, .1 localhost: only .2 is usable.
        let vips = allocate(r, ["a.b.c"]).unwrap();
        assert_eq!(vips["a.b.c"], Ipv4Addr::new(127, 0, 0, 2));
        assert!(allocate(r, ["a.b.c", "d.e.f"]).is_err());
        assert!(matches!(
            allocate("10.0.0.0/8".parse().unwrap(), ["a"]),
            Err(VipError::NotLoopback(_))
        ));
    }
}
