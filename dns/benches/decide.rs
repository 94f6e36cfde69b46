//! The cost of the resolver's per-packet decision, without sockets: a federated A query
//! answered from a 10,000-name table, and a non-federated query classified for forwarding.

#![allow(missing_docs, clippy::unwrap_used)]

use std::net::Ipv4Addr;

use criterion::{Criterion, criterion_group, criterion_main};
use dns::DnsTable;
use dns::answer::{Settings, Verdict, decide};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn bench(c: &mut Criterion) {
    let table = DnsTable::new((0..10_000u32).map(|i| {
        (
            format!("svc{i}.demo.local.domain"),
            Ipv4Addr::from(0x7ff0_0000 + i),
        )
    }));
    let settings = Settings {
        search_suffixes: vec!["demo.svc.cluster.local".into(), "svc.cluster.local".into()],
        ..Settings::default()
    };
    let fed = query("svc4242.demo.local.domain.");
    let fwd = query("www.example.com.");
    c.bench_function("decide/federated A (10k names)", |b| {
        b.iter(|| match decide(&fed, &table, &settings) {
            Verdict::Reply { bytes, .. } => bytes.len(),
            _ => unreachable!(),
        })
    });
    c.bench_function("decide/forwarded name", |b| {
        b.iter(|| matches!(decide(&fwd, &table, &settings), Verdict::Forward(_)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
