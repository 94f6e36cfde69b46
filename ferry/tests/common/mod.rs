//! Helpers the `ferry` binary's integration tests share (each test file uses some of them).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test helpers: failures panic with their cause

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// Starts `ferry <args>` (killed when the handle drops); its stderr goes to the test's.
pub fn spawn_ferry<I, S>(args: I) -> tokio::process::Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ferry")
}

/// Sends SIGTERM and waits (10 s at most) for the process to exit.
pub async fn sigterm(child: &mut tokio::process::Child) -> ExitStatus {
    let pid = child.id().expect("process still running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .expect("wait for ferry")
}

/// `ferry config vips --json`: hostname -> VIP for a config file.
pub fn vips(config: &Path) -> BTreeMap<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["config", "vips", "--json", "--config"])
        .arg(config)
        .output()
        .expect("run ferry config vips");
    serde_json::from_slice(&out.stdout).expect("vips JSON")
}
