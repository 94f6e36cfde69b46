//! A native `nft -f` script: one table (`inet` for both families, `ip` for IPv4 only)
//! holding every chain, hooked chains as base chains. Written in the form `nft list table`
//! prints, so reading back is a text comparison.

use std::fmt::Write as _;

use ipnet::IpNet;

use crate::model::{Chain, Family, Hook, Matches, Owner, Ports, Rule, RuleSet, Table, Target};

/// The nft name of a chain: lower case; raw-table chains prefixed, since one nft table
/// holds what iptables keeps in two (`ISTIO_OUTPUT_DNS` exists in both nat and raw).
pub fn chain_name(table: Table, name: &str) -> String {
    match table {
        Table::Nat => name.to_ascii_lowercase(),
        Table::Raw => format!("raw_{}", name.to_ascii_lowercase()),
    }
}

/// The table definition, as `nft list table FAMILY NAME` prints it.
pub fn table(rules: &RuleSet) -> String {
    let mut s = format!("table {} {} {{\n", rules.nft_family(), rules.nft_table);
    for (i, chain) in rules.chains.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        let _ = writeln!(s, "\tchain {} {{", chain_name(chain.table, &chain.name));
        if let Some(hook) = chain.hook {
            let _ = writeln!(s, "\t\t{}", base(chain.table, hook));
        }
        for rule in rules_of(rules, chain) {
            let _ = writeln!(s, "\t\t{}", rule_text(chain.table, rule));
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// The script that replaces the table atomically: declare it (so deleting cannot fail),
/// delete it, define it anew, all in one transaction.
pub fn script(rules: &RuleSet) -> String {
    let fam = rules.nft_family();
    let name = rules.nft_table;
    format!(
        "table {fam} {name}\ndelete table {fam} {name}\n{}",
        table(rules)
    )
}

/// The script that removes the table in both families, whether or not it exists.
pub fn cleanup_script(name: &str) -> String {
    ["ip", "inet"]
        .iter()
        .map(|fam| format!("table {fam} {name}\ndelete table {fam} {name}\n"))
        .collect()
}

fn rules_of<'a>(rules: &'a RuleSet, chain: &'a Chain) -> impl Iterator<Item = &'a Rule> {
    let v6 = rules.families.contains(&Family::V6);
    chain
        .rules
        .iter()
        .filter(move |r| v6 || r.matches.family() != Some(Family::V6))
}

fn base(table: Table, hook: Hook) -> &'static str {
    // Priorities as nft 1.0 prints them: dstnat (-100) has a name on prerouting only.
    match (table, hook) {
        (Table::Nat, Hook::Output) => "type nat hook output priority -100; policy accept;",
        (Table::Nat, Hook::Prerouting) => {
            "type nat hook prerouting priority dstnat; policy accept;"
        }
        (Table::Raw, Hook::Output) => "type filter hook output priority raw; policy accept;",
        (Table::Raw, Hook::Prerouting) => {
            "type filter hook prerouting priority raw; policy accept;"
        }
    }
}

fn addr(n: &IpNet) -> String {
    // nft prints host prefixes as bare addresses.
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn l3(n: &IpNet) -> &'static str {
    match Family::of(n) {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn op(negated: bool) -> &'static str {
    if negated { "!= " } else { "" }
}

/// One rule as `nft list` prints it.
pub fn rule_text(table: Table, rule: &Rule) -> String {
    let m: &Matches = &rule.matches;
    let mut parts: Vec<String> = Vec::new();
    if let Some(iface) = m.out_iface {
        parts.push(format!("oifname \"{iface}\""));
    }
    if let Some(src) = &m.source {
        parts.push(format!("{} saddr {}", l3(src), addr(src)));
    }
    if let Some((dst, neg)) = &m.dest {
        parts.push(format!("{} daddr {}{}", l3(dst), op(*neg), addr(dst)));
    }
    if let Some(p) = m.proto {
        let name = p.name();
        if m.sport.is_none() && m.dport.is_none() {
            parts.push(format!("meta l4proto {name}"));
        }
        if let Some(sp) = m.sport {
            parts.push(format!("{name} sport {sp}"));
        }
        match &m.dport {
            Some((Ports::One(p), neg)) => parts.push(format!("{name} dport {}{p}", op(*neg))),
            Some((Ports::Range(a, b), neg)) => {
                parts.push(format!("{name} dport {}{a}-{b}", op(*neg)));
            }
            Some((Ports::Set(set), neg)) => {
                let list: Vec<String> = set.iter().map(u16::to_string).collect();
                parts.push(format!(
                    "{name} dport {}{{ {} }}",
                    op(*neg),
                    list.join(", ")
                ));
            }
            None => {}
        }
    }
    if let Some((o, neg)) = &m.owner {
        let (key, id) = match o {
            Owner::Uid(u) => ("skuid", u),
            Owner::Gid(g) => ("skgid", g),
        };
        parts.push(format!("meta {key} {}{id}", op(*neg)));
    }
    parts.push(match &rule.target {
        Target::Return => "return".to_owned(),
        Target::Jump(c) => format!("jump {}", chain_name(table, c)),
        Target::Redirect(p) => format!("redirect to :{p}"),
        Target::CtZone(z) => format!("ct zone set {z}"),
    });
    parts.join(" ")
}
