//! The demo's own workloads: the plain HTTP ping-pong server (behind ferry's inbound), the
//! Mtls server doing its own mTLS with its SVID, and the two clients (a plain HTTP client
//! through the client zone's DNS and sidecar; an mTLS client with its own SVID).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use proxy::identity::{Identity, peer_spiffe_id};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use xds::client::model::{IstioTls, ServerIdMatch};

/// Reads an HTTP/1.1 request head (bounded) and answers `pong from <name>`.
async fn pong<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, name: &str) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        if got == buf.len() {
            return Ok(());
        }
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            return Ok(());
        }
        got += n;
    }
    let body = format!("pong from {name}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// The plain HTTP ping-pong server on `listener` until `stop`.
pub async fn ping_pong_server(listener: TcpListener, stop: CancellationToken) {
    loop {
        let (s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        tokio::spawn(async move {
            let _ = pong(s, "server (plain HTTP behind ferry's inbound)").await;
        });
    }
}

/// The Mtls server: terminates mTLS itself with its SVID (`identity`), requiring a client
/// certificate from a trusted (own or federated) domain.
pub async fn mtls_server(listener: TcpListener, identity: Identity, stop: CancellationToken) {
    let config = match identity.server_config(&[b"http/1.1"]) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Mtls server has no identity");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(5), acceptor.accept(s)).await
            {
                let _ = pong(tls, "mtls-server (its own mTLS)").await;
            }
        });
    }
}

/// Asks the DNS server at `dns` for `name`'s A record.
pub async fn resolve(dns: SocketAddr, name: &str) -> anyhow::Result<Ipv4Addr> {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&m.to_vec()?, dns).await?;
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .with_context(|| format!("no DNS answer from {dns}"))??;
    let resp = Message::from_vec(&buf[..n])?;
    resp.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .with_context(|| format!("{dns} has no A record for {name}"))
}

/// One plain HTTP GET: returns (the client's local address, the response body).
pub async fn plain_get(addr: SocketAddr, host: &str) -> anyhow::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let local = s.local_addr()?;
    let req = format!("GET /ping HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .context("response timed out")??;
    body(&out).map(|b| (local, b))
}

/// One GET over the client's own mTLS: returns (server SPIFFE ID, body).
pub async fn mtls_get(addr: SocketAddr, identity: &Identity) -> anyhow::Result<(String, String)> {
    let tls = IstioTls {
        sni: super::topology::MTLS_HOST.to_owned(),
        alpn: vec!["http/1.1".to_owned()],
        cert_secret: "default".to_owned(),
        validation_secret: format!("spiffe://{}", super::topology::SERVER_TD),
        server_ids: ServerIdMatch::Exact(vec![super::topology::MTLS_SERVER_ID.to_owned()]),
    };
    let config: Arc<rustls::ClientConfig> = identity.client_config(&tls)?;
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let name = ServerName::try_from(super::topology::MTLS_HOST.to_owned())?;
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let server = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(peer_spiffe_id)
        .unwrap_or_else(|| "-".to_owned());
    s.write_all(
        format!(
            "GET /ping HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            super::topology::MTLS_HOST
        )
        .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    // The server closes after answering; a missing close_notify is not an error here.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    body(&String::from_utf8_lossy(&out)).map(|b| (server, b))
}

fn body(resp: &str) -> anyhow::Result<String> {
    if !resp.starts_with("HTTP/1.1 200") {
        bail!(
            "unexpected response: {:?}",
            resp.lines().next().unwrap_or("")
        );
    }
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default())
}

/// Picks the SVID with this SPIFFE ID.
#[derive(Debug)]
struct ById(String);

impl spiffe::x509_source::SvidPicker for ById {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids
            .iter()
            .position(|s| s.spiffe_id().to_string() == self.0)
    }
}

/// A workload's identity from the Workload API at `socket`: the default SVID, or the one
/// with `id`.
pub async fn identity(socket: &std::path::Path, id: Option<&str>) -> anyhow::Result<Identity> {
    let mut b = spiffe::X509Source::builder().endpoint(format!("unix://{}", socket.display()));
    if let Some(id) = id {
        b = b.picker(ById(id.to_owned()));
    }
    let source = tokio::time::timeout(Duration::from_secs(20), b.build())
        .await
        .with_context(|| format!("no SVID from {} in 20 s", socket.display()))??;
    Ok(Identity::from_source(Arc::new(source)))
}
