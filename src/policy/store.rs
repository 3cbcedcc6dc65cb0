//! The reloadable policy store: the running snapshot, swapped atomically, and how it
//! got there (status of every load). May not decide.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{CATALOG_FILE, DIRECTORY_FILE, LoadError, PolicySnapshot, SCHEMA_FILE};

/// What started a policy load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The server started.
    Startup,
    /// A file in the policy directory changed.
    FileChange,
    /// The process received SIGHUP.
    Hangup,
}

impl Trigger {
    /// The name shown in status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::FileChange => "file-change",
            Trigger::Hangup => "SIGHUP",
        }
    }
}

/// One attempt to load the policy directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadAttempt {
    /// When it finished (RFC 3339).
    pub at: String,
    /// What started it.
    pub trigger: Trigger,
    /// The hash of the loaded set, or every problem found.
    pub result: Result<String, Vec<String>>,
}

/// How the policy set got to be what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// Hash of the running set.
    pub policy_set: String,
    /// When the running set was loaded (RFC 3339).
    pub loaded_at: String,
    /// Reloads that swapped in a set (or found the same one).
    pub reloads_succeeded: u64,
    /// Reloads refused because the directory did not validate.
    pub reloads_failed: u64,
    /// The latest attempt.
    pub last: LoadAttempt,
}

/// The current policy snapshot, swappable atomically while requests run.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<PolicySnapshot>,
    /// Records reload outcomes; held only briefly.
    status: std::sync::Mutex<StoreStatus>,
    /// Serializes reloads (held across loading and archiving, never by readers).
    reloading: std::sync::Mutex<()>,
    /// Where every set that decides is archived by hash, once configured.
    archive: std::sync::OnceLock<PathBuf>,
}

impl PolicyStore {
    /// Loads the policy directory; fails on any diagnostic.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let snapshot = PolicySnapshot::load(dir)?;
        let at = crate::record::rfc3339_now();
        let status = StoreStatus {
            policy_set: snapshot.hash().to_owned(),
            loaded_at: at.clone(),
            reloads_succeeded: 0,
            reloads_failed: 0,
            last: LoadAttempt {
                at,
                trigger: Trigger::Startup,
                result: Ok(snapshot.hash().to_owned()),
            },
        };
        Ok(Self {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(snapshot),
            status: std::sync::Mutex::new(status),
            reloading: std::sync::Mutex::new(()),
            archive: std::sync::OnceLock::new(),
        })
    }

    /// Archives the running set under `root` (see [`PolicySnapshot::archive`]) and
    /// every set a reload swaps in from now on, before it decides anything.
    pub fn archive_to(&self, root: &Path) -> Result<PathBuf, String> {
        let archived = self.current().archive(root)?;
        let _ = self.archive.set(root.to_owned());
        Ok(archived)
    }

    /// The snapshot to decide a whole request with.
    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// The directory policies are loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The running set and the outcome of reloads.
    pub fn status(&self) -> StoreStatus {
        match self.status.lock() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the directory again and swaps the new snapshot in only if the whole set
    /// validates; requests in flight finish with the snapshot they started with. On
    /// error the running snapshot stays in place. A set with the running set's hash is
    /// not swapped (its decision cache stays warm). Reloads run one at a time.
    pub fn reload(&self, trigger: Trigger) -> Result<Arc<PolicySnapshot>, LoadError> {
        let _one_at_a_time = match self.reloading.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let running = self.current();
        let loaded = PolicySnapshot::load(&self.dir).and_then(|snapshot| {
            // A set is archived before it decides anything, so every decision it makes
            // can be replayed.
            if let Some(root) = self.archive.get() {
                snapshot.archive(root).map_err(|problem| LoadError {
                    diagnostics: vec![format!("cannot archive the policy set: {problem}")],
                })?;
            }
            Ok(snapshot)
        });
        let at = crate::record::rfc3339_now();
        let swapped = matches!(&loaded, Ok(snapshot) if snapshot.hash() != running.hash());
        let result = loaded.map(|snapshot| {
            if swapped {
                let snapshot = Arc::new(snapshot);
                self.current.store(Arc::clone(&snapshot));
                snapshot
            } else {
                running
            }
        });
        let mut status = match self.status.lock() {
            Ok(status) => status,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &result {
            Ok(snapshot) => {
                if swapped {
                    status.policy_set = snapshot.hash().to_owned();
                    status.loaded_at = at.clone();
                }
                status.reloads_succeeded += 1;
                status.last = LoadAttempt {
                    at,
                    trigger,
                    result: Ok(snapshot.hash().to_owned()),
                };
            }
            Err(error) => {
                status.reloads_failed += 1;
                status.last = LoadAttempt {
                    at,
                    trigger,
                    result: Err(error.diagnostics.clone()),
                };
            }
        }
        result
    }
}

/// Files whose change can change the policy set (test suites cannot). Names starting
/// with `..` are the symlinks Kubernetes swaps when a mounted ConfigMap changes.
pub fn affects_policy_set(file_name: &str) -> bool {
    file_name.starts_with("..")
        || file_name == SCHEMA_FILE
        || file_name == DIRECTORY_FILE
        || file_name == CATALOG_FILE
        || file_name.ends_with(".cedar")
}
