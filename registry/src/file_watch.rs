//! One debounced file watcher for every file ferry reloads (the config file, federated
//! bundle files), reacting to changes of *content* only.
//!
//! Why not just "re-read on every inotify event": notify 8 reports `IN_OPEN` and
//! `IN_CLOSE_NOWRITE`, so a reader that re-reads on every event sees its own read as an
//! event and triggers itself forever, and so does anyone's `cat ferry.yaml`. Here:
//!
//! 1. events that cannot change content (opens, reads, closes after reading) are dropped;
//! 2. the rest are coalesced (a burst such as truncate, write, rename is one change) and
//!    debounced;
//! 3. each watched file's SHA-256 is then compared with the last one seen; only files whose
//!    bytes differ (or that appeared or disappeared) are reported.
//!
//! The parent directories are watched, not the files, because editors and `kubectl cp`
//! replace files by rename. Reading and hashing run on the blocking pool.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Editors write in bursts (truncate, write, rename); changes closer than this are one edit.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Why a watch could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {source}", path.display())]
pub struct FileWatchError {
    /// The directory that could not be watched.
    pub path: PathBuf,
    /// The OS watcher's error.
    pub source: notify::Error,
}

/// The content fingerprint of one file: `None` when it cannot be read (absent, permission).
type Fingerprint = Option<[u8; 32]>;

/// Watches a fixed set of files; [`FileWatch::changed`] resolves when any of their contents
/// changed. Dropping it stops the OS watch.
pub struct FileWatch {
    files: Vec<(PathBuf, Fingerprint)>,
    events: mpsc::Receiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl FileWatch {
    /// Starts watching `files`, taking their current contents as the baseline (so the first
    /// [`changed`](Self::changed) reports a change made after this call). Reads the files:
    /// call it where blocking briefly is acceptable (start-up, or the blocking pool).
    pub fn new(files: impl IntoIterator<Item = PathBuf>) -> Result<Self, FileWatchError> {
        let files: Vec<PathBuf> = files
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let dirs: BTreeSet<PathBuf> = files.iter().map(|f| parent(f)).collect();
        // notify names an entry as `<watched dir>/<name>`: match on exactly that spelling.
        let names: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| Some(parent(f).join(f.file_name()?)))
            .collect();
        // Capacity 1 and `try_send`: a burst of events collapses into one wake-up.
        let (tx, events) = mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            if !may_change_content(&ev.kind) {
                return;
            }
            if ev.paths.iter().any(|p| names.contains(p)) {
                let _ = tx.try_send(());
            }
        })
        .map_err(|source| FileWatchError {
            path: dirs.iter().next().cloned().unwrap_or_default(),
            source,
        })?;
        for d in &dirs {
            watcher
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|source| FileWatchError {
                    path: d.clone(),
                    source,
                })?;
        }
        let files = files
            .into_iter()
            .map(|f| {
                let fp = fingerprint(&f);
                (f, fp)
            })
            .collect();
        Ok(Self {
            files,
            events,
            _watcher: watcher,
        })
    }

    /// The watched files.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Waits until the content of at least one watched file differs from the last content
    /// seen, and returns those files. Events that leave every file's bytes unchanged (a
    /// reader's open, a `touch`, a rewrite with the same bytes) are absorbed here. Returns
    /// `None` when the OS watcher has stopped.
    pub async fn changed(&mut self) -> Option<Vec<PathBuf>> {
        loop {
            self.events.recv().await?;
            tokio::time::sleep(DEBOUNCE).await;
            while self.events.try_recv().is_ok() {}
            let paths: Vec<PathBuf> = self.files.iter().map(|(p, _)| p.clone()).collect();
            let now = match tokio::task::spawn_blocking(move || {
                paths.iter().map(|p| fingerprint(p)).collect::<Vec<_>>()
            })
            .await
            {
                Ok(v) => v,
                Err(_) => continue,
            };
            let mut changed = Vec::new();
            for ((path, last), fp) in self.files.iter_mut().zip(now) {
                if *last != fp {
                    *last = fp;
                    changed.push(path.clone());
                }
            }
            if !changed.is_empty() {
                return Some(changed);
            }
        }
    }
}

/// Opens, reads and closes-after-read cannot change a file's bytes; everything else might.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn fingerprint(path: &Path) -> Fingerprint {
    std::fs::read(path)
        .ok()
        .map(|bytes| Sha256::digest(&bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn no_change_within(w: &mut FileWatch, d: Duration) -> bool {
        tokio::time::timeout(d, w.changed()).await.is_err()
    }

    #[tokio::test]
    async fn reports_content_changes_and_absorbs_reads_and_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.pem");
        let b = dir.path().join("b.pem");
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "x").unwrap();
        let mut w = FileWatch::new([a.clone(), b.clone()]).unwrap();

        // Reads (someone's `cat`) and a rewrite with identical bytes are not changes.
        for _ in 0..5 {
            std::fs::read(&a).unwrap();
        }
        std::fs::write(&a, "one").unwrap();
        assert!(no_change_within(&mut w, Duration::from_millis(400)).await);

        // A content change of `a` is reported, naming only `a`.
        std::fs::write(&a, "two").unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![a.clone()]);

        // Replacement by rename is a change too.
        let tmp = dir.path().join("b.tmp");
        std::fs::write(&tmp, "y").unwrap();
        std::fs::rename(&tmp, &b).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![b]);

        // Our own reads while checking did not queue another change.
        assert!(no_change_within(&mut w, Duration::from_millis(400)).await);
    }

    #[test]
    fn read_only_events_are_ignored() {
        assert!(!may_change_content(&EventKind::Access(AccessKind::Open(
            notify::event::AccessMode::Any
        ))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(may_change_content(&EventKind::Modify(
            notify::event::ModifyKind::Any
        )));
    }
}
