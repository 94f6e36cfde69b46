//! The command line: what a newcomer sees in `ferry --help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// ferry lets plain workloads reach services in other trust zones over SPIFFE mTLS, with
/// no code change. It has the control plane (xDS server, SPIFFE Workload API + SDS and CA)
/// the local DNS resolver, configured from one YAML file of Cofide `FederatedService`
/// objects, and the sidecar proxy (`ferry proxy`), a drop-in for an Envoy sidecar.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// `info,xds=debug`. `RUST_LOG`, when set, wins.
    #[arg(long, global = true, default_value = "info", env = "FERRY_LOG_LEVEL")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// ferry's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect a config file without running anything.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the control plane of a trust zone: Workload API + CA and the xDS server,
    /// reloading the config file when it changes. Stops cleanly on SIGTERM/SIGINT.
    Agent(AgentArgs),
    /// Run the local DNS resolver: federated hostnames answer with their loopback VIPs,
    /// every other name is forwarded to the upstream resolvers. Names come from ferry's
    /// xDS server (--xds) or a config file (--config, hot reloaded). Stops cleanly on
    /// SIGTERM/SIGINT.
    Dns(DnsArgs),
    /// Run the sidecar data plane: captured (or `--bind-vips`) connections to federated
    /// services leave as Istio mTLS (`IstioMtls`) or with the app's own TLS untouched
    /// (`Mtls`); routes come from the standard Envoy resources of an xDS server (a ferry
    /// agent or any control plane serving that subset), the SVID from the Workload API.
    /// With `--inbound` it is also an Istio-compatible server sidecar. SIGTERM drains.
    Proxy(Box<ProxyArgs>),
    /// Run the server side's SNI router with Istio gateway semantics: `IstioMtls` services
    /// by `outbound_.P_._.H` with an Istio ALPN required (AUTO_PASSTHROUGH), `Mtls`
    /// services by hostname (PASSTHROUGH); never terminates TLS. Routes come from the
    /// zone's FederatedServices (watched).
    Gateway(GatewayArgs),
    /// Show the whole mission on this machine: two trust domains, their agents, a gateway,
    /// an inbound sidecar in front of a plain HTTP server, an app doing its own mTLS, and
    /// a client sidecar with DNS; one line per ping and tlsMode every second. No root, no
    /// flags, everything on loopback; Ctrl-C stops it and removes its files.
    Demo(DemoArgs),
    /// Print, as multi-document YAML, the Istio objects the server cluster needs for each
    /// FederatedService of our own trust domain, as the Cofide Agent creates them:
    /// ServiceEntry, PeerAuthentication (STRICT for `IstioMtls`, DISABLE on the port for
    /// `Mtls`), Gateway on the east-west gateway (AUTO_PASSTHROUGH or PASSTHROUGH) and, for
    /// PASSTHROUGH, the VirtualService routing the SNI to the service.
    Export(ExportArgs),
    /// Install the capture rules of an injected sidecar in this network namespace (the init
    /// container's step): `--profile cofide` (spiffe-enable's nftables set) or `istio`
    /// (istio-iptables REDIRECT mode, same flags); `--dry-run` prints them, `--verify`
    /// reads them back, `--cleanup` removes exactly ferry's chains. Needs NET_ADMIN.
    Iptables(Box<crate::iptables_cmd::IptablesArgs>),
    /// Inspect the TPM behind `ca.backend: tpm` (vendor, firmware, EK certificate, CA keys).
    #[command(subcommand)]
    Attest(crate::attest_cmd::AttestCommand),
    /// Manage the trust domain's CA (`ferry ca init` creates it ahead of the first start).
    #[command(subcommand)]
    Ca(crate::attest_cmd::CaCommand),
    /// Benchmark this ferry against stock Envoy on loopback: `ferry bench
    /// throughput|latency|connections|memory|xds|dns|svid|all [OPTIONS]`.
    ///
    /// Runs the `ferry-bench` harness next to this binary (or `$FERRY_BENCH`) with
    /// `FERRY_BIN` set to this binary; build both with `cargo build --release -p ferry -p
    /// bench`. `ferry bench --help` lists the scenarios and their options.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Bench(BenchArgs),
}

/// `ferry bench ...`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The harness's scenario and its options, passed through as they are.
    #[arg(
        value_name = "SCENARIO [ARGS]",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..
    )]
    pub args: Vec<std::ffi::OsString>,
}

/// `ferry config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file and print a summary: trust domains and every federated
    /// service with its hostname, port, tlsMode and gateways. Exits non-zero on errors,
    /// listing all of them with file:line:column.
    Check(ConfigFile),
    /// Print the loopback VIP allocated to every federated hostname.
    Vips(ConfigFile),
}

/// A config file argument.
#[derive(Debug, Args)]
pub struct ConfigFile {
    /// The ferry config (YAML, one AgentConfig plus FederatedService documents).
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry agent ...`
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The ferry config (YAML). Watched: edits take effect without restart; a bad edit is
    /// logged and the last good config keeps serving.
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (xDS streams, pushes, NACKs by
    /// type) and `/ready`.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
}

/// `ferry dns ...`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "xds"])))]
pub struct DnsArgs {
    /// Take names and VIPs from the xDS server at this address (`http://127.0.0.1:18001`
    /// or `127.0.0.1:18001`), as the sidecar does; the last names received keep serving
    /// while the server is away.
    #[arg(long, value_name = "URL")]
    pub xds: Option<String>,
    /// Take names and VIPs from this ferry config's FederatedServices instead (watched).
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// UDP and TCP listen address [default: the config's listen.dns, else 127.0.0.1:15053].
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Upstream resolver (repeatable) [default: the nameservers of --resolv-conf].
    #[arg(long = "upstream", value_name = "IP:PORT")]
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Where default upstreams and search suffixes come from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Search suffix stripped before matching a federated name (repeatable), e.g.
    /// `demo.svc.cluster.local` [default: the `search` list of --resolv-conf].
    #[arg(long = "search-suffix", value_name = "DOMAIN")]
    pub search_suffixes: Vec<String>,
    /// Answer for a federated name asked a type other than A (AAAA, TXT, ...): `noerror`
    /// (empty answer, RFC 8020) or `nxdomain` (what Envoy's dns_filter says).
    #[arg(long, value_enum, default_value_t = NoData::Noerror)]
    pub no_data: NoData,
    /// TTL of federated answers, in seconds.
    #[arg(long, default_value_t = 30)]
    pub ttl: u32,
    /// Time allowed for a forwarded query before SERVFAIL.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (queries by result, forwarded,
    /// malformed, upstream latency).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
    /// Forwarded queries outstanding at once; beyond it, SERVFAIL at once.
    #[arg(long, default_value_t = 1024)]
    pub max_inflight: usize,
}

/// `--no-data` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NoData {
    /// NOERROR with no answer.
    Noerror,
    /// NXDOMAIN.
    Nxdomain,
}

/// `ferry proxy ...`: the Cofide sidecar defaults (outbound :10000, DNS :15053, admin
/// :9901, node id `node`). Every flag has an environment form.
#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct ProxyArgs {
    /// The xDS server (`host:port` or `http://host:port`): a ferry agent or any xDS server
    /// serving the outbound listener, clusters and endpoints. Needed unless only
    /// `--inbound` runs.
    #[arg(long, value_name = "ADDR", env = "FERRY_PROXY_XDS")]
    pub xds: Option<String>,
    /// The SPIFFE Workload API (`unix:///path` or `tcp://ip:port`).
    #[arg(long, value_name = "URI", env = "SPIFFE_ENDPOINT_SOCKET")]
    pub workload_api: String,
    /// The capture listener (where iptables/nftables redirect outbound TCP); `off`
    /// disables it.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "0.0.0.0:10000",
        env = "FERRY_PROXY_OUTBOUND"
    )]
    pub outbound: String,
    /// Bind every federated VIP:port as its own listener (no capture rules needed; 127/8
    /// needs no root), following xDS updates.
    #[arg(long, env = "FERRY_PROXY_BIND_VIPS")]
    pub bind_vips: bool,
    /// The DNS listener (UDP and TCP) answering federated names with their VIPs; `off`
    /// disables it.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:15053",
        env = "FERRY_PROXY_DNS"
    )]
    pub dns: String,
    /// Upstream resolver for other names (repeatable) [default: the nameservers of
    /// /etc/resolv.conf].
    #[arg(
        long = "dns-upstream",
        value_name = "IP:PORT",
        env = "FERRY_PROXY_DNS_UPSTREAM",
        value_delimiter = ','
    )]
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// The admin endpoint (`/ready`, `/stats/prometheus`, `/config_dump`); `off`
    /// disables it.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:9901",
        env = "FERRY_PROXY_ADMIN"
    )]
    pub admin: String,
    /// Node id sent to the xDS server.
    #[arg(long, default_value = "node", env = "FERRY_PROXY_NODE_ID")]
    pub node_id: String,
    /// Node cluster sent to the xDS server.
    #[arg(long, default_value = "cluster", env = "FERRY_PROXY_NODE_CLUSTER")]
    pub node_cluster: String,
    /// The inbound (server sidecar) listener: Istio mTLS in, plaintext to --inbound-app.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_PROXY_INBOUND",
        requires = "inbound_app"
    )]
    pub inbound: Option<std::net::SocketAddr>,
    /// The app behind the inbound listener.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_PROXY_INBOUND_APP",
        requires = "inbound"
    )]
    pub inbound_app: Option<std::net::SocketAddr>,
    /// Captured destinations that are neither federated nor loopback: forward them
    /// (`allow-any`) or refuse them (`registry-only`).
    #[arg(long, value_enum, default_value_t = OutboundPolicyArg::AllowAny, env = "FERRY_PROXY_OUTBOUND_POLICY")]
    pub outbound_policy: OutboundPolicyArg,
    /// After SIGTERM, how long open connections may finish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, env = "FERRY_PROXY_DRAIN_TIME")]
    pub drain_time: std::time::Duration,
    /// A connection idle this long both ways is closed (a route's tcp_proxy idle_timeout
    /// wins).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, env = "FERRY_PROXY_IDLE_TIMEOUT")]
    pub idle_timeout: std::time::Duration,
    /// Connections open at once per direction; more are closed at accept.
    #[arg(long, default_value_t = 32768, env = "FERRY_PROXY_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Metadata exchange: this workload's name [default: $ISTIO_META_WORKLOAD_NAME, else
    /// derived from the pod name].
    #[arg(long, env = "FERRY_PROXY_WORKLOAD_NAME")]
    pub workload_name: Option<String>,
    /// Metadata exchange: the namespace [default: $POD_NAMESPACE, else `default`].
    #[arg(long, env = "FERRY_PROXY_NAMESPACE")]
    pub namespace: Option<String>,
    /// Metadata exchange: the cluster id [default: $ISTIO_META_CLUSTER_ID, else
    /// `Kubernetes`].
    #[arg(long, env = "FERRY_PROXY_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Metadata exchange: the pod name [default: $POD_NAME, else the host name].
    #[arg(long, env = "FERRY_PROXY_POD_NAME")]
    pub pod_name: Option<String>,
    /// Metadata exchange: a workload label `key=value` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, env = "FERRY_PROXY_LABELS", value_delimiter = ',')]
    pub labels: Vec<(String, String)>,
    /// How long to wait at start for the first SVID from the Workload API.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "FERRY_PROXY_SVID_TIMEOUT")]
    pub svid_timeout: std::time::Duration,
}

/// `--outbound-policy` values (Istio's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutboundPolicyArg {
    /// Forward unknown destinations.
    AllowAny,
    /// Refuse unknown destinations.
    RegistryOnly,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `ferry gateway ...`
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The server zone's ferry config: its own FederatedServices become routes.
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Where clients connect (Istio's east-west gateway port is 15443).
    #[arg(long, default_value = "0.0.0.0:15443", env = "FERRY_GATEWAY_LISTEN")]
    pub listen: std::net::SocketAddr,
    /// A service's backend `HOSTNAME=HOST:PORT` (repeatable) [default:
    /// `<name>.<namespace>.svc.cluster.local:<port>`].
    #[arg(long = "backend", value_name = "HOSTNAME=HOST:PORT", value_parser = parse_backend, env = "FERRY_GATEWAY_BACKENDS", value_delimiter = ',')]
    pub backends: Vec<(String, String)>,
    /// Serve `/metrics` and `/ready` here.
    #[arg(long, value_name = "ADDR", env = "FERRY_GATEWAY_ADMIN")]
    pub admin: Option<std::net::SocketAddr>,
    /// After SIGTERM, how long open connections may finish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, env = "FERRY_GATEWAY_DRAIN_TIME")]
    pub drain_time: std::time::Duration,
}

fn parse_backend(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((h, a)) if !h.is_empty() && a.contains(':') => Ok((
            registry::hostname::Hostname::new(h).to_string(),
            a.to_owned(),
        )),
        _ => Err(format!("{s:?} is not HOSTNAME=HOST:PORT")),
    }
}

/// `ferry export ...`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The ferry config (YAML, one AgentConfig plus FederatedService documents).
    #[arg(long, short = 'c', env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Namespace of the east-west gateway, where the Gateway objects go.
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    pub namespace_of_gateway: String,
    /// Labels of the east-west gateway pods (`key=value`, comma-separated or repeated).
    #[arg(long, default_value = "istio=eastwestgateway", value_name = "KEY=VALUE", value_parser = parse_label, value_delimiter = ',')]
    pub gateway_selector: Vec<(String, String)>,
    /// The east-west gateway's TLS port.
    #[arg(long, default_value_t = 15443, value_name = "PORT")]
    pub gateway_port: u16,
}

/// `ferry demo ...`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after N rounds (exit 0 when every ping succeeded).
    #[arg(long, value_name = "N", env = "FERRY_DEMO_COUNT")]
    pub count: Option<u64>,
    /// The first of the 11 consecutive loopback ports the demo uses.
    #[arg(long, default_value_t = 17000, env = "FERRY_DEMO_BASE_PORT")]
    pub base_port: u16,
}
