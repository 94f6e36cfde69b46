//! The capture rules as data: chains of rules with typed matches and targets. Profiles build
//! a [`RuleSet`]; renderers turn it into `iptables-restore` input or an `nft -f` script. No
//! strings are parsed back into this model: verification compares rendered text.

use std::fmt;

use ipnet::IpNet;

/// An IP family. iptables keeps one rule set per family (`iptables` / `ip6tables`); nft's
/// `inet` tables hold both, and family-specific matches (`ip daddr`) select one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`iptables`, nft `ip`).
    V4,
    /// IPv6 (`ip6tables`, nft `ip6`).
    V6,
}

impl Family {
    /// The family of an address or prefix.
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }
}

/// The netfilter table a chain lives in. Capture needs `nat` (REDIRECT) and, for DNS,
/// `raw` (conntrack zones, set before connection tracking sees the packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `nat`: redirection to the proxy's ports.
    Nat,
    /// `raw`: conntrack zones for DNS.
    Raw,
}

impl Table {
    /// The name iptables uses (`*nat`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Raw => "raw",
        }
    }
}

/// The built-in hook a chain is attached to. In iptables this is a jump from the built-in
/// chain (`-A OUTPUT -j ISTIO_OUTPUT`); in nft the chain becomes a base chain on the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Locally generated packets (`OUTPUT`).
    Output,
    /// Packets arriving from an interface (`PREROUTING`).
    Prerouting,
}

impl Hook {
    /// The built-in chain's iptables name.
    pub fn chain(self) -> &'static str {
        match self {
            Self::Output => "OUTPUT",
            Self::Prerouting => "PREROUTING",
        }
    }
}

/// A transport protocol match (`-p tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The protocol's name in both syntaxes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A port, a port range, or a set of ports to match on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ports {
    /// One port.
    One(u16),
    /// An inclusive range (`1:65535`, nft `1-65535`).
    Range(u16, u16),
    /// Several ports (iptables `-m multiport`, nft `{ a, b }`).
    Set(Vec<u16>),
}

/// Whose socket sent a packet (`-m owner`, nft `meta skuid/skgid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The socket owner's uid.
    Uid(u32),
    /// The socket owner's gid.
    Gid(u32),
}

/// What a rule matches on. Every match can be negated where netfilter allows it; a rule
/// holds at most one match of each kind, rendered in iptables-save's canonical order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Matches {
    /// Source prefix (`-s`).
    pub source: Option<IpNet>,
    /// Destination prefix (`-d`), negated when the flag is set.
    pub dest: Option<(IpNet, bool)>,
    /// Output interface (`-o`).
    pub out_iface: Option<&'static str>,
    /// Transport protocol (`-p`); required by port matches.
    pub proto: Option<Proto>,
    /// Source port (`--sport`).
    pub sport: Option<u16>,
    /// Destination port(s) (`--dport` / `--dports`), negated when the flag is set.
    pub dport: Option<(Ports, bool)>,
    /// Socket owner (`-m owner`), negated when the flag is set.
    pub owner: Option<(Owner, bool)>,
}

impl Matches {
    /// The family this rule is restricted to by its addresses, if any.
    pub fn family(&self) -> Option<Family> {
        self.source
            .as_ref()
            .or(self.dest.as_ref().map(|(n, _)| n))
            .map(Family::of)
    }
}

/// What a matching packet does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Leave this chain (not captured).
    Return,
    /// Continue in another chain of the same table.
    Jump(String),
    /// Redirect to a local port (the proxy's listener), keeping the original destination
    /// for `SO_ORIGINAL_DST`.
    Redirect(u16),
    /// Put the flow in a conntrack zone (raw table), separating the proxy's DNS flows from
    /// the application's so UDP conntrack entries do not collide.
    CtZone(u16),
}

/// One rule: matches and a target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// What the rule matches.
    pub matches: Matches,
    /// What it does to a matching packet.
    pub target: Target,
}

/// A chain owned by ferry, with the hook it is attached to (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The table it lives in.
    pub table: Table,
    /// Its iptables name (`ISTIO_OUTPUT`); nft uses a lower-case form.
    pub name: String,
    /// The built-in hook it is attached to; `None` for chains only jumped to.
    pub hook: Option<Hook>,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
}

impl Chain {
    /// An empty chain.
    pub fn new(table: Table, name: &str, hook: Option<Hook>) -> Self {
        Self {
            table,
            name: name.to_owned(),
            hook,
            rules: Vec::new(),
        }
    }

    /// Appends a rule.
    pub fn push(&mut self, matches: Matches, target: Target) {
        self.rules.push(Rule { matches, target });
    }

    /// The rules that apply to `family`: those without an address match, and those whose
    /// addresses are of that family.
    pub fn rules_for(&self, family: Family) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(move |r| r.matches.family().is_none_or(|f| f == family))
    }
}

/// Everything one profile installs, and the names it owns (so cleanup removes exactly
/// those, including chains an earlier, different configuration left behind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// The profile's name, for messages.
    pub profile: &'static str,
    /// The chains, in creation order.
    pub chains: Vec<Chain>,
    /// Families the rules apply to (`iptables` and/or `ip6tables`).
    pub families: Vec<Family>,
    /// Every chain name (per table) the profile may create, installed or not.
    pub owned: Vec<(Table, &'static str)>,
    /// The nft table that holds the rules (family `inet` when both families are captured,
    /// `ip` otherwise).
    pub nft_table: &'static str,
}

impl RuleSet {
    /// The tables this rule set has chains in, in a fixed order.
    pub fn tables(&self) -> Vec<Table> {
        let mut t: Vec<Table> = self.chains.iter().map(|c| c.table).collect();
        t.sort();
        t.dedup();
        t
    }

    /// The nft family keyword for this rule set's table.
    pub fn nft_family(&self) -> &'static str {
        if self.families.contains(&Family::V6) {
            "inet"
        } else {
            "ip"
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}
