//! The transparent path, end to end, with zero app configuration: what an injected
//! sidecar does for an unmodified app.
//!
//! Two network namespaces joined by a veth pair (10.77.0.2 "pod" <-> 10.77.0.1 "remote
//! cluster"):
//!
//! - **pod**: `/etc/netns/NAME/resolv.conf` names `10.77.0.53` (nothing listens there);
//!   `ferry iptables` installs the capture rules (`cofide`, or `istio` with
//!   `--redirect-dns`); `ferry agent` (CA, Workload API, xDS on loopback) runs as root;
//!   `ferry proxy` with its Cofide defaults runs as uid 1337; the app is `curl`, run as
//!   another uid, and a plain `127.0.0.1:6379` service;
//! - **remote**: stock Envoy as the east-west gateway on `10.77.0.1:15443` (AUTO_PASSTHROUGH
//!   for the `IstioMtls` service, PASSTHROUGH for the `Mtls` one), `ferry proxy --inbound`
//!   in front of a plain HTTP server, and an mTLS server doing its own TLS.
//!
//! `curl http://server.demo.local.domain:8443/` gets the server's answer: its DNS query was
//! captured and answered with the VIP, its connection captured, upgraded to Istio mTLS
//! (both proxies log the other's SPIFFE ID and metadata) and routed by SNI. A client doing
//! its own mTLS reaches the `Mtls` server untouched. The proxy's own connections are not
//! captured again (no loop), and the pod's loopback service still answers.
//!
//! Every address is on loopback or inside the two namespaces, which are deleted however
//! the test ends. Needs root, stock Envoy and curl: skipped without them, failed under
//! `CI=true`.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::config::{AgentDoc, Entry};
use testkit::mesh::{self, GatewayRoute, HttpServer, MtlsServer, Spawned};
use testkit::netns::Netns;

const TD: &str = "local.domain";
const HOST: &str = "server.demo.local.domain";
const MTLS_HOST: &str = "mtls.demo.local.domain";
const CLIENT_ID: &str = "spiffe://local.domain/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/server";
const MTLS_CLIENT_ID: &str = "spiffe://local.domain/ns/demo/sa/mtls-client";
const MTLS_SERVER_ID: &str = "spiffe://local.domain/ns/demo/sa/mtls";
/// The uid the sidecar runs as (the capture rules let it through).
const PROXY_UID: u32 = 1337;
/// The app's uid: anything but the proxy's.
const APP_UID: u32 = 4242;
const POD_IP: &str = "10.77.0.2/24";
const REMOTE_IP: &str = "10.77.0.1/24";
/// The pod's nameserver: on the veth subnet (so it is routable), but nobody answers there.
const NAMESERVER: &str = "10.77.0.53";
const READY: Duration = Duration::from_secs(30);

/// Which capture rules the pod gets.
#[derive(Debug, Clone, Copy)]
enum Profile {
    /// spiffe-enable's rules (iptables backend): proxy on 10000, all loopback TCP captured.
    Cofide,
    /// istio-iptables' rules (nftables backend) with the VIP range included and DNS
    /// redirected: proxy on 15001.
    Istio,
}

impl Profile {
    fn outbound_port(self) -> u16 {
        match self {
            Profile::Cofide => 10000,
            Profile::Istio => 15001,
        }
    }

    fn iptables_args(self) -> Vec<&'static str> {
        match self {
            Profile::Cofide => vec!["iptables", "--profile", "cofide", "--backend", "iptables"],
            Profile::Istio => vec![
                "iptables",
                "--profile",
                "istio",
                "--backend",
                "nftables",
                "-p",
                "15001",
                "-u",
                "1337",
                "-g",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "127.240.0.0/12",
                "--redirect-dns",
            ],
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn tool_runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A tokio listener on `at` inside `ns`.
fn listen_in(ns: &Netns, at: &str) -> tokio::net::TcpListener {
    let at = addr(at);
    let l = ns
        .within(|| std::net::TcpListener::bind(at))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {at} in {}: {e}", ns.name()));
    l.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(l).unwrap()
}

/// `GET path` over HTTP/1.0 to `to` from inside `ns`: status and body, `None` if nothing
/// answers (blocking, so callers wrap it in `block_in_place`).
fn http_get_in(ns: &Netns, to: SocketAddr, path: &str) -> Option<(u16, String)> {
    ns.within(|| {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nhost: {to}\r\n\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let status = raw.split(' ').nth(1)?.parse().ok()?;
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    })
    .ok()
    .flatten()
}

/// Waits until `name`'s admin at `admin` inside `ns` answers `/ready` with 200.
async fn wait_ready_in(ns: &Netns, admin: SocketAddr, p: &mut Spawned) {
    let deadline = Instant::now() + READY;
    loop {
        let ready = tokio::task::block_in_place(|| http_get_in(ns, admin, "/ready"));
        if ready.is_some_and(|(s, _)| s == 200) {
            return;
        }
        if let Some(status) = p.exited() {
            panic!("exited ({status}) before it was ready\n{}", p.log_tail(40));
        }
        assert!(
            Instant::now() < deadline,
            "not ready on {admin} in {}\n{}",
            ns.name(),
            p.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until something accepts TCP on `to` inside `ns`.
async fn wait_port_in(ns: &Netns, to: SocketAddr, what: &Spawned) {
    let deadline = Instant::now() + READY;
    while !tokio::task::block_in_place(|| {
        ns.within(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
            .unwrap()
    }) {
        assert!(
            Instant::now() < deadline,
            "nothing on {to} in {}\n{}",
            ns.name(),
            what.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Spawns `program args` inside `ns` (`ip netns exec` execs it, so the child is the
/// program itself), logging to `<dir>/<name>.log`.
fn spawn_in(ns: &Netns, name: &str, dir: &Path, program: &Path, args: &[&str]) -> Spawned {
    let mut argv = ns.exec_prefix();
    argv.remove(0);
    argv.push(program.display().to_string());
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    Spawned::start(name, Path::new("ip"), &argv, &[], dir).unwrap()
}

/// `curl -sS URL` inside the pod as the app's uid: the body, or curl's complaint.
async fn app_curl(pod: &Netns, url: &str) -> Result<String, String> {
    let uid = format!("--reuid={APP_UID}");
    let gid = format!("--regid={APP_UID}");
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.name(),
            "setpriv",
            &uid,
            &gid,
            "--clear-groups",
        ])
        .args(["curl", "-sS", "--max-time", "5", url])
        .output()
        .await
        .map_err(|e| format!("run curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "curl {url}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A copy of the ferry binary in the shared dir (readable by the proxy's uid; its own
/// path for a `unix:path:` selector).
fn ferry_copy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_ferry"), &p).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_federated_services_through_cofide_capture() {
    transparent(Profile::Cofide).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_federated_services_through_istio_capture_with_dns_redirect() {
    transparent(Profile::Istio).await;
}

async fn transparent(profile: Profile) {
    if !testkit::require(
        "root (network namespaces, capture rules, setpriv)",
        testkit::is_root(),
    ) || !testkit::require("curl", tool_runs("curl"))
    {
        return;
    }
    let Some(envoy) = testkit::envoy::require() else {
        return;
    };
    // Namespaces first: dropped last, after every process in them is killed.
    let pod = Netns::new("pod").unwrap();
    let remote = Netns::new("rem").unwrap();
    pod.link(&remote, POD_IP, REMOTE_IP).unwrap();
    pod.set_resolv_conf(&format!(
        "nameserver {NAMESERVER}\noptions timeout:2 attempts:2\n"
    ))
    .unwrap();
    let dir = testkit::shared_tempdir();
    let d = dir.path();
    let proxy_bin = ferry_copy(d, "ferry-proxy");
    let server_bin = ferry_copy(d, "ferry-server");
    let me = std::env::current_exe().unwrap();
    let socket = d.join("agent.sock");
    let gateway: SocketAddr = addr("10.77.0.1:15443");
    let xds = addr("127.0.0.1:18001");
    let admin = addr("127.0.0.1:9901");

    // The capture rules come first, as the init container runs before the pod's others.
    let mut rules = vec![proxy_bin.display().to_string()];
    rules.extend(profile.iptables_args().iter().map(|a| (*a).to_owned()));
    let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
    pod.exec_ok(rules[0], &rules[1..])
        .unwrap_or_else(|e| panic!("ferry iptables: {e}"));

    // ferry agent in the pod's namespace (xDS on its loopback), one trust domain.
    let path_sel = |p: &Path| format!("unix:path:{}", p.display());
    let services = format!(
        "{}{}",
        mesh::own_domain_service("server", 8443, "IstioMtls", gateway),
        mesh::own_domain_service("mtls", 9443, "Mtls", gateway)
    );
    let doc = AgentDoc::in_dir(TD, d)
        .listen("xds", xds)
        .listen("outbound", format!("0.0.0.0:{}", profile.outbound_port()))
        .listen("dns", "127.0.0.1:5353")
        .ca("svidTtl", "1h")
        .entry(&Entry::new(CLIENT_ID, [format!("unix:uid:{PROXY_UID}")]))
        .entry(&Entry::new(
            SERVER_ID,
            ["unix:uid:0".to_owned(), path_sel(&server_bin)],
        ))
        .entry(&Entry::new(
            MTLS_CLIENT_ID,
            ["unix:uid:0".to_owned(), path_sel(&me)],
        ))
        .entry(&Entry::new(
            MTLS_SERVER_ID,
            ["unix:uid:0".to_owned(), path_sel(&me)],
        ));
    let config = d.join("ferry.yaml");
    std::fs::write(&config, doc.raw(&services).render()).unwrap();
    let config_s = config.display().to_string();
    let agent = spawn_in(
        &pod,
        "agent",
        d,
        Path::new(env!("CARGO_BIN_EXE_ferry")),
        &["agent", "--config", &config_s],
    );
    testkit::wait_until("the Workload API socket", READY, || {
        let s = socket.clone();
        async move { s.exists() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(40)));
    let workload_api = format!("unix://{}", socket.display());
    let ctx = mesh::fetch_context(&workload_api).await;

    // The remote cluster: app servers, ferry's inbound sidecar, stock Envoy as gateway.
    let app = HttpServer::serve("app", listen_in(&remote, "127.0.0.1:8080")).unwrap();
    let mtls_app = MtlsServer::serve(
        "mtls-app",
        listen_in(&remote, "127.0.0.1:8444"),
        mesh::svid(&ctx, MTLS_SERVER_ID),
        mesh::roots(&ctx, TD),
    )
    .unwrap();
    let inbound_addr = addr("127.0.0.1:15006");
    let bootstrap = d.join("gateway.yaml");
    std::fs::write(
        &bootstrap,
        mesh::gateway_bootstrap(
            gateway,
            15000,
            &[
                GatewayRoute::auto_passthrough(8443, HOST, inbound_addr),
                GatewayRoute::passthrough(MTLS_HOST, mtls_app.addr()),
            ],
        ),
    )
    .unwrap();
    let bootstrap_s = bootstrap.display().to_string();
    let envoy_gw = spawn_in(
        &remote,
        "gateway",
        d,
        &envoy,
        &[
            "-c",
            &bootstrap_s,
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "info",
        ],
    );
    wait_port_in(&remote, gateway, &envoy_gw).await;
    let mut inbound = spawn_in(
        &remote,
        "ferry-inbound",
        d,
        &server_bin,
        &[
            "proxy",
            "--workload-api",
            &workload_api,
            "--inbound",
            "127.0.0.1:15006",
            "--inbound-app",
            "127.0.0.1:8080",
            "--outbound",
            "off",
            "--dns",
            "off",
            "--workload-name",
            "server",
            "--namespace",
            "demo",
        ],
    );
    wait_ready_in(&remote, admin, &mut inbound).await;

    // The pod's sidecar as uid 1337, Cofide defaults but for the capture port.
    let outbound_flag = format!("0.0.0.0:{}", profile.outbound_port());
    let xds_flag = format!("http://{xds}");
    let mut proxy = spawn_in(
        &pod,
        "ferry-proxy",
        d,
        Path::new("setpriv"),
        &[
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            &proxy_bin.display().to_string(),
            "proxy",
            "--xds",
            &xds_flag,
            "--workload-api",
            &workload_api,
            "--outbound",
            &outbound_flag,
            "--workload-name",
            "client",
            "--namespace",
            "demo",
        ],
    );
    wait_ready_in(&pod, admin, &mut proxy).await;
    let logs = || {
        format!(
            "{}\n{}\n{}\n{}",
            proxy.log_tail(40),
            inbound.log_tail(30),
            envoy_gw.log_tail(20),
            agent.log_tail(20)
        )
    };

    // IstioMtls: a plain curl, nothing configured.
    let url = format!("http://{HOST}:8443/");
    let body = mesh::retry("curl the IstioMtls service", logs, || app_curl(&pod, &url)).await;
    assert_eq!(body, app.body(), "{}", logs());
    let req = app.requests().pop().unwrap();
    assert_eq!(req.header("host"), Some(&*format!("{HOST}:8443")));
    let line = proxy
        .wait_access(Duration::from_secs(10), |l| l.contains(SERVER_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(mesh::meta_mentions(&line, "server"), "outbound: {line}");
    assert!(line.contains(":8443"), "original destination: {line}");
    assert!(line.contains(&gateway.to_string()), "endpoint: {line}");
    let line = inbound
        .wait_access(Duration::from_secs(10), |l| l.contains(CLIENT_ID))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(mesh::meta_mentions(&line, "client"), "inbound: {line}");
    let routed = format!(
        "{} sni={} upstream={inbound_addr}",
        mesh::GATEWAY_LOG_TAG,
        mesh::auto_passthrough_sni(8443, HOST)
    );
    mesh::retry("the gateway's access line", logs, || {
        let seen = if envoy_gw.log().contains(&routed) {
            Ok(())
        } else {
            Err(format!("no line {routed:?}"))
        };
        async move { seen }
    })
    .await;

    // Mtls: a client doing its own mTLS, after a system lookup (getent) in the pod.
    let hosts = pod
        .exec_ok("getent", &["ahostsv4", MTLS_HOST])
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let vip: std::net::IpAddr = hosts
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("getent: {hosts}"));
    assert!(
        addr("127.240.0.0:0").ip() <= vip && vip <= addr("127.255.255.255:0").ip(),
        "{MTLS_HOST} resolved to {vip}, not a VIP"
    );
    let dst = SocketAddr::new(vip, 9443);
    let r = mesh::retry("mTLS GET through the capture", logs, || {
        let cfg = mesh::client_config(
            Some(mesh::svid(&ctx, MTLS_CLIENT_ID)),
            mesh::roots(&ctx, TD),
            MTLS_SERVER_ID,
            &["http/1.1"],
        );
        let pod = &pod;
        async move {
            tokio::task::block_in_place(|| {
                pod.within(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(mesh::tls_get(dst, MTLS_HOST, cfg))
                })
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        }
    })
    .await;
    assert!(r.text.ends_with(&mtls_app.body()), "{}", r.text);
    let seen = mtls_app
        .wait_seen(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(seen.sni.as_deref(), Some(MTLS_HOST));
    assert_eq!(seen.alpn_offered, vec!["http/1.1"], "ALPN untouched");
    assert_eq!(seen.peer_uri_sans, vec![MTLS_CLIENT_ID.to_owned()]);

    // A plain loopback service in the pod still answers (captured and connected to
    // directly under `cofide`; not captured at all under `istio`).
    let redis = HttpServer::serve("redis", listen_in(&pod, "127.0.0.1:6379")).unwrap();
    let body = mesh::retry("curl the pod's loopback service", logs, || {
        app_curl(&pod, "http://127.0.0.1:6379/")
    })
    .await;
    assert_eq!(body, redis.body());
    if let Profile::Cofide = profile {
        let line = proxy
            .wait_access(Duration::from_secs(10), |l| {
                mesh::log_value(l, "dst") == Some("127.0.0.1:6379")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        assert_eq!(
            mesh::log_value(&line, "endpoint"),
            Some("127.0.0.1:6379"),
            "{line}"
        );
    }

    // The proxy's own connections were never captured back into it.
    let (status, stats) =
        tokio::task::block_in_place(|| http_get_in(&pod, admin, "/stats/prometheus"))
            .unwrap_or_else(|| panic!("no stats\n{}", logs()));
    assert_eq!(status, 200);
    let loops: Vec<&str> = stats
        .lines()
        .filter(|l| l.starts_with("ferry_proxy_connections_refused") && l.contains("loop"))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(loops.is_empty(), "capture loops: {loops:?}");
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("ferry_proxy_connections_accepted") && !l.ends_with(" 0")),
        "{stats}"
    );
}
