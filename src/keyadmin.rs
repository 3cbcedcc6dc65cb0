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

    /// Loads (or on first use creates) the checkpoint signer; returns whether it was created.
    pub fn signer(&self) -> Result<(CheckpointSigner, bool, PathBuf), audit::checkpoint::Error> {
        let path = self
            .checkpoint_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join(audit::checkpoint::SIGNING_KEY_FILE));
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
        time.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
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
/// generations, then asks for a checkpoint over them.
pub async fn log_events(
    log: &DecisionLog,
    generations: BTreeMap<String, u64>,
    events: &[KeyEvent],
    actor: &str,
) -> Result<(), audit::Error> {
    log.set_key_generations(generations);
    for event in events {
        log.append(key_event_entry(event, actor)).await?;
    }
    log.checkpoint().await?;
    Ok(())
}

/// A change to make: given the keyring as it is (none if there is no file), returns the
/// keyring as it should be and the events that describe the difference. Runs with the
/// keyring lock held; nothing is written until it returns.
pub type Change<'a> =
    dyn FnOnce(&Path) -> Result<(BTreeMap<String, u64>, Keyring, Vec<KeyEvent>), keys::Error> + 'a;

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
    let _keyring_lock = keys::lock(&paths.data_dir, &holder)?;
    let (before, keyring, events) = change(&paths.keyring())?;
    let (signer, _, _) = paths.signer()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Error::Other(format!("cannot start runtime: {error}")))?;
    runtime.block_on(async {
        let (log, _) = DecisionLog::open_with(
            &paths.log(),
            LogOptions {
                signer: Some(signer),
                key_generations: Some(before),
                holder: holder.clone(),
                ..LogOptions::default()
            },
        )?;
        if events.is_empty() {
            return Ok(events);
        }
        keyring.save()?;
        log_events(&log, keyring.generations(), &events, &holder).await?;
        Ok(events)
    })
}
