//! Network namespaces the tests create and always delete: the only place besides loopback
//! where test traffic may go. Needs root (`ip netns add`); tests call [`crate::require`]
//! with [`crate::is_root`] first, so CI (root) fails instead of skipping.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Error;

/// A named network namespace (`ip netns add`), deleted on drop together with its
/// `/etc/netns/NAME/` directory (the per-namespace `resolv.conf`).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace named `ferry-<tag>-<pid>-<n>` with its loopback up.
    /// A stale namespace of the same name (a crashed earlier run) is replaced.
    pub fn new(tag: &str) -> Result<Self, Error> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        // Interface and namespace names are short in places (veth: 15 bytes), keep it tight.
        let name = format!("fy-{tag}-{}-{n}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which also
    /// bind-mounts `/etc/netns/NAME/*` over `/etc`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// The argument prefix that runs a program inside the namespace, for code that takes a
    /// command prefix (such as the capture-rule applier).
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Runs `program args` inside the namespace and returns its output, whatever its status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, Error> {
        self.command(program)
            .args(args)
            .output()
            .map_err(Error::io(format!("ip netns exec {} {program}", self.name)))
    }

    /// Runs `program args` inside the namespace; a non-zero exit is an error carrying stderr.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        let out = self.exec(program, args)?;
        checked(
            &format!("(in {}) {program} {}", self.name, args.join(" ")),
            out,
        )
    }

    /// Writes `/etc/netns/NAME/resolv.conf`, which `ip netns exec` shows the namespace's
    /// processes as `/etc/resolv.conf`.
    pub fn set_resolv_conf(&self, contents: &str) -> Result<PathBuf, Error> {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("mkdir {}", dir.display())))?;
        let path = dir.join("resolv.conf");
        std::fs::write(&path, contents).map_err(Error::io(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// Runs `f` on a thread of its own that has joined the namespace (`setns`) and returns
    /// what `f` returned. Sockets `f` creates belong to the namespace and stay there when
    /// handed back, so in-process servers can listen inside it and in-process clients can
    /// connect from it. Blocks the caller until `f` ends.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        let ns =
            std::fs::File::open(&path).map_err(Error::io(format!("open {}", path.display())))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::Unexpected(format!("setns into {}: {e}", self.name)))?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::Unexpected(format!("a thread inside {} panicked", self.name)))?
        })
    }

    /// Connects `self` and `peer` with a veth pair (`veth0` here, `veth0` there too: names
    /// are per namespace), addresses them with `here` and `there` (CIDR notation, one
    /// subnet) and brings both ends up.
    pub fn link(&self, peer: &Netns, here: &str, there: &str) -> Result<(), Error> {
        self.exec_ok(
            "ip",
            &[
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
                &peer.name,
            ],
        )?;
        peer.exec_ok("ip", &["link", "set", "veth1", "name", "veth0"])?;
        for (ns, cidr) in [(self, here), (peer, there)] {
            ns.exec_ok("ip", &["addr", "add", cidr, "dev", "veth0"])?;
            ns.exec_ok("ip", &["link", "set", "veth0", "up"])?;
        }
        Ok(())
    }

    fn etc_dir(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// Runs a command on the host (root namespace); a non-zero exit is an error carrying stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(Error::io(format!("run {program}")))?;
    checked(&format!("{program} {}", args.join(" ")), out)
}

fn checked(what: &str, out: Output) -> Result<String, Error> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Unexpected(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
