//! Hot reload of the policy directory and of single files (the employee-token JWKS,
//! the client-certificate revocation lists): a file watcher and SIGHUP both ask for a
//! reload. Policy reloads run in one task, one at a time, after the directory has been
//! quiet for a moment (editors and `git checkout` write several files in a row); a file
//! reload is immediate, and each file's owner decides what an unusable file does.
//!
//! [`PolicyStore::reload`] swaps a new set in only when the whole directory validates,
//! so a half-edited directory is refused and the running set keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::policy::{self, PolicyStore, Trigger};

/// A file reloaded on change and on SIGHUP.
#[derive(Clone)]
pub struct WatchedFile {
    /// The file.
    pub path: PathBuf,
    /// What it is, for the log ("employee token keys").
    pub what: &'static str,
    /// Reads it again: a summary of what is now in use, or why the file was refused
    /// (and what stays in use).
    pub reload: Arc<dyn Fn() -> Result<String, String> + Send + Sync>,
}

impl std::fmt::Debug for WatchedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedFile")
            .field("path", &self.path)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl WatchedFile {
    fn reload(&self, trigger: &str) {
        match (self.reload)() {
            Ok(summary) => {
                tracing::info!(trigger, file = %self.path.display(), "{} reloaded: {summary}", self.what)
            }
            Err(error) => tracing::error!(
                trigger,
                file = %self.path.display(),
                "{} reload rejected: {error}",
                self.what
            ),
        }
    }

    /// Whether a watcher event path is this file, or a Kubernetes swap in its
    /// directory.
    fn touched_by(&self, path: &Path) -> bool {
        (path.file_name().is_some() && path.file_name() == self.path.file_name())
            || (path.parent().map(normal_dir) == Some(self.dir())
                && path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(swapped))
    }

    /// The directory of the file, as the watcher reports its paths.
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(dir) => normal_dir(dir),
            None => PathBuf::from("."),
        }
    }
}

fn normal_dir(dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_owned()
    }
}

/// Quiet time after the last change before the directory is loaded.
pub const SETTLE: Duration = Duration::from_millis(250);

/// Keeps the file watcher alive; dropping it stops watching.
pub struct Watcher {
    _inner: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("watching", &self._inner.is_some())
            .finish()
    }
}

fn relevant(event: &notify::Event) -> bool {
    !matches!(event.kind, EventKind::Access(_))
        && event.paths.iter().any(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| policy::affects_policy_set(name) || swapped(name))
        })
}

/// Whether `name` is one of the entries Kubernetes swaps to update a mounted
/// ConfigMap or Secret (`..data` and the timestamped directories it points to): the
/// files themselves are symlinks that never change.
fn swapped(name: &str) -> bool {
    name.starts_with("..") && name.len() > 2
}

/// Starts watching the policy directory (when `watch`) and `files` (always) and
/// listening for SIGHUP, and the task that reloads. Returns the watcher to keep and the tasks to
/// abort on stop.
pub fn spawn(
    policies: Arc<PolicyStore>,
    watch: bool,
    files: Vec<WatchedFile>,
) -> (Watcher, Vec<JoinHandle<()>>) {
    let (requests, mut received) = mpsc::unbounded_channel::<Trigger>();
    let mut tasks = Vec::new();
    let files = Arc::new(files);

    // The reloadable files are watched whatever `watch` says about the policy
    // directory: a revocation list must not wait for a SIGHUP.
    let watcher = if watch || !files.is_empty() {
        let sender = requests.clone();
        let watched = Arc::clone(&files);
        let started = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let event = match event {
                Ok(event) => event,
                Err(error) => return tracing::warn!(%error, "watch error"),
            };
            tracing::trace!(?event, "watched directory changed");
            if watch && relevant(&event) {
                let _ = sender.send(Trigger::FileChange);
            }
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for file in watched.iter() {
                if event.paths.iter().any(|path| file.touched_by(path)) {
                    file.reload("file-change");
                }
            }
        });
        match started {
            Ok(mut watcher) => {
                if watch {
                    // Recursive: `invariants/` is part of the set (also when created
                    // later); changes under `tests/` match no name that matters.
                    match watcher.watch(policies.dir(), RecursiveMode::Recursive) {
                        Ok(()) => {
                            tracing::info!(dir = %policies.dir().display(), "watching the policy directory for changes")
                        }
                        Err(error) => {
                            tracing::warn!(%error, dir = %policies.dir().display(), "cannot watch the policy directory; reload with SIGHUP")
                        }
                    }
                }
                for file in files.iter() {
                    match watcher.watch(&file.dir(), RecursiveMode::NonRecursive) {
                        Ok(()) => {
                            tracing::info!(file = %file.path.display(), "watching the {} for changes", file.what)
                        }
                        Err(error) => {
                            tracing::error!(%error, file = %file.path.display(), "cannot watch the {}: changes apply only on SIGHUP", file.what)
                        }
                    }
                }
                Some(watcher)
            }
            Err(error) => {
                tracing::error!(%error, "cannot watch files: the policy directory and the reloadable files reload only on SIGHUP");
                None
            }
        }
    } else {
        None
    };

    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => {
            let sender = requests.clone();
            let files = Arc::clone(&files);
            tasks.push(tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    // File reads and parsing stay off the async workers.
                    let reloaded = Arc::clone(&files);
                    let _ = tokio::task::spawn_blocking(move || {
                        for file in reloaded.iter() {
                            file.reload("SIGHUP");
                        }
                    })
                    .await;
                    if sender.send(Trigger::Hangup).is_err() {
                        break;
                    }
                }
            }));
        }
        Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP"),
    }
    drop(requests);

    tasks.push(tokio::spawn(async move {
        while let Some(mut trigger) = received.recv().await {
            // Wait until nothing has changed for SETTLE; a SIGHUP among the changes
            // names the reload.
            loop {
                match tokio::time::timeout(SETTLE, received.recv()).await {
                    Ok(Some(Trigger::Hangup)) => trigger = Trigger::Hangup,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let store = Arc::clone(&policies);
            let before = store.current().hash().to_owned();
            match tokio::task::spawn_blocking(move || store.reload(trigger)).await {
                Ok(Ok(snapshot)) if snapshot.hash() == before => {
                    tracing::info!(trigger = trigger.as_str(), hash = %before, "policy directory reloaded: unchanged")
                }
                Ok(Ok(snapshot)) => tracing::info!(
                    trigger = trigger.as_str(),
                    hash = snapshot.hash(),
                    previous = %before,
                    policies = snapshot.len(),
                    "policy set reloaded"
                ),
                Ok(Err(error)) => tracing::error!(
                    trigger = trigger.as_str(),
                    running = %before,
                    "policy reload rejected; the running set stays in place: {error}"
                ),
                Err(error) => tracing::error!(%error, "policy reload task failed"),
            }
        }
    }));
    (Watcher { _inner: watcher }, tasks)
}
