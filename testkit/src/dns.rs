//! DNS peers for tests: an authoritative upstream (hickory-server with an in-memory zone)
//! started on loopback, and `dig` as the client, so resolver tests run against real DNS
//! software on both sides.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

use crate::Error;

/// The zone the test upstream serves.
pub const UPSTREAM_ZONE: &str = "upstream.test.";
/// `www.upstream.test` resolves to this.
pub const UPSTREAM_WWW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// `big.upstream.test` has this many A records: too large for a 1232-byte UDP answer.
pub const UPSTREAM_BIG_COUNT: u8 = 120;

/// An authoritative DNS server for `upstream.test.` on 127.0.0.1 (UDP and TCP, same port):
/// `www` A 192.0.2.10, `txt` TXT "hello from upstream", `big` with 120 A records;
/// anything else in the zone is NXDOMAIN. Stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    server: Server<Catalog>,
}

impl Upstream {
    /// Starts the server on a free port.
    pub async fn start() -> Result<Self, Error> {
        let origin = Name::from_str(UPSTREAM_ZONE).map_err(|e| Error::Unexpected(e.to_string()))?;
        let name = |n: &str| {
            Name::from_str(&format!("{n}.{UPSTREAM_ZONE}"))
                .map_err(|e| Error::Unexpected(e.to_string()))
        };
        let mut zone =
            InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::empty(
                origin.clone(),
                ZoneType::Primary,
                AxfrPolicy::Deny,
            );
        let soa = SOA::new(name("ns")?, name("admin")?, 1, 3600, 600, 86400, 60);
        zone.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
        zone.upsert_mut(
            Record::from_rdata(name("www")?, 300, RData::A(A(UPSTREAM_WWW))),
            1,
        );
        zone.upsert_mut(
            Record::from_rdata(
                name("txt")?,
                300,
                RData::TXT(TXT::new(vec!["hello from upstream".into()])),
            ),
            1,
        );
        for i in 0..UPSTREAM_BIG_COUNT {
            zone.upsert_mut(
                Record::from_rdata(name("big")?, 300, RData::A(A(Ipv4Addr::new(10, 9, 0, i)))),
                1,
            );
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);

        // UDP and TCP on the same port: the kernel picks a free UDP port, whose TCP twin
        // another test may hold; try again with a new port rather than fail.
        let mut attempt = 0;
        let (udp, tcp, addr) = loop {
            attempt += 1;
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(Error::io("bind upstream udp"))?;
            let addr = udp.local_addr().map_err(Error::io("upstream addr"))?;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(e) if attempt >= 20 => return Err(Error::io("bind upstream tcp")(e)),
                Err(_) => continue,
            }
        };
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 65535);
        Ok(Self { addr, server })
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (the port then refuses or times out).
    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

/// True when `dig` is installed.
pub fn dig_available() -> bool {
    Command::new("dig").arg("-v").output().is_ok()
}

/// What `dig` printed, parsed just enough for assertions.
#[derive(Debug, Clone)]
pub struct DigAnswer {
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...
    pub status: String,
    /// Header flags (`qr`, `aa`, `tc`, ...).
    pub flags: Vec<String>,
    /// Answer records, each `(name, ttl, type, data)`.
    pub answers: Vec<(String, u32, String, String)>,
    /// The whole output, for assertion messages.
    pub raw: String,
}

/// Runs `dig @server -p port name type` with extra `opts` (e.g. `+tcp`, `+ignore`) in a
/// blocking thread, with 1 try of 3 s unless `opts` say otherwise.
pub async fn dig(
    server: SocketAddr,
    name: &str,
    qtype: &str,
    opts: &[&str],
) -> Result<DigAnswer, Error> {
    let mut args = vec![
        format!("@{}", server.ip()),
        "-p".into(),
        server.port().to_string(),
        name.into(),
        qtype.into(),
        "+tries=1".into(),
        "+time=3".into(),
    ];
    args.extend(opts.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || Command::new("dig").args(&args).output())
        .await
        .map_err(|e| Error::Unexpected(e.to_string()))?
        .map_err(Error::io("run dig"))?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_dig(&raw)
}

fn parse_dig(raw: &str) -> Result<DigAnswer, Error> {
    let header = raw
        .lines()
        .find(|l| l.contains("->>HEADER<<-"))
        .ok_or_else(|| Error::Unexpected(format!("no answer from dig:\n{raw}")))?;
    let status = header
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_owned();
    let flags = raw
        .lines()
        .find(|l| l.starts_with(";; flags:"))
        .and_then(|l| l.strip_prefix(";; flags:"))
        .and_then(|l| l.split(';').next())
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for l in raw.lines() {
        if l.starts_with(";; ANSWER SECTION:") {
            in_answer = true;
            continue;
        }
        if in_answer {
            if l.trim().is_empty() || l.starts_with(";;") {
                break;
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 5 {
                answers.push((
                    f[0].to_owned(),
                    f[1].parse().unwrap_or(0),
                    f[3].to_owned(),
                    f[4..].join(" "),
                ));
            }
        }
    }
    Ok(DigAnswer {
        status,
        flags,
        answers,
        raw: raw.to_owned(),
    })
}
