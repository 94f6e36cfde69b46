//! `ferry bench`: runs the benchmark harness, `ferry-bench`, against this very binary.
//! The harness (which links the test kit) is a program of its own, so the production
//! binary does not carry it: this only finds it and replaces the process with it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The harness's file name.
const HARNESS: &str = "ferry-bench";
/// How to get the harness.
const BUILD: &str = "cargo build --release -p ferry -p bench";

/// Where the harness is: `$FERRY_BENCH` when set, else `ferry-bench` next to `ferry`.
fn harness(ferry: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BENCH") {
        let p = PathBuf::from(p);
        anyhow::ensure!(
            p.is_file(),
            "FERRY_BENCH={}: no such file (build the harness with `{BUILD}`, or unset \
             FERRY_BENCH to use the ferry-bench next to ferry)",
            p.display()
        );
        return Ok(p);
    }
    let p = ferry.with_file_name(HARNESS);
    anyhow::ensure!(
        p.is_file(),
        "the benchmark harness is not installed: no {} next to {} (build both with \
         `{BUILD}`, or point FERRY_BENCH at it)",
        p.display(),
        ferry.display()
    );
    Ok(p)
}

/// Execs the harness with `args`, `FERRY_BIN` set to this executable so the harness
/// measures this build. Returns only on failure.
pub fn run(args: &[OsString]) -> anyhow::Result<std::process::ExitCode> {
    let ferry = std::env::current_exe().context("cannot locate the running ferry executable")?;
    let bench = harness(&ferry)?;
    let err = std::process::Command::new(&bench)
        .args(args)
        .env("FERRY_BIN", &ferry)
        .exec();
    Err(err).with_context(|| format!("cannot run {}", bench.display()))
}
