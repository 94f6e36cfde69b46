//! ferry's config file: one YAML file, multi-document, holding one `AgentConfig` and any
//! number of `FederatedService` objects in the Cofide CRD shape.
//!
//! [`load`] reads and validates a file into a [`Config`]; every mistake comes back at once
//! as a [`Diagnostic`] naming the file, line, column and field path. [`watch`] keeps a
//! validated snapshot current as the file is edited.

mod model;
mod positions;
mod raw;
mod validate;
mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;
pub use positions::Position;
pub use watch::{ConfigWatcher, WatchError, restart_only_changes};

/// One problem found in a config file, located precisely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as given to [`load`].
    pub file: PathBuf,
    /// Where in it.
    pub position: Position,
    /// The field path, e.g. `spec.gateways[0].port` (empty for the whole document).
    pub path: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.position.line,
            self.position.column
        )?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config; every problem is listed.
    #[error("{} has {} error(s):\n{}", file.display(), errors.len(), join(errors))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Every problem found, in file order.
        errors: Vec<Diagnostic>,
    },
}

fn join(errors: &[Diagnostic]) -> String {
    errors
        .iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A validated config and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config.
    pub config: Config,
    /// Things that are allowed but probably not meant (e.g. a missing `spiffeIDPaths`).
    pub warnings: Vec<Diagnostic>,
}

/// Reads and validates a config file. Relative paths inside it are relative to its directory.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&src, path, base)
}

/// Validates config text; `file` names it in diagnostics and `base_dir` anchors relative paths.
pub fn parse(src: &str, file: &Path, base_dir: &Path) -> Result<Loaded, ConfigError> {
    validate::build(src, file, base_dir)
        .map(|(config, warnings)| Loaded { config, warnings })
        .map_err(|errors| ConfigError::Invalid {
            file: file.to_owned(),
            errors,
        })
}
