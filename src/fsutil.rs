//! Durable private files and single-writer locks for the data directory.
//!
//! Owns two file-system disciplines every writer of the data directory follows: files
//! holding secrets or state are replaced atomically through a unique temporary file
//! (fsync file, rename, fsync directory), and each file with one writer is guarded by an
//! exclusive advisory lock (`flock`) on a lock file beside it that names its holder. It
//! knows nothing of what the files contain.

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Creates `dir` and its missing parents, each new one readable by its owner only
/// (0700). Existing directories keep their mode.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

use rand::TryRng as _;

/// Writes a file readable by its owner only, atomically: a fresh temporary file with a
/// unique name in the same directory, fsync, rename over `path`, fsync of the directory.
/// Concurrent writers never share a temporary file; the last rename wins, so callers that
/// read, modify and write hold a [`LockFile`] around the whole change.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = temporary_name(path)?;
    let result = write_new(&temporary, contents).and_then(|()| fs::rename(&temporary, path));
    if result.is_err() {
        // Best effort: a failed write must not leave a partial copy of a secret behind.
        let _ = fs::remove_file(&temporary);
    }
    result?;
    sync_parent(path)
}

/// Creates `path` with `contents`, readable by its owner only, only if it does not exist
/// yet: written to a temporary file, fsynced, then linked into place (`link` never
/// replaces a file). Returns `false`, writing nothing, when `path` already exists, so
/// two processes racing to create it agree on one.
pub fn create_private_file(path: &Path, contents: &[u8]) -> std::io::Result<bool> {
    let temporary = temporary_name(path)?;
    let result = (|| {
        write_new(&temporary, contents)?;
        fs::hard_link(&temporary, path)
    })();
    let _ = fs::remove_file(&temporary);
    match result {
        Ok(()) => sync_parent(path).map(|()| true),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(error),
    }
}

/// Removes temporary files [`write_private_file`] left beside `path` (a crash between
/// writing and renaming one): they may hold an old copy of a secret. Call it only while
/// holding the lock that guards `path`, so that no writer is using one. Returns what
/// was removed.
pub fn remove_stale_temporaries(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(file_name)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let prefix = format!(".{}.", file_name.to_string_lossy());
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".tmp") && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

fn temporary_name(path: &Path) -> std::io::Result<PathBuf> {
    let mut suffix = [0u8; 8];
    rand::rngs::SysRng
        .try_fill_bytes(&mut suffix)
        .map_err(|_| {
            std::io::Error::other("the operating system's random number generator failed")
        })?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        hex::encode(suffix)
    )))
}

fn write_new(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Makes a rename or creation in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Who holds a lock, as written into the lock file by its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder(pub String);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written by another process: shown without control characters.
        let shown: String = self.0.trim().chars().filter(|c| !c.is_control()).collect();
        if shown.is_empty() {
            f.write_str("another process")
        } else {
            f.write_str(&shown)
        }
    }
}

/// Longest holder description read back from a lock file.
const MAX_HOLDER_BYTES: u64 = 512;

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("`{path}` is held by {holder}")]
    Held {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as the holder described itself.
        holder: Holder,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock `{path}`: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An exclusive lock on a lock file, released when dropped (or when the process ends,
/// however it ends: the kernel drops `flock` locks with the last descriptor).
#[derive(Debug)]
pub struct LockFile {
    path: PathBuf,
    _file: File,
}

impl LockFile {
    /// Opens (creating it if need be) the lock file, which must be a regular file of
    /// its own: a symbolic link planted in its place is refused, never followed (the
    /// holder description is written into the file).
    fn open(path: &Path) -> Result<File, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => options.open(path).map_err(io)?,
            Ok(_) => {
                return Err(io(std::io::Error::other(
                    "not a regular file (a link or directory in its place is refused)",
                )));
            }
            // `create_new` (O_EXCL) never follows a link planted meanwhile.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                match options.clone().create_new(true).open(path) {
                    Ok(file) => file,
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Self::open(path);
                    }
                    Err(error) => return Err(io(error)),
                }
            }
            Err(error) => return Err(io(error)),
        };
        // The file opened is the one checked: no link swapped in between.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let opened = file.metadata().map_err(io)?;
            let named = fs::symlink_metadata(path).map_err(io)?;
            if !named.is_file() || opened.ino() != named.ino() || opened.dev() != named.dev() {
                return Err(io(std::io::Error::other("replaced while being opened")));
            }
        }
        Ok(file)
    }

    /// Reads who holds the lock at `path` (empty when nobody wrote a description).
    pub fn holder(path: &Path) -> Holder {
        let mut text = String::new();
        if fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file()) {
            let _ = File::open(path)
                .and_then(|file| file.take(MAX_HOLDER_BYTES).read_to_string(&mut text));
        }
        Holder(text)
    }

    fn claimed(path: &Path, mut file: File, holder: &str) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(holder.as_bytes()).map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
            _file: file,
        })
    }

    /// Waits for the lock at `path` (other writers of the same kind queue behind each
    /// other) and records `holder` in it.
    pub fn acquire(path: &Path, holder: &str) -> Result<Self, LockError> {
        let file = Self::open(path)?;
        file.lock().map_err(|source| LockError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::claimed(path, file, holder)
    }

    /// Takes the lock at `path` if it becomes free within `patience`; otherwise names
    /// the holder. Used where waiting would hide a conflict (a running server).
    pub fn try_acquire(path: &Path, holder: &str, patience: Duration) -> Result<Self, LockError> {
        let file = Self::open(path)?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Self::claimed(path, file, holder),
                Err(fs::TryLockError::WouldBlock) if started.elapsed() < patience => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(LockError::Held {
                        path: path.to_owned(),
                        holder: Self::holder(path),
                    });
                }
                Err(fs::TryLockError::Error(source)) => {
                    return Err(LockError::Io {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A one-line description of this process for lock files and log entries:
/// `what (pid N, uid U)`. The uid comes from the kernel, never from the environment.
pub fn describe_process(what: &str) -> String {
    match uid() {
        Some(uid) => format!("{what} (pid {}, uid {uid})", std::process::id()),
        None => format!("{what} (pid {})", std::process::id()),
    }
}

#[cfg(unix)]
fn uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    // `/proc/self` belongs to the process's effective uid (no libc needed).
    fs::metadata("/proc/self").ok().map(|meta| meta.uid())
}

#[cfg(not(unix))]
fn uid() -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_named_and_a_waiter_gets_the_lock_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = LockFile::acquire(&path, "first holder").unwrap();
        let error = LockFile::try_acquire(&path, "second", Duration::from_millis(50)).unwrap_err();
        assert!(error.to_string().contains("first holder"), "{error}");
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || LockFile::acquire(&path, "second").map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        waiter.join().unwrap().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_link_planted_as_lock_file_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("master.key");
        fs::write(&target, "precious").unwrap();
        let path = dir.path().join("x.lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = LockFile::acquire(&path, "me").unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        // A dangling link is not followed to create a file either.
        let dangling = dir.path().join("y.lock");
        std::os::unix::fs::symlink(dir.path().join("created-elsewhere"), &dangling).unwrap();
        assert!(LockFile::acquire(&dangling, "me").is_err());
        assert!(!dir.path().join("created-elsewhere").exists());
        // Holder text from another process is shown without control characters.
        assert_eq!(Holder("\u{1b}[2Jevil\n".to_owned()).to_string(), "[2Jevil");
    }

    #[test]
    fn a_file_created_only_if_new_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.key");
        assert!(create_private_file(&path, b"first").unwrap());
        assert!(!create_private_file(&path, b"second").unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary files left"
        );
    }

    #[test]
    fn private_files_are_replaced_whole_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let writers: Vec<_> = (0..8)
            .map(|n| {
                let path = path.clone();
                std::thread::spawn(move || {
                    write_private_file(&path, n.to_string().repeat(1000).as_bytes())
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
        let text = fs::read_to_string(&path).unwrap();
        let first = text.chars().next().unwrap();
        assert!(text.chars().all(|c| c == first) && text.len() == 1000);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o077, 0);
        }
    }
}
