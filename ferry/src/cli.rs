//! The command line: what a newcomer sees in `ferry --help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// ferry lets plain workloads reach services in other trust zones over SPIFFE mTLS, with
/// no code change. It has the control plane (xDS server, SPIFFE Workload API + SDS and CA)
/// and the local DNS resolver, configured from one YAML file of Cofide `FederatedService`
/// objects; stock Envoy driven by `ferry agent` is the sidecar until ferry's own proxy lands.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// `info,xds=debug`. `RUST_LOG`, when set, wins.
    #[arg(long, global = true, default_value = "info", env = "FERRY_LOG_LEVEL")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
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
