//! How much of the agent one local user may hold, and how the accept loop behaves when the
//! process runs out of file descriptors.
//!
//! The Workload API socket is 0666: every local user can connect, registered or not. An
//! unregistered user once opened thousands of idle connections without an HTTP/2 preface;
//! the agent ran out of fds, every workload timed out, and the accept loop spun on EMFILE.
//! So:
//!
//! - [`ConnTracker`]: at most [`ConnectionLimits::max_connections_per_peer`] open
//!   connections per peer uid (Unix socket) or remote IP (TCP); one more is closed at once,
//!   before any per-connection work, and counted; and at most
//!   [`ConnectionLimits::max_connections_total`] across all peers, so that several users
//!   together cannot take the process's last file descriptors either;
//! - a connection must send the HTTP/2 preface and SETTINGS within
//!   [`ConnectionLimits::handshake_timeout`] (enforced by [`crate::authority_shim::H2Shim`]);
//! - HTTP/2 keepalive pings find dead peers; streams per connection are capped;
//! - [`Backoff`]: accept errors that are about the process (EMFILE, ENFILE, ENOBUFS, ENOMEM)
//!   pause accepting, doubling from 10 ms to 1 s, instead of retrying at once;
//! - [`BurstLog`]: each of these logs at most one line per window, with a count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::authority_shim::H2Limits;
use crate::peer::PeerInfo;

/// Default for [`ConnectionLimits::max_connections_per_peer`]: far above what one workload
/// needs (a handful of streams share one connection), far below the default fd limit.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;
/// Default for [`ConnectionLimits::max_connections_total`]: 16 peers at their per-peer limit,
/// well under the 65,536 fds a service normally may open.
pub const DEFAULT_MAX_CONNECTIONS_TOTAL: usize = 4096;
/// Default for [`ConnectionLimits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ConnectionLimits::keepalive_interval`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Default for [`ConnectionLimits::keepalive_timeout`].
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default for [`ConnectionLimits::max_concurrent_streams`].
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// First pause after an accept error; doubled on each consecutive one.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after consecutive accept errors.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Repeated warnings of one kind are folded into one line per this window.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The connection limits of a Workload API server; [`Default`] is what `ferry agent` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections allowed per peer uid (Unix socket) or remote IP address (TCP).
    pub max_connections_per_peer: usize,
    /// Open connections allowed in all, whoever holds them.
    pub max_connections_total: usize,
    /// Time a new connection has to send the HTTP/2 preface and its SETTINGS frame.
    pub handshake_timeout: Duration,
    /// HTTP/2 PING after this long without frames from the client.
    pub keepalive_interval: Duration,
    /// Close the connection when a PING is not answered within this.
    pub keepalive_timeout: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS per connection.
    pub max_concurrent_streams: u32,
    /// Frame, header table and header list sizes the server advertises.
    pub h2: H2Limits,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_connections_total: DEFAULT_MAX_CONNECTIONS_TOTAL,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            h2: H2Limits::default(),
        }
    }
}

/// Whose quota a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A Unix socket peer's effective uid.
    Uid(u32),
    /// A TCP peer's address (v4-mapped IPv6 folded to IPv4).
    Addr(IpAddr),
    /// Neither is known (SO_PEERCRED failed): all such connections share one quota.
    Unknown,
}

impl PeerKey {
    /// The key of an accepted connection's peer.
    pub fn of(peer: &PeerInfo) -> Self {
        if let Some(c) = &peer.cred {
            return PeerKey::Uid(c.uid);
        }
        match peer.remote {
            Some(a) => PeerKey::Addr(a.ip().to_canonical()),
            None => PeerKey::Unknown,
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Uid(u) => write!(f, "uid {u}"),
            PeerKey::Addr(a) => write!(f, "address {a}"),
            PeerKey::Unknown => f.write_str("unknown peer"),
        }
    }
}

/// Open connections per key and in all.
#[derive(Debug, Default)]
struct Held {
    per_key: HashMap<PeerKey, usize>,
    total: usize,
}

type Counts = Arc<Mutex<Held>>;

/// Why [`ConnTracker::try_acquire`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer holds its per-peer maximum.
    Peer(usize),
    /// All peers together hold the total maximum.
    Total(usize),
}

/// Open connections per [`PeerKey`], with a cap per key and one in all.
#[derive(Debug, Clone)]
pub struct ConnTracker {
    counts: Counts,
    per_peer: usize,
    total: usize,
}

impl ConnTracker {
    /// A tracker allowing `per_peer` connections per key and `total` in all.
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            counts: Arc::default(),
            per_peer,
            total,
        }
    }

    /// A slot for one more connection of `key`, or why not.
    pub fn try_acquire(&self, key: PeerKey) -> Result<Slot, Refusal> {
        let mut held = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if held.total >= self.total {
            return Err(Refusal::Total(self.total));
        }
        let n = held.per_key.entry(key).or_insert(0);
        if *n >= self.per_peer {
            return Err(Refusal::Peer(self.per_peer));
        }
        *n += 1;
        held.total += 1;
        Ok(Slot {
            counts: self.counts.clone(),
            key,
        })
    }

    /// Connections `key` holds now.
    pub fn count(&self, key: PeerKey) -> usize {
        let held = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        held.per_key.get(&key).copied().unwrap_or(0)
    }
}

/// One admitted connection's place in its peer's quota; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    counts: Counts,
    key: PeerKey,
}

impl Slot {
    /// Whose quota this is.
    pub fn key(&self) -> PeerKey {
        self.key
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.per_key.remove(&self.key);
            }
        }
    }
}

/// Counters of refused and failed connections, for tests and metrics.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections admitted.
    pub accepted: AtomicU64,
    /// Connections closed at once because their peer was at its limit.
    pub rejected_over_limit: AtomicU64,
    /// `accept` failures (EMFILE and the like).
    pub accept_errors: AtomicU64,
    /// Connections closed for not completing the HTTP/2 handshake in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed for sending something that is not acceptable HTTP/2.
    pub protocol_errors: AtomicU64,
}

impl ConnStats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Scraped as `workload_api_connections_*_total` counters: an operator sees a flood being
/// refused (and by what) without reading logs.
impl prometheus_client::collector::Collector for ConnStats {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        for (name, help, counter) in [
            (
                "connections_accepted",
                "Workload API connections admitted",
                &self.accepted,
            ),
            (
                "connections_rejected_over_limit",
                "Workload API connections closed at once: their peer uid (or IP) was at its limit",
                &self.rejected_over_limit,
            ),
            (
                "accept_errors",
                "accept() failures such as EMFILE",
                &self.accept_errors,
            ),
            (
                "connections_handshake_timeouts",
                "Workload API connections closed for not sending the HTTP/2 preface and SETTINGS in time",
                &self.handshake_timeouts,
            ),
            (
                "connections_protocol_errors",
                "Workload API connections closed for sending something that is not acceptable HTTP/2",
                &self.protocol_errors,
            ),
        ] {
            let c = ConstCounter::new(Self::get(counter));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

/// Folds a burst of identical events into one log line per [`LOG_WINDOW`].
#[derive(Debug)]
pub struct BurstLog {
    window: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl BurstLog {
    /// A log allowing one line per `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: None,
            suppressed: 0,
        }
    }

    /// Records an event at `now`. `Some(n)`: log it now, mentioning the `n` events that
    /// were folded since the previous line; `None`: stay silent.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.window => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Exponential pause between failing `accept` calls.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Pauses doubling from `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }

    /// The pause to take now; the next one is twice as long (up to the maximum).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// An accept succeeded: start again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX)
    }
}

/// True for `accept` errors about one connection (the client gave up before we took it):
/// retry at once. Anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM, unknown) is about the
/// process and gets a [`Backoff`] pause.
pub fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || e.raw_os_error() == Some(nix::libc::EPROTO)
        || e.raw_os_error() == Some(nix::libc::EPERM)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tracker_caps_per_key_and_frees_on_drop() {
        let t = ConnTracker::new(2, 100);
        let a1 = t.try_acquire(PeerKey::Uid(1)).unwrap();
        let _a2 = t.try_acquire(PeerKey::Uid(1)).unwrap();
        assert_eq!(t.try_acquire(PeerKey::Uid(1)).err(), Some(Refusal::Peer(2)));
        let _b = t.try_acquire(PeerKey::Uid(2)).unwrap();
        assert_eq!(t.count(PeerKey::Uid(1)), 2);
        drop(a1);
        assert_eq!(t.count(PeerKey::Uid(1)), 1);
        assert!(t.try_acquire(PeerKey::Uid(1)).is_ok());
    }

    #[test]
    fn many_peers_together_stop_at_the_total() {
        let t = ConnTracker::new(2, 3);
        let held: Vec<Slot> = (1..=3)
            .map(|u| t.try_acquire(PeerKey::Uid(u)).unwrap())
            .collect();
        // A fourth user, under its own per-peer limit, still finds the process full.
        assert_eq!(
            t.try_acquire(PeerKey::Uid(4)).err(),
            Some(Refusal::Total(3))
        );
        drop(held);
        assert!(t.try_acquire(PeerKey::Uid(4)).is_ok());
    }

    #[test]
    fn v4_mapped_peers_share_the_v4_quota() {
        let mapped = PeerInfo {
            remote: Some("[::ffff:127.0.0.1]:4000".parse().unwrap()),
            ..PeerInfo::default()
        };
        let v4 = PeerInfo {
            remote: Some("127.0.0.1:4001".parse().unwrap()),
            ..PeerInfo::default()
        };
        assert_eq!(PeerKey::of(&mapped), PeerKey::of(&v4));
    }

    #[test]
    fn burst_log_folds_a_window_into_one_line() {
        let mut l = BurstLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.note(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(l.note(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.note(t0 + Duration::from_secs(11)), Some(999));
        assert_eq!(l.note(t0 + Duration::from_secs(12)), None);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let seq: Vec<_> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn fd_exhaustion_is_not_a_connection_error() {
        let emfile = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
        let enfile = std::io::Error::from_raw_os_error(nix::libc::ENFILE);
        let aborted = std::io::Error::from_raw_os_error(nix::libc::ECONNABORTED);
        assert!(!is_connection_error(&emfile));
        assert!(!is_connection_error(&enfile));
        assert!(is_connection_error(&aborted));
    }
}
