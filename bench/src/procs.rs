//! Locating and measuring the processes under test.

use std::path::PathBuf;

/// The ferry binary to measure: `$FERRY_BIN`, else the release build in this workspace.
pub fn ferry_binary() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::workspace_root().join("target/release/ferry"));
    anyhow::ensure!(
        p.is_file(),
        "no ferry binary at {} (run `cargo build --release -p ferry` first, or set FERRY_BIN)",
        p.display()
    );
    Ok(p)
}

/// Resident set size of `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
