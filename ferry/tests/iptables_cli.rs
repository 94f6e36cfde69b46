//! `ferry iptables` as an init container runs it, in a network namespace of the test's own
//! (root; CI fails without it): apply, apply again (nothing changes), `--verify`,
//! `--cleanup`; an invalid flag is refused before anything is touched.

#![allow(clippy::expect_used, missing_docs)] // test setup: a failure panics with its cause

use testkit::netns::Netns;

fn ferry(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = ns
        .exec(env!("CARGO_BIN_EXE_ferry"), &[&["iptables"], args].concat())
        .expect("run ferry");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn init_container_lifecycle_both_backends() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    for backend in ["nftables", "iptables"] {
        let ns = Netns::new("cli").expect("netns");
        let b = ["--backend", backend];
        let (ok, out) = ferry(&ns, &[&b[..], &["--profile", "cofide"]].concat());
        assert!(
            ok && out.contains("applied and verified"),
            "{backend}: {out}"
        );
        let (ok, out) = ferry(&ns, &[&b[..], &["--profile", "cofide"]].concat());
        assert!(ok && out.contains("nothing changed"), "{backend}: {out}");
        let (ok, out) = ferry(&ns, &[&b[..], &["--verify"]].concat());
        assert!(ok, "{backend}: {out}");
        // The istio profile's rules are not installed: --verify says which lines miss.
        let (ok, out) = ferry(&ns, &[&b[..], &["--profile", "istio", "--verify"]].concat());
        assert!(
            !ok && out.contains("- ") && out.contains("istio"),
            "{backend}: {out}"
        );
        let (ok, out) = ferry(&ns, &[&b[..], &["--cleanup"]].concat());
        assert!(
            ok && out.contains("removed the cofide rules"),
            "{backend}: {out}"
        );
        let (ok, _) = ferry(&ns, &[&b[..], &["--verify"]].concat());
        assert!(!ok, "{backend}: verify passed after cleanup");
    }
}

#[test]
fn invalid_flags_touch_nothing() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    let ns = Netns::new("bad").expect("netns");
    let before = ns.exec_ok("nft", &["list", "ruleset"]).expect("nft");
    for (args, says) in [
        (
            &["--profile", "istio", "-b", "80,99999"][..],
            "-b \"99999\"",
        ),
        (
            &["--profile", "istio", "-x", "10.0.0.0/40"][..],
            "-x \"10.0.0.0/40\"",
        ),
        (&["--profile", "istio", "-m", "TPROXY"][..], "only REDIRECT"),
        (&["--profile", "cofide", "-i", "10.0.0.0/8"][..], "-i"),
        (&["-p", "0"][..], "-p \"0\""),
    ] {
        let (ok, out) = ferry(&ns, args);
        assert!(!ok && out.contains(says), "{args:?}: {out}");
    }
    assert_eq!(
        ns.exec_ok("nft", &["list", "ruleset"]).expect("nft"),
        before
    );
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    if !testkit::require("root (network namespaces)", testkit::is_root()) {
        return;
    }
    let ns = Netns::new("dry").expect("netns");
    let (ok, out) = ferry(&ns, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(out.contains("table inet envoy_proxy {"), "{out}");
    assert!(out.contains("ip daddr 127.0.0.0/8 tcp dport 1-65535 redirect to :10000"));
    let (ok, out) = ferry(
        &ns,
        &["--profile", "istio", "--backend", "iptables", "--dry-run"],
    );
    assert!(
        ok && out.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{out}"
    );
    assert_eq!(ns.exec_ok("nft", &["list", "ruleset"]).expect("nft"), "");
}
