//! Key operations as logged transactions: every keyring change is made by one writer
//! holding both the keyring lock and the decision log's writer lock, and is recorded
//! as `key_event` entries followed by a signed checkpoint that vouches for the new
//! keyring generations.
//!
//! Owns the order of a key change (lock keyring, read, lock log and check for rollback,
//! save, log, checkpoint). It may not touch key bytes (the keyring does) or the log's
//! format (the audit module does). While a server runs it holds the log lock, so
//! offline changes are refused with a message naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// The decision log entry of one key change. `actor` says who made it.
pub fn key_event_entry(event: &KeyEvent, actor: &str) -> Entry {
    let time = time::OffsetDateTime::now_utc();
    let mut entry = Entry::bare(
        crate::record::rfc3339(time),
        time.unix_timestamp(),
        String::new(),
        audit::KEY_EVENT_KIND,
        "done".to_owned(),
    );
    entry.principal = Some(actor.to_owned());
    entry.authentication = "local".to_owned();
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

/// Appends `events` to an open log as `key_event` entries after telling it the new
/// generations, then asks for a checkpoint over them (none when there are no events).
pub async fn log_events(
    log: &DecisionLog,
    generations: BTreeMap<String, u64>,
    events: &[KeyEvent],
    actor: &str,
) -> Result<(), audit::Error> {
    log.set_key_generations(generations);
    if events.is_empty() {
        return Ok(());
    }
    for event in events {
        log.append(key_event_entry(event, actor)).await?;
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
    let result = runtime.block_on(async {
        let unlogged = unlogged_changes(&before, state.newest_checkpoint.as_ref());
        log_events(&log, before_generations, &unlogged, &holder).await?;
        if events.is_empty() {
            return Ok(());
        }
        keyring.save()?;
        log_events(&log, keyring.generations(), &events, &holder)
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
