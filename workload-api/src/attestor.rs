//! Caller attestation, SPIRE unix-attestor style: who the caller is comes from the kernel
//! (`SO_PEERCRED`: pid, uid, gid), what it runs from `/proc/<pid>/exe`.
//!
//! Order matters for cost and safety: uid/gid (and user/group/path) are evaluated first;
//! the executable is hashed only when some entry whose other selectors all match needs
//! `unix:sha256`, only up to [`MAX_HASHED_EXE`] bytes, and at most once per file version
//! (a bounded cache keyed by device, inode, size, mtime and ctime). Process facts are
//! trusted only while the connection's [`Binding`](crate::peer::Binding) holds: the same
//! process (pidfd / start time), running the same executable as right after accept, still
//! holding the connection. Everything here blocks (`/proc`, NSS lookups, hashing): call it
//! on the blocking pool.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use nix::unistd::{Gid, Group, Uid, User};
use registry::config::{RegistrationEntry, Selector};
use sha2::{Digest, Sha256};

use crate::peer::{BindError, PeerCred, PeerInfo, ProcIdentity};

/// Executables larger than this are not hashed (`unix:sha256` then does not match and a
/// warning is logged once per file): hashing is on the request path, and a huge (possibly
/// sparse) file would let any local user burn CPU and I/O.
pub const MAX_HASHED_EXE: u64 = 256 << 20;

/// How many executables' digests are remembered.
const DIGEST_CACHE_ENTRIES: usize = 1024;

/// Why a caller could not be attested (each maps to a gRPC status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// Neither peer credentials nor a TCP owner could be found.
    #[error("caller cannot be attested: {0}")]
    Unknown(String),
    /// The process went away (or its pid was reused) while it was being inspected.
    #[error("caller process {pid} changed during attestation (exited, pid reused or exec'd)")]
    Raced {
        /// The pid.
        pid: i32,
    },
    /// The connection is no longer bound to the process that opened it.
    #[error(transparent)]
    Unbound(#[from] BindError),
}

/// The attested facts about one caller, against which selectors are matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Process id (Unix sockets only).
    pub pid: Option<i32>,
    /// User id.
    pub uid: u32,
    /// Primary group id (Unix sockets only).
    pub gid: Option<u32>,
    /// User name, when the uid has one (looked up only when an entry uses `unix:user`).
    pub user: Option<String>,
    /// Group name, when the gid has one (looked up only when an entry uses `unix:group`).
    pub group: Option<String>,
    /// The executable, from `/proc/<pid>/exe`.
    pub path: Option<PathBuf>,
    /// SHA-256 of the executable, lowercase hex (computed only when a candidate entry
    /// needs it).
    pub sha256: Option<String>,
}

impl Caller {
    /// True when the caller matches every selector (and there is at least one).
    pub fn matches(&self, selectors: &[Selector]) -> bool {
        !selectors.is_empty() && selectors.iter().all(|s| self.matches_one(s))
    }

    fn matches_one(&self, s: &Selector) -> bool {
        match s {
            Selector::Uid(u) => self.uid == *u,
            Selector::Gid(g) => self.gid == Some(*g),
            Selector::User(n) => self.user.as_deref() == Some(n.as_str()),
            Selector::Group(n) => self.group.as_deref() == Some(n.as_str()),
            Selector::Path(p) => self.path.as_deref() == Some(p.as_path()),
            Selector::Sha256(h) => self.sha256.as_deref() == Some(h.as_str()),
        }
    }

    /// True when some entry uses `unix:sha256` and all its other selectors match: only
    /// then is the executable worth hashing.
    fn needs_sha256(&self, entries: &[RegistrationEntry]) -> bool {
        entries.iter().any(|e| {
            e.selectors.iter().any(|s| matches!(s, Selector::Sha256(_)))
                && e.selectors
                    .iter()
                    .all(|s| matches!(s, Selector::Sha256(_)) || self.matches_one(s))
        })
    }
}

fn uses(entries: &[RegistrationEntry], f: impl Fn(&Selector) -> bool) -> bool {
    entries.iter().any(|e| e.selectors.iter().any(&f))
}

/// Attests the peer of a connection against the registration `entries` (which decide
/// what is worth looking up). Blocking: run it on the blocking pool.
pub fn attest(peer: &PeerInfo, entries: &[RegistrationEntry]) -> Result<Caller, AttestError> {
    if let Some(c) = &peer.cred {
        return attest_unix(c, entries);
    }
    if let (Some(remote), Some(local)) = (peer.remote, peer.local) {
        let uid = tcp_owner(remote, local).ok_or_else(|| {
            AttestError::Unknown(format!("no local socket owner found for TCP peer {remote}"))
        })?;
        let user = if uses(entries, |s| matches!(s, Selector::User(_))) {
            user_name(uid)
        } else {
            None
        };
        return Ok(Caller {
            pid: None,
            uid,
            gid: None,
            user,
            group: None,
            path: None,
            sha256: None,
        });
    }
    Err(AttestError::Unknown("no peer credentials".into()))
}

fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

fn proc_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Real, effective, saved, fs: SO_PEERCRED reports the effective uid.
    line.split_whitespace().nth(2)?.parse().ok()
}

fn attest_unix(c: &PeerCred, entries: &[RegistrationEntry]) -> Result<Caller, AttestError> {
    let (pid, uid, gid) = (c.pid, c.uid, c.gid);
    let mut caller = Caller {
        pid: Some(pid),
        uid,
        gid: Some(gid),
        user: None,
        group: None,
        path: None,
        sha256: None,
    };
    if uses(entries, |s| matches!(s, Selector::User(_))) {
        caller.user = user_name(uid);
    }
    if uses(entries, |s| matches!(s, Selector::Group(_))) {
        caller.group = group_name(gid);
    }
    // Without a binding (not from an accepted socket) nothing ties the pid to the
    // connection: uid/gid only. Without /proc for this pid (another pid namespace), too.
    let Some(binding) = &c.binding else {
        return Ok(caller);
    };
    let Some(verified) = binding.verify()? else {
        return Ok(caller);
    };
    if verified.identity.exe.is_some() {
        caller.path = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    }
    if caller.path.is_some() && caller.needs_sha256(entries) {
        caller.sha256 = DIGESTS.of_process(pid, &verified.identity);
    }
    // Same process, same program, still the owner the kernel told us about?
    if !binding.still_same(&verified.identity) || proc_uid(pid) != Some(uid) {
        return Err(AttestError::Raced { pid });
    }
    Ok(caller)
}

/// One version of one file: a changed file gets a new key (ctime cannot be set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(m: &std::fs::Metadata) -> Self {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone)]
struct DigestEntry {
    /// `None`: over [`MAX_HASHED_EXE`] (already warned about).
    sha256: Option<String>,
    hashes: u64,
}

/// Executable digests, one per file version. Process-wide: a file's digest does not
/// depend on which server asks.
#[derive(Debug, Default)]
struct DigestCache {
    map: Mutex<HashMap<FileKey, DigestEntry>>,
}

static DIGESTS: LazyLock<DigestCache> = LazyLock::new(DigestCache::default);

impl DigestCache {
    fn lookup(&self, key: &FileKey) -> Option<DigestEntry> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    fn insert(&self, key: FileKey, sha256: Option<String>, hashed: bool) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= DIGEST_CACHE_ENTRIES
            && !map.contains_key(&key)
            && let Some(k) = map.keys().next().copied()
        {
            map.remove(&k);
        }
        let e = map.entry(key).or_insert(DigestEntry {
            sha256: None,
            hashes: 0,
        });
        e.sha256 = sha256;
        e.hashes += u64::from(hashed);
    }

    /// The digest of what process `pid` runs, if it is still `identity`'s executable
    /// and not over the size cap.
    fn of_process(&self, pid: i32, identity: &ProcIdentity) -> Option<String> {
        let mut f = std::fs::File::open(format!("/proc/{pid}/exe")).ok()?;
        let m = f.metadata().ok()?;
        if Some((m.dev(), m.ino())) != identity.exe {
            return None; // exec'd meanwhile: the final check denies
        }
        let key = FileKey::of(&m);
        if let Some(e) = self.lookup(&key) {
            return e.sha256;
        }
        if m.size() > MAX_HASHED_EXE {
            tracing::warn!(
                pid,
                size = m.size(),
                max = MAX_HASHED_EXE,
                "executable too large to hash: unix:sha256 selectors do not match it (logged once per file)"
            );
            self.insert(key, None, false);
            return None;
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        // Read at most the cap even if the file grows meanwhile (the key check catches it).
        let mut limited = (&mut f).take(MAX_HASHED_EXE);
        loop {
            let n = limited.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        // Changed while we read: neither trust nor cache it.
        if f.metadata().map(|m| FileKey::of(&m)).ok() != Some(key) {
            return None;
        }
        self.insert(key, Some(hex.clone()), true);
        Some(hex)
    }
}

/// How many times the file at `path` (its current version) was read to compute its
/// digest, and whether it was found over [`MAX_HASHED_EXE`]: the cache's statistics, for
/// tests and debugging. `None` when attestation never looked at it.
pub fn digest_stats(path: &Path) -> Option<DigestStats> {
    let m = std::fs::metadata(path).ok()?;
    DIGESTS.lookup(&FileKey::of(&m)).map(|e| DigestStats {
        hashes: e.hashes,
        too_large: e.sha256.is_none(),
    })
}

/// What the executable digest cache knows about one file (see [`digest_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestStats {
    /// Times the file was read and hashed.
    pub hashes: u64,
    /// True when it is over the size cap and was not hashed.
    pub too_large: bool,
}

/// The uid owning the local TCP socket at `remote` connected to our `local`, from
/// `/proc/net/tcp{,6}` (TCP endpoints have no peer credentials).
fn tcp_owner(remote: SocketAddr, local: SocketAddr) -> Option<u32> {
    let key = |a: SocketAddr| -> String {
        match a {
            SocketAddr::V4(v4) => {
                format!(
                    "{:08X}:{:04X}",
                    u32::from_ne_bytes(v4.ip().octets()),
                    a.port()
                )
            }
            SocketAddr::V6(v6) => {
                let o = v6.ip().octets();
                let words: String = o
                    .chunks(4)
                    .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                    .collect();
                format!("{words}:{:04X}", a.port())
            }
        }
    };
    // Each socket is listed by the family it was created with: AF_INET in tcp, AF_INET6 in
    // tcp6, where an IPv4 peer (grpc C-core dials 127.0.0.1 from an AF_INET6 socket) shows
    // as ::ffff:a.b.c.d. So look IPv4 (and v4-mapped) addresses up in both forms.
    let as_v4 = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let as_v6 = |a: SocketAddr| match a.ip().to_canonical() {
        std::net::IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        std::net::IpAddr::V6(_) => a,
    };
    for (table, remote, local) in [
        ("/proc/net/tcp", as_v4(remote), as_v4(local)),
        ("/proc/net/tcp6", as_v6(remote), as_v6(local)),
    ] {
        if table == "/proc/net/tcp" && remote.is_ipv6() {
            continue;
        }
        let (want_local, want_rem) = (key(remote), key(local));
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 7 && f[1] == want_local && f[2] == want_rem {
                return f[7].parse().ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{Binding, PeerCred};

    fn entry(selectors: Vec<Selector>) -> RegistrationEntry {
        RegistrationEntry {
            spiffe_id: registry::spiffe::SpiffeId::parse("spiffe://example.org/t").unwrap(),
            selectors,
            hint: None,
            ttl: None,
        }
    }

    /// Our own process as the peer of a real connection.
    fn me(entries: &[RegistrationEntry]) -> Result<Caller, AttestError> {
        let d = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(d.path().join("s")).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(d.path().join("s")).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let peer = rt.block_on(async {
            let s = tokio::net::UnixStream::from_std(s).unwrap();
            crate::peer::unix_peer(&s)
        });
        attest(&peer, entries)
    }

    #[test]
    fn own_process_is_attested_with_path_and_hash() {
        let exe = std::env::current_exe().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let all = [
            entry(vec![Selector::Uid(uid), Selector::Sha256("0".repeat(64))]),
            entry(vec![
                Selector::User("x".into()),
                Selector::Group("x".into()),
            ]),
        ];
        let c = me(&all).unwrap();
        assert_eq!(c.path.as_deref(), Some(exe.as_path()));
        let hash = c.sha256.clone().unwrap();
        assert_eq!(hash.len(), 64);
        assert!(c.matches(&[Selector::Uid(c.uid), Selector::Path(exe.clone())]));
        assert!(c.matches(&[Selector::Sha256(hash)]));
        assert!(!c.matches(&[Selector::Uid(c.uid), Selector::Uid(c.uid + 1)]));
        assert!(!c.matches(&[]));
        if let Some(u) = c.user.clone() {
            assert!(c.matches(&[Selector::User(u)]));
        }
        if let Some(g) = c.group.clone() {
            assert!(c.matches(&[Selector::Group(g)]));
        }
    }

    #[test]
    fn no_hash_unless_a_candidate_entry_needs_it() {
        let uid = nix::unistd::geteuid().as_raw();
        let other = [entry(vec![
            Selector::Uid(uid + 1),
            Selector::Sha256("0".repeat(64)),
        ])];
        let c = me(&other).unwrap();
        assert_eq!(c.sha256, None, "uid does not match: nothing to hash");
        assert_eq!(c.user, None, "no unix:user selector: no lookup");
        let plain = [entry(vec![Selector::Uid(uid)])];
        assert_eq!(me(&plain).unwrap().sha256, None);
    }

    #[test]
    fn pid_with_another_owner_is_rejected() {
        // Claim a child of ours belongs to an unlikely uid: the re-check against /proc
        // catches it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let peer = PeerInfo {
            cred: Some(PeerCred {
                pid,
                uid: 4_000_000,
                gid: 0,
                binding: Some(Binding::new(pid, None, None)),
            }),
            ..PeerInfo::default()
        };
        let r = attest(&peer, &[]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r, Err(AttestError::Raced { pid }));
    }

    #[test]
    fn tcp_peer_uid_comes_from_proc_net_tcp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, remote) = l.accept().unwrap();
        let peer = PeerInfo {
            cred: None,
            remote: Some(remote),
            local: Some(s.local_addr().unwrap()),
        };
        let caller = attest(&peer, &[]).unwrap();
        assert_eq!(caller.uid, nix::unistd::geteuid().as_raw());
        drop(c);
    }
}
