//! A minimal HTTP/1.1 GET for admin endpoints (Envoy's, ferry's): tests need nothing more,
//! and a full client would add a dependency for one request shape.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;

/// An HTTP response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

/// `GET path` on `addr` with `Connection: close`, reading the whole response.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response, Error> {
    request(addr, "GET", path).await
}

/// `POST path` with an empty body (Envoy admin mutations such as `/drain_listeners`).
pub async fn post(addr: SocketAddr, path: &str) -> Result<Response, Error> {
    request(addr, "POST", path).await
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Result<Response, Error> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(Error::io(format!("connect {addr}")))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(Error::io(format!("write to {addr}")))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .map_err(Error::io(format!("read from {addr}")))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Unexpected(format!("no HTTP header end in reply from {addr}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Unexpected(format!("bad status line from {addr}: {head:?}")))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
