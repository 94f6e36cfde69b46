//! `iptables-restore` input, one per family, written in the canonical form `iptables-save`
//! prints (option order, implicit `-m tcp`, `--to-ports`), so reading back is a text
//! comparison.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::{Chain, Family, Matches, Owner, Ports, Rule, RuleSet, Table, Target};

/// One family's and table's share of ferry's rules, keyed by chain: the chains ferry
/// declares and, per chain (built-in ones included), the `-A` lines that belong to ferry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    /// Declared ferry-owned chains, sorted.
    pub chains: Vec<String>,
    /// `-A` lines per chain, in order (built-in chains: only the jumps into ferry's).
    pub lines: BTreeMap<String, Vec<String>>,
}

impl TableRules {
    /// Every line, for diffs: declarations first, then rules by chain.
    pub fn all_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.chains.iter().map(|c| format!(":{c}")).collect();
        v.extend(self.lines.values().flatten().cloned());
        v
    }

    /// Whether nothing of ferry's is installed.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.lines.is_empty()
    }
}

/// What the rule set installs in one family's table.
pub fn expected(rules: &RuleSet, family: Family, table: Table) -> TableRules {
    let mut out = TableRules::default();
    if !rules.families.contains(&family) {
        return out;
    }
    for chain in rules.chains.iter().filter(|c| c.table == table) {
        out.chains.push(chain.name.clone());
        if let Some(hook) = chain.hook {
            out.lines
                .entry(hook.chain().to_owned())
                .or_default()
                .push(format!("-A {} -j {}", hook.chain(), chain.name));
        }
        let lines: Vec<String> = chain
            .rules_for(family)
            .map(|r| rule_line(chain, r))
            .collect();
        if !lines.is_empty() {
            out.lines.insert(chain.name.clone(), lines);
        }
    }
    out.chains.sort();
    out
}

/// ferry's share of an `iptables-save -t TABLE` listing: the owned chains and every rule
/// in them or jumping to them.
pub fn installed(save: &str, owned: &[&str]) -> TableRules {
    let mut out = TableRules::default();
    for line in save.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if owned.contains(&name) {
                out.chains.push(name.to_owned());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            let target = rest
                .split_whitespace()
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1)
                .unwrap_or_default();
            if owned.contains(&chain) || owned.contains(&target) {
                out.lines
                    .entry(chain.to_owned())
                    .or_default()
                    .push(line.to_owned());
            }
        }
    }
    out.chains.sort();
    out
}

/// The restore input that turns `current` into `want` in one transaction (`--noflush`
/// keeps everyone else's rules): unhook ferry's chains, flush them, delete the ones no
/// longer wanted, then add the wanted rules. Empty `want` is a cleanup.
pub fn transition(table: Table, current: &TableRules, want: &TableRules) -> String {
    let mut s = format!("*{}\n", table.name());
    let ours = |c: &String| current.chains.contains(c) || want.chains.contains(c);
    // Jumps from built-in chains into ours go first, or the chains could not be deleted.
    for (chain, lines) in &current.lines {
        if ours(chain) {
            continue;
        }
        for l in lines {
            let _ = writeln!(s, "-D{}", &l[2..]);
        }
    }
    let mut declared: Vec<&String> = current.chains.iter().chain(&want.chains).collect();
    declared.sort();
    declared.dedup();
    for c in &declared {
        // Declaring a chain with --noflush creates it, or empties it if it exists.
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for c in declared.iter().filter(|c| !want.chains.contains(c)) {
        let _ = writeln!(s, "-X {c}");
    }
    for c in &want.chains {
        for l in want.lines.get(c).into_iter().flatten() {
            let _ = writeln!(s, "{l}");
        }
    }
    for (chain, lines) in &want.lines {
        if !want.chains.contains(chain) {
            for l in lines {
                let _ = writeln!(s, "{l}");
            }
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The full restore input for a family (what `--dry-run` prints), as applied to a
/// namespace without ferry's rules.
pub fn script(rules: &RuleSet, family: Family) -> String {
    let mut s = String::new();
    for table in rules.tables() {
        let want = expected(rules, family, table);
        s.push_str(&transition(table, &TableRules::default(), &want));
    }
    s
}

/// One rule as `iptables-save` prints it.
pub fn rule_line(chain: &Chain, rule: &Rule) -> String {
    let mut s = format!("-A {}", chain.name);
    push_matches(&mut s, &rule.matches);
    match &rule.target {
        Target::Return => s.push_str(" -j RETURN"),
        Target::Jump(c) => {
            let _ = write!(s, " -j {c}");
        }
        Target::Redirect(p) => {
            let _ = write!(s, " -j REDIRECT --to-ports {p}");
        }
        Target::CtZone(z) => {
            let _ = write!(s, " -j CT --zone {z}");
        }
    }
    s
}

fn not(negated: bool) -> &'static str {
    if negated { " !" } else { "" }
}

fn push_matches(s: &mut String, m: &Matches) {
    if let Some(src) = &m.source {
        let _ = write!(s, " -s {src}");
    }
    if let Some((dst, neg)) = &m.dest {
        let _ = write!(s, "{} -d {dst}", not(*neg));
    }
    if let Some(iface) = m.out_iface {
        let _ = write!(s, " -o {iface}");
    }
    if let Some(p) = m.proto {
        let _ = write!(s, " -p {}", p.name());
        let single = matches!(&m.dport, Some((Ports::One(_) | Ports::Range(..), _)));
        if m.sport.is_some() || single {
            let _ = write!(s, " -m {}", p.name());
        }
        if let Some(sp) = m.sport {
            let _ = write!(s, " --sport {sp}");
        }
        match &m.dport {
            Some((Ports::One(p), neg)) => {
                let _ = write!(s, "{} --dport {p}", not(*neg));
            }
            Some((Ports::Range(a, b), neg)) => {
                let _ = write!(s, "{} --dport {a}:{b}", not(*neg));
            }
            Some((Ports::Set(set), neg)) => {
                let list: Vec<String> = set.iter().map(u16::to_string).collect();
                let _ = write!(s, " -m multiport{} --dports {}", not(*neg), list.join(","));
            }
            None => {}
        }
    }
    if let Some((o, neg)) = &m.owner {
        let (flag, id) = match o {
            Owner::Uid(u) => ("--uid-owner", u),
            Owner::Gid(g) => ("--gid-owner", g),
        };
        let _ = write!(s, " -m owner{} {flag} {id}", not(*neg));
    }
}
