//! Hot reload: a watcher that yields a new validated [`Config`] whenever the file changes,
//! and keeps the last good one (logging every error) when an edit is bad.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::{Config, ConfigError, load};

/// Editors write in bursts (truncate, write, rename); changes closer than this are one edit.
const DEBOUNCE: Duration = Duration::from_millis(30);

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The first load failed: there is no good config to serve.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The OS file watcher could not be set up.
    #[error("cannot watch {}: {source}", path.display())]
    Notify {
        /// The directory watched.
        path: PathBuf,
        /// The watcher error.
        source: notify::Error,
    },
}

/// Owns the file watch; dropping it stops the updates (the receivers keep the last value).
pub struct ConfigWatcher {
    rx: watch::Receiver<Arc<Config>>,
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl ConfigWatcher {
    /// Loads `path` (failing if it is invalid now) and starts watching it. Must be called
    /// inside a Tokio runtime.
    pub fn start(path: &Path) -> Result<Self, WatchError> {
        let first = load(path)?;
        for w in &first.warnings {
            tracing::warn!(%w, "config warning");
        }
        let (tx, rx) = watch::channel(Arc::new(first.config));

        // Watch the directory, not the file: editors and `kubectl cp` replace files by rename.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_owned());
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && ev.paths.iter().any(|p| p.file_name() == name.as_deref())
            {
                let _ = ev_tx.send(());
            }
        })
        .map_err(|source| WatchError::Notify {
            path: dir.clone(),
            source,
        })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Notify {
                path: dir.clone(),
                source,
            })?;

        let path = path.to_owned();
        let task = tokio::spawn(async move {
            while ev_rx.recv().await.is_some() {
                tokio::time::sleep(DEBOUNCE).await;
                while ev_rx.try_recv().is_ok() {}
                match load(&path) {
                    Ok(loaded) => {
                        for w in &loaded.warnings {
                            tracing::warn!(%w, "config warning");
                        }
                        let changed = **tx.borrow() != loaded.config;
                        if changed {
                            tracing::info!(file = %path.display(), services = loaded.config.services.len(), "config reloaded");
                            tx.send_replace(Arc::new(loaded.config));
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
        });
        Ok(Self {
            rx,
            _watcher: watcher,
            task,
        })
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
