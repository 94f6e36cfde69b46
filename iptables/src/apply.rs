//! Installing, verifying and removing the rules with the real tools
//! (`iptables-restore`/`iptables-save`, `nft`). Each step is one atomic transaction; a
//! failure part-way removes what the earlier steps installed. Applying rules that are
//! already installed changes nothing.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::Error;
use crate::model::{Family, RuleSet, Table};
use crate::render::{nft, restore};

/// Which netfilter front end writes the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore` / `ip6tables-restore` (legacy or nf_tables, whichever the host's
    /// `iptables` is).
    Iptables,
    /// A native `nft` table.
    Nftables,
}

impl Backend {
    /// The backend's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }
}

/// Whether applying changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Rules were written.
    Changed,
    /// The exact rules were already installed; nothing was written.
    Unchanged,
}

/// Runs the netfilter tools, optionally under a prefix (`ip netns exec NS`), which is how
/// tests act on a namespace of their own.
#[derive(Debug, Clone, Default)]
pub struct Runner {
    prefix: Vec<String>,
}

impl Runner {
    /// Runs the tools directly, in the caller's network namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// Runs every tool as `prefix... tool args`.
    pub fn with_prefix(prefix: Vec<String>) -> Self {
        Self { prefix }
    }

    /// Runs `tool args`, feeding `stdin`; a non-zero exit is [`Error::Tool`] with stderr.
    pub fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let line = format!("{tool} {}", args.join(" "));
        let (program, rest) = match self.prefix.split_first() {
            Some((p, rest)) => (p.as_str(), rest),
            None => (tool, &[][..]),
        };
        let mut cmd = Command::new(program);
        cmd.args(rest);
        if !self.prefix.is_empty() {
            cmd.arg(tool);
        }
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| Error::Spawn {
            tool: line.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Tool {
                tool: line,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Whether `tool --version` runs (the tool is installed and usable).
    pub fn has(&self, tool: &str) -> bool {
        self.run(tool, &["--version"], None).is_ok()
    }
}

/// Picks a backend for `auto`: nftables when `nft` works here, else iptables.
pub fn detect(runner: &Runner) -> Backend {
    if runner.run("nft", &["list", "tables"], None).is_ok() {
        Backend::Nftables
    } else {
        Backend::Iptables
    }
}

/// What `--dry-run` prints: the exact input each tool would be given.
pub fn render(rules: &RuleSet, backend: Backend) -> String {
    match backend {
        Backend::Nftables => format!("# nft -f -\n{}", nft::script(rules)),
        Backend::Iptables => rules
            .families
            .iter()
            .map(|&f| {
                format!(
                    "# {} --noflush\n{}",
                    restore_tool(f),
                    restore::script(rules, f)
                )
            })
            .collect(),
    }
}

fn restore_tool(f: Family) -> &'static str {
    match f {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    }
}

fn save_tool(f: Family) -> &'static str {
    match f {
        Family::V4 => "iptables-save",
        Family::V6 => "ip6tables-save",
    }
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
const TABLES: [Table; 2] = [Table::Nat, Table::Raw];

fn owned(rules: &RuleSet, table: Table) -> Vec<&'static str> {
    rules
        .owned
        .iter()
        .filter(|(t, _)| *t == table)
        .map(|(_, n)| *n)
        .collect()
}

fn read_table(
    runner: &Runner,
    rules: &RuleSet,
    f: Family,
    t: Table,
) -> Result<restore::TableRules, Error> {
    let save = runner.run(save_tool(f), &["-t", t.name()], None)?;
    Ok(restore::installed(&save, &owned(rules, t)))
}

fn restore_input(runner: &Runner, f: Family, input: &str) -> Result<(), Error> {
    runner
        .run(restore_tool(f), &["--noflush", "--wait"], Some(input))
        .map(drop)
}

/// Installs the rules. Already installed: [`Applied::Unchanged`], nothing written. A
/// failure part-way removes ferry's rules again ([`Error::RolledBack`]).
pub fn apply(rules: &RuleSet, backend: Backend, runner: &Runner) -> Result<Applied, Error> {
    match backend {
        Backend::Nftables => apply_nft(rules, runner),
        Backend::Iptables => apply_iptables(rules, runner),
    }
}

fn apply_nft(rules: &RuleSet, runner: &Runner) -> Result<Applied, Error> {
    if verify_nft(rules, runner).is_ok() {
        return Ok(Applied::Unchanged);
    }
    // The other family's table of the same name (an earlier run with or without
    // --dual-stack) goes in the same transaction.
    let other = if rules.nft_family() == "inet" {
        "ip"
    } else {
        "inet"
    };
    let name = rules.nft_table;
    let script = format!(
        "table {other} {name}\ndelete table {other} {name}\n{}",
        nft::script(rules)
    );
    runner.run("nft", &["-f", "-"], Some(&script))?;
    Ok(Applied::Changed)
}

fn apply_iptables(rules: &RuleSet, runner: &Runner) -> Result<Applied, Error> {
    // Families the rule set does not cover lose ferry's rules (an earlier --dual-stack).
    let mut steps = Vec::new();
    for f in FAMILIES {
        let v6_missing = f == Family::V6 && !runner.has(save_tool(f));
        if v6_missing && !rules.families.contains(&f) {
            continue;
        }
        for t in TABLES {
            let current = read_table(runner, rules, f, t)?;
            let want = restore::expected(rules, f, t);
            if current != want {
                steps.push((f, t, current, want));
            }
        }
    }
    if steps.is_empty() {
        return Ok(Applied::Unchanged);
    }
    for (f, t, current, want) in &steps {
        tracing::debug!(family = %f, table = t.name(), "writing rules");
        if let Err(cause) = restore_input(runner, *f, &restore::transition(*t, current, want)) {
            let rollback = match cleanup_iptables(rules, runner) {
                Ok(_) => "nothing of ferry's is left installed".to_owned(),
                Err(e) => format!("cleanup failed too: {e}"),
            };
            return Err(Error::RolledBack {
                cause: Box::new(cause),
                rollback,
            });
        }
    }
    Ok(Applied::Changed)
}

/// Reads the rules back and compares them with `rules`: [`Error::Mismatch`] lists the
/// missing (`-`) and unexpected (`+`) lines.
pub fn verify(rules: &RuleSet, backend: Backend, runner: &Runner) -> Result<(), Error> {
    match backend {
        Backend::Nftables => verify_nft(rules, runner),
        Backend::Iptables => verify_iptables(rules, runner),
    }
}

fn verify_nft(rules: &RuleSet, runner: &Runner) -> Result<(), Error> {
    let want = nft::table(rules);
    let got = runner
        .run(
            "nft",
            &["list", "table", rules.nft_family(), rules.nft_table],
            None,
        )
        .unwrap_or_default();
    let norm = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    compare("nftables", rules.profile, &norm(&want), &norm(&got))
}

fn verify_iptables(rules: &RuleSet, runner: &Runner) -> Result<(), Error> {
    let mut want = Vec::new();
    let mut got = Vec::new();
    for f in FAMILIES {
        if !rules.families.contains(&f) && !runner.has(save_tool(f)) {
            continue;
        }
        for t in TABLES {
            let tag = |l: String| format!("{} {}: {l}", save_tool(f), t.name());
            want.extend(
                restore::expected(rules, f, t)
                    .all_lines()
                    .into_iter()
                    .map(tag),
            );
            got.extend(
                read_table(runner, rules, f, t)?
                    .all_lines()
                    .into_iter()
                    .map(tag),
            );
        }
    }
    compare("iptables", rules.profile, &want, &got)
}

fn compare(
    backend: &'static str,
    profile: &'static str,
    want: &[String],
    got: &[String],
) -> Result<(), Error> {
    if want == got {
        return Ok(());
    }
    let mut diff = String::new();
    for l in want.iter().filter(|l| !got.contains(l)) {
        diff.push_str(&format!("- {l}\n"));
    }
    for l in got.iter().filter(|l| !want.contains(l)) {
        diff.push_str(&format!("+ {l}\n"));
    }
    if diff.is_empty() {
        diff = "same rules in a different order\n".to_owned();
    }
    Err(Error::Mismatch {
        backend,
        profile,
        diff,
    })
}

/// Removes exactly the profile's chains/table and the jumps into them; anything else is
/// left alone. Returns whether anything was removed.
pub fn cleanup(rules: &RuleSet, backend: Backend, runner: &Runner) -> Result<bool, Error> {
    match backend {
        Backend::Nftables => {
            let present = ["ip", "inet"].iter().any(|fam| {
                runner
                    .run("nft", &["list", "table", fam, rules.nft_table], None)
                    .is_ok()
            });
            if present {
                runner.run(
                    "nft",
                    &["-f", "-"],
                    Some(&nft::cleanup_script(rules.nft_table)),
                )?;
            }
            Ok(present)
        }
        Backend::Iptables => cleanup_iptables(rules, runner),
    }
}

fn cleanup_iptables(rules: &RuleSet, runner: &Runner) -> Result<bool, Error> {
    let mut removed = false;
    let mut first_err = None;
    for f in FAMILIES {
        if !runner.has(save_tool(f)) {
            continue;
        }
        for t in TABLES {
            // Keep going after an error: remove as much as possible, report the first.
            let step = read_table(runner, rules, f, t).and_then(|current| {
                if current.is_empty() {
                    return Ok(false);
                }
                let input = restore::transition(t, &current, &restore::TableRules::default());
                restore_input(runner, f, &input).map(|()| true)
            });
            match step {
                Ok(r) => removed |= r,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    first_err.map_or(Ok(removed), Err)
}
