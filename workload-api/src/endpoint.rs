//! The listening socket: `unix:///path` (the normal case: peer credentials identify the
//! caller) or `tcp://ip:port`. Each accepted connection carries a [`PeerInfo`] that tonic
//! hands to every request as a connection extension.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use registry::config::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::accept::{self, Accept, Connection};
use crate::error::Error;
use crate::limits::{ConnStats, ConnectionLimits, PeerKey};
use crate::peer::unix_peer;
pub use crate::peer::{PeerCred, PeerInfo};

/// An accepted connection with its peer facts.
#[derive(Debug)]
pub enum PeerStream {
    /// From the Unix socket.
    Unix(UnixStream, PeerInfo),
    /// From the TCP listener.
    Tcp(TcpStream, PeerInfo),
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            PeerStream::Unix(_, p) | PeerStream::Tcp(_, p) => p.clone(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            PeerStream::Unix($s, _) => {
                let $s = Pin::new($s);
                $e
            }
            PeerStream::Tcp($s, _) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A bound listener. Dropping it removes the socket file it created.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket at this path.
    Unix(UnixListener, PathBuf),
    /// A TCP listener.
    Tcp(TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the endpoint. For a Unix socket: creates the parent directory if missing (0755),
/// replaces a stale socket file only when nothing accepts connections on it, and makes
/// the socket 0666 so any local workload can call (who gets what is decided by attestation;
/// access to the socket is controlled by the directory the operator chooses).
pub fn bind(endpoint: &Endpoint) -> Result<Listener, Error> {
    let ep = endpoint.to_string();
    let err = |action: &'static str| {
        let ep = ep.clone();
        move |source| Error::Listen {
            endpoint: ep,
            action,
            source,
        }
    };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let std = std::net::TcpListener::bind(addr).map_err(err("bind"))?;
            std.set_nonblocking(true).map_err(err("set non-blocking"))?;
            Ok(Listener::Tcp(
                TcpListener::from_std(std).map_err(err("register"))?,
            ))
        }
        Endpoint::Unix(path) => {
            if let Some(dir) = path.parent()
                && !dir.exists()
            {
                std::fs::create_dir_all(dir).map_err(err("create socket directory"))?;
            }
            remove_stale(path)?;
            let l = UnixListener::bind(path).map_err(err("bind"))?;
            let listener = Listener::Unix(l, path.clone());
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                .map_err(err("chmod 0666"))?;
            Ok(listener)
        }
    }
}

fn remove_stale(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse {
            path: path.to_owned(),
        }),
        Err(_) => {
            tracing::info!(path = %path.display(), "removing stale Workload API socket (nothing listens on it)");
            std::fs::remove_file(path).map_err(|source| Error::Listen {
                endpoint: format!("unix://{}", path.display()),
                action: "remove stale socket",
                source,
            })
        }
    }
}

impl Listener {
    /// The admitted connections, each with its [`PeerInfo`], behind the per-peer limits,
    /// the handshake timeout and the `:authority` shim ([`crate::accept`]).
    pub fn incoming(
        self,
        limits: ConnectionLimits,
        stats: Arc<ConnStats>,
    ) -> impl Stream<Item = io::Result<Connection<PeerStream>>> + Send {
        accept::incoming(self, limits, stats)
    }
}

/// A connection between `accept` and the limit check: only what the check needs is known.
#[derive(Debug)]
pub enum RawConn {
    /// From the Unix socket.
    Unix(UnixStream),
    /// From the TCP listener, with its (cheap) addresses.
    Tcp(TcpStream, PeerInfo),
}

impl Accept for Listener {
    type Raw = RawConn;
    type Io = PeerStream;

    async fn accept(&mut self) -> io::Result<(RawConn, PeerKey)> {
        match self {
            Listener::Unix(u, _) => {
                let (s, _) = u.accept().await?;
                // Only the uid, for the quota: the full peer facts (pidfd, /proc) are
                // gathered once the connection is admitted.
                let key = match getsockopt(&s, PeerCredentials) {
                    Ok(c) => PeerKey::Uid(c.uid()),
                    Err(_) => PeerKey::Unknown,
                };
                Ok((RawConn::Unix(s), key))
            }
            Listener::Tcp(t) => {
                let (s, remote) = t.accept().await?;
                let p = PeerInfo {
                    cred: None,
                    remote: Some(canonical(remote)),
                    local: s.local_addr().ok().map(canonical),
                };
                let key = PeerKey::of(&p);
                Ok((RawConn::Tcp(s, p), key))
            }
        }
    }

    fn admit(raw: RawConn) -> PeerStream {
        match raw {
            RawConn::Unix(s) => {
                let p = unix_peer(&s);
                PeerStream::Unix(s, p)
            }
            RawConn::Tcp(s, p) => PeerStream::Tcp(s, p),
        }
    }
}

/// A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`; the kernel lists their
/// sockets in `/proc/net/tcp` as IPv4. Fold them so the address is the same however the
/// listener was bound (owner lookup, per-address limits, logs).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
