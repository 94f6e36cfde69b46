//! Directories and files under `ca.stateDir` that no other local user can plant, swap,
//! redirect or read.
//!
//! The invariant: a directory is opened once with `O_DIRECTORY|O_NOFOLLOW`, and its owner
//! (the agent's effective uid) and mode (not writable by group or others) are checked on the
//! open descriptor with `fstat`. Every file in it is then reached relative to that
//! descriptor (`openat`, `renameat`, `unlinkat`), so renaming paths after the check cannot
//! redirect the CA. Files are opened with `O_NOFOLLOW` and checked the same way (private
//! keys also must not be readable by group or others). Writes go to a fresh, randomly
//! named temp file created with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600, are fsynced, and
//! are renamed over the target, then the directory is fsynced: a planted file or symlink is
//! never written through, and a crash leaves either the old or the new content.
//!
//! Limit: the ancestors of `ca.stateDir` are resolved as usual. Whoever controls an ancestor
//! can at most put another directory that the agent's own user owns in its place, and the
//! trust-domain check of the state file catches a foreign CA.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, geteuid, unlinkat};

use crate::error::{Error, Insecure, Result};

/// Who may read a file: decides the permission check on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrecy {
    /// Certificates and state: others may read, nobody else may write.
    Public,
    /// Private keys: only the owner may read or write.
    Secret,
}

/// A checked directory, held open by descriptor.
#[derive(Debug)]
pub(crate) struct PrivateDir {
    path: PathBuf,
    dir: File,
}

fn insecure(path: &Path, problem: Insecure) -> Error {
    Error::InsecureState {
        path: path.to_owned(),
        problem,
    }
}

/// Checks owner and mode of an opened file or directory.
fn check(path: &Path, meta: &fs::Metadata, secrecy: Secrecy) -> Result<()> {
    let expected = geteuid().as_raw();
    if meta.uid() != expected {
        return Err(insecure(
            path,
            Insecure::WrongOwner {
                owner: meta.uid(),
                expected,
            },
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(path, Insecure::WritableByOthers { mode }));
    }
    if secrecy == Secrecy::Secret && mode & 0o044 != 0 {
        return Err(insecure(path, Insecure::ReadableByOthers { mode }));
    }
    Ok(())
}

impl PrivateDir {
    /// Opens `path` as a private directory, creating it (and missing parents) with mode
    /// 0700 when absent. Refuses a symlink, a non-directory, a directory owned by another
    /// uid or writable by group or others.
    pub(crate) fn open_or_create(path: &Path) -> Result<Self> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => return Err(insecure(path, Insecure::Symlink)),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(Error::io(path, "create directory"))?;
                tracing::debug!(dir = %path.display(), "created CA state directory (0700)");
            }
            Err(e) => return Err(Error::io(path, "inspect")(e)),
        }
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW).bits())
            .open(path)
            .map_err(|e| match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                // Swapped for a symlink since the lstat above.
                Errno::ELOOP => insecure(path, Insecure::Symlink),
                Errno::ENOTDIR => insecure(
                    path,
                    Insecure::WrongType {
                        expected: "directory",
                    },
                ),
                _ => Error::io(path, "open directory")(e),
            })?;
        let meta = dir.metadata().map_err(Error::io(path, "stat directory"))?;
        if !meta.is_dir() {
            return Err(insecure(
                path,
                Insecure::WrongType {
                    expected: "directory",
                },
            ));
        }
        check(path, &meta, Secrecy::Public)?;
        Ok(Self {
            path: path.to_owned(),
            dir,
        })
    }

    /// The full path of `name` in this directory (for messages).
    pub(crate) fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Reads `name`, or `None` when it does not exist. Refuses a symlink, a non-regular
    /// file, a file owned by another uid or writable by others, and, for a [`Secrecy::Secret`]
    /// file, one readable by others.
    pub(crate) fn read(&self, name: &str, secrecy: Secrecy) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(name);
        // O_NONBLOCK: a FIFO must not hang the open; regular files ignore it.
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = match openat(&self.dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(insecure(&path, Insecure::Symlink)),
            Err(e) => return Err(Error::io(&path, "open")(e.into())),
        };
        let mut file = File::from(fd);
        let meta = file.metadata().map_err(Error::io(&path, "stat"))?;
        if !meta.is_file() {
            return Err(insecure(
                &path,
                Insecure::WrongType {
                    expected: "regular file",
                },
            ));
        }
        check(&path, &meta, secrecy)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(Error::io(&path, "read"))?;
        Ok(Some(data))
    }

    /// Replaces `name` with `data` atomically: exclusive create of a random temp name (mode
    /// 0600, never following links), write, fsync, rename over `name`, fsync the directory.
    pub(crate) fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let r: [u8; 8] = rand::random();
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = format!(".{name}.{hex}.tmp");
        let tmp_path = self.path_of(&tmp);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            &self.dir,
            tmp.as_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| Error::io(&tmp_path, "create")(e.into()))?;
        let written = (|| {
            let mut f = File::from(fd);
            f.write_all(data).map_err(Error::io(&tmp_path, "write"))?;
            f.sync_all().map_err(Error::io(&tmp_path, "sync"))?;
            drop(f);
            renameat(&self.dir, tmp.as_str(), &self.dir, name)
                .map_err(|e| Error::io(self.path_of(name), "rename into place")(e.into()))
        })();
        if let Err(e) = written {
            if let Err(u) = unlinkat(&self.dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                tracing::warn!(file = %tmp_path.display(), error = %u, "cannot remove temp file");
            }
            return Err(e);
        }
        self.dir
            .sync_all()
            .map_err(Error::io(&self.path, "sync directory"))
    }

    /// Deletes `name`; a missing file is not an error.
    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        match unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(self.path_of(name), "remove")(e.into())),
        }
    }
}
