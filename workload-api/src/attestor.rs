//! Caller attestation, SPIRE unix-attestor style: who the caller is comes from the kernel
//! (`SO_PEERCRED`: pid, uid, gid), what it runs from `/proc/<pid>/exe`. The pid is checked
//! again after `/proc` was read, so a process that exited and whose pid was reused cannot
//! borrow another program's identity.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};
use registry::config::Selector;
use sha2::{Digest, Sha256};

use crate::endpoint::PeerInfo;

/// Why a caller could not be attested (each maps to a gRPC status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// Neither peer credentials nor a TCP owner could be found.
    #[error("caller cannot be attested: {0}")]
    Unknown(String),
    /// The process went away (or its pid was reused) while it was being inspected.
    #[error("caller process {pid} changed during attestation (exited or pid reused)")]
    Raced {
        /// The pid.
        pid: i32,
    },
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
    /// User name, when the uid has one.
    pub user: Option<String>,
    /// Group name, when the gid has one.
    pub group: Option<String>,
    /// The executable, from `/proc/<pid>/exe`.
    pub path: Option<PathBuf>,
    /// SHA-256 of the executable, lowercase hex (computed only when an entry needs it).
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
}

/// Attests the peer of a connection. `want_sha256` asks for the executable's hash (costly
/// for big binaries, so only when some registration entry uses `unix:sha256:`).
pub fn attest(peer: &PeerInfo, want_sha256: bool) -> Result<Caller, AttestError> {
    if let Some(c) = peer.cred {
        return attest_pid(c.pid, c.uid, c.gid, want_sha256);
    }
    if let (Some(remote), Some(local)) = (peer.remote, peer.local) {
        let uid = tcp_owner(remote, local).ok_or_else(|| {
            AttestError::Unknown(format!("no local socket owner found for TCP peer {remote}"))
        })?;
        return Ok(Caller {
            pid: None,
            uid,
            gid: None,
            user: user_name(uid),
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

/// Field 22 of `/proc/<pid>/stat`: the start time, which differs for a reused pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn proc_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Real, effective, saved, fs: SO_PEERCRED reports the effective uid.
    line.split_whitespace().nth(2)?.parse().ok()
}

fn hash_file(path: &str) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn attest_pid(pid: i32, uid: u32, gid: u32, want_sha256: bool) -> Result<Caller, AttestError> {
    let mut caller = Caller {
        pid: Some(pid),
        uid,
        gid: Some(gid),
        user: user_name(uid),
        group: group_name(gid),
        path: None,
        sha256: None,
    };
    // Without /proc for this pid (another pid namespace), only uid/gid selectors can match.
    let Some(before) = start_time(pid) else {
        return Ok(caller);
    };
    let exe = format!("/proc/{pid}/exe");
    caller.path = std::fs::read_link(&exe).ok();
    if want_sha256 {
        caller.sha256 = hash_file(&exe);
    }
    // Same process still there, and still the owner the kernel told us about?
    if start_time(pid) != Some(before) || proc_uid(pid) != Some(uid) {
        return Err(AttestError::Raced { pid });
    }
    Ok(caller)
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
    let (want_local, want_rem) = (key(remote), key(local));
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
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
    use crate::endpoint::PeerCred;

    fn me() -> Caller {
        let pid = i32::try_from(std::process::id()).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let peer = PeerInfo {
            cred: Some(PeerCred { pid, uid, gid }),
            ..PeerInfo::default()
        };
        attest(&peer, true).unwrap()
    }

    #[test]
    fn own_process_is_attested_with_path_and_hash() {
        let c = me();
        let exe = std::env::current_exe().unwrap();
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
    fn pid_with_another_owner_is_rejected() {
        // Claim pid 1 belongs to an unlikely uid: the re-check against /proc catches it.
        let peer = PeerInfo {
            cred: Some(PeerCred {
                pid: 1,
                uid: 4_000_000,
                gid: 0,
            }),
            ..PeerInfo::default()
        };
        if std::path::Path::new("/proc/1/stat").exists() {
            assert_eq!(attest(&peer, false), Err(AttestError::Raced { pid: 1 }));
        }
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
        let caller = attest(&peer, false).unwrap();
        assert_eq!(caller.uid, nix::unistd::geteuid().as_raw());
        drop(c);
    }
}
