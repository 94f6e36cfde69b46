//! The resolver's decision for one packet, as pure code (no I/O, fuzzed): answer a
//! federated name from the table, forward anything else, or drop what is not a query.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::metrics::Outcome;
use crate::table::DnsTable;
use registry::hostname::Hostname;

/// EDNS UDP payload size ferry advertises in its own answers (the DNS Flag Day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;

/// How federated names are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// TTL of federated A records, in seconds.
    pub ttl: u32,
    /// Search suffixes (no leading or trailing dot, lowercase) stripped from query names
    /// before a second table lookup, like Kubernetes' `<ns>.svc.cluster.local`.
    pub search_suffixes: Vec<String>,
    /// How a federated name answers types other than A.
    pub no_data: NoDataMode,
}

/// The answer for a federated name asked for a type it has no data of (AAAA, TXT, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoDataMode {
    /// NOERROR with an empty answer (RFC 8020: the name exists), so stub resolvers use the
    /// A answer at once. The default.
    #[default]
    NoError,
    /// NXDOMAIN, as Envoy's dns_filter answers: for setups that must match it exactly.
    NxDomain,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ttl: 30,
            search_suffixes: Vec::new(),
            no_data: NoDataMode::NoError,
        }
    }
}

/// What to do with one received packet.
#[derive(Debug)]
pub enum Verdict {
    /// Send these bytes back.
    Reply {
        /// The encoded response.
        bytes: Vec<u8>,
        /// For metrics.
        outcome: Outcome,
    },
    /// Not ours: forward the packet upstream. The parsed query is kept to build a
    /// SERVFAIL if forwarding fails.
    Forward(Box<Message>),
    /// Not a DNS query (does not parse, or is a response): drop it silently.
    Drop,
}

/// Decides what to do with `packet`.
pub fn decide(packet: &[u8], table: &DnsTable, settings: &Settings) -> Verdict {
    let Ok(query) = Message::from_vec(packet) else {
        return Verdict::Drop;
    };
    if query.metadata.message_type != MessageType::Query {
        return Verdict::Drop;
    }
    if query.metadata.op_code != OpCode::Query {
        return reply(
            error_response(&query, ResponseCode::NotImp),
            Outcome::Refused,
        );
    }
    let [q] = query.queries.as_slice() else {
        return reply(
            error_response(&query, ResponseCode::FormErr),
            Outcome::Refused,
        );
    };
    if q.query_class() != DNSClass::IN {
        return Verdict::Forward(Box::new(query));
    }
    let name = Hostname::new(&q.name().to_ascii());
    let Some(vip) = table.lookup(&name, &settings.search_suffixes) else {
        return Verdict::Forward(Box::new(query));
    };
    let mut resp = response_to(&query, ResponseCode::NoError);
    resp.metadata.authoritative = true;
    let outcome = match q.query_type() {
        RecordType::A | RecordType::ANY => {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                settings.ttl,
                RData::A(A(vip)),
            ));
            Outcome::Federated
        }
        // AAAA and every other type: the name exists but has no such data (NOERROR, empty),
        // so stub resolvers fall back to A at once; or NXDOMAIN when configured to match Envoy.
        _ => {
            if settings.no_data == NoDataMode::NxDomain {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            Outcome::FederatedNoData
        }
    };
    reply(resp, outcome)
}

fn reply(msg: Message, outcome: Outcome) -> Verdict {
    match msg.to_vec() {
        Ok(bytes) => Verdict::Reply { bytes, outcome },
        // Only an unencodable name could fail here, and it came from a decoded packet.
        Err(_) => Verdict::Drop,
    }
}

/// A response skeleton for `query`: same id, question and RD; RA set; an OPT record when
/// the query had one (RFC 6891 6.1.1).
fn response_to(query: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = query.metadata.checking_disabled;
    resp.metadata.response_code = code;
    resp.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        resp.set_edns(edns);
    }
    resp
}

fn error_response(query: &Message, code: ResponseCode) -> Message {
    response_to(query, code)
}

/// The SERVFAIL sent when forwarding `query` fails.
pub fn servfail(query: &Message) -> Option<Vec<u8>> {
    error_response(query, ResponseCode::ServFail).to_vec().ok()
}

/// The largest response a UDP client accepts: its EDNS payload size, at least 512.
pub fn max_udp_payload(query: &Message) -> usize {
    query
        .edns
        .as_ref()
        .map(|e| usize::from(e.max_payload()).max(512))
        .unwrap_or(512)
}

/// Cuts a response that does not fit `limit` bytes down to its header and question with
/// the TC bit set (RFC 1035 4.2.1), so the client retries over TCP.
pub fn truncate_for_udp(response: &[u8], limit: usize) -> Option<Vec<u8>> {
    if response.len() <= limit {
        return None;
    }
    let msg = Message::from_vec(response).ok()?;
    let mut t = msg.truncate();
    t.metadata.truncation = true;
    if let Some(e) = msg.edns {
        t.set_edns(e);
    }
    t.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn query(name: &str, ty: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn table() -> DnsTable {
        DnsTable::new([("server.demo.local.domain", Ipv4Addr::new(127, 240, 1, 2))])
    }

    fn decode(v: Verdict) -> (Message, Outcome) {
        match v {
            Verdict::Reply { bytes, outcome } => (Message::from_vec(&bytes).unwrap(), outcome),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn federated_a_is_answered_with_the_vip() {
        let s = Settings::default();
        let (m, o) = decode(decide(
            &query("Server.Demo.Local.Domain.", RecordType::A, true),
            &table(),
            &s,
        ));
        assert_eq!(o, Outcome::Federated);
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, 30);
        assert_eq!(
            &m.answers[0].data,
            &RData::A(A(Ipv4Addr::new(127, 240, 1, 2)))
        );
        // The answer echoes the name as asked.
        assert_eq!(m.answers[0].name.to_ascii(), "Server.Demo.Local.Domain.");
        assert!(m.edns.is_some(), "EDNS query gets an OPT record back");
    }

    #[test]
    fn aaaa_and_txt_are_nodata() {
        for ty in [RecordType::AAAA, RecordType::TXT, RecordType::MX] {
            let (m, o) = decode(decide(
                &query("server.demo.local.domain", ty, false),
                &table(),
                &Settings::default(),
            ));
            assert_eq!(o, Outcome::FederatedNoData);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(m.answers.is_empty());
            assert!(m.edns.is_none());
        }
    }

    #[test]
    fn nodata_mode_nxdomain_matches_envoy() {
        let s = Settings {
            no_data: NoDataMode::NxDomain,
            ..Settings::default()
        };
        let (m, _) = decode(decide(
            &query("server.demo.local.domain", RecordType::AAAA, false),
            &table(),
            &s,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let (a, _) = decode(decide(
            &query("server.demo.local.domain", RecordType::A, false),
            &table(),
            &s,
        ));
        assert_eq!(a.answers.len(), 1, "A is unaffected");
    }

    #[test]
    fn search_suffixed_names_are_recognised() {
        let s = Settings {
            ttl: 5,
            search_suffixes: vec!["demo.svc.cluster.local".into()],
            ..Settings::default()
        };
        let q = query(
            "server.demo.local.domain.demo.svc.cluster.local",
            RecordType::A,
            false,
        );
        let (m, o) = decode(decide(&q, &table(), &s));
        assert_eq!(o, Outcome::Federated);
        assert_eq!(m.answers[0].ttl, 5);
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_dropped() {
        let s = Settings::default();
        assert!(matches!(
            decide(&query("example.com", RecordType::A, false), &table(), &s),
            Verdict::Forward(_)
        ));
        assert!(matches!(
            decide(b"\x00\x01garbage", &table(), &s),
            Verdict::Drop
        ));
        assert!(matches!(decide(&[], &table(), &s), Verdict::Drop));
        // A response is never answered (reflection).
        let mut m =
            Message::from_vec(&query("server.demo.local.domain", RecordType::A, false)).unwrap();
        m.metadata.message_type = MessageType::Response;
        assert!(matches!(
            decide(&m.to_vec().unwrap(), &table(), &s),
            Verdict::Drop
        ));
    }

    #[test]
    fn non_query_opcodes_and_multi_questions_are_refused() {
        let mut m = Message::new(7, MessageType::Query, OpCode::Status);
        m.add_query(Query::query(
            Name::from_ascii("a.b").unwrap(),
            RecordType::A,
        ));
        let (r, _) = decode(decide(&m.to_vec().unwrap(), &table(), &Settings::default()));
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
        let mut m = Message::new(8, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("a.b").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_ascii("c.d").unwrap(),
            RecordType::A,
        ));
        let (r, _) = decode(decide(&m.to_vec().unwrap(), &table(), &Settings::default()));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn servfail_and_truncation() {
        let q = Message::from_vec(&query("example.com", RecordType::A, true)).unwrap();
        let sf = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(sf.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(sf.metadata.id, 0x1234);
        assert_eq!(max_udp_payload(&q), 4096);
        let mut big = Message::response(1, OpCode::Query);
        big.add_queries(q.queries.iter().cloned());
        for i in 0..100u8 {
            big.add_answer(Record::from_rdata(
                Name::from_ascii("example.com.").unwrap(),
                60,
                RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
            ));
        }
        let bytes = big.to_vec().unwrap();
        assert!(truncate_for_udp(&bytes, 4096).is_none());
        let t = Message::from_vec(&truncate_for_udp(&bytes, 512).unwrap()).unwrap();
        assert!(t.metadata.truncation);
        assert!(t.answers.is_empty());
        assert_eq!(t.queries.len(), 1);
    }
}
