//! Errors: a flag that cannot be honoured (before anything is touched), a tool that failed
//! (with its stderr), or rules that read back differently from what was written.

use std::path::PathBuf;

/// What went wrong, naming the flag, tool or chain involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value is invalid; nothing was applied.
    #[error("{flag} {value:?}: {reason}")]
    InvalidFlag {
        /// The flag as the user typed it (`-b`, `--outbound-ports`).
        flag: &'static str,
        /// The offending value.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A file the rules depend on (resolv.conf) could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tool could not be started (not installed, not in PATH).
    #[error("running {tool}: {source} (is it installed?)")]
    Spawn {
        /// The command line.
        tool: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Applying failed part-way; what had been applied was removed again.
    #[error("{cause}; rolled back: {rollback}")]
    RolledBack {
        /// The failure.
        cause: Box<Error>,
        /// The rollback's outcome ("nothing of ferry's is left installed", or its error).
        rollback: String,
    },
    /// The installed rules differ from the expected ones.
    #[error("{backend} rules differ from the {profile} profile:\n{diff}")]
    Mismatch {
        /// Which backend was read.
        backend: &'static str,
        /// The profile compared against.
        profile: &'static str,
        /// Missing (`-`) and unexpected (`+`) lines.
        diff: String,
    },
}
