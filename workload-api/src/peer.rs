//! Who is at the other end of a Workload API connection, and the facts that bind the
//! connection to that process.
//!
//! Attestation runs per request, long after `accept`. `SO_PEERCRED` names the pid that
//! called `connect`, but a pid is only a number: the process may have handed the
//! connection to another process, exec'd another program, or exited and had its pid
//! reused. So at accept we keep a [`Binding`]: our socket's inode, a pidfd of the peer
//! (`SO_PEERPIDFD`, Linux >= 6.5; it pins the exact process that connected, even one
//! whose pid was reused between connect and accept) and, captured on the blocking pool
//! right after accept, the process's identity (start time, `/proc/PID/exe` device and
//! inode) and the inode of the peer's end of the socket. [`Binding::verify`] then checks
//! at every call that the same process, running the same program, still holds the
//! connection.
//!
//! Everything here that touches `/proc` or netlink blocks: call it off the async workers.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, getsockopt,
    sockopt::{PeerCredentials, PeerPidfd},
};
use tokio::net::UnixStream;

/// The kernel's word on who is at the other end of a Unix socket (`SO_PEERCRED`), plus
/// what binds the connection to that process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// What ties the connection to the process; `None` when it could not be recorded,
    /// and then only uid/gid are attested.
    pub binding: Option<Binding>,
}

/// What is known about a connection's peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Unix sockets: the peer's credentials.
    pub cred: Option<PeerCred>,
    /// TCP: the peer's address.
    pub remote: Option<std::net::SocketAddr>,
    /// TCP: our address on this connection.
    pub local: Option<std::net::SocketAddr>,
}

/// Why a connection is no longer bound to the process that made it. Each one denies the
/// call (PermissionDenied), since the process asking may not be the one attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The connecting process is gone (its pidfd reports it dead, or its pid now names
    /// another process).
    #[error(
        "caller process {pid} has exited or its pid was reused; the connection no longer belongs to the process that opened it"
    )]
    Exited {
        /// The pid from `SO_PEERCRED`.
        pid: i32,
    },
    /// The process runs another executable than when it connected.
    #[error(
        "caller process {pid} executed another program after it connected; connect from the program to be attested"
    )]
    Execed {
        /// The pid.
        pid: i32,
    },
    /// The process no longer has the connection open: it was handed to another process.
    #[error(
        "caller process {pid} no longer holds this connection (it was handed to another process); connect from the process to be attested"
    )]
    SocketNotHeld {
        /// The pid.
        pid: i32,
    },
}

/// The identity of a process image: changes on exec (exe) or pid reuse (start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcIdentity {
    /// Device and inode of the executable `/proc/PID/exe` points to; `None` when we may
    /// not look (another user's process and no `CAP_SYS_PTRACE`): then only uid/gid are
    /// attested.
    pub exe: Option<(u64, u64)>,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot): differs for a reused pid.
    pub start_time: u64,
}

/// What was recorded about the peer right after accept.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Anchor {
    /// The peer's pid is not visible here (0: another pid namespace): uid/gid only.
    NotVisible,
    /// The process was already gone (or unreadable) when we looked.
    Gone,
    /// The process as it was right after accept.
    Seen {
        identity: ProcIdentity,
        /// Inode of the peer's end of the connection (from `sock_diag`), if known.
        peer_inode: Option<u64>,
    },
}

struct Inner {
    pid: i32,
    /// Inode of our end of the connection.
    local_inode: Option<u64>,
    /// The peer process, pinned (`SO_PEERPIDFD`), when the kernel offers it.
    pidfd: Option<OwnedFd>,
    anchor: OnceLock<Anchor>,
    /// The fd number under which the peer held the socket last time (a fast path for
    /// processes with many descriptors).
    last_fd: AtomicI32,
}

/// Ties a connection to the process that opened it (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct Binding(Arc<Inner>);

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("pid", &self.0.pid)
            .field("local_inode", &self.0.local_inode)
            .field("pidfd", &self.0.pidfd.as_ref().map(AsRawFd::as_raw_fd))
            .field("anchor", &self.0.anchor.get())
            .finish()
    }
}

impl PartialEq for Binding {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Binding {}

/// The process facts a verified binding vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The process identity recorded after accept (and found again now).
    pub identity: ProcIdentity,
}

impl Binding {
    /// A binding for `pid` whose connection's local end has inode `local_inode`. Cheap: the
    /// `/proc` facts are captured by [`Binding::anchor_now`] (on the blocking pool).
    pub(crate) fn new(pid: i32, local_inode: Option<u64>, pidfd: Option<OwnedFd>) -> Self {
        Binding(Arc::new(Inner {
            pid,
            local_inode,
            pidfd,
            anchor: OnceLock::new(),
            last_fd: AtomicI32::new(-1),
        }))
    }

    /// Records the process identity now (once; later calls return at once). Blocking.
    pub fn anchor_now(&self) {
        self.anchor();
    }

    fn anchor(&self) -> &Anchor {
        self.0.anchor.get_or_init(|| {
            let pid = self.0.pid;
            if pid <= 0 {
                return Anchor::NotVisible;
            }
            let Some(identity) = proc_identity(pid) else {
                return Anchor::Gone;
            };
            let peer_inode = self.0.local_inode.and_then(|ino| {
                let peer = unix_peer_inode(ino);
                if peer.is_none() {
                    warn_no_sock_diag();
                }
                peer
            });
            // Read again: the facts above belong to this process only if it is still there.
            if !self.alive()
                || proc_identity(pid).map(|i| i.start_time) != Some(identity.start_time)
            {
                return Anchor::Gone;
            }
            Anchor::Seen {
                identity,
                peer_inode,
            }
        })
    }

    /// True while the process that connected has not exited: from its pidfd when there is
    /// one (exact), else nothing to check here (callers compare start times).
    fn alive(&self) -> bool {
        match &self.0.pidfd {
            Some(fd) => pidfd_pid(fd) == Some(self.0.pid),
            None => true,
        }
    }

    /// Checks that the process that connected is still there, runs the program it ran at
    /// accept, and still holds the connection. `Ok(None)`: the pid is not visible from
    /// here (another pid namespace), so only uid/gid can be attested. Blocking.
    pub fn verify(&self) -> Result<Option<Verified>, BindError> {
        let pid = self.0.pid;
        let (identity, peer_inode) = match self.anchor() {
            Anchor::NotVisible => return Ok(None),
            Anchor::Gone => return Err(BindError::Exited { pid }),
            Anchor::Seen {
                identity,
                peer_inode,
            } => (*identity, *peer_inode),
        };
        let now = proc_identity(pid).ok_or(BindError::Exited { pid })?;
        if !self.alive() || now.start_time != identity.start_time {
            return Err(BindError::Exited { pid });
        }
        if now.exe != identity.exe {
            return Err(BindError::Execed { pid });
        }
        // Without the executable nothing process-specific is attested (uid/gid only), and
        // the descriptors are just as unreadable.
        if identity.exe.is_some()
            && let Some(ino) = peer_inode
        {
            let hint = self.0.last_fd.load(Ordering::Relaxed);
            match holds_socket(pid, ino, hint) {
                Some(fd) => self.0.last_fd.store(fd, Ordering::Relaxed),
                None => return Err(BindError::SocketNotHeld { pid }),
            }
        }
        Ok(Some(Verified { identity }))
    }

    /// Checks, after other `/proc` reads, that they were about the process that connected,
    /// running the same program (not a successor with the same pid, nor a new exec).
    /// Blocking.
    pub fn still_same(&self, identity: &ProcIdentity) -> bool {
        self.alive() && proc_identity(self.0.pid).as_ref() == Some(identity)
    }
}

fn warn_no_sock_diag() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "sock_diag (NETLINK_SOCK_DIAG, unix_diag) is unavailable: cannot check that a caller still holds its connection"
        );
    });
}

/// Peer facts of an accepted Unix connection: `SO_PEERCRED`, plus a [`Binding`] (socket
/// inode and `SO_PEERPIDFD`; the `/proc` facts are captured on the blocking pool when a
/// Tokio runtime is there, else by the first attestation).
pub(crate) fn unix_peer(s: &UnixStream) -> PeerInfo {
    let cred = match getsockopt(s, PeerCredentials) {
        Ok(c) => {
            let local_inode = nix::sys::stat::fstat(s.as_fd()).ok().map(|st| st.st_ino);
            // EINVAL/ENOPROTOOPT before Linux 6.5; ESRCH when the peer already exited.
            let pidfd = getsockopt(s, PeerPidfd).ok();
            let binding = Binding::new(c.pid(), local_inode, pidfd);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let b = binding.clone();
                drop(rt.spawn_blocking(move || b.anchor_now()));
            }
            Some(PeerCred {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
                binding: Some(binding),
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "SO_PEERCRED failed; the caller cannot be attested");
            None
        }
    };
    PeerInfo {
        cred,
        ..PeerInfo::default()
    }
}

/// Field 22 of `/proc/<pid>/stat`: the start time, which differs for a reused pid.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn proc_identity(pid: i32) -> Option<ProcIdentity> {
    let start = start_time(pid)?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Some(ProcIdentity {
        exe,
        start_time: start,
    })
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo` (`Pid: -1` once it has exited).
fn pidfd_pid(fd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let line = info.lines().find(|l| l.starts_with("Pid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The descriptor under which `pid` holds the socket with inode `ino` (trying `hint`
/// first), if it does.
fn holds_socket(pid: i32, ino: u64, hint: i32) -> Option<i32> {
    let want = format!("socket:[{ino}]");
    let is_it = |fd: &str| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .is_ok_and(|l| l.as_os_str() == want.as_str())
    };
    if hint >= 0 && is_it(&hint.to_string()) {
        return Some(hint);
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|fd| is_it(fd))
        .and_then(|fd| fd.parse().ok())
}

// From linux/netlink.h, linux/sock_diag.h and linux/unix_diag.h (stable kernel ABI).
const AF_UNIX: u8 = 1;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const UDIAG_SHOW_PEER: u32 = 4;
const UNIX_DIAG_PEER: u16 = 2;

/// The inode of the other end of the Unix socket with inode `ino`, from the kernel's
/// `sock_diag` (netlink; `ss -x` asks the same). Blocking.
pub(crate) fn unix_peer_inode(ino: u64) -> Option<u64> {
    let ino32 = u32::try_from(ino).ok()?;
    let sock = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    // struct nlmsghdr (16 bytes) + struct unix_diag_req (24 bytes), native endian.
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    req.push(AF_UNIX);
    req.push(0); // protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&ino32.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    nix::sys::socket::sendto(
        sock.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .ok()?;
    let mut buf = [0u8; 1024];
    let n = nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
    parse_peer_reply(buf.get(..n)?, ino32)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a `unix_diag_msg` reply for socket `ino`: the `UNIX_DIAG_PEER` attribute.
fn parse_peer_reply(b: &[u8], ino: u32) -> Option<u64> {
    let len = usize::try_from(u32_at(b, 0)?).ok()?;
    let kind = u16_at(b, 4)?;
    if kind == NLMSG_ERROR || kind != SOCK_DIAG_BY_FAMILY || len > b.len() {
        return None; // e.g. no such socket, or truncated
    }
    let b = &b[..len];
    // unix_diag_msg after the 16-byte header: family, type, state, pad, ino, cookie[2].
    if u32_at(b, 20)? != ino {
        return None;
    }
    let mut off = 32;
    while off + 4 <= b.len() {
        let alen = usize::from(u16_at(b, off)?);
        if alen < 4 {
            return None;
        }
        if u16_at(b, off + 2)? == UNIX_DIAG_PEER {
            return u32_at(b, off + 4).map(u64::from);
        }
        off += (alen + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_names_the_other_end() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ia = nix::sys::stat::fstat(a.as_fd()).unwrap().st_ino;
        let ib = nix::sys::stat::fstat(b.as_fd()).unwrap().st_ino;
        assert_eq!(unix_peer_inode(ia), Some(ib));
        assert_eq!(unix_peer_inode(ib), Some(ia));
    }

    #[test]
    fn an_error_reply_names_no_peer() {
        let mut b = vec![0u8; 36];
        b[..4].copy_from_slice(&36u32.to_ne_bytes());
        b[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_peer_reply(&b, 7), None);
        assert_eq!(parse_peer_reply(&b[..3], 7), None);
    }

    #[test]
    fn own_process_holds_its_socket() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ib = nix::sys::stat::fstat(b.as_fd()).unwrap().st_ino;
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(holds_socket(pid, ib, -1).is_some());
        drop(b);
        assert!(holds_socket(pid, ib, -1).is_none());
        drop(a);
    }

    #[test]
    fn a_process_without_the_socket_is_refused() {
        // A child that never had the socket: the binding names it, our end names a pair
        // the child does not hold.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let ia = nix::sys::stat::fstat(a.as_fd()).unwrap().st_ino;
        let binding = Binding::new(pid, Some(ia), None);
        let r = binding.verify();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r, Err(BindError::SocketNotHeld { pid }));
        // And once it is gone, the binding says so.
        assert_eq!(binding.verify(), Err(BindError::Exited { pid }));
    }
}
