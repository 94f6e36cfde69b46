//! Test server apps that record what they saw: plain HTTP/1.1 and HTTP over rustls mTLS.

// Test harness: a failed setup is a test failure, loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Identity, uri_sans};
use crate::Error;

/// One HTTP request as a test server saw it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The request line, e.g. `GET / HTTP/1.1`.
    pub line: String,
    /// Header lines as `(lowercased name, value)`.
    pub headers: Vec<(String, String)>,
    /// Who connected (for [`MtlsServer`], the TCP peer).
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `METHOD SP target SP HTTP/1.x` with an upper-case ASCII method.
fn well_formed(line: &str) -> bool {
    let parts: Vec<&str> = line.split(' ').collect();
    matches!(parts.as_slice(), [m, t, v]
        if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())
            && !t.is_empty() && v.starts_with("HTTP/1."))
}

/// Reads one HTTP/1.1 request head (and discards a `Content-Length` body), answers `200`
/// with `body` (`400` for a malformed request line) and `Connection: close`. `None` if the peer sent no complete request.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, body: &str) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let req = Request {
        line,
        headers,
        peer: None,
    };
    let want: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - end - 4;
    while have < want {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    // Bytes a proxy should have stripped (a metadata-exchange frame, a TLS record) in
    // front of the request line make it malformed: answer 400 so the client sees it.
    let (status, body) = if well_formed(&req.line) {
        ("200 OK", body.to_owned())
    } else {
        (
            "400 Bad Request",
            format!("malformed request line {:?}", req.line),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await.ok()?;
    let _ = s.shutdown().await;
    Some(req)
}

/// A plain HTTP/1.1 server: answers every well-formed request `200` with the body `pong
/// from <name>` (a malformed one, e.g. with stray proxy bytes in front, `400`) and closes;
/// records each request. Stops when dropped.
pub struct HttpServer {
    addr: SocketAddr,
    name: String,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` (port 0 for any) and serves on it as `name`.
    pub async fn start(name: &str, addr: SocketAddr) -> Result<Self, Error> {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(Error::io(format!("bind HTTP server on {addr}")))?;
        Self::serve(name, l)
    }

    /// Serves as `name` on a listener bound elsewhere (e.g. inside a network namespace
    /// with [`crate::netns::Netns::within`]).
    pub fn serve(name: &str, l: tokio::net::TcpListener) -> Result<Self, Error> {
        let addr = l.local_addr().map_err(Error::io("HTTP server address"))?;
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let body = format!("pong from {name}");
        let rec = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = l.accept().await {
                let (rec, body) = (rec.clone(), body.clone());
                tokio::spawn(async move {
                    if let Some(mut r) = serve_one(&mut s, &body).await {
                        r.peer = Some(peer);
                        rec.lock().unwrap().push(r);
                    }
                });
            }
        });
        Ok(Self {
            addr,
            name: name.to_owned(),
            requests,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The body every response carries: `pong from <name>`.
    pub fn body(&self) -> String {
        format!("pong from {}", self.name)
    }

    /// The requests served so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`MtlsServer`] saw on one connection.
#[derive(Debug, Clone, Default)]
pub struct MtlsSeen {
    /// The SNI of the ClientHello.
    pub sni: Option<String>,
    /// The ALPN list the client offered.
    pub alpn_offered: Vec<String>,
    /// The URI SANs of the client's leaf certificate (its SPIFFE ID).
    pub peer_uri_sans: Vec<String>,
    /// The request it answered, if the client sent one.
    pub request: Option<Request>,
}

#[derive(Debug)]
struct HelloRecorder {
    key: Arc<rustls::sign::CertifiedKey>,
    hellos: Mutex<Vec<(Option<String>, Vec<String>)>>,
}

impl rustls::server::ResolvesServerCert for HelloRecorder {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let alpn = hello
            .alpn()
            .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
            .unwrap_or_default();
        self.hellos
            .lock()
            .unwrap()
            .push((hello.server_name().map(str::to_owned), alpn));
        Some(self.key.clone())
    }
}

/// The server app of the `Mtls` mode: terminates mTLS itself with its SVID, requires a
/// client certificate chaining to the given roots, answers HTTP/1.1 `200 pong from
/// <name>` inside TLS, and records the SNI, offered ALPN and client URI SANs it saw.
pub struct MtlsServer {
    addr: SocketAddr,
    name: String,
    seen: Arc<Mutex<Vec<MtlsSeen>>>,
    recorder: Arc<HelloRecorder>,
    task: tokio::task::JoinHandle<()>,
}

impl MtlsServer {
    /// Binds `addr` and serves as `name` with `identity` (chain + key), trusting `roots`
    /// for client certificates.
    pub async fn start(
        name: &str,
        addr: SocketAddr,
        identity: Identity,
        roots: RootCertStore,
    ) -> Result<Self, Error> {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(Error::io(format!("bind mTLS server on {addr}")))?;
        Self::serve(name, l, identity, roots)
    }

    /// Serves as `name` with `identity` and client roots `roots` on a listener bound
    /// elsewhere (e.g. inside a network namespace with [`crate::netns::Netns::within`]).
    pub fn serve(
        name: &str,
        l: tokio::net::TcpListener,
        identity: Identity,
        roots: RootCertStore,
    ) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = provider
            .key_provider
            .load_private_key(identity.key)
            .map_err(|e| Error::Unexpected(format!("server key: {e}")))?;
        let recorder = Arc::new(HelloRecorder {
            key: Arc::new(rustls::sign::CertifiedKey::new(identity.chain, key)),
            hellos: Mutex::default(),
        });
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| Error::Unexpected(format!("client verifier: {e}")))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Unexpected(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(recorder.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let addr = l.local_addr().map_err(Error::io("mTLS server address"))?;
        let seen: Arc<Mutex<Vec<MtlsSeen>>> = Arc::default();
        let body = format!("pong from {name}");
        let (rec, hellos) = (seen.clone(), recorder.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = l.accept().await {
                let (acceptor, rec, hellos, body) =
                    (acceptor.clone(), rec.clone(), hellos.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = tls.get_ref().1;
                    let peer_uri_sans = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| uri_sans(c))
                        .unwrap_or_default();
                    let (sni, alpn_offered) = hellos
                        .hellos
                        .lock()
                        .unwrap()
                        .last()
                        .cloned()
                        .unwrap_or_default();
                    let request = serve_one(&mut tls, &body).await.map(|mut r| {
                        r.peer = Some(peer);
                        r
                    });
                    rec.lock().unwrap().push(MtlsSeen {
                        sni,
                        alpn_offered,
                        peer_uri_sans,
                        request,
                    });
                });
            }
        });
        Ok(Self {
            addr,
            name: name.to_owned(),
            seen,
            recorder,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The body every response carries: `pong from <name>`.
    pub fn body(&self) -> String {
        format!("pong from {}", self.name)
    }

    /// The completed mTLS connections so far.
    pub fn seen(&self) -> Vec<MtlsSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last completed mTLS connection, waiting up to `timeout` for one: the server
    /// notes a connection after it has answered, so a client can see the response first.
    pub async fn wait_seen(&self, timeout: std::time::Duration) -> Result<MtlsSeen, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.seen().pop() {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("a completed connection at {}", self.name),
                    timeout,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Every ClientHello so far as (SNI, offered ALPN), including refused handshakes.
    pub fn hellos(&self) -> Vec<(Option<String>, Vec<String>)> {
        self.recorder.hellos.lock().unwrap().clone()
    }
}

impl Drop for MtlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
