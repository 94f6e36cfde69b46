//! The two rule sets, built from validated [`Options`]:
//!
//! - `cofide`: spiffe-enable's init-container rules (protocols.md section 2), in one nat
//!   chain on OUTPUT: the proxy's uid returns, DNS to 15053, the proxy's own ports return,
//!   all loopback TCP to the outbound listener (federated names resolve to loopback VIPs).
//! - `istio`: istio-iptables REDIRECT mode (protocols.md section 6), written from Istio's
//!   documented semantics: outbound to 15001 with include/exclude CIDRs and ports, inbound
//!   to 15006, the proxy's uid/gid excluded, the 127.0.0.6 and loopback rules, DNS capture
//!   with conntrack zones.

use ipnet::IpNet;

use crate::model::{Chain, Family, Hook, Matches, Owner, Ports, Proto, RuleSet, Table, Target};
use crate::options::{InboundPorts, Options, OutboundCidrs, Profile, TUNNEL_PORT};

/// The cofide profile's only chain (nft: `inet envoy_proxy` / `envoy_output`, as
/// spiffe-enable names them, so `ferry iptables` replaces an existing install in place).
pub const COFIDE_CHAIN: &str = "ENVOY_OUTPUT";

const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const DNS: u16 = 53;

/// Builds the rule set the options describe.
pub fn build(o: &Options) -> RuleSet {
    match o.profile {
        Profile::Cofide => cofide(o),
        Profile::Istio => istio(o),
    }
}

fn net(s: &str) -> IpNet {
    // Only called with the literal prefixes below.
    s.parse()
        .unwrap_or_else(|_| IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)))
}

fn tcp() -> Matches {
    Matches {
        proto: Some(Proto::Tcp),
        ..Matches::default()
    }
}

fn proto_dport(proto: Proto, port: u16) -> Matches {
    Matches {
        proto: Some(proto),
        dport: Some((Ports::One(port), false)),
        ..Matches::default()
    }
}

fn owner(o: Owner) -> Matches {
    Matches {
        owner: Some((o, false)),
        ..Matches::default()
    }
}

fn owners(o: &Options) -> impl Iterator<Item = Owner> + '_ {
    o.proxy_uids
        .iter()
        .map(|&u| Owner::Uid(u))
        .chain(o.proxy_gids.iter().map(|&g| Owner::Gid(g)))
}

fn cofide(o: &Options) -> RuleSet {
    let mut c = Chain::new(Table::Nat, COFIDE_CHAIN, Some(Hook::Output));
    for &uid in &o.proxy_uids {
        c.push(owner(Owner::Uid(uid)), Target::Return);
    }
    c.push(proto_dport(Proto::Udp, DNS), Target::Redirect(o.dns_port));
    c.push(proto_dport(Proto::Tcp, DNS), Target::Redirect(o.dns_port));
    c.push(proto_dport(Proto::Tcp, o.proxy_port), Target::Return);
    c.push(proto_dport(Proto::Tcp, o.admin_port), Target::Return);
    for lo in ["127.0.0.0/8", "::1/128"] {
        c.push(
            Matches {
                dest: Some((net(lo), false)),
                proto: Some(Proto::Tcp),
                dport: Some((Ports::Range(1, 65535), false)),
                ..Matches::default()
            },
            Target::Redirect(o.proxy_port),
        );
    }
    RuleSet {
        profile: "cofide",
        chains: vec![c],
        families: vec![Family::V4, Family::V6],
        owned: vec![(Table::Nat, COFIDE_CHAIN)],
        nft_table: "envoy_proxy",
    }
}

fn istio(o: &Options) -> RuleSet {
    let families = if o.dual_stack {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    };
    let loopback = |fam: Family| match fam {
        Family::V4 => net("127.0.0.1/32"),
        Family::V6 => net("::1/128"),
    };

    let mut inbound = Chain::new(
        Table::Nat,
        ISTIO_INBOUND,
        (o.inbound_ports != InboundPorts::None).then_some(Hook::Prerouting),
    );
    inbound.push(proto_dport(Proto::Tcp, TUNNEL_PORT), Target::Return);
    match &o.inbound_ports {
        InboundPorts::None => {}
        InboundPorts::All => {
            for &p in &o.inbound_ports_exclude {
                inbound.push(proto_dport(Proto::Tcp, p), Target::Return);
            }
            inbound.push(tcp(), Target::Jump(ISTIO_IN_REDIRECT.into()));
        }
        InboundPorts::List(ports) => {
            for &p in ports {
                inbound.push(
                    proto_dport(Proto::Tcp, p),
                    Target::Jump(ISTIO_IN_REDIRECT.into()),
                );
            }
        }
    }

    let mut redirect = Chain::new(Table::Nat, ISTIO_REDIRECT, None);
    redirect.push(tcp(), Target::Redirect(o.proxy_port));
    let mut in_redirect = Chain::new(Table::Nat, ISTIO_IN_REDIRECT, None);
    in_redirect.push(tcp(), Target::Redirect(o.inbound_port));

    let mut out = Chain::new(Table::Nat, ISTIO_OUTPUT, Some(Hook::Output));
    for &p in &o.outbound_ports_exclude {
        out.push(proto_dport(Proto::Tcp, p), Target::Return);
    }
    // The inbound side's connections to the app come from 127.0.0.6 (::6): never captured.
    for fam in &families {
        let src = match fam {
            Family::V4 => net("127.0.0.6/32"),
            Family::V6 => net("::6/128"),
        };
        out.push(
            Matches {
                source: Some(src),
                out_iface: Some("lo"),
                ..Matches::default()
            },
            Target::Return,
        );
    }
    let includes_loopback = match &o.outbound_cidrs {
        OutboundCidrs::All => false,
        OutboundCidrs::List(l) => l.iter().any(|n| n.addr().is_loopback()),
    };
    for who in owners(o) {
        // The proxy calling its own pod's service address over lo goes to the inbound side.
        let skip = if o.redirect_dns && matches!(who, Owner::Uid(_)) {
            Ports::Set(vec![DNS, TUNNEL_PORT])
        } else {
            Ports::One(TUNNEL_PORT)
        };
        for fam in &families {
            out.push(
                Matches {
                    dest: Some((loopback(*fam), true)),
                    out_iface: Some("lo"),
                    proto: Some(Proto::Tcp),
                    dport: Some((skip.clone(), true)),
                    owner: Some((who, false)),
                    ..Matches::default()
                },
                Target::Jump(ISTIO_IN_REDIRECT.into()),
            );
        }
        // An app calling itself over lo is not captured, unless loopback is included.
        if !includes_loopback {
            let mut m = Matches {
                out_iface: Some("lo"),
                owner: Some((who, true)),
                ..Matches::default()
            };
            if o.redirect_dns {
                // TCP DNS to a resolver on localhost must still be captured below.
                m.proto = Some(Proto::Tcp);
                m.dport = Some((Ports::One(DNS), true));
            }
            out.push(m, Target::Return);
        }
        // Everything else the proxy sends leaves uncaptured: no loop.
        out.push(owner(who), Target::Return);
    }

    let mut chains = vec![inbound, redirect, in_redirect];
    let mut raw = Vec::new();
    if o.redirect_dns {
        out.push(Matches::default(), Target::Jump(ISTIO_OUTPUT_DNS.into()));
        chains.push(dns_nat(o));
        raw = dns_raw(o);
    }
    for fam in &families {
        out.push(
            Matches {
                dest: Some((loopback(*fam), false)),
                ..Matches::default()
            },
            Target::Return,
        );
    }
    for n in &o.outbound_cidrs_exclude {
        out.push(
            Matches {
                dest: Some((*n, false)),
                ..Matches::default()
            },
            Target::Return,
        );
    }
    for &p in &o.outbound_ports {
        out.push(
            proto_dport(Proto::Tcp, p),
            Target::Jump(ISTIO_REDIRECT.into()),
        );
    }
    match &o.outbound_cidrs {
        OutboundCidrs::All => out.push(Matches::default(), Target::Jump(ISTIO_REDIRECT.into())),
        OutboundCidrs::List(list) => {
            for n in list {
                out.push(
                    Matches {
                        dest: Some((*n, false)),
                        ..Matches::default()
                    },
                    Target::Jump(ISTIO_REDIRECT.into()),
                );
            }
            out.push(Matches::default(), Target::Return);
        }
    }
    chains.push(out);
    chains.extend(raw);
    RuleSet {
        profile: "istio",
        chains,
        families,
        owned: vec![
            (Table::Nat, ISTIO_INBOUND),
            (Table::Nat, ISTIO_REDIRECT),
            (Table::Nat, ISTIO_IN_REDIRECT),
            (Table::Nat, ISTIO_OUTPUT),
            (Table::Nat, ISTIO_OUTPUT_DNS),
            (Table::Raw, ISTIO_OUTPUT_DNS),
            (Table::Raw, ISTIO_INBOUND),
        ],
        nft_table: "ferry_istio",
    }
}

/// The DNS servers' host prefixes, or `None` for "any server" (`--capture-all-dns`).
fn dns_targets(o: &Options) -> Option<Vec<IpNet>> {
    (!o.capture_all_dns).then(|| {
        o.dns_servers
            .iter()
            .map(|&ip| IpNet::from(ip))
            .filter(|n| o.dual_stack || Family::of(n) == Family::V4)
            .collect()
    })
}

fn dns_nat(o: &Options) -> Chain {
    let mut c = Chain::new(Table::Nat, ISTIO_OUTPUT_DNS, None);
    let to = |proto: Proto, dest: Option<IpNet>| Matches {
        dest: dest.map(|d| (d, false)),
        ..proto_dport(proto, DNS)
    };
    let servers = dns_targets(o);
    match &servers {
        None => c.push(to(Proto::Tcp, None), Target::Redirect(o.dns_port)),
        Some(list) => {
            for &s in list {
                c.push(to(Proto::Tcp, Some(s)), Target::Redirect(o.dns_port));
            }
        }
    }
    // The proxy's own upstream queries leave uncaptured.
    for who in owners(o) {
        c.push(
            Matches {
                owner: Some((who, false)),
                ..proto_dport(Proto::Udp, DNS)
            },
            Target::Return,
        );
    }
    match &servers {
        None => c.push(to(Proto::Udp, None), Target::Redirect(o.dns_port)),
        Some(list) => {
            for &s in list {
                c.push(to(Proto::Udp, Some(s)), Target::Redirect(o.dns_port));
            }
        }
    }
    c
}

/// Conntrack zones: the proxy's queries to upstream servers (and their answers) in zone 1,
/// the app's queries to the proxy (and its answers) in zone 2, so the two UDP flows with
/// the same 4-tuple after NAT never share a conntrack entry.
fn dns_raw(o: &Options) -> Vec<Chain> {
    let mut out = Chain::new(Table::Raw, ISTIO_OUTPUT_DNS, Some(Hook::Output));
    let mut inb = Chain::new(Table::Raw, ISTIO_INBOUND, Some(Hook::Prerouting));
    for who in owners(o) {
        out.push(
            Matches {
                owner: Some((who, false)),
                ..proto_dport(Proto::Udp, DNS)
            },
            Target::CtZone(1),
        );
        out.push(
            Matches {
                proto: Some(Proto::Udp),
                sport: Some(o.dns_port),
                owner: Some((who, false)),
                ..Matches::default()
            },
            Target::CtZone(2),
        );
    }
    let answers = |src: Option<IpNet>| Matches {
        source: src,
        proto: Some(Proto::Udp),
        sport: Some(DNS),
        ..Matches::default()
    };
    match dns_targets(o) {
        None => {
            out.push(proto_dport(Proto::Udp, DNS), Target::CtZone(2));
            inb.push(answers(None), Target::CtZone(1));
        }
        Some(list) => {
            for s in list {
                out.push(
                    Matches {
                        dest: Some((s, false)),
                        ..proto_dport(Proto::Udp, DNS)
                    },
                    Target::CtZone(2),
                );
                inb.push(answers(Some(s)), Target::CtZone(1));
            }
        }
    }
    vec![out, inb]
}
