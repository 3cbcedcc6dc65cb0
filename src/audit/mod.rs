//! The decision log: one hash-chained JSON line per request, durably appended (written
//! and fsynced) before the request's plaintext leaves the service.
//!
//! Owns the log directory. A single writer thread assigns sequence numbers and chain
//! links and commits concurrent requests' entries with one fsync per batch (group
//! commit). It never receives plaintext or key material: [`Entry`] has no place for
//! either. Line format and verification rules: `docs/decision-log.md`.

pub mod checkpoint;
mod entry;
mod groups;
mod log;
mod query;
pub mod replay;
mod segments;
mod verify;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

// What the submodules share among themselves (each has `use super::*`).
use segments::{Head, open_segment, segment_head, write_failed_marker};
use writer::{Job, Problem, Request, UnsignedSpan, Writer};

pub use checkpoint::{CHECKPOINT_KIND, Checkpoint, CheckpointSigner, CheckpointVerifier};
pub use entry::{
    ChainFields, Entry, FieldEntry, KeyAdminEntry, KeyEventEntry, KeyRingDecision, RecordEntry,
    UnsignedTailEntry, chain_line, split_line,
};
pub use groups::expand_fields;
pub use log::{Appended, DecisionLog, LogOptions, OpenState};
pub use query::{Filter, QueryStats, for_each_entry, parse_time, query};
pub use segments::{
    FailedMarker, MAX_LINE_BYTES, check_key_generations, failed_marker_path, read_failed_marker,
    segment_numbers, segment_path,
};
pub use verify::{VerifyFailure, VerifyOptions, VerifyReport, verify, verify_with};

/// Prefix of segment file names: `decisions-000001.jsonl`.
pub const SEGMENT_PREFIX: &str = "decisions-";
/// Suffix of segment file names.
pub const SEGMENT_SUFFIX: &str = ".jsonl";
/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Size after which the writer continues in a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Age after which the writer continues in a new segment (one segment a day at most).
pub const DEFAULT_SEGMENT_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest time between signed checkpoints while entries are written.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Format version every entry carries as `format` (entries without one are format 1;
/// format 2 added `format` and key events, format 3 groups the fields).
pub const ENTRY_FORMAT: u32 = 3;
/// `kind` of entries that record a change to the keyring.
pub const KEY_EVENT_KIND: &str = "key_event";
/// `kind` of entries that record a key administration request and its decisions.
pub const KEY_ADMIN_KIND: &str = "key_admin";
/// `kind` of the entry the writer writes instead of signing entries that waited longer
/// than the verifier's slack for a checkpoint (an inherited tail after a crash, a
/// stalled disk).
pub const UNSIGNED_TAIL_KIND: &str = "unsigned_tail";
/// The writer lock in the log directory: one process appends at a time.
pub const WRITER_LOCK_FILE: &str = "writer.lock";
/// How long opening the log waits for a previous writer in this process to let go.
const LOCK_PATIENCE: Duration = Duration::from_secs(3);
const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;
/// Most entries committed by one fsync.
const MAX_BATCH: usize = 1024;

/// Errors of the decision log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The log could not be opened at start.
    #[error("cannot open decision log `{path}`: {reason}")]
    Open {
        /// The log directory or segment.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An append did not become durable; nothing that depends on it may proceed.
    #[error("decision log unavailable: {0}")]
    Unavailable(String),
    /// Another process appends to the log.
    #[error("decision log `{dir}` is in use by {holder}")]
    Locked {
        /// The log directory.
        dir: PathBuf,
        /// Who holds it, as it described itself.
        holder: String,
    },
    /// The keyring is older than what the log's newest checkpoint vouches for.
    #[error(
        "the keyring was rolled back: jurisdiction `{jurisdiction}` is at generation {keyring} but the decision log's newest checkpoint (seq {seq}, signed {signed_at}) vouches for generation {checkpoint}; restore the newest keyring.json"
    )]
    KeyringRolledBack {
        /// The jurisdiction.
        jurisdiction: String,
        /// Its generation in the keyring (0: missing).
        keyring: u64,
        /// Its generation in the checkpoint.
        checkpoint: u64,
        /// The checkpoint's seq.
        seq: u64,
        /// When the checkpoint was signed.
        signed_at: String,
    },
}

/// Suffix of the marker that seals a segment after a failed write or fsync.
pub const FAILED_SUFFIX: &str = ".failed";

#[cfg(test)]
mod tests;
