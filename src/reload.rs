//! Hot reload of the policy directory and the employee-token JWKS: a file watcher and
//! SIGHUP both ask for a reload. Policy reloads run in one task, one at a time, after
//! the directory has been quiet for a moment (editors and `git checkout` write several
//! files in a row); a JWKS reload is immediate and keeps the old keys if the new file
//! is unusable.
//!
//! [`PolicyStore::reload`] swaps a new set in only when the whole directory validates,
//! so a half-edited directory is refused and the running set keeps serving.

use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::policy::{self, PolicyStore, Trigger};
use crate::token::TokenVerifier;

fn reload_jwks(tokens: &TokenVerifier, trigger: &str) {
    match tokens.reload() {
        Ok(keys) => {
            tracing::info!(trigger, keys, jwks = %tokens.jwks_path().display(), "employee token keys reloaded")
        }
        Err(error) => tracing::error!(
            trigger,
            "JWKS reload rejected; the current keys stay in place: {error}"
        ),
    }
}

/// The directory of the JWKS file, as the watcher reports its paths.
fn jwks_dir(jwks: &std::path::Path) -> std::path::PathBuf {
    match jwks.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => std::path::PathBuf::from("."),
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

/// Starts watching the policy directory and the JWKS file (when `watch`) and
/// listening for SIGHUP, and the task that reloads. Returns the watcher to keep and
/// the tasks to abort on stop.
pub fn spawn(
    policies: Arc<PolicyStore>,
    watch: bool,
    tokens: Option<Arc<TokenVerifier>>,
) -> (Watcher, Vec<JoinHandle<()>>) {
    let (requests, mut received) = mpsc::unbounded_channel::<Trigger>();
    let mut tasks = Vec::new();

    let watcher = if watch {
        let sender = requests.clone();
        let jwks = tokens.clone();
        let jwks_file = jwks
            .as_ref()
            .and_then(|tokens| tokens.jwks_path().file_name().map(ToOwned::to_owned));
        let jwks_directory = jwks
            .as_ref()
            .map(|tokens| jwks_dir(tokens.jwks_path()))
            .unwrap_or_default();
        let started = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let event = match event {
                Ok(event) => event,
                Err(error) => return tracing::warn!(%error, "watch error"),
            };
            tracing::trace!(?event, "watched directory changed");
            if relevant(&event) {
                let _ = sender.send(Trigger::FileChange);
            }
            if let (Some(tokens), Some(name)) = (&jwks, &jwks_file)
                && !matches!(event.kind, EventKind::Access(_))
                && event.paths.iter().any(|path| {
                    path.file_name() == Some(name.as_os_str())
                        || (path.parent() == Some(jwks_directory.as_path())
                            && path
                                .file_name()
                                .and_then(|name| name.to_str())
                                .is_some_and(swapped))
                })
            {
                reload_jwks(tokens, "file-change");
            }
        })
        .and_then(|mut watcher| {
            watcher.watch(policies.dir(), RecursiveMode::NonRecursive)?;
            if let Some(tokens) = &tokens {
                watcher.watch(&jwks_dir(tokens.jwks_path()), RecursiveMode::NonRecursive)?;
            }
            Ok(watcher)
        });
        match started {
            Ok(watcher) => {
                tracing::info!(dir = %policies.dir().display(), "watching the policy directory for changes");
                Some(watcher)
            }
            Err(error) => {
                tracing::warn!(%error, dir = %policies.dir().display(), "cannot watch the policy directory; reload with SIGHUP");
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
            let tokens = tokens.clone();
            tasks.push(tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    if let Some(tokens) = &tokens {
                        reload_jwks(tokens, "SIGHUP");
                    }
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
