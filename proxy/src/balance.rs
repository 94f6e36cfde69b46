//! Which endpoint of a cluster a new connection dials, in which order it fails over, and
//! which endpoints are ejected for failing (Envoy's `consecutive_gateway_failure` outlier
//! detection).
//!
//! Algorithm of [`Outliers::attempt_order`], for one connection:
//! 1. drop weight-0 endpoints (never chosen);
//! 2. drop ejected endpoints, unless that would drop them all: then keep them (a cluster
//!    whose every endpoint is ejected is still tried, never blackholed);
//! 3. order by priority level (0 first); within a level, a weighted random permutation
//!    (Efraimidis–Spirakis with exponential keys `-ln(u)/weight`, ascending), so the first
//!    attempt goes to an endpoint with probability proportional to its weight, and so does
//!    each failover among the rest.
//!
//! Health ([`Outliers::report`]): a success resets an endpoint's consecutive failures; the
//! `consecutive_failures`-th failure in a row ejects it for `base_ejection * times_ejected`
//! (capped at `max_ejection`), unless that would eject more than `max_ejected_percent` of
//! the cluster (one endpoint may always be ejected, as in Envoy). Ejections expire by time;
//! `times_ejected` goes back to 0 once the endpoint has stayed un-ejected for `max_ejection`.
//!
//! Cost per connection: one short `Mutex` section in `attempt_order` and one in `report`
//! (never held across an await), and no heap allocation for clusters of up to
//! [`INLINE_ENDPOINTS`] endpoints. Time comes from an injectable clock so tests need no
//! sleeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use registry::config::GatewayAddress;
use xds::client::model::GatewayEndpoint;

/// Outlier-detection settings, like Envoy's `consecutive_gateway_failure` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint (default 5).
    pub consecutive_failures: u32,
    /// First ejection time; the n-th ejection lasts n times as long (default 30 s).
    pub base_ejection: Duration,
    /// Cap on one ejection's time (default 300 s).
    pub max_ejection: Duration,
    /// Most of a cluster's endpoints that may be ejected at once, in percent (default 50;
    /// 0 disables ejection).
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Clusters of at most this many endpoints get their attempt order without a heap allocation.
pub const INLINE_ENDPOINTS: usize = 8;

type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// Per-cluster endpoint health shared by all connections of the proxy, keyed by cluster name
/// and endpoint address and port.
pub struct Outliers {
    cfg: OutlierConfig,
    clock: Clock,
    clusters: Mutex<HashMap<Box<str>, ClusterHealth>>,
}

impl std::fmt::Debug for Outliers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outliers")
            .field("cfg", &self.cfg)
            .field("ejected", &self.ejected())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct ClusterHealth {
    /// Endpoints in the cluster as last seen by `attempt_order` (the percentage's base).
    size: usize,
    /// Only endpoints with failures or an ejection history; healthy ones are removed.
    hosts: Vec<HostHealth>,
}

#[derive(Debug)]
struct HostHealth {
    address: GatewayAddress,
    port: u16,
    consecutive: u32,
    times_ejected: u32,
    ejected_until: Option<Instant>,
}

impl HostHealth {
    fn is(&self, e: &GatewayEndpoint) -> bool {
        self.port == e.port && self.address == e.address
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }
}

impl ClusterHealth {
    fn ejected_count(&self, now: Instant) -> usize {
        self.hosts.iter().filter(|h| h.ejected(now)).count()
    }

    fn is_ejected(&self, e: &GatewayEndpoint, now: Instant) -> bool {
        self.hosts.iter().any(|h| h.is(e) && h.ejected(now))
    }
}

impl Outliers {
    /// Outlier detection on the system clock.
    pub fn new(cfg: OutlierConfig) -> Self {
        Self::with_clock(cfg, Instant::now)
    }

    /// Outlier detection on an injected clock (tests move time without sleeping).
    pub fn with_clock(
        cfg: OutlierConfig,
        clock: impl Fn() -> Instant + Send + Sync + 'static,
    ) -> Self {
        Outliers {
            cfg,
            clock: Box::new(clock),
            clusters: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, ClusterHealth>> {
        // Every critical section leaves the map consistent, so a poisoned lock is usable.
        self.clusters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoints of `cluster` to try, in order, for one connection (see the module docs).
    ///
    /// `endpoints` is the cluster's current list; `rng_seed` makes the weighted order
    /// reproducible (pass a per-connection random value).
    pub fn attempt_order<'a>(
        &self,
        cluster: &str,
        endpoints: &'a [GatewayEndpoint],
        rng_seed: u64,
    ) -> AttemptOrder<'a> {
        let mut slots = Slots::new(endpoints.len());
        let mut any_ejected = false;
        {
            let now = (self.clock)();
            let mut clusters = self.lock();
            let health = match clusters.get_mut(cluster) {
                Some(h) => h,
                // First connection to this cluster: one allocation for its lifetime.
                None => clusters.entry(cluster.into()).or_default(),
            };
            health.size = endpoints.len();
            for (i, e) in endpoints.iter().enumerate() {
                if e.weight == 0 {
                    continue;
                }
                if !health.hosts.is_empty() && health.is_ejected(e, now) {
                    any_ejected = true;
                    continue;
                }
                slots.push(Slot { index: i, key: 0.0 });
            }
        }
        if slots.as_slice().is_empty() && any_ejected {
            // Every choosable endpoint is ejected: try them all rather than fail.
            for (i, e) in endpoints.iter().enumerate() {
                if e.weight > 0 {
                    slots.push(Slot { index: i, key: 0.0 });
                }
            }
        }
        let mut rng = SplitMix64(rng_seed);
        for s in slots.as_mut_slice() {
            // u in (0, 1]: ln(u) is finite, the key is >= 0; smaller keys go first.
            let u = ((rng.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            s.key = -u.ln() / f64::from(endpoints[s.index].weight);
        }
        slots.as_mut_slice().sort_unstable_by(|a, b| {
            endpoints[a.index]
                .priority
                .cmp(&endpoints[b.index].priority)
                .then(a.key.total_cmp(&b.key))
        });
        AttemptOrder {
            endpoints,
            slots,
            next: 0,
        }
    }

    /// Records the outcome of one connection attempt to `endpoint` of `cluster`.
    pub fn report(&self, cluster: &str, endpoint: &GatewayEndpoint, ok: bool) {
        let now = (self.clock)();
        let cfg = &self.cfg;
        let mut clusters = self.lock();
        let Some(health) = clusters.get_mut(cluster) else {
            if ok {
                return;
            }
            // A report without attempt_order (size unknown): track it anyway.
            let health = clusters.entry(cluster.into()).or_default();
            return record_failure(cfg, health, endpoint, now);
        };
        if ok {
            let Some(pos) = health.hosts.iter().position(|h| h.is(endpoint)) else {
                return;
            };
            let h = &mut health.hosts[pos];
            h.consecutive = 0;
            forget_old_ejections(cfg, h, now);
            if h.times_ejected == 0 && !h.ejected(now) {
                health.hosts.swap_remove(pos);
            }
        } else {
            record_failure(cfg, health, endpoint, now);
        }
    }

    /// How many endpoints are ejected now, over all clusters (for metrics).
    pub fn ejected(&self) -> usize {
        let now = (self.clock)();
        self.lock().values().map(|c| c.ejected_count(now)).sum()
    }

    /// Forgets a cluster that is no longer configured (its health and ejections).
    pub fn remove_cluster(&self, cluster: &str) {
        self.lock().remove(cluster);
    }
}

/// Resets the ejection multiplier once the host has stayed un-ejected for `max_ejection`.
fn forget_old_ejections(cfg: &OutlierConfig, h: &mut HostHealth, now: Instant) {
    if let Some(until) = h.ejected_until
        && now >= until + cfg.max_ejection
    {
        h.times_ejected = 0;
        h.ejected_until = None;
    }
}

fn record_failure(
    cfg: &OutlierConfig,
    health: &mut ClusterHealth,
    e: &GatewayEndpoint,
    now: Instant,
) {
    let ejected_now = health.ejected_count(now);
    let size = health.size.max(health.hosts.len()).max(1);
    let pos = match health.hosts.iter().position(|h| h.is(e)) {
        Some(p) => p,
        None => {
            health.hosts.push(HostHealth {
                address: e.address.clone(),
                port: e.port,
                consecutive: 0,
                times_ejected: 0,
                ejected_until: None,
            });
            health.hosts.len() - 1
        }
    };
    let h = &mut health.hosts[pos];
    forget_old_ejections(cfg, h, now);
    h.consecutive = h.consecutive.saturating_add(1);
    if h.consecutive < cfg.consecutive_failures.max(1) || h.ejected(now) {
        return;
    }
    let pct = usize::from(cfg.max_ejected_percent);
    let allowed = pct > 0 && (ejected_now == 0 || (ejected_now + 1) * 100 <= pct * size);
    if !allowed {
        return;
    }
    h.times_ejected = h.times_ejected.saturating_add(1);
    let time = cfg
        .base_ejection
        .saturating_mul(h.times_ejected)
        .min(cfg.max_ejection);
    h.ejected_until = Some(now + time);
    h.consecutive = 0;
    tracing::info!(endpoint = %e.address, port = e.port, ?time, "outlier ejected after consecutive failures");
}

/// The endpoints one connection tries, best first: an iterator over the cluster's slice.
#[derive(Debug)]
pub struct AttemptOrder<'a> {
    endpoints: &'a [GatewayEndpoint],
    slots: Slots,
    next: usize,
}

impl<'a> Iterator for AttemptOrder<'a> {
    type Item = &'a GatewayEndpoint;

    fn next(&mut self) -> Option<Self::Item> {
        let slot = self.slots.as_slice().get(self.next)?;
        self.next += 1;
        self.endpoints.get(slot.index)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.slots.as_slice().len() - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for AttemptOrder<'_> {}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    index: usize,
    key: f64,
}

/// A vector of slots kept on the stack up to [`INLINE_ENDPOINTS`].
#[derive(Debug)]
enum Slots {
    Inline([Slot; INLINE_ENDPOINTS], usize),
    Heap(Vec<Slot>),
}

impl Slots {
    fn new(capacity: usize) -> Self {
        if capacity <= INLINE_ENDPOINTS {
            Slots::Inline([Slot::default(); INLINE_ENDPOINTS], 0)
        } else {
            Slots::Heap(Vec::with_capacity(capacity))
        }
    }

    /// Pushes within the capacity given to `new` (callers push at most one per endpoint).
    fn push(&mut self, s: Slot) {
        match self {
            Slots::Inline(a, n) => {
                if let Some(slot) = a.get_mut(*n) {
                    *slot = s;
                    *n += 1;
                }
            }
            Slots::Heap(v) => v.push(s),
        }
    }

    fn as_slice(&self) -> &[Slot] {
        match self {
            Slots::Inline(a, n) => &a[..*n],
            Slots::Heap(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Slot] {
        match self {
            Slots::Inline(a, n) => &mut a[..*n],
            Slots::Heap(v) => v,
        }
    }
}

/// SplitMix64: a tiny, good-enough generator for load-balancing order (not for secrets).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    fn ep(last: u8, priority: u32, weight: u32) -> GatewayEndpoint {
        GatewayEndpoint {
            address: GatewayAddress::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))),
            port: 15443,
            priority,
            weight,
        }
    }

    /// A clock the test moves by hand.
    fn manual_clock() -> (
        Arc<Mutex<Instant>>,
        impl Fn() -> Instant + Send + Sync + 'static,
    ) {
        let t = Arc::new(Mutex::new(Instant::now()));
        let c = Arc::clone(&t);
        (t, move || *c.lock().unwrap())
    }

    fn advance(t: &Mutex<Instant>, d: Duration) {
        let mut g = t.lock().unwrap();
        *g += d;
    }

    fn order(o: &Outliers, eps: &[GatewayEndpoint], seed: u64) -> Vec<u8> {
        o.attempt_order("c", eps, seed)
            .map(|e| match e.address {
                GatewayAddress::Ip(IpAddr::V4(ip)) => ip.octets()[3],
                _ => unreachable!(),
            })
            .collect()
    }

    fn fail(o: &Outliers, e: &GatewayEndpoint, n: u32) {
        for _ in 0..n {
            o.report("c", e, false);
        }
    }

    #[test]
    fn lower_priority_levels_come_first_and_weight_zero_never() {
        let o = Outliers::new(OutlierConfig::default());
        let eps = [
            ep(1, 1, 10),
            ep(2, 0, 1),
            ep(3, 0, 5),
            ep(4, 2, 1),
            ep(5, 0, 0),
        ];
        for seed in 0..100 {
            let got = order(&o, &eps, seed);
            assert_eq!(got.len(), 4, "{got:?}");
            let mut level0 = got[..2].to_vec();
            level0.sort();
            assert_eq!(level0, [2, 3]);
            assert_eq!(&got[2..], [1, 4]);
        }
    }

    #[test]
    fn first_choice_follows_weights() {
        let o = Outliers::new(OutlierConfig::default());
        let eps = [ep(1, 0, 1), ep(2, 0, 2), ep(3, 0, 7)];
        let mut first = [0u32; 3];
        let n = 20_000;
        for seed in 0..n {
            let got = order(&o, &eps, seed * 7919);
            first[usize::from(got[0] - 1)] += 1;
        }
        for (i, w) in [1.0, 2.0, 7.0].iter().enumerate() {
            let share = f64::from(first[i]) / f64::from(n as u32);
            assert!(
                (share - w / 10.0).abs() < 0.02,
                "endpoint {i}: {share} ({first:?})"
            );
        }
    }

    #[test]
    fn consecutive_failures_eject_until_expiry_with_backoff() {
        let (t, clock) = manual_clock();
        let o = Outliers::with_clock(OutlierConfig::default(), clock);
        let eps = [ep(1, 0, 1), ep(2, 0, 1), ep(3, 0, 1), ep(4, 0, 1)];
        order(&o, &eps, 0);
        fail(&o, &eps[0], 4);
        o.report("c", &eps[0], true); // a success resets the count
        fail(&o, &eps[0], 4);
        assert_eq!(o.ejected(), 0);
        fail(&o, &eps[0], 1);
        assert_eq!(o.ejected(), 1);
        for seed in 0..20 {
            assert!(!order(&o, &eps, seed).contains(&1));
        }
        advance(&t, Duration::from_secs(30));
        assert_eq!(o.ejected(), 0);
        assert!(order(&o, &eps, 0).contains(&1));
        // The second ejection lasts twice as long.
        fail(&o, &eps[0], 5);
        advance(&t, Duration::from_secs(59));
        assert_eq!(o.ejected(), 1);
        advance(&t, Duration::from_secs(1));
        assert_eq!(o.ejected(), 0);
    }

    #[test]
    fn ejection_time_is_capped() {
        let (t, clock) = manual_clock();
        let cfg = OutlierConfig {
            max_ejected_percent: 100,
            ..OutlierConfig::default()
        };
        let o = Outliers::with_clock(cfg, clock);
        let eps = [ep(1, 0, 1), ep(2, 0, 1)];
        order(&o, &eps, 0);
        for _ in 0..20 {
            fail(&o, &eps[0], 5);
            advance(&t, Duration::from_secs(300));
            assert_eq!(o.ejected(), 0, "never longer than max_ejection");
        }
    }

    #[test]
    fn every_endpoint_ejected_means_try_them_all() {
        let cfg = OutlierConfig {
            max_ejected_percent: 100,
            ..OutlierConfig::default()
        };
        let o = Outliers::new(cfg);
        let eps = [ep(1, 0, 1), ep(2, 1, 1)];
        order(&o, &eps, 0);
        fail(&o, &eps[0], 5);
        assert_eq!(order(&o, &eps, 0), [2]);
        fail(&o, &eps[1], 5);
        assert_eq!(o.ejected(), 2);
        assert_eq!(order(&o, &eps, 0), [1, 2]);
    }

    #[test]
    fn max_ejected_percent_limits_ejections() {
        let o = Outliers::new(OutlierConfig::default());
        let eps = [ep(1, 0, 1), ep(2, 0, 1), ep(3, 0, 1), ep(4, 0, 1)];
        order(&o, &eps, 0);
        for e in &eps {
            fail(&o, e, 5);
        }
        assert_eq!(o.ejected(), 2, "50% of 4");
        assert_eq!(order(&o, &eps, 0).len(), 2);
        // A single endpoint may always be ejected, and is still tried.
        let one = [ep(9, 0, 1)];
        o.attempt_order("single", &one, 0);
        for _ in 0..5 {
            o.report("single", &one[0], false);
        }
        assert_eq!(o.ejected(), 3);
        assert_eq!(o.attempt_order("single", &one, 0).count(), 1);
        // 0% disables ejection.
        let off = Outliers::new(OutlierConfig {
            max_ejected_percent: 0,
            ..OutlierConfig::default()
        });
        fail(&off, &eps[0], 50);
        assert_eq!(off.ejected(), 0);
    }

    #[test]
    fn clusters_are_independent_and_removable() {
        let o = Outliers::new(OutlierConfig::default());
        let eps = [ep(1, 0, 1), ep(2, 0, 1)];
        order(&o, &eps, 0);
        fail(&o, &eps[0], 5);
        assert_eq!(o.attempt_order("other", &eps, 0).count(), 2);
        o.remove_cluster("c");
        assert_eq!(o.ejected(), 0);
    }

    #[test]
    fn large_clusters_use_the_heap_path() {
        let o = Outliers::new(OutlierConfig::default());
        let eps: Vec<_> = (1..=20).map(|i| ep(i, u32::from(i % 3), 1)).collect();
        let got = o.attempt_order("big", &eps, 42);
        assert_eq!(got.len(), 20);
        let prios: Vec<u32> = got.map(|e| e.priority).collect();
        assert!(prios.is_sorted());
    }
}
