//! Hot reload: a watcher that yields a new validated [`Config`] whenever the file's content
//! changes, and keeps the last good one (logging every error once) when an edit is bad or
//! changes a setting that only a restart can apply.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use super::{AgentConfig, Config, ConfigError, Loaded, load};
use crate::file_watch::{FileWatch, FileWatchError};

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The first load failed: there is no good config to serve.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The OS file watcher could not be set up.
    #[error(transparent)]
    Notify(#[from] FileWatchError),
    /// The blocking load task did not complete (the runtime is shutting down).
    #[error("config load of {} was cancelled", path.display())]
    Cancelled {
        /// The config file.
        path: PathBuf,
    },
}

/// Owns the file watch; dropping it stops the updates (the receivers keep the last value).
pub struct ConfigWatcher {
    rx: watch::Receiver<Arc<Config>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConfigWatcher {
    /// Loads `path` (failing if it is invalid now) and starts watching it. Reading,
    /// validating and hashing run on the blocking pool, never on an async worker.
    pub async fn start(path: &Path) -> Result<Self, WatchError> {
        let owned = path.to_owned();
        let (first, files) = tokio::task::spawn_blocking(move || {
            let loaded = load(&owned)?;
            let files = FileWatch::new([owned])?;
            Ok::<_, WatchError>((loaded, files))
        })
        .await
        .map_err(|_| WatchError::Cancelled {
            path: path.to_owned(),
        })??;
        for w in &first.warnings {
            tracing::warn!(%w, "config warning");
        }
        let (tx, rx) = watch::channel(Arc::new(first.config));
        let task = tokio::spawn(follow(path.to_owned(), files, tx));
        Ok(Self { rx, task })
    }

    /// A receiver of validated snapshots; the current value is always a good config.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.rx.clone()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Config> {
        self.rx.borrow().clone()
    }
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reloads once per change of the file's content; publishes only good configs that differ.
async fn follow(path: PathBuf, mut files: FileWatch, tx: watch::Sender<Arc<Config>>) {
    while files.changed().await.is_some() {
        let p = path.clone();
        let Ok(result) = tokio::task::spawn_blocking(move || load(&p)).await else {
            return;
        };
        match result {
            Ok(Loaded { config, warnings }) => {
                for w in &warnings {
                    tracing::warn!(%w, "config warning");
                }
                let current = tx.borrow().clone();
                let fixed = restart_only_changes(&current.agent, &config.agent);
                if !fixed.is_empty() {
                    tracing::error!(
                        file = %path.display(),
                        changed = %fixed.join(", "),
                        "config edit rejected: these settings apply only at start; restart ferry to apply them, still serving the last good config"
                    );
                    continue;
                }
                if *current != config {
                    tracing::info!(file = %path.display(), services = config.services.len(), "config reloaded");
                    tx.send_replace(Arc::new(config));
                }
            }
            Err(ConfigError::Invalid { errors, .. }) => {
                for e in &errors {
                    tracing::error!(error = %e, "config error");
                }
                tracing::error!(
                    file = %path.display(),
                    errors = errors.len(),
                    "config edit rejected, still serving the last good config"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "config edit rejected, still serving the last good config");
            }
        }
    }
}

/// The settings a running agent cannot change in place, by their config path: the trust
/// domain (every key and certificate is for it), the listeners (bound once) and the CA.
pub fn restart_only_changes(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.trust_domain != new.trust_domain {
        out.push("trustDomain");
    }
    let (a, b) = (&old.listen, &new.listen);
    if a.xds != b.xds {
        out.push("listen.xds");
    }
    if a.workload_api != b.workload_api {
        out.push("listen.workloadApi");
    }
    if a.dns != b.dns {
        out.push("listen.dns");
    }
    if a.outbound != b.outbound {
        out.push("listen.outbound");
    }
    if old.ca != new.ca {
        out.push("ca");
    }
    out
}
