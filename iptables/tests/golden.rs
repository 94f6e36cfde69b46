//! Golden tests: the exact rules rendered for a set of flag combinations, both backends.
//! The expected files under `tests/golden/` were written from spiffe-enable's rule list
//! (protocols.md section 2) and istio-iptables' documented semantics (section 6), then
//! checked line by line; `FERRY_UPDATE_GOLDEN=1` rewrites them after a deliberate change
//! (review the diff).

#![allow(clippy::expect_used, missing_docs)] // test setup: a failure panics with its cause

use std::path::{Path, PathBuf};

use iptables::apply::{Backend, render};
use iptables::{RawOptions, profile};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn resolv_conf() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("resolv.conf");
    std::fs::write(
        &path,
        "search cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\n",
    )
    .expect("write");
    (dir, path)
}

fn check(name: &str, raw: RawOptions, resolv: &Path) {
    let rules = profile::build(&raw.validate(resolv).expect("valid flags"));
    for (backend, ext) in [(Backend::Iptables, "iptables"), (Backend::Nftables, "nft")] {
        let got = render(&rules, backend);
        let path = golden_dir().join(format!("{name}.{ext}"));
        if std::env::var_os("FERRY_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).expect("write golden");
            continue;
        }
        let want =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(got, want, "{} differs", path.display());
    }
}

fn istio() -> RawOptions {
    RawOptions {
        profile: Some("istio".into()),
        ..RawOptions::default()
    }
}

#[test]
fn cofide_default() {
    let (_d, r) = resolv_conf();
    check("cofide", RawOptions::default(), &r);
}

#[test]
fn cofide_custom_uid_and_port() {
    let (_d, r) = resolv_conf();
    check(
        "cofide-uid-port",
        RawOptions {
            proxy_uid: Some("2000".into()),
            proxy_port: Some("15001".into()),
            ..RawOptions::default()
        },
        &r,
    );
}

#[test]
fn istio_outbound_only() {
    let (_d, r) = resolv_conf();
    check("istio-default", istio(), &r);
}

#[test]
fn istio_sidecar_injected() {
    // What Istio's injector passes: -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x ""
    // -b '*' -d 15090,15021,15020.
    let (_d, r) = resolv_conf();
    check(
        "istio-injected",
        RawOptions {
            proxy_port: Some("15001".into()),
            inbound_port: Some("15006".into()),
            proxy_uid: Some("1337".into()),
            inbound_mode: Some("REDIRECT".into()),
            outbound_cidrs: Some("*".into()),
            inbound_ports: Some("*".into()),
            inbound_ports_exclude: Some("15090,15021,15020".into()),
            ..istio()
        },
        &r,
    );
}

#[test]
fn istio_dns_to_resolv_conf_servers_dual_stack() {
    let (_d, r) = resolv_conf();
    check(
        "istio-dns-dual-stack",
        RawOptions {
            redirect_dns: true,
            dual_stack: true,
            ..istio()
        },
        &r,
    );
}

#[test]
fn istio_capture_all_dns_include_list_and_ports() {
    let (_d, r) = resolv_conf();
    check(
        "istio-include-capture-all-dns",
        RawOptions {
            outbound_cidrs: Some("127.240.0.0/12,10.0.0.0/8".into()),
            outbound_cidrs_exclude: Some("10.96.0.0/12".into()),
            outbound_ports: Some("3306".into()),
            outbound_ports_exclude: Some("25,465".into()),
            inbound_ports: Some("8080,9090".into()),
            proxy_gid: Some("1337,2000".into()),
            redirect_dns: true,
            capture_all_dns: true,
            ..istio()
        },
        &r,
    );
}
