//! The README is a newcomer's walk from clone to demo to tests to a Kubernetes install:
//! every `ferry` command in it (shell blocks and the CLI reference) must name a real
//! subcommand and real flags, and every repository file or directory it passes must exist.
//! Commands that need a cluster or docker cannot run here; their inputs are checked.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)] // test: panics name the cause

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(testkit::workspace_root().join("README.md")).expect("README.md")
}

/// The fenced blocks of a given info string, continuation lines joined.
fn blocks(text: &str, info: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // Inside a fence: Some(collected lines) when its info string is the wanted one.
    let mut fence: Option<Option<Vec<String>>> = None;
    for line in text.lines() {
        let tag = line.trim_start().strip_prefix("```");
        match (&mut fence, tag) {
            (None, Some(tag)) => fence = Some((tag.trim() == info).then(Vec::new)),
            (Some(f), Some(_)) => {
                out.extend(f.take());
                fence = None;
            }
            (Some(Some(b)), None) => match b.last_mut() {
                Some(prev) if prev.ends_with('\\') => {
                    prev.pop();
                    prev.push_str(line);
                }
                _ => b.push(line.to_owned()),
            },
            _ => {}
        }
    }
    out
}

/// Subcommands whose flags belong to a second word (`ferry bench throughput --duration`
/// is checked against `ferry bench throughput --help`, the harness's own help).
const TWO_LEVEL: [&str; 4] = ["config", "attest", "ca", "bench"];

fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(path)
        .arg("--help")
        .output()
        .expect("run ferry --help");
    assert!(
        out.status.success(),
        "README names `ferry {}`, which does not exist:\n{}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks that `ferry ARGS` names a real subcommand and that each flag is in its help.
fn check_ferry(args: &[&str], context: &str, cache: &mut BTreeMap<String, String>) {
    let Some(first) = args.first() else { return };
    let path: Vec<&str> = if TWO_LEVEL.contains(first) && args.len() > 1 {
        args[..2].to_vec()
    } else {
        vec![*first]
    };
    let text = cache
        .entry(path.join(" "))
        .or_insert_with(|| help(&path))
        .clone();
    for a in &args[path.len()..] {
        let a = a.trim_matches(|c| c == '[' || c == ']' || c == '|');
        let flag = a.split('=').next().unwrap_or(a);
        let known = if flag.starts_with("--") && flag.len() > 2 {
            text.contains(flag)
        } else if flag.len() == 2 && flag.starts_with('-') && flag != "--" {
            text.contains(&format!("{flag},")) || text.contains(&format!("{flag} "))
        } else {
            true
        };
        assert!(
            known,
            "README: `ferry {}` has no {flag} (in: {context})",
            path.join(" ")
        );
    }
}

/// A shell word that names a repository path (relative, with a slash and no scheme).
fn repo_path(word: &str) -> Option<&str> {
    let w = word.trim_end_matches(['&', ';']);
    let looks = w.contains('/')
        && !w.starts_with('/')
        && !w.starts_with("unix:")
        && !w.contains("://")
        && !w.starts_with("--")
        && !w.starts_with("./target")
        && !w.starts_with("target/")
        && !w.starts_with("csi.")
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c));
    looks.then_some(w.trim_start_matches("./"))
}

#[test]
fn every_shell_command_names_real_subcommands_flags_and_files() {
    let root = testkit::workspace_root();
    let mut cache = BTreeMap::new();
    let mut ferry_commands = 0;
    for block in blocks(&readme(), "sh") {
        for line in block {
            let code = line.split(" #").next().unwrap_or_default();
            for cmd in code.split(['&', ';', '|']) {
                let words: Vec<&str> = cmd.split_whitespace().collect();
                for w in &words {
                    // A path is a repository path when its first component is a top-level
                    // entry or it names a file (`deployment/x` is a kubectl resource).
                    let repo = |p: &str| {
                        let top = p.split('/').next().unwrap_or_default();
                        root.join(top).exists()
                            || p.rsplit('/').next().is_some_and(|f| f.contains('.'))
                    };
                    if let Some(p) = repo_path(w).filter(|p| repo(p)) {
                        assert!(
                            Path::new(&root).join(p).exists(),
                            "README names {p}, which does not exist (in: {line})"
                        );
                    }
                }
                // The program: `ferry` first, `.../target/release/ferry` anywhere (after
                // `setpriv ...`), or what follows `cargo run --release --`.
                let at = words.iter().enumerate().position(|(i, w)| {
                    (i == 0 && *w == "ferry") || w.ends_with("target/release/ferry") || *w == "--"
                });
                let Some(at) = at else { continue };
                // `cargo run --release -- ARGS` and `target/release/ferry ARGS` are ferry.
                if words[at] == "--" && !words.starts_with(&["cargo", "run"]) {
                    continue;
                }
                check_ferry(&words[at + 1..], &line, &mut cache);
                ferry_commands += 1;
            }
        }
    }
    assert!(
        ferry_commands >= 10,
        "only {ferry_commands} ferry commands found"
    );
}

#[test]
fn cli_reference_names_real_subcommands_and_flags() {
    let text = readme();
    let cli = blocks(&text, "")
        .into_iter()
        .find(|b| b.first().is_some_and(|l| l.starts_with("ferry [")))
        .expect("the CLI block");
    let mut cache = BTreeMap::new();
    let mut current: Vec<String> = Vec::new();
    let mut seen = 0;
    for line in &cli[1..] {
        if line.starts_with(&" ".repeat(40)) || line.trim().is_empty() {
            continue;
        }
        // The left column: everything before the description (three or more spaces).
        let left = line.trim_start().split("   ").next().unwrap_or_default();
        let words: Vec<&str> = left.split_whitespace().collect();
        if line.starts_with("  ") && !line.starts_with("   ") {
            let n = if TWO_LEVEL.contains(&words[0]) { 2 } else { 1 };
            current = words[..n].iter().map(|s| (*s).to_owned()).collect();
            seen += 1;
        }
        let mut args: Vec<&str> = current.iter().map(String::as_str).collect();
        args.extend(
            words
                .iter()
                .filter(|w| w.trim_start_matches('[').starts_with('-')),
        );
        check_ferry(&args, line, &mut cache);
    }
    assert!(seen >= 9, "only {seen} subcommands in the CLI block");
}
