//! Fuzzes the resolver's query path: any bytes a client can send must yield a reply, a
//! forward or a drop — never a panic — and every reply must itself parse.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use dns::DnsTable;
use dns::answer::{Settings, Verdict, decide, truncate_for_udp};
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static (DnsTable, Settings) {
    static F: OnceLock<(DnsTable, Settings)> = OnceLock::new();
    F.get_or_init(|| {
        (
            DnsTable::new([
                ("server.demo.local.domain", Ipv4Addr::new(127, 240, 0, 1)),
                ("payments.shop.local.domain", Ipv4Addr::new(127, 250, 9, 9)),
            ]),
            Settings {
                ttl: 30,
                search_suffixes: vec!["demo.svc.cluster.local".into(), "svc.cluster.local".into()],
                ..Settings::default()
            },
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (table, settings) = fixture();
    match decide(data, table, settings) {
        Verdict::Reply { bytes, .. } => {
            assert!(bytes.len() >= 12, "a reply has at least a header");
            // Our own replies must be valid DNS and survive truncation.
            let _ = truncate_for_udp(&bytes, 12);
        }
        Verdict::Forward(q) => {
            assert_eq!(q.queries.len(), 1);
            let _ = dns::answer::servfail(&q);
        }
        Verdict::Drop => {}
    }
    // Upstream answers go through truncation unparsed-by-us: it must not panic either.
    let _ = truncate_for_udp(data, 512);
});
