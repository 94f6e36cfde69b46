//! The capture options, validated: every port, CIDR and id is parsed and checked here, so
//! a bad flag is an error naming it before any rule is touched. The flags follow
//! istio-iptables (`-p -z -u -g -m -b -d -i -x -q -o`).

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::Error;

/// Which rule set to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// What spiffe-enable's init container installs for a Cofide sidecar: the proxy's uid
    /// returns, DNS goes to 15053, all loopback TCP goes to the outbound listener.
    Cofide,
    /// istio-iptables' REDIRECT-mode semantics.
    Istio,
}

impl Profile {
    /// The profile's name, as `--profile` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cofide => "cofide",
            Self::Istio => "istio",
        }
    }
}

/// Which inbound ports are captured (`-b`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InboundPorts {
    /// None (the default): inbound traffic is not captured.
    #[default]
    None,
    /// Every port (`*`), less `-d`.
    All,
    /// These ports.
    List(Vec<u16>),
}

/// Which outbound destinations are captured (`-i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    /// Every destination (`*`, the injected sidecar's default).
    All,
    /// Only these prefixes; everything else returns.
    List(Vec<IpNet>),
}

/// The validated options a profile is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The rule set.
    pub profile: Profile,
    /// The proxy's outbound listener (`-p`; 10000 for cofide, 15001 for istio).
    pub proxy_port: u16,
    /// The inbound capture port (`-z`, 15006).
    pub inbound_port: u16,
    /// The proxy's DNS port (15053).
    pub dns_port: u16,
    /// The proxy's admin port, never captured (cofide: 9901).
    pub admin_port: u16,
    /// Uids whose traffic is never captured (`-u`, 1337).
    pub proxy_uids: Vec<u32>,
    /// Gids whose traffic is never captured (`-g`, 1337; istio only).
    pub proxy_gids: Vec<u32>,
    /// Inbound ports captured (`-b`).
    pub inbound_ports: InboundPorts,
    /// Inbound ports excluded when `-b '*'` (`-d`).
    pub inbound_ports_exclude: Vec<u16>,
    /// Outbound destinations captured (`-i`).
    pub outbound_cidrs: OutboundCidrs,
    /// Outbound destinations excluded (`-x`).
    pub outbound_cidrs_exclude: Vec<IpNet>,
    /// Outbound ports always captured (`-q`).
    pub outbound_ports: Vec<u16>,
    /// Outbound ports never captured (`-o`).
    pub outbound_ports_exclude: Vec<u16>,
    /// Capture DNS to the proxy (`--redirect-dns`; always on for cofide).
    pub redirect_dns: bool,
    /// Capture DNS to any server, not only those in resolv.conf (`--capture-all-dns`).
    pub capture_all_dns: bool,
    /// Install IPv6 rules too (`--dual-stack`; always on for cofide).
    pub dual_stack: bool,
    /// The nameservers whose DNS is captured when not `--capture-all-dns`.
    pub dns_servers: Vec<IpAddr>,
}

/// The tunnel port Istio's inbound never captures (HBONE).
pub const TUNNEL_PORT: u16 = 15008;

/// The flags as given on the command line, before validation. `None` means "not given",
/// so a profile can reject flags it does not use and fill its own defaults. With the `cli`
/// feature these are `ferry iptables`' clap arguments (istio-iptables' short and long names).
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RawOptions {
    /// Rule set: `cofide` (spiffe-enable's: uid 1337 returns, DNS to 15053, all loopback
    /// TCP to 10000) or `istio` (istio-iptables REDIRECT mode) [default: cofide].
    #[cfg_attr(feature = "cli", arg(long, value_parser = ["cofide", "istio"]))]
    pub profile: Option<String>,
    /// The proxy's outbound capture port [default: 10000 (cofide), 15001 (istio)].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'p', long = "envoy-port", value_name = "PORT")
    )]
    pub proxy_port: Option<String>,
    /// Inbound capture port [istio; default: 15006].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'z', long = "inbound-capture-port", value_name = "PORT")
    )]
    pub inbound_port: Option<String>,
    /// Uid(s) whose traffic is never captured, comma-separated [default: 1337].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'u', long = "proxy-uid", value_name = "UID")
    )]
    pub proxy_uid: Option<String>,
    /// Gid(s) whose traffic is never captured [istio; default: 1337].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'g', long = "proxy-gid", value_name = "GID")
    )]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode; only REDIRECT is supported [istio].
    #[cfg_attr(
        feature = "cli",
        arg(
            short = 'm',
            long = "istio-inbound-interception-mode",
            value_name = "MODE"
        )
    )]
    pub inbound_mode: Option<String>,
    /// Inbound ports to capture, comma-separated, or `*` for all [istio; default: none].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'b', long = "istio-inbound-ports", value_name = "PORTS")
    )]
    pub inbound_ports: Option<String>,
    /// Inbound ports not captured when `-b '*'` [istio].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'd', long = "istio-local-exclude-ports", value_name = "PORTS")
    )]
    pub inbound_ports_exclude: Option<String>,
    /// Outbound CIDRs to capture, or `*` [istio; default: `*`].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'i', long = "istio-service-cidr", value_name = "CIDRS")
    )]
    pub outbound_cidrs: Option<String>,
    /// Outbound CIDRs never captured [istio].
    #[cfg_attr(
        feature = "cli",
        arg(short = 'x', long = "istio-service-exclude-cidr", value_name = "CIDRS")
    )]
    pub outbound_cidrs_exclude: Option<String>,
    /// Outbound ports always captured [istio].
    #[cfg_attr(
        feature = "cli",
        arg(
            short = 'q',
            long = "istio-include-outbound-ports",
            value_name = "PORTS"
        )
    )]
    pub outbound_ports: Option<String>,
    /// Outbound ports never captured [istio].
    #[cfg_attr(
        feature = "cli",
        arg(
            short = 'o',
            long = "istio-exclude-outbound-ports",
            value_name = "PORTS"
        )
    )]
    pub outbound_ports_exclude: Option<String>,
    /// Capture DNS (udp/tcp 53 to the nameservers of --resolv-conf) to 15053 [istio;
    /// always on for cofide].
    #[cfg_attr(feature = "cli", arg(long))]
    pub redirect_dns: bool,
    /// With --redirect-dns: capture DNS to any server, not only resolv.conf's [istio].
    #[cfg_attr(feature = "cli", arg(long))]
    pub capture_all_dns: bool,
    /// Install IPv6 rules too [istio; cofide always has its ::1 rule].
    #[cfg_attr(feature = "cli", arg(long))]
    pub dual_stack: bool,
}

impl RawOptions {
    /// Validates the flags for their profile. `resolv_conf` is read only when the DNS
    /// servers are needed (istio, `--redirect-dns` without `--capture-all-dns`).
    pub fn validate(&self, resolv_conf: &Path) -> Result<Options, Error> {
        let profile = match self.profile.as_deref().unwrap_or("cofide") {
            "cofide" => Profile::Cofide,
            "istio" => Profile::Istio,
            other => return Err(invalid("--profile", other, "expected cofide or istio")),
        };
        if let Some(m) = &self.inbound_mode
            && m != "REDIRECT"
        {
            return Err(invalid(
                "-m",
                m,
                "only REDIRECT is supported (TPROXY needs policy routing ferry does not set up)",
            ));
        }
        match profile {
            Profile::Cofide => self.cofide(),
            Profile::Istio => self.istio(resolv_conf),
        }
    }

    fn cofide(&self) -> Result<Options, Error> {
        let istio_only = [
            ("-z", self.inbound_port.is_some()),
            ("-g", self.proxy_gid.is_some()),
            ("-b", self.inbound_ports.is_some()),
            ("-d", self.inbound_ports_exclude.is_some()),
            ("-i", self.outbound_cidrs.is_some()),
            ("-x", self.outbound_cidrs_exclude.is_some()),
            ("-q", self.outbound_ports.is_some()),
            ("-o", self.outbound_ports_exclude.is_some()),
            ("--capture-all-dns", self.capture_all_dns),
        ];
        if let Some((flag, _)) = istio_only.iter().find(|(_, given)| *given) {
            return Err(invalid(
                flag,
                "",
                "applies to --profile istio; the cofide profile is spiffe-enable's fixed rule set",
            ));
        }
        Ok(Options {
            profile: Profile::Cofide,
            proxy_port: port_or("-p", self.proxy_port.as_deref(), 10000)?,
            inbound_port: 15006,
            dns_port: 15053,
            admin_port: 9901,
            proxy_uids: ids_or("-u", self.proxy_uid.as_deref())?,
            proxy_gids: Vec::new(),
            inbound_ports: InboundPorts::None,
            inbound_ports_exclude: Vec::new(),
            outbound_cidrs: OutboundCidrs::All,
            outbound_cidrs_exclude: Vec::new(),
            outbound_ports: Vec::new(),
            outbound_ports_exclude: Vec::new(),
            redirect_dns: true,
            capture_all_dns: true,
            dual_stack: true,
            dns_servers: Vec::new(),
        })
    }

    fn istio(&self, resolv_conf: &Path) -> Result<Options, Error> {
        let inbound_ports = match self.inbound_ports.as_deref().map(str::trim) {
            None | Some("") => InboundPorts::None,
            Some("*") => InboundPorts::All,
            Some(list) => InboundPorts::List(ports("-b", list)?),
        };
        let outbound_cidrs = match self.outbound_cidrs.as_deref().map(str::trim) {
            None | Some("*") => OutboundCidrs::All,
            Some(list) => OutboundCidrs::List(cidrs("-i", list)?),
        };
        let outbound_cidrs_exclude = match self.outbound_cidrs_exclude.as_deref() {
            Some(s) if s.trim() == "*" => {
                return Err(invalid("-x", s, "'*' would exclude everything"));
            }
            Some(s) => cidrs("-x", s)?,
            None => Vec::new(),
        };
        if self.capture_all_dns && !self.redirect_dns {
            return Err(invalid(
                "--capture-all-dns",
                "",
                "needs --redirect-dns (DNS capture is off without it)",
            ));
        }
        let dns_servers = if self.redirect_dns && !self.capture_all_dns {
            let servers = nameservers(resolv_conf)?;
            if servers.is_empty() {
                return Err(invalid(
                    "--redirect-dns",
                    "",
                    &format!(
                        "{} names no nameserver to capture; use --capture-all-dns",
                        resolv_conf.display()
                    ),
                ));
            }
            servers
        } else {
            Vec::new()
        };
        let opts = Options {
            profile: Profile::Istio,
            proxy_port: port_or("-p", self.proxy_port.as_deref(), 15001)?,
            inbound_port: port_or("-z", self.inbound_port.as_deref(), 15006)?,
            dns_port: 15053,
            admin_port: 15000,
            proxy_uids: ids_or("-u", self.proxy_uid.as_deref())?,
            proxy_gids: ids_or("-g", self.proxy_gid.as_deref())?,
            inbound_ports,
            inbound_ports_exclude: list_or_empty("-d", self.inbound_ports_exclude.as_deref())?,
            outbound_cidrs,
            outbound_cidrs_exclude,
            outbound_ports: list_or_empty("-q", self.outbound_ports.as_deref())?,
            outbound_ports_exclude: list_or_empty("-o", self.outbound_ports_exclude.as_deref())?,
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            dual_stack: self.dual_stack,
            dns_servers,
        };
        if !opts.dual_stack {
            let v6 = opts
                .outbound_cidrs_exclude
                .iter()
                .chain(match &opts.outbound_cidrs {
                    OutboundCidrs::List(l) => l.as_slice(),
                    OutboundCidrs::All => &[],
                })
                .find(|n| matches!(n, IpNet::V6(_)));
            if let Some(n) = v6 {
                return Err(invalid(
                    if opts.outbound_cidrs_exclude.contains(n) {
                        "-x"
                    } else {
                        "-i"
                    },
                    &n.to_string(),
                    "an IPv6 prefix needs --dual-stack",
                ));
            }
        }
        Ok(opts)
    }
}

fn invalid(flag: &'static str, value: &str, reason: &str) -> Error {
    Error::InvalidFlag {
        flag,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn port(flag: &'static str, s: &str) -> Result<u16, Error> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid(flag, s, "expected a port 1-65535")),
        Ok(p) => Ok(p),
    }
}

fn port_or(flag: &'static str, s: Option<&str>, default: u16) -> Result<u16, Error> {
    s.map_or(Ok(default), |s| port(flag, s))
}

fn ports(flag: &'static str, list: &str) -> Result<Vec<u16>, Error> {
    let mut out = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = port(flag, p)?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

fn list_or_empty(flag: &'static str, s: Option<&str>) -> Result<Vec<u16>, Error> {
    s.map_or(Ok(Vec::new()), |s| ports(flag, s))
}

fn cidrs(flag: &'static str, list: &str) -> Result<Vec<IpNet>, Error> {
    let mut out = Vec::new();
    for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        // A bare address means a host prefix, as in iptables.
        let net = c
            .parse::<IpNet>()
            .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| invalid(flag, c, "expected a CIDR such as 10.0.0.0/8 or an IP"))?;
        // iptables stores the network address; render what it will read back.
        let net = net.trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

fn ids_or(flag: &'static str, s: Option<&str>) -> Result<Vec<u32>, Error> {
    let Some(s) = s else {
        return Ok(vec![1337]);
    };
    let mut out = Vec::new();
    for id in s.split(',').map(str::trim) {
        let id: u32 = id
            .parse()
            .map_err(|_| invalid(flag, s, "expected numeric ids, comma-separated"))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// The `nameserver` addresses of a resolv.conf (Istio captures DNS to these only, so a
/// local resolver's own upstream queries are not looped back).
pub fn nameservers(path: &Path) -> Result<Vec<IpAddr>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse_nameservers(&text))
}

fn parse_nameservers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // A link-local v6 server may carry a zone (`fe80::1%eth0`), which no rule can match.
        if let Some(ip) = words
            .next()
            .and_then(|w| w.parse::<IpAddr>().ok())
            .filter(|ip| !out.contains(ip))
        {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio() -> RawOptions {
        RawOptions {
            profile: Some("istio".into()),
            ..RawOptions::default()
        }
    }

    fn err(raw: &RawOptions) -> String {
        match raw.validate(Path::new("/nonexistent")) {
            Ok(o) => panic!("accepted: {o:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_per_profile() {
        let c = RawOptions::default()
            .validate(Path::new("/nonexistent"))
            .expect("cofide");
        assert_eq!(
            (c.proxy_port, c.proxy_uids.as_slice()),
            (10000, &[1337][..])
        );
        let i = istio().validate(Path::new("/nonexistent")).expect("istio");
        assert_eq!((i.proxy_port, i.inbound_port), (15001, 15006));
        assert_eq!(i.outbound_cidrs, OutboundCidrs::All);
        assert_eq!(i.inbound_ports, InboundPorts::None);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let mut r = istio();
        r.proxy_port = Some("70000".into());
        assert!(err(&r).starts_with("-p \"70000\""), "{}", err(&r));
        let mut r = istio();
        r.inbound_ports = Some("80,http".into());
        assert!(err(&r).starts_with("-b \"http\""), "{}", err(&r));
        let mut r = istio();
        r.outbound_cidrs_exclude = Some("10.0.0.0/33".into());
        assert!(err(&r).starts_with("-x \"10.0.0.0/33\""), "{}", err(&r));
        let mut r = istio();
        r.outbound_cidrs_exclude = Some("*".into());
        assert!(err(&r).contains("exclude everything"));
        let mut r = istio();
        r.proxy_uid = Some("istio-proxy".into());
        assert!(err(&r).starts_with("-u"));
        let mut r = istio();
        r.inbound_mode = Some("TPROXY".into());
        assert!(err(&r).contains("only REDIRECT"));
        let mut r = istio();
        r.outbound_cidrs = Some("fd00::/8".into());
        assert!(err(&r).contains("needs --dual-stack"));
        let mut r = istio();
        r.capture_all_dns = true;
        assert!(err(&r).contains("needs --redirect-dns"));
        let r = RawOptions {
            profile: Some("linkerd".into()),
            ..RawOptions::default()
        };
        assert!(err(&r).contains("cofide or istio"));
    }

    #[test]
    fn cofide_rejects_istio_only_flags() {
        let r = RawOptions {
            inbound_ports: Some("*".into()),
            ..RawOptions::default()
        };
        assert!(err(&r).starts_with("-b"), "{}", err(&r));
    }

    #[test]
    fn redirect_dns_needs_a_nameserver() {
        let mut r = istio();
        r.redirect_dns = true;
        assert!(err(&r).contains("/nonexistent"), "{}", err(&r));
    }

    #[test]
    fn resolv_conf_parsing() {
        let got = parse_nameservers(
            "# c\nsearch x\nnameserver 10.0.0.10\nnameserver fe80::1%eth0\nnameserver ::1\nnameserver 10.0.0.10\n",
        );
        assert_eq!(
            got,
            [
                "10.0.0.10".parse::<IpAddr>().expect("ip"),
                "::1".parse().expect("ip")
            ]
        );
    }

    #[test]
    fn cidrs_are_truncated_and_deduplicated() {
        let got = cidrs("-i", "10.1.2.3/8, 10.0.0.0/8,192.168.0.1").expect("cidrs");
        let want: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().expect("n"),
            "192.168.0.1/32".parse().expect("n"),
        ];
        assert_eq!(got, want);
    }
}
