//! Key operations as logged transactions: every keyring change is made by one writer
//! holding both the keyring lock and the decision log's writer lock, and is recorded
//! as `key_event` entries followed by a signed checkpoint that vouches for the new
//! keyring generations.
//!
//! Owns the order of a key change (lock keyring, read, lock log and check for rollback,
//! save, log, checkpoint), offline ([`change_offline`]) and in a running server
//! ([`LiveKeyring`]: the keyring requests use, swapped whole). It may not touch key
//! bytes (the keyring does), decide who may change keys (the gatekeeper does) or the
//! log's format (the audit module does). While a server runs it holds the log lock,
//! so offline changes are refused with a message naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::{self, CheckpointSigner, DecisionLog, Entry, KeyEventEntry, LogOptions};
use crate::config::LOG_DIR;
use crate::keys::{self, KeyEvent, Keyring};

/// Why a key change did not happen (or was not fully logged).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The keyring refused.
    #[error(transparent)]
    Keys(#[from] keys::Error),
    /// The decision log refused: in use, rolled back, or unwritable.
    #[error(transparent)]
    Log(#[from] audit::Error),
    /// The checkpoint signing key is unusable.
    #[error(transparent)]
    Signer(#[from] audit::checkpoint::Error),
    /// Another change holds a lock; nothing was changed.
    #[error("the keyring is busy: {0}; retry")]
    Busy(String),
    /// An earlier live change may have reached the file but not the server: live
    /// changes are refused until a restart reads the file again.
    #[error("key changes are disabled until the server restarts: {0}")]
    Disabled(String),
    /// Anything else around the change.
    #[error("{0}")]
    Other(String),
}

/// Where a data directory keeps what key changes touch.
#[derive(Debug, Clone)]
pub struct DataPaths {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The checkpoint signing key; default `<data_dir>/audit-signing-key.pem`.
    pub checkpoint_key: Option<PathBuf>,
}

impl DataPaths {
    /// The keyring file.
    pub fn keyring(&self) -> PathBuf {
        self.data_dir.join(keys::KEYRING_FILE)
    }

    /// The decision log directory.
    pub fn log(&self) -> PathBuf {
        self.data_dir.join(LOG_DIR)
    }

    /// The checkpoint signing key file.
    pub fn signing_key(&self) -> PathBuf {
        self.checkpoint_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join(audit::checkpoint::SIGNING_KEY_FILE))
    }

    /// Loads (or on first use creates) the checkpoint signer; returns whether it was created.
    pub fn signer(&self) -> Result<(CheckpointSigner, bool, PathBuf), audit::checkpoint::Error> {
        let path = self.signing_key();
        let (signer, created) = CheckpointSigner::load_or_create(
            &path,
            &self.data_dir.join(audit::checkpoint::PUBLIC_KEY_FILE),
        )?;
        Ok((signer, created, path))
    }
}

/// Who made a key change, as its `key_event` entries record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// A local command (`` `ringfence keys rotate` (pid 4242, uid 1000) ``), or the
    /// Cedar principal of an admin call (`Employee::"kim"`).
    pub principal: String,
    /// The service an admin call came through.
    pub service: Option<String>,
    /// `local`, or how the admin caller was authenticated.
    pub authentication: String,
    /// The admin call's request id (its `key_admin` entry); empty for local changes.
    pub request_id: String,
    /// Purpose and ticket the admin caller stated; empty for local changes.
    pub stated: crate::record::StatedPurpose,
}

impl Actor {
    /// A command run on the machine, with the server stopped.
    pub fn local(holder: &str) -> Self {
        Self {
            principal: holder.to_owned(),
            service: None,
            authentication: "local".to_owned(),
            request_id: String::new(),
            stated: crate::record::StatedPurpose::default(),
        }
    }
}

/// The decision log entry of one key change.
pub fn key_event_entry(event: &KeyEvent, actor: &Actor) -> Entry {
    let time = time::OffsetDateTime::now_utc();
    let mut entry = Entry::bare(
        crate::record::rfc3339(time),
        time.unix_timestamp(),
        actor.request_id.clone(),
        audit::KEY_EVENT_KIND,
        "done".to_owned(),
    );
    entry.principal = Some(actor.principal.clone());
    entry.service = actor.service.clone();
    entry.authentication = actor.authentication.clone();
    entry.purpose = actor.stated.purpose.clone();
    entry.ticket = actor.stated.ticket.clone();
    entry.action = Some(format!("keys {}", event.operation));
    entry.key_event = Some(KeyEventEntry {
        operation: event.operation.to_owned(),
        jurisdiction: event.jurisdiction.as_str().to_owned(),
        version: event.version.get(),
        key_id: event.key_id.to_string(),
        generation: event.generation,
    });
    entry
}

/// Appends `events` to an open log as `key_event` entries, then tells it the new
/// generations and asks for a checkpoint that vouches for them (none when there are no
/// events). In that order: a checkpoint must never vouch for a generation whose events
/// are not in the log, or a change that failed to log would not be found `unlogged`
/// at the next start.
pub async fn log_events(
    log: &DecisionLog,
    generations: BTreeMap<String, u64>,
    events: &[KeyEvent],
    actor: &Actor,
) -> Result<(), audit::Error> {
    for event in events {
        log.append(key_event_entry(event, actor)).await?;
    }
    log.set_key_generations(generations);
    if events.is_empty() {
        return Ok(());
    }
    log.checkpoint().await?;
    Ok(())
}

/// Changes found in the keyring that the log never recorded (a crash between saving the
/// keyring and logging the change): one `unlogged` event per jurisdiction whose
/// generation is ahead of what the newest checkpoint vouches for (all of them when no
/// checkpoint vouches for any), describing where it stands now.
pub fn unlogged_changes(states: &[KeyEvent], newest: Option<&audit::Checkpoint>) -> Vec<KeyEvent> {
    let vouched = newest.map(|checkpoint| &checkpoint.key_generations);
    states
        .iter()
        .filter(|state| {
            let logged = vouched
                .and_then(|generations| generations.get(state.jurisdiction.as_str()))
                .copied()
                .unwrap_or(0);
            state.generation > logged
        })
        .map(|state| KeyEvent {
            operation: "unlogged",
            ..state.clone()
        })
        .collect()
}

/// A change to make: given the keyring file, returns where the keyring stood before
/// ([`Keyring::states`]; empty for a new or format-1 keyring), the keyring as it should
/// be, and the events that describe the difference. Runs with the keyring lock held;
/// nothing is written until it returns.
pub type Change<'a> =
    dyn FnOnce(&Path) -> Result<(Vec<KeyEvent>, Keyring, Vec<KeyEvent>), keys::Error> + 'a;

/// Makes one key change with no server running: keyring lock (waiting for other
/// offline writers), read and change in memory, decision log lock (refused while a
/// server holds it) with the rollback check against the keyring as it was, save,
/// `key_event` entries and a checkpoint. Returns the events.
pub fn change_offline(
    paths: &DataPaths,
    actor: &str,
    change: Box<Change<'_>>,
) -> Result<Vec<KeyEvent>, Error> {
    change_offline_with(paths, actor, change, Box::new(|_| Ok(())))
}

/// What must change with a keyring, just before it is saved (see
/// [`change_offline_with`]).
pub type BeforeSave<'a> = dyn FnOnce(&Keyring) -> Result<(), Error> + 'a;

/// [`change_offline`] with `before_save`, run while both locks are held (no server
/// runs) just before the changed keyring is saved: what must change with it (the
/// subject store, re-sealed by `keys rotate-master`).
pub fn change_offline_with(
    paths: &DataPaths,
    actor: &str,
    change: Box<Change<'_>>,
    before_save: Box<BeforeSave<'_>>,
) -> Result<Vec<KeyEvent>, Error> {
    let holder = crate::fsutil::describe_process(&format!("`{actor}`"));
    let keyring_lock = keys::lock(&paths.data_dir, &holder)?;
    let (before, keyring, events) = change(&paths.keyring())?;
    let signing_key = paths.signing_key();
    if !signing_key.exists()
        && audit::segment_numbers(&paths.log()).is_ok_and(|numbers| !numbers.is_empty())
    {
        // A fresh key would sign this log's next checkpoint under another identity.
        return Err(Error::Other(format!(
            "no checkpoint signing key at `{}`, but the decision log `{}` has entries: pass the --checkpoint-key that `serve` uses",
            signing_key.display(),
            paths.log().display()
        )));
    }
    let (signer, _, _) = paths.signer()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Error::Other(format!("cannot start runtime: {error}")))?;
    let before_generations: BTreeMap<String, u64> = before
        .iter()
        .map(|state| (state.jurisdiction.as_str().to_owned(), state.generation))
        .collect();
    let (log, state) = DecisionLog::open_with(
        &paths.log(),
        LogOptions {
            signer: Some(signer),
            key_generations: Some(before_generations.clone()),
            holder: holder.clone(),
            ..LogOptions::default()
        },
    )?;
    let actor = Actor::local(&holder);
    let result = runtime.block_on(async {
        let unlogged = unlogged_changes(&before, state.newest_checkpoint.as_ref());
        log_events(&log, before_generations, &unlogged, &actor).await?;
        if events.is_empty() {
            return Ok(());
        }
        before_save(&keyring)?;
        keyring.save()?;
        log_events(&log, keyring.generations(), &events, &actor)
            .await
            .map_err(|error| {
                Error::Other(format!(
                    "the keyring was changed but the change could not be logged ({error}); the next start of `serve` or a `keys` command records it as `unlogged`: do not repeat the change"
                ))
            })
    });
    // The log lock goes only after the writer is done: the next queued writer must
    // find it free.
    log.close();
    drop(keyring_lock);
    result.map(|()| events)
}

/// How long a live change waits for another change (in this server or an offline
/// command holding the keyring lock) before it is refused as busy.
const CHANGE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The keyring a running server decrypts and encrypts with, changed live by the admin
/// service. Each request takes one [`LiveKeyring::load`] and uses it throughout, so a
/// change is atomic: requests that started before it use the old keyring whole,
/// requests that start after the change returns use the new one whole.
#[derive(Debug)]
pub struct LiveKeyring {
    current: ArcSwap<Keyring>,
    /// One change at a time within the server (the file lock serializes processes).
    changes: tokio::sync::Mutex<()>,
    /// Set when a change may have reached the file but not memory or the log: the file
    /// and the served keyring may differ, so further changes are refused until a
    /// restart reads the file again (and records what the log missed as `unlogged`).
    broken: std::sync::Mutex<Option<String>>,
}

/// A change being made: both locks held and a copy of the keyring to change. Nothing
/// is saved or served until [`PreparedChange::commit`]; dropping it changes nothing.
pub struct PreparedChange<'a> {
    live: &'a LiveKeyring,
    _serial: tokio::sync::MutexGuard<'a, ()>,
    _file_lock: crate::fsutil::LockFile,
    next: Keyring,
    events: Vec<KeyEvent>,
}

impl std::fmt::Debug for PreparedChange<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedChange")
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl LiveKeyring {
    /// Serves `keyring` until the first change.
    pub fn new(keyring: Keyring) -> Self {
        Self {
            current: ArcSwap::from_pointee(keyring),
            changes: tokio::sync::Mutex::new(()),
            broken: std::sync::Mutex::new(None),
        }
    }

    /// The keyring as it is now; hold it for the whole request.
    pub fn load(&self) -> Arc<Keyring> {
        self.current.load_full()
    }

    /// Takes this server's change lock and the keyring file lock, each within
    /// [`CHANGE_PATIENCE`] (else [`Error::Busy`] naming the holder), and copies the
    /// keyring to change. A decision taken before waiting may be stale by now: check
    /// the caller's credentials again, and decide again if the policies changed.
    pub async fn lock(&self, holder: &str) -> Result<PreparedChange<'_>, Error> {
        let serial = tokio::time::timeout(CHANGE_PATIENCE, self.changes.lock())
            .await
            .map_err(|_| {
                Error::Busy("another key change is in progress in this server".to_owned())
            })?;
        if let Some(problem) = self
            .broken
            .lock()
            .map_err(|_| Error::Other("poisoned".to_owned()))?
            .as_ref()
        {
            return Err(Error::Disabled(problem.clone()));
        }
        let next = Keyring::clone(&self.current.load());
        let path = next
            .path()
            .parent()
            .map(|dir| dir.join(keys::KEYRING_LOCK_FILE))
            .unwrap_or_else(|| PathBuf::from(keys::KEYRING_LOCK_FILE));
        let holder = holder.to_owned();
        let file_lock = tokio::task::spawn_blocking(move || {
            crate::fsutil::LockFile::try_acquire(&path, &holder, CHANGE_PATIENCE)
        })
        .await
        .map_err(|error| Error::Other(format!("keyring lock task failed: {error}")))?
        .map_err(|error| match error {
            held @ crate::fsutil::LockError::Held { .. } => Error::Busy(held.to_string()),
            other => Error::Keys(keys::Error::Lock(other)),
        })?;
        Ok(PreparedChange {
            live: self,
            _serial: serial,
            _file_lock: file_lock,
            next,
            events: Vec::new(),
        })
    }

    fn break_changes(&self, problem: String) {
        if let Ok(mut broken) = self.broken.lock() {
            *broken = Some(problem);
        }
    }
}

impl PreparedChange<'_> {
    /// Applies `change` to the copy. A refused change leaves the copy as it was.
    pub fn apply(
        &mut self,
        change: impl FnOnce(&mut Keyring) -> Result<Vec<KeyEvent>, keys::Error>,
    ) -> Result<&[KeyEvent], keys::Error> {
        let mut scratch = self.next.clone();
        let events = change(&mut scratch)?;
        self.next = scratch;
        self.events.extend(events);
        Ok(&self.events)
    }

    /// What the changed copy holds of `jurisdiction` (versions, ids, states).
    pub fn summary(&self, jurisdiction: &str) -> Option<keys::KeyInfo> {
        self.next
            .summary()
            .into_iter()
            .find(|info| info.jurisdiction == jurisdiction)
    }

    /// Saves the changed keyring, logs its events and a checkpoint over the new
    /// generations, and only then serves it to every request that starts from now on
    /// (so no entry uses a version before its `key_event`). When the save fails, the
    /// server keeps the keyring it had; when the events cannot be logged, it serves
    /// the saved one (the file is the truth). Either way it refuses further changes
    /// until it restarts, and the next start records what the log missed as
    /// `unlogged`.
    pub async fn commit(self, log: &DecisionLog, actor: &Actor) -> Result<Vec<KeyEvent>, Error> {
        if self.events.is_empty() {
            return Ok(Vec::new());
        }
        let live = self.live;
        let next = Arc::new(self.next);
        let saving = Arc::clone(&next);
        let saved = tokio::task::spawn_blocking(move || saving.save())
            .await
            .map_err(|error| Error::Other(format!("keyring save task failed: {error}")))
            .and_then(|saved| saved.map_err(Error::from));
        if let Err(error) = saved {
            // A save can fail after the rename (the directory's fsync): then the file
            // holds the change, and it is served (a destroyed version must not keep
            // decrypting); otherwise the old keyring stays (a new version whose key is
            // not on disk must never encrypt).
            let reached_disk = {
                let next = Arc::clone(&next);
                tokio::task::spawn_blocking(move || next.is_saved())
                    .await
                    .unwrap_or(false)
            };
            if reached_disk {
                live.current.store(next);
            }
            live.break_changes(format!("saving the keyring failed ({error})"));
            return Err(error);
        }
        for event in &self.events {
            if let Err(error) = log.append(key_event_entry(event, actor)).await {
                // The file is the truth: serve it (a destroyed version must not keep
                // decrypting), stop further changes, and let the next start record the
                // change as `unlogged` (no checkpoint vouches for it meanwhile).
                live.current.store(next);
                live.break_changes(format!("a saved key change could not be logged ({error})"));
                return Err(Error::Other(format!(
                    "the keyring was saved and is in use, but the change could not be logged ({error}); the next start records it as `unlogged`"
                )));
            }
        }
        // Logged: from here on the change is served. A checkpoint that cannot be
        // written now comes with a later batch (the log refuses requests meanwhile).
        log.set_key_generations(next.generations());
        if let Err(error) = log.checkpoint().await {
            tracing::warn!(%error, "no checkpoint after a key change yet");
        }
        live.current.store(next);
        Ok(self.events)
    }
}

/// Shreds `subject` with the server stopped (`keys shred`): under both locks, destroys
/// its secrets in `jurisdictions` (every one the keyring holds, when empty) and logs a
/// `key_admin` entry for it (no policy decides a local command; it names the command
/// as its principal, like offline key changes).
pub fn shred_offline(
    paths: &DataPaths,
    actor: &str,
    master: &dyn keys::MasterKeySource,
    subject: &crate::record::SubjectId,
    jurisdictions: &[crate::record::Jurisdiction],
) -> Result<Vec<crate::subjects::ShredOutcome>, Error> {
    let holder = crate::fsutil::describe_process(&format!("`{actor}`"));
    let keyring_lock = keys::lock(&paths.data_dir, &holder)?;
    let keyring = Keyring::open(&paths.keyring(), master)?;
    let targets: Vec<crate::record::Jurisdiction> = if jurisdictions.is_empty() {
        keyring.jurisdictions().cloned().collect()
    } else {
        for jurisdiction in jurisdictions {
            if !keyring.holds(jurisdiction) {
                return Err(keys::Error::UnknownJurisdiction(jurisdiction.clone()).into());
            }
        }
        jurisdictions.to_vec()
    };
    let (signer, _, _) = paths.signer()?;
    let (log, _) = DecisionLog::open_with(
        &paths.log(),
        LogOptions {
            signer: Some(signer),
            key_generations: Some(keyring.generations()),
            holder: holder.clone(),
            ..LogOptions::default()
        },
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Error::Other(format!("cannot start runtime: {error}")))?;
    let result = runtime.block_on(async {
        let subjects = crate::subjects::Subjects::open(&paths.data_dir, &keyring, 0)
            .map_err(|error| Error::Other(error.to_string()))?;
        let outcomes = subjects
            .shred(subject, &targets)
            .await
            .map_err(|error| Error::Other(error.to_string()))?;
        let time = time::OffsetDateTime::now_utc();
        let mut entry = Entry::bare(
            crate::record::rfc3339(time),
            time.unix_timestamp(),
            String::new(),
            audit::KEY_ADMIN_KIND,
            shred_outcome(&outcomes),
        );
        entry.principal = Some(holder.clone());
        entry.authentication = "local".to_owned();
        entry.action = Some(crate::policy::Action::Shred.as_str().to_owned());
        entry.key_admin = Some(audit::KeyAdminEntry {
            operation: "shred".to_owned(),
            below: None,
            from: None,
            key_rings: targets
                .iter()
                .map(|jurisdiction| audit::KeyRingDecision {
                    jurisdiction: jurisdiction.as_str().to_owned(),
                    decision: "local".to_owned(),
                    policies: Vec::new(),
                    errors: Vec::new(),
                })
                .collect(),
            subject: Some(subject.as_str().to_owned()),
        });
        log.append(entry).await.map_err(|error| {
            Error::Other(format!(
                "the subject was shredded but the shred could not be logged ({error})"
            ))
        })?;
        Ok(outcomes)
    });
    log.close();
    drop(keyring_lock);
    result
}

/// The outcome text of a shred's entry: `shredded: US shredded, EU no_secret`.
pub fn shred_outcome(outcomes: &[crate::subjects::ShredOutcome]) -> String {
    format!(
        "shredded: {}",
        outcomes
            .iter()
            .map(|outcome| format!("{} {}", outcome.jurisdiction(), outcome.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
