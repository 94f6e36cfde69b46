//! The rules against the real tools, in network namespaces this test creates (root; CI
//! fails instead of skipping without it): applied, read back equal to the model, applied
//! again unchanged, and cleaned up leaving the namespace's full ruleset exactly as it was,
//! someone else's rules included.

#![allow(clippy::expect_used, missing_docs)] // test setup: a failure panics with its cause

use iptables::apply::{Applied, Backend, Runner};
use iptables::{RawOptions, RuleSet, profile};
use testkit::netns::Netns;

fn rules(args: &[(&str, &str)], flags: &[&str], resolv: &std::path::Path) -> RuleSet {
    let mut raw = RawOptions::default();
    for (k, v) in args {
        let v = Some((*v).to_owned());
        match *k {
            "profile" => raw.profile = v,
            "-i" => raw.outbound_cidrs = v,
            "-x" => raw.outbound_cidrs_exclude = v,
            "-b" => raw.inbound_ports = v,
            "-d" => raw.inbound_ports_exclude = v,
            "-o" => raw.outbound_ports_exclude = v,
            "-q" => raw.outbound_ports = v,
            other => panic!("test flag {other}"),
        }
    }
    raw.redirect_dns = flags.contains(&"--redirect-dns");
    raw.capture_all_dns = flags.contains(&"--capture-all-dns");
    raw.dual_stack = flags.contains(&"--dual-stack");
    profile::build(&raw.validate(resolv).expect("valid flags"))
}

/// Everything netfilter holds in the namespace, without handles or counters: what must be
/// identical before ferry's rules and after their cleanup.
fn snapshot(ns: &Netns) -> String {
    let nft = ns
        .exec_ok("nft", &["-j", "list", "ruleset"])
        .expect("nft list");
    let mut v: serde_json::Value = serde_json::from_str(&nft).expect("nft json");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.remove("counter");
                m.remove("metainfo");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    let save = |tool: &str| {
        ns.exec_ok(tool, &[])
            .expect("save")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!("{v}\n{}\n{}", save("iptables-save"), save("ip6tables-save"))
}

/// Someone else's rules in every table ferry touches, so cleanup has something to spare.
fn foreign_rules(ns: &Netns) {
    for (tool, addr) in [("iptables", "192.0.2.1"), ("ip6tables", "2001:db8::1")] {
        for table in ["nat", "raw"] {
            for chain in ["OUTPUT", "PREROUTING"] {
                ns.exec_ok(
                    tool,
                    &["-t", table, "-A", chain, "-d", addr, "-j", "RETURN"],
                )
                .expect("foreign rule");
            }
        }
    }
    for cmd in [
        "add table inet other",
        "add chain inet other out { type filter hook output priority 0 ; policy accept ; }",
        "add rule inet other out tcp dport 9 counter",
    ] {
        ns.exec_ok("nft", &[cmd]).expect("foreign nft table");
    }
}

fn lifecycle(name: &str, rules: &RuleSet, backend: Backend) {
    let ns = Netns::new("ipt").expect("netns");
    foreign_rules(&ns);
    let before = snapshot(&ns);
    let run = Runner::with_prefix(ns.exec_prefix());

    assert_eq!(
        iptables::apply(rules, backend, &run).expect("apply"),
        Applied::Changed,
        "{name}"
    );
    iptables::verify(rules, backend, &run).unwrap_or_else(|e| panic!("{name}: {e}"));
    let applied = snapshot(&ns);
    assert_ne!(applied, before, "{name}: nothing was installed");

    assert_eq!(
        iptables::apply(rules, backend, &run).expect("apply again"),
        Applied::Unchanged,
        "{name}"
    );
    assert_eq!(
        snapshot(&ns),
        applied,
        "{name}: second apply changed the ruleset"
    );

    assert!(
        iptables::cleanup(rules, backend, &run).expect("cleanup"),
        "{name}"
    );
    let err = iptables::verify(rules, backend, &run).expect_err("verify after cleanup");
    assert!(err.to_string().contains("- "), "{name}: {err}");
    assert_eq!(
        snapshot(&ns),
        before,
        "{name}: cleanup did not restore the ruleset"
    );
    assert!(
        !iptables::cleanup(rules, backend, &run).expect("cleanup again"),
        "{name}"
    );
}

fn cases(resolv: &std::path::Path) -> Vec<(&'static str, RuleSet)> {
    vec![
        ("cofide", rules(&[], &[], resolv)),
        ("istio default", rules(&[("profile", "istio")], &[], resolv)),
        (
            "istio inbound, excludes, dns to resolv.conf servers, dual-stack",
            rules(
                &[
                    ("profile", "istio"),
                    ("-b", "*"),
                    ("-d", "15090,15021,15020"),
                    ("-x", "10.96.0.0/12,fd00::/8"),
                    ("-o", "25"),
                    ("-q", "3306"),
                ],
                &["--redirect-dns", "--dual-stack"],
                resolv,
            ),
        ),
        (
            "istio include list, capture-all-dns",
            rules(
                &[
                    ("profile", "istio"),
                    ("-i", "127.240.0.0/12,10.0.0.0/8"),
                    ("-b", "8080,9090"),
                ],
                &["--redirect-dns", "--capture-all-dns"],
                resolv,
            ),
        ),
    ]
}

fn resolv() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("resolv.conf");
    std::fs::write(&path, "nameserver 10.96.0.10\nnameserver fd00::a\n").expect("write");
    (dir, path)
}

#[test]
fn iptables_backend_apply_verify_idempotent_cleanup() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    let (_dir, path) = resolv();
    for (name, rules) in cases(&path) {
        lifecycle(name, &rules, Backend::Iptables);
    }
}

#[test]
fn nftables_backend_apply_verify_idempotent_cleanup() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    let (_dir, path) = resolv();
    for (name, rules) in cases(&path) {
        lifecycle(name, &rules, Backend::Nftables);
    }
}

#[test]
fn changed_flags_replace_the_old_rules_in_place() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    let (_dir, path) = resolv();
    let dns = rules(
        &[("profile", "istio")],
        &["--redirect-dns", "--dual-stack"],
        &path,
    );
    let plain = rules(&[("profile", "istio"), ("-b", "80")], &[], &path);
    for backend in [Backend::Iptables, Backend::Nftables] {
        let ns = Netns::new("chg").expect("netns");
        let run = Runner::with_prefix(ns.exec_prefix());
        iptables::apply(&dns, backend, &run).expect("apply dns");
        assert_eq!(
            iptables::apply(&plain, backend, &run).expect("apply plain"),
            Applied::Changed
        );
        // The DNS chains (raw table, nat ISTIO_OUTPUT_DNS, IPv6) are gone, not left over.
        iptables::verify(&plain, backend, &run).unwrap_or_else(|e| panic!("{e}"));
        iptables::cleanup(&plain, backend, &run).expect("cleanup");
    }
}

#[test]
fn a_failure_half_way_leaves_nothing_applied() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    let (_dir, path) = resolv();
    let ns = Netns::new("half").expect("netns");
    let before = snapshot(&ns);
    // IPv4 goes in first; a built-in chain name that does not exist in the IPv6 raw table
    // would be refused by ip6tables-restore. Simulate it with a rule set whose IPv6 part
    // jumps to a chain nobody declares.
    let mut broken = rules(
        &[("profile", "istio")],
        &["--redirect-dns", "--dual-stack"],
        &path,
    );
    if let Some(c) = broken
        .chains
        .iter_mut()
        .find(|c| c.name == "ISTIO_REDIRECT")
    {
        c.push(
            iptables::model::Matches {
                dest: Some(("fd00::/8".parse().expect("net"), false)),
                ..Default::default()
            },
            iptables::model::Target::Jump("NO_SUCH_CHAIN".into()),
        );
    }
    let run = Runner::with_prefix(ns.exec_prefix());
    let err = iptables::apply(&broken, Backend::Iptables, &run).expect_err("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("ip6tables-restore") && msg.contains("rolled back"),
        "{msg}"
    );
    // iptables-nft leaves the empty built-in tables it created; ferry's chains are gone.
    let after = snapshot(&ns);
    assert!(!after.contains("ISTIO"), "{after}");
    let _ = before;
}
