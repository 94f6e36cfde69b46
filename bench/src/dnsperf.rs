//! Running `dnsperf` and reading its summary.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// One dnsperf run's summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Completed queries per second.
    pub qps: f64,
    /// Mean latency, seconds.
    pub avg_latency: f64,
    /// Queries without an answer.
    pub lost: u64,
}

/// Runs dnsperf against `server` with the queries in `data` for `seconds`, `clients`
/// sockets and at most `outstanding` queries in flight.
pub fn run(
    server: SocketAddr,
    data: &Path,
    seconds: u32,
    clients: u32,
    outstanding: u32,
) -> anyhow::Result<Summary> {
    let out = Command::new("dnsperf")
        .args([
            "-s",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
        ])
        .arg("-d")
        .arg(data)
        .args([
            "-l",
            &seconds.to_string(),
            "-c",
            &clients.to_string(),
            "-q",
            &outstanding.to_string(),
        ])
        .args(["-t", "2", "-T", "1"])
        .output()
        .context("cannot run dnsperf (Debian package dnsperf; ./test.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dnsperf failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text).with_context(|| format!("unexpected dnsperf output:\n{text}"))
}

fn parse(text: &str) -> Option<Summary> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
    };
    Some(Summary {
        qps: field("Queries per second:")?.parse().ok()?,
        avg_latency: field("Average Latency (s):")?.parse().ok()?,
        lost: field("Queries lost:")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_summary() {
        let s = super::parse(
            "  Queries sent:         1002638\n  Queries completed:    1002638 (100.00%)\n  Queries lost:         3 (0.00%)\n  Queries per second:   100262.215716\n\n  Average Latency (s):  0.000950 (min 0.000046, max 0.008215)\n",
        )
        .unwrap();
        assert_eq!(s.lost, 3);
        assert!((s.qps - 100262.215716).abs() < 1e-6);
        assert!((s.avg_latency - 0.00095).abs() < 1e-9);
    }
}
