//! A real software TPM for tests: `swtpm` manufactured by `swtpm_setup` with an EK
//! certificate and a platform certificate, signed by a certificate authority that lives in
//! the test's own temp dir (so tests never touch `/var/lib/swtpm-localca` and two TPMs in
//! one test have two different manufacturers).
//!
//! The TPM listens on loopback TCP (the `swtpm:` TCTI); [`Swtpm`] kills it on drop. The
//! state dir outlives a [`Swtpm::restart`], which is how tests check that keys survive an
//! agent (or TPM) restart.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::Error;

/// The NV index of the RSA 2048 EK certificate (TCG EK Credential Profile), which
/// `swtpm_setup --create-ek-cert` fills.
pub const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

/// The programs the harness runs.
const TOOLS: [&str; 3] = ["swtpm", "swtpm_setup", "swtpm_localca"];

/// True when `swtpm`, `swtpm_setup` and `swtpm_localca` are on `PATH`.
pub fn available() -> bool {
    TOOLS.iter().all(|t| which(t).is_some())
}

/// Checks for swtpm through [`crate::require`]: under `CI=true` a missing swtpm fails the
/// test; elsewhere it skips with a message. Returns whether the test can run.
pub fn require() -> bool {
    crate::require(
        "swtpm, swtpm_setup and swtpm_localca on PATH (Debian packages swtpm and swtpm-tools)",
        available(),
    )
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A running swtpm with its own manufacturer CA. Killed (SIGTERM, then SIGKILL) on drop;
/// the temp dir with the TPM state and the CA goes with it.
#[derive(Debug)]
pub struct Swtpm {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
}

impl Swtpm {
    /// Manufactures a new TPM (EK and EK certificate, platform certificate, from a fresh
    /// local CA in a temp dir) and starts it.
    pub fn start() -> Result<Self, Error> {
        let dir = crate::tempdir().map_err(Error::io("create a temp dir for swtpm"))?;
        manufacture(dir.path())?;
        let mut tpm = Self {
            dir,
            child: None,
            port: 0,
        };
        tpm.spawn()?;
        Ok(tpm)
    }

    /// The TCTI string that reaches this TPM (`swtpm:host=127.0.0.1,port=P`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port (the control channel is the next port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the TPM's persistent state (`tpm2-00.permall`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The manufacturer's root CA certificate (PEM) that the EK certificate chains to.
    pub fn manufacturer_root_pem(&self) -> PathBuf {
        self.dir
            .path()
            .join("localca")
            .join("swtpm-localca-rootca-cert.pem")
    }

    /// The manufacturer's intermediate (issuer) CA certificate (PEM) that signed the EK
    /// certificate.
    pub fn manufacturer_issuer_pem(&self) -> PathBuf {
        self.dir.path().join("localca").join("issuercert.pem")
    }

    /// Where swtpm writes its log (for failure messages).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("swtpm.log")
    }

    /// Stops the TPM and starts it again on the same state (as after a reboot: transient
    /// objects are gone, persistent objects and NV remain). The TCTI may change.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.spawn()
    }

    /// Stops the TPM (the state stays). [`Swtpm::restart`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let mut last = None;
        // The two ports were free a moment ago; another test may take one first, so retry.
        for _ in 0..5 {
            let port = free_port_pair();
            match self.spawn_on(port) {
                Ok(child) => {
                    self.child = Some(child);
                    self.port = port;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Unexpected("swtpm did not start".into())))
    }

    fn spawn_on(&self, port: u16) -> Result<Child, Error> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io(format!("open {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(Error::io(format!("dup {}", log_path.display())))?;
        let state = self.state_dir();
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("startup-clear,not-need-init")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(Error::io("spawn swtpm"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Unexpected(format!(
                    "swtpm exited ({status}) before listening on {addr}: {}",
                    tail(&log_path)
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(child);
            }
            if start.elapsed() > Duration::from_secs(10) {
                terminate(&mut child);
                return Err(Error::Timeout {
                    what: format!("swtpm to listen on {addr} ({})", tail(&log_path)),
                    timeout: Duration::from_secs(10),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM (swtpm saves its state and exits), then SIGKILL after a second.
fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A port P on 127.0.0.1 such that P and P + 1 were both free a moment ago (swtpm's
/// command and control channels).
fn free_port_pair() -> u16 {
    loop {
        let port = crate::free_port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// Runs `swtpm_setup` into `<dir>/state` with a private local CA in `<dir>/localca`.
fn manufacture(dir: &Path) -> Result<(), Error> {
    let state = dir.join("state");
    let localca = dir.join("localca");
    for d in [&state, &localca] {
        std::fs::create_dir_all(d).map_err(Error::io(format!("create {}", d.display())))?;
    }
    let ca_conf = dir.join("swtpm-localca.conf");
    let ca_opts = dir.join("swtpm-localca.options");
    let setup_conf = dir.join("swtpm_setup.conf");
    let l = localca.display();
    write(
        &ca_conf,
        &format!(
            "statedir = {l}\nsigningkey = {l}/signkey.pem\nissuercert = {l}/issuercert.pem\ncertserial = {l}/certserial\n"
        ),
    )?;
    write(
        &ca_opts,
        "--platform-manufacturer ferry-tests\n--platform-version 2.1\n--platform-model swtpm\n",
    )?;
    write(
        &setup_conf,
        &format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
            ca_conf.display(),
            ca_opts.display()
        ),
    )?;
    let log = dir.join("swtpm_setup.log");
    let out = Command::new("swtpm_setup")
        .arg("--tpm2")
        .arg("--create-ek-cert")
        .arg("--create-platform-cert")
        .arg("--tpmstate")
        .arg(&state)
        .arg("--config")
        .arg(&setup_conf)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("run swtpm_setup"))?;
    if !out.status.success() {
        return Err(Error::Unexpected(format!(
            "swtpm_setup failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&log)
        )));
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(Error::io(format!("write {}", path.display())))
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manufactures_starts_restarts_and_stops() {
        if !require() {
            return;
        }
        let mut tpm = Swtpm::start().unwrap();
        assert!(tpm.manufacturer_root_pem().is_file());
        assert!(tpm.manufacturer_issuer_pem().is_file());
        assert!(tpm.state_dir().join("tpm2-00.permall").is_file());
        let addr = SocketAddr::from(([127, 0, 0, 1], tpm.port()));
        assert!(TcpStream::connect(addr).is_ok());
        tpm.restart().unwrap();
        let addr2 = SocketAddr::from(([127, 0, 0, 1], tpm.port()));
        assert!(TcpStream::connect(addr2).is_ok(), "{}", tpm.tcti());
        tpm.stop();
        assert!(TcpStream::connect(addr2).is_err());
    }
}
