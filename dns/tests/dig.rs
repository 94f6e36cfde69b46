//! The resolver as `dig` sees it, with a real authoritative upstream (hickory-server) on
//! loopback: federated answers (RFC 1035 A, RFC 3596 AAAA NODATA), forwarding with EDNS0
//! intact (RFC 6891), truncation over UDP and full answers over TCP (RFC 7766), SERVFAIL
//! when the upstream is gone, malformed packets dropped.

#![allow(clippy::unwrap_used)] // test setup: a failure should panic with its cause

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dns::answer::Settings;
use dns::metrics::{Metrics, Outcome};
use dns::{DnsTable, Resolver, ResolverConfig};
use testkit::dns::{UPSTREAM_BIG_COUNT, UPSTREAM_WWW, Upstream, dig, dig_available};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const FED: &str = "server.demo.local.domain";
const VIP: Ipv4Addr = Ipv4Addr::new(127, 240, 3, 4);

struct Setup {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    table: watch::Sender<Arc<DnsTable>>,
    upstream: Option<Upstream>,
    stop: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn setup(timeout: Duration) -> Option<Setup> {
    if !testkit::require("dig (Debian package dnsutils)", dig_available()) {
        return None;
    }
    let upstream = Upstream::start().await.unwrap();
    let (tx, rx) = watch::channel(Arc::new(DnsTable::new([(FED, VIP)])));
    let mut cfg = ResolverConfig::new("127.0.0.1:0".parse().unwrap(), vec![upstream.addr()]);
    cfg.timeout = timeout;
    cfg.tcp_idle = Duration::from_millis(400);
    cfg.settings = Settings {
        ttl: 30,
        search_suffixes: vec!["demo.svc.cluster.local".into(), "svc.cluster.local".into()],
        ..Settings::default()
    };
    let metrics = Arc::new(Metrics::default());
    let resolver = Resolver::bind(cfg, rx, metrics.clone()).unwrap();
    let addr = resolver.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(resolver.run(stop.clone()));
    Some(Setup {
        addr,
        metrics,
        table: tx,
        upstream: Some(upstream),
        stop,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_names_get_their_vip_other_types_nodata() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    for (name, opts) in [
        (FED, &[][..]),
        ("SERVER.Demo.Local.Domain.", &[][..]),
        (FED, &["+tcp"][..]),
    ] {
        let a = dig(s.addr, name, "A", opts).await.unwrap();
        assert_eq!(a.status, "NOERROR", "{}", a.raw);
        assert_eq!(a.answers.len(), 1, "{}", a.raw);
        assert_eq!(a.answers[0].1, 30, "TTL 30 s: {}", a.raw);
        assert_eq!(a.answers[0].2, "A");
        assert_eq!(a.answers[0].3, VIP.to_string());
        assert!(a.flags.contains(&"aa".to_owned()), "{}", a.raw);
    }
    for qtype in ["AAAA", "TXT"] {
        let a = dig(s.addr, FED, qtype, &[]).await.unwrap();
        assert_eq!(a.status, "NOERROR", "{qtype}: {}", a.raw);
        assert!(a.answers.is_empty(), "{qtype}: {}", a.raw);
    }
    assert_eq!(s.metrics.count(Outcome::Federated), 3);
    assert_eq!(s.metrics.count(Outcome::FederatedNoData), 2);
    assert_eq!(
        s.metrics.forwarded_count(),
        0,
        "federated names never go upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_suffixed_federated_names_are_answered_locally() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    let name = format!("{FED}.demo.svc.cluster.local");
    let a = dig(s.addr, &name, "A", &[]).await.unwrap();
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert_eq!(a.answers[0].0, format!("{name}."));
    assert_eq!(a.answers[0].3, VIP.to_string());
    assert_eq!(s.metrics.forwarded_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_and_nxdomain_passes_through() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    let a = dig(s.addr, "www.upstream.test", "A", &[]).await.unwrap();
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert_eq!(a.answers[0].3, UPSTREAM_WWW.to_string());
    let t = dig(s.addr, "txt.upstream.test", "TXT", &["+tcp"])
        .await
        .unwrap();
    assert_eq!(t.answers[0].3, "\"hello from upstream\"", "{}", t.raw);
    let n = dig(s.addr, "nope.upstream.test", "A", &[]).await.unwrap();
    assert_eq!(n.status, "NXDOMAIN", "{}", n.raw);
    assert_eq!(s.metrics.forwarded_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_answers_truncate_over_udp_and_complete_over_tcp() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    // dig advertises 1232 bytes by default; 120 A records do not fit.
    let udp = dig(s.addr, "big.upstream.test", "A", &["+ignore"])
        .await
        .unwrap();
    assert!(udp.flags.contains(&"tc".to_owned()), "{}", udp.raw);
    assert!(
        udp.answers.len() < usize::from(UPSTREAM_BIG_COUNT),
        "{}",
        udp.raw
    );
    let tcp = dig(s.addr, "big.upstream.test", "A", &["+tcp"])
        .await
        .unwrap();
    assert!(!tcp.flags.contains(&"tc".to_owned()), "{}", tcp.raw);
    assert_eq!(
        tcp.answers.len(),
        usize::from(UPSTREAM_BIG_COUNT),
        "{}",
        tcp.raw
    );
    // EDNS0 is relayed: a client that takes 4096 bytes over UDP gets everything over UDP.
    let edns = dig(
        s.addr,
        "big.upstream.test",
        "A",
        &["+ignore", "+bufsize=4096"],
    )
    .await
    .unwrap();
    assert!(!edns.flags.contains(&"tc".to_owned()), "{}", edns.raw);
    assert_eq!(
        edns.answers.len(),
        usize::from(UPSTREAM_BIG_COUNT),
        "{}",
        edns.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_within_the_timeout_when_the_upstream_is_down() {
    let Some(mut s) = setup(Duration::from_millis(600)).await else {
        return;
    };
    s.upstream.take().unwrap().stop().await;
    let start = Instant::now();
    let a = dig(s.addr, "www.upstream.test", "A", &[]).await.unwrap();
    assert_eq!(a.status, "SERVFAIL", "{}", a.raw);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "answered only after {:?}",
        start.elapsed()
    );
    assert_eq!(s.metrics.count(Outcome::ServFail), 1);
    // Federated names still answer without the upstream.
    let f = dig(s.addr, FED, "A", &[]).await.unwrap();
    assert_eq!(f.answers[0].3, VIP.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_updates_apply_without_restart() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    let new_vip = Ipv4Addr::new(127, 241, 0, 7);
    s.table
        .send(Arc::new(DnsTable::new([
            (FED, new_vip),
            ("api.shop.local.domain", VIP),
        ])))
        .unwrap();
    let a = dig(s.addr, FED, "A", &[]).await.unwrap();
    assert_eq!(a.answers[0].3, new_vip.to_string(), "{}", a.raw);
    let b = dig(s.addr, "api.shop.local.domain", "A", &["+tcp"])
        .await
        .unwrap();
    assert_eq!(b.answers[0].3, VIP.to_string(), "{}", b.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_dropped_and_counted() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        &b"\x12"[..],
        b"\x12\x34\x01\x00\x00\x05garbage!!",
        &[0xffu8; 600],
    ] {
        sock.send_to(junk, s.addr).await.unwrap();
    }
    let mut buf = [0u8; 512];
    let r = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(r.is_err(), "no reply to garbage");
    testkit::wait_until("3 malformed counted", Duration::from_secs(2), || async {
        s.metrics.malformed_count() == 3
    })
    .await
    .unwrap();
    // Garbage on TCP closes that connection only.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"\x00\x04abcd")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest)
        .await
        .unwrap();
    assert!(rest.is_empty());
    let a = dig(s.addr, FED, "A", &[]).await.unwrap();
    assert_eq!(a.answers[0].3, VIP.to_string(), "still serving: {}", a.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tcp_clients_are_disconnected() {
    let Some(s) = setup(Duration::from_secs(2)).await else {
        return;
    };
    // Announces a 32-byte query, sends 3 bytes, then stalls.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"\x00\x20abc")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the server closes a stalled connection: {closed:?}"
    );
    let a = dig(s.addr, FED, "A", &["+tcp"]).await.unwrap();
    assert_eq!(a.answers[0].3, VIP.to_string(), "still serving: {}", a.raw);
}

#[tokio::test]
async fn bad_settings_are_refused_with_a_clear_error() {
    let port = testkit::free_port();
    let me: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_tx, rx) = watch::channel(Arc::new(DnsTable::default()));
    let err = Resolver::bind(
        ResolverConfig::new(me, vec![me]),
        rx.clone(),
        Arc::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("own listen address: queries would loop"),
        "{err}"
    );
    // A wildcard listener receives on every local address: an upstream on the same port
    // at loopback (or the unspecified address) is the resolver itself.
    let port = testkit::free_port();
    let wildcard: SocketAddr = ([0, 0, 0, 0], port).into();
    for up in ["127.0.0.1", "127.0.0.53", "0.0.0.0"] {
        let up: SocketAddr = (up.parse::<std::net::IpAddr>().unwrap(), port).into();
        let err = Resolver::bind(
            ResolverConfig::new(wildcard, vec![up]),
            rx.clone(),
            Arc::default(),
        )
        .err()
        .unwrap_or_else(|| panic!("--listen {wildcard} --upstream {up} must be refused"))
        .to_string();
        assert!(err.contains("queries would loop"), "{err}");
    }
    // The same port on another address of a specific listener is not a loop.
    let other: SocketAddr = ([127, 0, 0, 2], me.port()).into();
    let ok = Resolver::bind(
        ResolverConfig::new(me, vec![other]),
        rx.clone(),
        Arc::default(),
    );
    assert!(ok.is_ok(), "{:?}", ok.err());
    drop(ok);
    let err = Resolver::bind(ResolverConfig::new(me, vec![]), rx.clone(), Arc::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no upstream resolvers"), "{err}");
    // A port already taken by another server is named in the error.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let up: SocketAddr = ([127, 0, 0, 1], 9).into();
    let err = Resolver::bind(ResolverConfig::new(addr, vec![up]), rx, Arc::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("cannot listen for DNS on {addr}")),
        "{err}"
    );
}
