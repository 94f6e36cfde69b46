//! One test per validation rule, plus whole-file behaviour (all errors at once, located).

use std::path::Path;
use std::time::Duration;

use super::*;

const AGENT: &str =
    "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\ntrustDomain: client.domain\n";

fn svc(body: &str) -> String {
    format!(
        "---\napiVersion: registry.cofide.io/v1alpha1\nkind: FederatedService\nmetadata:\n  name: server\n  namespace: demo\n{body}"
    )
}

const GOOD_SPEC: &str = "spec:\n  name: server\n  namespace: demo\n  port: 8443\n  exportedTrustDomains: [client.domain]\n  spiffeIDPaths: [/ns/demo/sa/server]\n  tlsMode: IstioMtls\n  gateways:\n    - type: istio-eastwestgateway\n      port: 15443\n      ip: 10.1.2.3\n";

fn parse_str(src: &str) -> Result<Loaded, Vec<Diagnostic>> {
    match parse(src, Path::new("ferry.yaml"), Path::new("/nonexistent")) {
        Ok(l) => Ok(l),
        Err(ConfigError::Invalid { errors, .. }) => Err(errors),
        Err(e) => panic!("unexpected {e}"),
    }
}

/// Asserts exactly one error, at `path`, whose message contains `needle`; returns it.
fn one_error(src: &str, path: &str, needle: &str) -> Diagnostic {
    let errs = parse_str(src).expect_err("config should be rejected");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.path, path, "{e}");
    assert!(e.message.contains(needle), "{e}");
    e
}

#[test]
fn minimal_agent_with_one_service() {
    let src = format!("{AGENT}{}", svc(GOOD_SPEC));
    let l = parse_str(&src).unwrap();
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let c = l.config;
    assert_eq!(c.agent.trust_domain.as_str(), "client.domain");
    assert_eq!(c.agent.listen.xds.to_string(), "127.0.0.1:18001");
    assert_eq!(c.agent.listen.dns.to_string(), "127.0.0.1:15053");
    assert_eq!(c.agent.listen.outbound.to_string(), "0.0.0.0:10000");
    assert!(!c.agent.listen.outbound_passthrough);
    assert_eq!(
        c.agent.listen.workload_api.to_string(),
        "unix:///run/ferry/agent.sock"
    );
    assert_eq!(c.agent.vip_range.to_string(), "127.240.0.0/12");
    let s = &c.services[0];
    // No annotation: the server's trust domain is our own.
    assert_eq!(s.hostname, "server.demo.client.domain");
    assert_eq!(s.istio_sni(), "outbound_.8443_._.server.demo.client.domain");
    assert_eq!(s.cluster_name(), "server.demo.client.domain_cluster");
    assert_eq!(s.tls_mode, TlsMode::IstioMtls);
    assert!(c.agent.vip_range.contains(&s.vip));
    match &s.server_identity {
        ServerIdentity::Exact(ids) => assert_eq!(
            ids[0].to_string(),
            "spiffe://client.domain/ns/demo/sa/server"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn trust_domain_annotation_sets_hostname_and_ids() {
    let src = format!(
        "{AGENT}{}",
        svc(&format!(
            "  annotations:\n    ferry.dev/trust-domain: local.domain\n{GOOD_SPEC}"
        ))
    );
    let c = parse_str(&src).unwrap().config;
    assert_eq!(c.services[0].hostname, "server.demo.local.domain");
    assert_eq!(c.federated_trust_domains()[0].as_str(), "local.domain");
    let bad = format!(
        "{AGENT}{}",
        svc(&format!(
            "  annotations:\n    ferry.dev/trust-domain: Local.Domain\n{GOOD_SPEC}"
        ))
    );
    let e = one_error(
        &bad,
        "metadata.annotations.ferry.dev/trust-domain",
        "invalid trust domain",
    );
    assert_eq!(e.position.line, 11);
}

#[test]
fn tls_mode_is_required_and_an_enum() {
    let src = format!("{AGENT}{}", svc(&GOOD_SPEC.replace("IstioMtls", "mtls")));
    let e = one_error(
        &src,
        "spec.tlsMode",
        "must be Mtls or IstioMtls, got \"mtls\"",
    );
    // "  tlsMode: mtls" on line 16: the value starts in column 12.
    assert_eq!((e.position.line, e.position.column), (16, 12));
    assert_eq!(
        e.to_string(),
        "ferry.yaml:16:12: spec.tlsMode: must be Mtls or IstioMtls, got \"mtls\""
    );
    let src = format!(
        "{AGENT}{}",
        svc(&GOOD_SPEC.replace("  tlsMode: IstioMtls\n", ""))
    );
    one_error(&src, "spec.tlsMode", "required");
    let src = format!("{AGENT}{}", svc(&GOOD_SPEC.replace("IstioMtls", "Mtls")));
    assert_eq!(
        parse_str(&src).unwrap().config.services[0].tls_mode,
        TlsMode::Mtls
    );
}

#[test]
fn ports_are_1_to_65535() {
    for bad in ["0", "65536", "-1"] {
        let src = format!(
            "{AGENT}{}",
            svc(&GOOD_SPEC.replace("port: 8443", &format!("port: {bad}")))
        );
        one_error(&src, "spec.port", "must be 1-65535");
        let src = format!(
            "{AGENT}{}",
            svc(&GOOD_SPEC.replace("port: 15443", &format!("port: {bad}")))
        );
        one_error(&src, "spec.gateways[0].port", "must be 1-65535");
    }
    let src = format!("{AGENT}{}", svc(&GOOD_SPEC.replace("  port: 8443\n", "")));
    one_error(&src, "spec.port", "required");
    // A type mistake is located at its field too.
    let src = format!(
        "{AGENT}{}",
        svc(&GOOD_SPEC.replace("port: 8443", "port: http"))
    );
    one_error(&src, "spec.port", "invalid type");
}

#[test]
fn required_spec_fields() {
    let src = format!("{AGENT}{}", svc(&GOOD_SPEC.replace("  name: server\n", "")));
    one_error(&src, "spec.name", "required");
    let src = format!(
        "{AGENT}{}",
        svc(&GOOD_SPEC.replace("  namespace: demo\n", ""))
    );
    one_error(&src, "spec.namespace", "required");
    let src = format!("{AGENT}{}", svc(""));
    one_error(&src, "spec", "required");
    let src = format!(
        "{AGENT}{}",
        svc(&GOOD_SPEC.replace("name: server", "name: Server_1"))
    );
    one_error(&src, "spec.name", "DNS label");
}

#[test]
fn gateway_hostname_xor_ip_and_type_enum() {
    let both = GOOD_SPEC.replace(
        "ip: 10.1.2.3",
        "ip: 10.1.2.3\n      hostname: gw.example.com",
    );
    one_error(
        &format!("{AGENT}{}", svc(&both)),
        "spec.gateways[0]",
        "exactly one of hostname and ip",
    );
    let neither = GOOD_SPEC.replace("      ip: 10.1.2.3\n", "");
    one_error(
        &format!("{AGENT}{}", svc(&neither)),
        "spec.gateways[0]",
        "one of hostname or ip is required",
    );
    let bad_ip = GOOD_SPEC.replace("10.1.2.3", "10.1.2");
    one_error(
        &format!("{AGENT}{}", svc(&bad_ip)),
        "spec.gateways[0].ip",
        "not an IP address",
    );
    let bad_type = GOOD_SPEC.replace("istio-eastwestgateway", "nginx");
    one_error(
        &format!("{AGENT}{}", svc(&bad_type)),
        "spec.gateways[0].type",
        "istio-ingressgateway or istio-eastwestgateway",
    );
    let host = GOOD_SPEC.replace("ip: 10.1.2.3", "hostname: GW.example.com");
    let c = parse_str(&format!("{AGENT}{}", svc(&host))).unwrap().config;
    assert_eq!(
        c.services[0].gateways[0].address,
        GatewayAddress::Hostname("gw.example.com".into())
    );
}

#[test]
fn status_gateway_entries_used_when_spec_has_none() {
    let spec = GOOD_SPEC.split("  gateways:").next().unwrap().to_owned();
    let status = "status:\n  gatewayEntries:\n    - type: istio-ingressgateway\n      port: 443\n      hostname: ingress.example.com\n  observedGeneration: 3\n";
    let c = parse_str(&format!("{AGENT}{}", svc(&format!("{spec}{status}"))))
        .unwrap()
        .config;
    assert_eq!(c.services[0].gateways[0].kind, GatewayType::Ingress);
    let bad = status.replace("port: 443", "port: 0");
    one_error(
        &format!("{AGENT}{}", svc(&format!("{spec}{bad}"))),
        "status.gatewayEntries[0].port",
        "1-65535",
    );
    // No gateways at all is allowed (status not yet filled) but warned about.
    let l = parse_str(&format!("{AGENT}{}", svc(&spec))).unwrap();
    assert!(
        l.warnings.iter().any(|w| w.message.contains("no gateways")),
        "{:?}",
        l.warnings
    );
}

#[test]
fn spiffe_id_paths_missing_warns_empty_errors_bad_errors() {
    let spec = GOOD_SPEC.replace("  spiffeIDPaths: [/ns/demo/sa/server]\n", "");
    let l = parse_str(&format!("{AGENT}{}", svc(&spec))).unwrap();
    assert_eq!(
        l.config.services[0].server_identity,
        ServerIdentity::AnyInTrustDomain
    );
    assert!(
        l.warnings
            .iter()
            .any(|w| w.message.contains("spiffeIDPaths is missing"))
    );
    let empty = GOOD_SPEC.replace("[/ns/demo/sa/server]", "[]");
    one_error(
        &format!("{AGENT}{}", svc(&empty)),
        "spec.spiffeIDPaths",
        "at least 1",
    );
    let bad = GOOD_SPEC.replace("[/ns/demo/sa/server]", "[/ns/demo/sa/server, \"/ns//x\"]");
    one_error(
        &format!("{AGENT}{}", svc(&bad)),
        "spec.spiffeIDPaths[1]",
        "empty segments",
    );
    // Leading slash optional.
    let noslash = GOOD_SPEC.replace("[/ns/demo/sa/server]", "[ns/demo/sa/server]");
    assert!(parse_str(&format!("{AGENT}{}", svc(&noslash))).is_ok());
}

#[test]
fn exported_trust_domains_are_validated() {
    let bad = GOOD_SPEC.replace("[client.domain]", "[client.domain, \"spiffe://x:1\"]");
    one_error(
        &format!("{AGENT}{}", svc(&bad)),
        "spec.exportedTrustDomains[1]",
        "invalid trust domain",
    );
}

#[test]
fn duplicate_hostnames_are_rejected() {
    let src = format!(
        "{AGENT}{}{}",
        svc(GOOD_SPEC),
        svc(GOOD_SPEC).replace(
            "name: server\n  namespace: demo\nspec",
            "name: other\n  namespace: demo\nspec"
        )
    );
    let e = one_error(
        &src,
        "spec.name",
        "duplicate hostname server.demo.client.domain",
    );
    assert!(e.message.contains("already defined at line"));
}

#[test]
fn agent_config_rules() {
    one_error(
        "apiVersion: ferry.dev/v1alpha1\nkind: AgentConfig\n",
        "trustDomain",
        "required",
    );
    one_error(
        &AGENT.replace("client.domain", "Client.Domain"),
        "trustDomain",
        "lowercase",
    );
    one_error(
        &format!("{AGENT}bogus: 1\n"),
        "bogus",
        "unknown field `bogus`",
    );
    one_error(
        &format!("{AGENT}listen:\n  xds: localhost\n"),
        "listen.xds",
        "ip:port",
    );
    one_error(
        &format!("{AGENT}listen:\n  outbound: localhost\n"),
        "listen.outbound",
        "ip:port",
    );
    one_error(
        &format!("{AGENT}listen:\n  workloadApi: /tmp/x.sock\n"),
        "listen.workloadApi",
        "unix://",
    );
    one_error(
        &format!("{AGENT}listen:\n  workloadApi: unix://rel.sock\n"),
        "listen.workloadApi",
        "absolute",
    );
    one_error(
        &format!("{AGENT}ca:\n  backend: hsm\n"),
        "ca.backend",
        "software or tpm",
    );
    one_error(
        &format!("{AGENT}ca:\n  svidTtl: soon\n"),
        "ca.svidTtl",
        "duration",
    );
    one_error(
        &format!("{AGENT}vipRange: 10.0.0.0/8\n"),
        "vipRange",
        "loopback",
    );
    one_error(&format!("{AGENT}vipRange: nope\n"), "vipRange", "CIDR");
    one_error(
        &format!("{AGENT}dns:\n  upstreams: [127.0.0.53, dns.google]\n"),
        "dns.upstreams[1]",
        "must be an IP or ip:port",
    );
    let ok = parse_str(&format!(
        "{AGENT}dns:\n  upstreams: [127.0.0.53, \"[::1]:5353\"]\n"
    ))
    .unwrap();
    assert_eq!(
        ok.config.agent.dns.upstreams,
        [
            "127.0.0.53:53".parse::<std::net::SocketAddr>().unwrap(),
            "[::1]:5353".parse().unwrap()
        ]
    );
    one_error(
        "apiVersion: ferry.dev/v2\nkind: AgentConfig\ntrustDomain: a.b\n",
        "apiVersion",
        "ferry.dev/v1alpha1",
    );
    one_error(
        &format!("{AGENT}---\n{AGENT}"),
        "kind",
        "only one AgentConfig",
    );
    one_error(
        &format!("{AGENT}---\nkind: Deployment\n"),
        "kind",
        "unknown kind",
    );
    let e = one_error(&svc(GOOD_SPEC), "", "no AgentConfig");
    assert_eq!(e.position.line, 2, "points at the first document");
    let ok = format!(
        "{AGENT}ca:\n  backend: tpm\n  svidTtl: 4s\n  tpm:\n    tcti: swtpm:host=127.0.0.1,port=2321\nlisten:\n  workloadApi: tcp://127.0.0.1:9000\n"
    );
    let c = parse_str(&ok).unwrap().config;
    assert_eq!(c.agent.ca.backend, CaBackend::Tpm);
    assert_eq!(c.agent.ca.svid_ttl, std::time::Duration::from_secs(4));
    assert_eq!(c.agent.ca.tpm_tcti, "swtpm:host=127.0.0.1,port=2321");
}

#[test]
fn registration_entry_rules() {
    let entry = |id: &str, sels: &str| {
        format!("{AGENT}registrationEntries:\n  - spiffeId: {id}\n    selectors: {sels}\n")
    };
    let c = parse_str(&entry("spiffe://client.domain/app", "[\"unix:uid:1000\", \"unix:user:app\", \"unix:gid:5\", \"unix:group:g\", \"unix:path:/usr/bin/app\"]")).unwrap().config;
    assert_eq!(c.agent.registration_entries[0].selectors.len(), 5);
    assert_eq!(
        c.agent.registration_entries[0].selectors[0],
        Selector::Uid(1000)
    );
    one_error(
        &entry("spiffe://client.domain/app", "[\"k8s:ns:default\"]"),
        "registrationEntries[0].selectors[0]",
        "unknown selector type \"k8s\"",
    );
    one_error(
        &entry("spiffe://client.domain/app", "[\"unix:pid:1\"]"),
        "registrationEntries[0].selectors[0]",
        "unknown selector type \"unix:pid\"",
    );
    one_error(
        &entry("spiffe://client.domain/app", "[\"unix:uid:me\"]"),
        "registrationEntries[0].selectors[0]",
        "must be a number",
    );
    one_error(
        &entry("spiffe://client.domain/app", "[\"unix:sha256:abc\"]"),
        "registrationEntries[0].selectors[0]",
        "bad value",
    );
    one_error(
        &entry("spiffe://client.domain/app", "[]"),
        "registrationEntries[0].selectors",
        "at least one",
    );
    one_error(
        &entry("spiffe://client.domain/a/../b", "[\"unix:uid:1\"]"),
        "registrationEntries[0].spiffeId",
        "dot segments",
    );
    one_error(
        &entry("spiffe://other.domain/app", "[\"unix:uid:1\"]"),
        "registrationEntries[0].spiffeId",
        "not in this agent's trust domain",
    );
}

#[test]
fn bundle_files_must_be_readable_and_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("good.json"), r#"{"keys":[]}"#).unwrap();
    std::fs::write(dir.path().join("junk.txt"), "hello").unwrap();
    let cfg = |f: &str| format!("{AGENT}trustBundles:\n  local.domain:\n    file: {f}\n");
    let run = |src: String| parse(&src, Path::new("ferry.yaml"), dir.path());
    let ok = run(cfg("good.pem")).unwrap().config;
    assert_eq!(
        ok.agent.trust_bundles.values().next().unwrap().file,
        dir.path().join("good.pem")
    );
    assert!(run(cfg("good.json")).is_ok());
    for (f, needle) in [
        ("missing.pem", "cannot read bundle file"),
        ("junk.txt", "neither PEM"),
    ] {
        match run(cfg(f)) {
            Err(ConfigError::Invalid { errors, .. }) => {
                assert_eq!(errors.len(), 1);
                assert_eq!(errors[0].path, "trustBundles.local.domain.file");
                assert!(errors[0].message.contains(needle), "{}", errors[0]);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn all_errors_reported_at_once_in_file_order() {
    let spec = GOOD_SPEC
        .replace("IstioMtls", "mtls")
        .replace("port: 8443", "port: 0")
        .replace("ip: 10.1.2.3", "ip: 10.1.2.3\n      hostname: gw");
    let src = format!(
        "{}registrationEntries:\n  - spiffeId: spiffe://client.domain/x\n    selectors: [\"docker:id:1\"]\n{}",
        AGENT.replace("client.domain", "CLIENT"),
        svc(&spec)
    );
    let errs = parse_str(&src).unwrap_err();
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "trustDomain",
            "registrationEntries[0].selectors[0]",
            "spec.port",
            "spec.tlsMode",
            "spec.gateways[0]"
        ],
        "an invalid AgentConfig still lets the services be checked: {errs:#?}"
    );
    let src = format!("{AGENT}{}", svc(&spec));
    let errs = parse_str(&src).unwrap_err();
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["spec.port", "spec.tlsMode", "spec.gateways[0]"],
        "{errs:#?}"
    );
    let lines: Vec<_> = errs.iter().map(|e| e.position.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn bad_vip_range_still_checks_dns_upstreams() {
    let src = format!("{AGENT}vipRange: banana\ndns:\n  upstreams: [not-an-ip]\n");
    let errs = parse_str(&src).unwrap_err();
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["vipRange", "dns.upstreams[0]"], "{errs:#?}");
}

#[test]
fn a_stream_error_is_reported_once_not_forever() {
    // 0x1A passes the position scanner but not libyaml's; its iterator used to repeat the
    // error without end (fuzz/artifacts: config_load oom).
    let errs = parse_str("\u{1a}").unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].message.contains("YAML error"), "{}", errs[0]);
}

#[test]
fn syntax_errors_are_located() {
    let errs = parse_str("apiVersion: [\nkind: x\n").unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].message.contains("YAML syntax error"), "{}", errs[0]);
}

#[test]
fn vips_stable_across_document_reorder_and_service_changes() {
    let mk = |n: &str| {
        svc(&GOOD_SPEC.replace(
            "name: server\n  namespace: demo",
            &format!("name: {n}\n  namespace: demo"),
        ))
        .replace(
            "  name: server\n  namespace: demo\nspec",
            &format!("  name: {n}\n  namespace: demo\nspec"),
        )
    };
    let names = ["alpha", "bravo", "charlie", "delta", "echo"];
    let all = format!("{AGENT}{}", names.iter().map(|n| mk(n)).collect::<String>());
    let c1 = parse_str(&all).unwrap().config;
    let vip = |c: &Config, n: &str| c.service(&format!("{n}.demo.client.domain")).unwrap().vip;
    let rev = format!(
        "{AGENT}{}",
        names.iter().rev().map(|n| mk(n)).collect::<String>()
    );
    let c2 = parse_str(&rev).unwrap().config;
    let fewer = format!(
        "{AGENT}{}",
        names
            .iter()
            .filter(|n| **n != "bravo")
            .map(|n| mk(n))
            .collect::<String>()
    );
    let c3 = parse_str(&fewer).unwrap().config;
    let more = format!("{all}{}", mk("zulu"));
    let c4 = parse_str(&more).unwrap().config;
    for n in names {
        assert_eq!(vip(&c1, n), vip(&c2, n), "{n} moved on reorder");
        assert_eq!(vip(&c1, n), vip(&c4, n), "{n} moved on add");
        if n != "bravo" {
            assert_eq!(vip(&c1, n), vip(&c3, n), "{n} moved on remove");
        }
    }
    assert_eq!(c1, c2);
}

#[test]
fn outbound_listener_settings() {
    let src = format!(
        "{AGENT}listen:\n  outbound: 0.0.0.0:15001\n  outboundPassthrough: true\n{}",
        svc(GOOD_SPEC)
    );
    let c = parse_str(&src).unwrap().config;
    assert_eq!(c.agent.listen.outbound.to_string(), "0.0.0.0:15001");
    assert!(c.agent.listen.outbound_passthrough);
}

#[test]
fn node_attestation_fields() {
    let c = parse_str(&format!(
        "{AGENT}ca:\n  role: root\n  caTtl: 10h\n  nodeAttestation:\n    listen: 127.0.0.1:9443\n    manufacturerCas: [/m/a.pem, b.pem]\n"
    ))
    .unwrap()
    .config;
    let n = c
        .agent
        .ca
        .node_attestation
        .expect("root has nodeAttestation");
    assert_eq!(n.listen.to_string(), "127.0.0.1:9443");
    assert_eq!(n.manufacturer_cas[0], Path::new("/m/a.pem"));
    assert!(
        n.manufacturer_cas[1].is_absolute(),
        "relative to the config file"
    );
    assert_eq!(
        n.node_ca_ttl,
        Duration::from_secs(10 * 3600),
        "defaults to caTtl"
    );
    let c = parse_str(&format!(
        "{AGENT}ca:\n  role: root\n  nodeAttestation:\n    manufacturerCas: [a.pem]\n    nodeCaTtl: 2h\n"
    ))
    .unwrap()
    .config;
    let n = c.agent.ca.node_attestation.unwrap();
    assert_eq!(n.listen.to_string(), "0.0.0.0:18443");
    assert_eq!(n.node_ca_ttl, Duration::from_secs(2 * 3600));
    one_error(
        &format!("{AGENT}ca:\n  role: root\n"),
        "ca.nodeAttestation",
        "required with ca.role: root",
    );
    one_error(
        &format!("{AGENT}ca:\n  role: root\n  nodeAttestation: {{}}\n"),
        "ca.nodeAttestation.manufacturerCas",
        "at least one PEM file",
    );
    one_error(
        &format!("{AGENT}ca:\n  nodeAttestation:\n    manufacturerCas: [a.pem]\n"),
        "ca.nodeAttestation",
        "only applies to ca.role: root",
    );
    one_error(
        &format!(
            "{AGENT}ca:\n  role: root\n  nodeAttestation:\n    manufacturerCas: [a.pem]\n    listen: nowhere\n"
        ),
        "ca.nodeAttestation.listen",
        "",
    );
    one_error(
        &format!("{AGENT}ca:\n  backend: tpm\n  role: node\n  upstream: https://root:1\n"),
        "ca.upstreamBundle",
        "required with ca.role: node",
    );
    one_error(
        &format!(
            "{AGENT}ca:\n  backend: tpm\n  fallback: software\n  role: node\n  upstream: https://root:1\n  upstreamBundle: b.pem\n"
        ),
        "ca.fallback",
        "does not apply to ca.role: node",
    );
    one_error(
        &format!("{AGENT}ca:\n  upstreamBundle: b.pem\n"),
        "ca.upstreamBundle",
        "only applies to ca.role: node",
    );
}

#[test]
fn tpm_ca_fields() {
    let c = parse_str(&format!("{AGENT}ca:\n  backend: tpm\n"))
        .unwrap()
        .config;
    assert_eq!(c.agent.ca.fallback, CaFallback::None, "no silent fallback");
    assert_eq!(c.agent.ca.role, CaRole::Standalone);
    assert_eq!(c.agent.ca.issuance, CaIssuance::IssuingCa);
    assert_eq!(c.agent.ca.upstream, None);
    let c = parse_str(&format!(
        "{AGENT}ca:\n  backend: tpm\n  role: node\n  upstream: https://root:8443\n  upstreamBundle: /etc/ferry/root.pem\n  issuance: direct\n"
    ))
    .unwrap()
    .config;
    assert_eq!(c.agent.ca.fallback, CaFallback::None);
    assert_eq!(c.agent.ca.role, CaRole::Node);
    assert_eq!(c.agent.ca.issuance, CaIssuance::Direct);
    assert_eq!(c.agent.ca.upstream.as_deref(), Some("https://root:8443"));
    assert_eq!(
        c.agent.ca.upstream_bundle.as_deref(),
        Some(Path::new("/etc/ferry/root.pem"))
    );
    one_error(
        &format!("{AGENT}ca:\n  backend: tpm\n  fallback: maybe\n"),
        "ca.fallback",
        "none or software",
    );
    one_error(
        &format!("{AGENT}ca:\n  fallback: software\n"),
        "ca.fallback",
        "only applies to ca.backend: tpm",
    );
    one_error(
        &format!("{AGENT}ca:\n  backend: tpm\n  role: node\n  upstreamBundle: b.pem\n"),
        "ca.upstream",
        "required with ca.role: node",
    );
    one_error(
        &format!(
            "{AGENT}ca:\n  backend: tpm\n  role: node\n  upstream: http://root:1\n  upstreamBundle: b.pem\n"
        ),
        "ca.upstream",
        "https://host:port",
    );
    one_error(
        &format!(
            "{AGENT}ca:\n  role: root\n  upstream: https://x:1\n  nodeAttestation:\n    manufacturerCas: [m.pem]\n"
        ),
        "ca.upstream",
        "only applies to ca.role: node",
    );
    one_error(
        &format!("{AGENT}ca:\n  role: node\n  upstream: https://x:1\n  upstreamBundle: b.pem\n"),
        "ca.role",
        "needs ca.backend: tpm",
    );
    one_error(
        &format!("{AGENT}ca:\n  role: leaf\n"),
        "ca.role",
        "standalone, root or node",
    );
    one_error(
        &format!("{AGENT}ca:\n  backend: tpm\n  issuance: fast\n"),
        "ca.issuance",
        "issuing-ca or direct",
    );
    one_error(
        &format!("{AGENT}ca:\n  backend: tpm\n  tpm:\n    tcti: /dev/tpm0\n"),
        "ca.tpm.tcti",
        "device:<path>",
    );
}
