//! The decision log: one hash-chained JSON line per request, durably appended (written
//! and fsynced) before the request's plaintext leaves the service.
//!
//! Owns the log directory. A single writer thread assigns sequence numbers and chain
//! links and commits concurrent requests' entries with one fsync per batch (group
//! commit). It never receives plaintext or key material: [`Entry`] has no place for
//! either. Line format and verification rules: `docs/decision-log.md`.

pub mod checkpoint;
mod query;
pub mod replay;
mod verify;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub use checkpoint::{CHECKPOINT_KIND, Checkpoint, CheckpointSigner, CheckpointVerifier};
pub use query::{Filter, QueryStats, for_each_entry, parse_time, query};
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
/// Format version every entry carries as `format` (entries without one are format 1).
pub const ENTRY_FORMAT: u32 = 2;
/// `kind` of entries that record a change to the keyring.
pub const KEY_EVENT_KIND: &str = "key_event";
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

/// What one log entry records of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    /// Record type.
    pub record_type: String,
    /// Record id (never a field value).
    pub record_id: String,
    /// Jurisdiction.
    pub jurisdiction: String,
}

/// The decision and outcome for one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldEntry {
    /// Field name.
    pub field: String,
    /// Classification from the field catalog.
    pub classification: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Determining policy ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Policy evaluation errors (any error denies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Key version named by the field's envelope, or used to encrypt it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// What happened: `decrypt`, `encrypt`, `denied`, `integrity_failure`, ...
    pub outcome: String,
}

/// A change to the keyring (`kind: "key_event"`); never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEventEntry {
    /// `init`, `rotate`, `migrate`.
    pub operation: String,
    /// The jurisdiction changed.
    pub jurisdiction: String,
    /// The key version created or carried over.
    pub version: u32,
    /// Its key id.
    pub key_id: String,
    /// The jurisdiction's keyring generation after the change.
    pub generation: u64,
}

/// Entries the writer found unsigned for longer than the verifier's slack and would
/// not vouch for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsignedTailEntry {
    /// First entry after the last checkpoint.
    pub from_seq: u64,
    /// Last entry of the log when the writer started.
    pub to_seq: u64,
    /// When the first of them was written.
    pub first_time: String,
}

/// One request's entry, before the writer chains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339 time the service decided.
    pub time: String,
    /// Unix seconds the policies saw as `context.request_time`.
    pub request_time: i64,
    /// Unique id of the request, returned to the caller.
    pub request_id: String,
    /// `encrypt`, `decrypt`, `authorize`, `integrity_failure` or `unauthenticated`.
    pub kind: String,
    /// Calling service, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Cedar principal, e.g. `Employee::"alice"`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// How the caller was authenticated.
    pub authentication: String,
    /// Cedar action, when a decision was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Stated purpose.
    pub purpose: String,
    /// Stated ticket.
    pub ticket: String,
    /// The record concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordEntry>,
    /// SHA-256 of the policy set that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_set: Option<String>,
    /// Per-field decisions and outcomes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldEntry>,
    /// Request-level outcome: `decided`, `encrypted`, `denied`, `integrity_failure`, or the
    /// error text of a `rejected` or `unauthenticated` entry.
    pub outcome: String,
    /// For `kind: "checkpoint"`: the signature over the chain head before this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// For `kind: "key_event"`: what changed in the keyring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_event: Option<KeyEventEntry>,
    /// For `kind: "unsigned_tail"`: the inherited entries no checkpoint vouched for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsigned_tail: Option<UnsignedTailEntry>,
}

impl Entry {
    /// An entry about no record and no decision: only when, what and the outcome.
    pub fn bare(
        time: String,
        request_time: i64,
        request_id: String,
        kind: &str,
        outcome: String,
    ) -> Self {
        Self {
            time,
            request_time,
            request_id,
            kind: kind.to_owned(),
            service: None,
            principal: None,
            authentication: String::new(),
            action: None,
            purpose: String::new(),
            ticket: String::new(),
            record: None,
            policy_set: None,
            fields: Vec::new(),
            outcome,
            checkpoint: None,
            key_event: None,
            unsigned_tail: None,
        }
    }

    /// A checkpoint entry carrying `checkpoint`.
    pub fn checkpoint(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint: Some(checkpoint.clone()),
            ..Self::bare(
                checkpoint.signed_at,
                0,
                String::new(),
                CHECKPOINT_KIND,
                "signed".to_owned(),
            )
        }
    }
}

/// How the writer rotates segments and signs checkpoints.
#[derive(Debug)]
pub struct LogOptions {
    /// Size after which the writer continues in a new segment.
    pub max_segment_bytes: u64,
    /// Age after which the writer continues in a new segment.
    pub max_segment_age: Duration,
    /// Longest time between checkpoints while entries are written.
    pub checkpoint_interval: Duration,
    /// Signs checkpoints; none means the log has no checkpoints.
    pub signer: Option<CheckpointSigner>,
    /// The keyring's generation per jurisdiction. When set, opening refuses a keyring
    /// older than the newest checkpoint vouches for, and checkpoints carry them.
    pub key_generations: Option<BTreeMap<String, u64>>,
    /// Who is writing, recorded in the writer lock (e.g. `ringfence serve (pid 7)`).
    pub holder: String,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            max_segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_segment_age: DEFAULT_SEGMENT_AGE,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            signer: None,
            key_generations: None,
            holder: crate::fsutil::describe_process("a ringfence decision log writer"),
        }
    }
}

#[derive(Serialize)]
struct Chained<'a> {
    seq: u64,
    format: u32,
    prev_hash: &'a str,
    #[serde(flatten)]
    entry: &'a Entry,
}

/// Formats one chained line (without its newline) and returns it with its hash.
/// The hash is SHA-256 over the line with its trailing `,"hash":"..."` member removed.
pub fn chain_line(seq: u64, prev_hash: &str, entry: &Entry) -> Result<(String, String), Error> {
    let mut body = serde_json::to_string(&Chained {
        seq,
        format: ENTRY_FORMAT,
        prev_hash,
        entry,
    })
    .map_err(|error| Error::Unavailable(format!("cannot encode entry: {error}")))?;
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    body.pop(); // the closing brace
    body.push_str(",\"hash\":\"");
    body.push_str(&hash);
    body.push_str("\"}");
    Ok((body, hash))
}

/// Splits a line into (hashed body, claimed hash), reversing [`chain_line`].
pub fn split_line(line: &str) -> Option<(String, &str)> {
    let split = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (head, suffix) = (line.get(..split)?, line.get(split..)?);
    let hash = suffix.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{head}}}"), hash))
}

/// Fields every chained line carries.
#[derive(Debug, Deserialize)]
pub struct ChainFields {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Entry format version (absent: 1).
    #[serde(default)]
    pub format: Option<u32>,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// When.
    #[serde(default)]
    pub time: String,
    /// Entry kind.
    #[serde(default)]
    pub kind: String,
    /// The signature of a checkpoint entry.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
}

/// A receipt that an entry is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's sequence number.
    pub seq: u64,
}

/// Why the log is failing, and how often commits failed, for status reporting.
#[derive(Debug, Default)]
struct Problem {
    reason: std::sync::Mutex<Option<String>>,
    failed_commits: std::sync::atomic::AtomicU64,
}

impl Problem {
    fn set(&self, reason: Option<String>) {
        if let Ok(mut slot) = self.reason.lock() {
            *slot = reason;
        }
    }
}

struct Job {
    entry: Entry,
    reply: oneshot::Sender<Result<Appended, Error>>,
}

// Nearly every request is an append: boxing it would add an allocation per entry.
#[allow(clippy::large_enum_variant)]
enum Request {
    Append(Job),
    /// Sign the current head now (if anything is unsigned); answers the checkpoint's seq.
    Checkpoint(oneshot::Sender<Result<u64, Error>>),
}

/// Handle to the decision log; cheap to share. Dropping the last handle stops the writer.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    sender: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
    problem: Arc<Problem>,
    key_generations: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    dir: PathBuf,
}

/// Where the chain stands when the log opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenState {
    /// Entries already in the log.
    pub last_seq: u64,
    /// Segment the writer appends to.
    pub segment: u64,
    /// A torn final line found in the previous segment, if any (left in place).
    pub torn_tail: Option<PathBuf>,
    /// The newest checkpoint found, if any.
    pub newest_checkpoint: Option<Checkpoint>,
}

struct Writer {
    dir: PathBuf,
    file: File,
    segment: u64,
    segment_bytes: u64,
    segment_started: Instant,
    options: LogOptions,
    /// When the last checkpoint was written; `None` makes the next batch carry one.
    last_checkpoint: Option<Instant>,
    /// Sequence number the last checkpoint vouched for.
    checkpointed_seq: u64,
    seq: u64,
    last_hash: String,
    failure: Option<Failure>,
    healthy: Arc<AtomicBool>,
    problem: Arc<Problem>,
    key_generations: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// The entries written since the last checkpoint (or `unsigned_tail` report).
    unsigned: Option<UnsignedSpan>,
    /// Held for the writer's life: one process appends at a time.
    _lock: crate::fsutil::LockFile,
}

/// Why the writer is refusing appends, and what it must do before it may resume.
struct Failure {
    reason: String,
    /// The segment to seal with a marker (none when opening the next segment failed).
    seal: Option<u64>,
}

/// Path of segment `number` in `dir`.
pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{number:06}{SEGMENT_SUFFIX}"))
}

/// Segment numbers present in `dir`, ascending.
pub fn segment_numbers(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let number: u64 = name
                .strip_prefix(SEGMENT_PREFIX)?
                .strip_suffix(SEGMENT_SUFFIX)?
                .parse()
                .ok()?;
            // Only the name the writer gives segment `number`: `decisions-1.jsonl` or
            // `decisions-+000001.jsonl` is not segment 1 read a second time.
            (segment_path(Path::new(""), number).as_os_str() == name.as_str()).then_some(number)
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Suffix of the marker that seals a segment after a failed write or fsync.
pub const FAILED_SUFFIX: &str = ".failed";

/// Written next to a segment whose write or fsync failed: entries after
/// `last_durable_seq` in it were never acknowledged, and the chain continues from
/// (`last_durable_seq`, `head`) in the next segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedMarker {
    /// The sealed segment.
    pub segment: u64,
    /// Last entry acknowledged as durable (0 for none).
    pub last_durable_seq: u64,
    /// Hash of that entry (the genesis hash for none).
    pub head: String,
    /// What failed.
    pub reason: String,
}

/// Path of the failure marker of segment `number`.
pub fn failed_marker_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!(
        "{SEGMENT_PREFIX}{number:06}{SEGMENT_SUFFIX}{FAILED_SUFFIX}"
    ))
}

/// Reads the failure marker of a segment, if there is one.
pub fn read_failed_marker(dir: &Path, number: u64) -> Result<Option<FailedMarker>, String> {
    let path = failed_marker_path(dir, number);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| format!("{}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

fn write_failed_marker(dir: &Path, marker: &FailedMarker) -> std::io::Result<()> {
    let text = serde_json::to_string(marker).map_err(std::io::Error::other)?;
    // Whole or not at all: a marker torn by a crash would keep `serve` from starting.
    crate::fsutil::write_private_file(&failed_marker_path(dir, marker.segment), text.as_bytes())
}

fn open_segment(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    // Entries name people and records: readable by the service account only.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// How old the entries a checkpoint signs may be before the writer reports them in
/// an `unsigned_tail` entry instead: the verifier's slack, less a margin for the
/// moments between this check and the verifier's reading of `signed_at`.
const REPORT_BEFORE_SLACK: time::Duration =
    verify::UNSIGNED_TAIL_SLACK.saturating_sub(time::Duration::seconds(5));

/// Longest line accepted when reading a segment back; entries are far smaller.
pub const MAX_LINE_BYTES: u64 = 16 * 1024 * 1024;

/// The last entry of a segment.
struct Head {
    seq: u64,
    hash: String,
    /// Whether it is a checkpoint.
    signed: bool,
}

/// Entries after the last checkpoint: the first one's seq and the span of their times
/// (an unreadable time counts as the oldest possible).
#[derive(Debug, Clone)]
pub(crate) struct UnsignedSpan {
    pub(crate) first_seq: u64,
    pub(crate) first_time: String,
    pub(crate) oldest: Option<time::OffsetDateTime>,
    pub(crate) newest: Option<time::OffsetDateTime>,
}

impl UnsignedSpan {
    pub(crate) fn start(seq: u64, time: &str) -> Self {
        let parsed =
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok();
        Self {
            first_seq: seq,
            first_time: time.to_owned(),
            oldest: parsed,
            newest: parsed,
        }
    }

    pub(crate) fn add(&mut self, time: &str) {
        match time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339) {
            Ok(parsed) => {
                self.oldest = self.oldest.map(|oldest| oldest.min(parsed));
                self.newest = self.newest.map(|newest| newest.max(parsed));
            }
            Err(_) => {
                self.oldest = None;
                self.newest = None;
            }
        }
    }

    /// Adds the entry (`seq`, `time`) to `span`, starting it if there is none.
    pub(crate) fn extend(span: &mut Option<Self>, seq: u64, time: &str) {
        match span {
            Some(span) => span.add(time),
            None => *span = Some(Self::start(seq, time)),
        }
    }

    /// One span of `older` followed by `newer` (either may be absent).
    pub(crate) fn join(older: Option<Self>, newer: Option<Self>) -> Option<Self> {
        match (older, newer) {
            (Some(mut older), Some(newer)) => {
                older.oldest = older.oldest.zip(newer.oldest).map(|(a, b)| a.min(b));
                older.newest = older.newest.zip(newer.newest).map(|(a, b)| a.max(b));
                Some(older)
            }
            (older, newer) => older.or(newer),
        }
    }

    /// Whether a checkpoint signed at `signed` may vouch for these entries: none was
    /// written more than `slack` before it, or dated more than `slack` after it.
    pub(crate) fn fits(&self, signed: time::OffsetDateTime, slack: time::Duration) -> bool {
        match (self.oldest, self.newest) {
            (Some(oldest), Some(newest)) => signed - oldest <= slack && newest - signed <= slack,
            _ => false,
        }
    }
}

/// What reading one segment found.
#[derive(Default)]
struct SegmentEnd {
    head: Option<Head>,
    torn: bool,
    checkpoint: Option<Checkpoint>,
    /// The first entry (seq, time) after the segment's last checkpoint (or its first
    /// entry when it has none).
    first_unsigned: Option<UnsignedSpan>,
}

/// The chain head in one segment, whether its end is torn, and its last checkpoint.
/// With `until` (a sealed segment's last acknowledged seq) the lines after it, which
/// no one acknowledged, are not read.
fn segment_head(path: &Path, until: Option<u64>) -> Result<SegmentEnd, String> {
    use std::io::Read as _;
    let file = File::open(path).map_err(|error| error.to_string())?;
    if !file
        .metadata()
        .map_err(|error| error.to_string())?
        .is_file()
    {
        return Err("not a regular file".to_owned());
    }
    let mut reader = BufReader::new(file);
    let mut end = SegmentEnd::default();
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        if until.is_some() && end.head.as_ref().map(|head| head.seq) == until {
            return Ok(end);
        }
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_line(&mut line)
            .map_err(|error| format!("line {}: {error}", number + 1))?;
        if read as u64 == MAX_LINE_BYTES {
            return Err(format!(
                "line {}: longer than {MAX_LINE_BYTES} bytes",
                number + 1
            ));
        }
        if read == 0 {
            return Ok(end);
        }
        number += 1;
        let Some(text) = line.strip_suffix('\n') else {
            // No newline: the write of this line never completed (a crash).
            end.torn = true;
            return Ok(end);
        };
        let (body, hash) =
            split_line(text).ok_or_else(|| format!("line {number}: not a chained entry"))?;
        if hex::encode(Sha256::digest(body.as_bytes())) != hash {
            return Err(format!("line {number}: hash mismatch"));
        }
        let fields: ChainFields =
            serde_json::from_str(&body).map_err(|error| format!("line {number}: {error}"))?;
        if until.is_some_and(|until| fields.seq > until) {
            // The sealed segment's acknowledged entries are all in older segments.
            return Ok(end);
        }
        let signed = fields.kind == CHECKPOINT_KIND;
        if signed && fields.checkpoint.is_some() {
            end.checkpoint = fields.checkpoint;
            end.first_unsigned = None;
        } else if fields.kind == UNSIGNED_TAIL_KIND {
            // Reported: the verifier no longer expects a checkpoint to vouch for them.
            end.first_unsigned = None;
        } else {
            UnsignedSpan::extend(&mut end.first_unsigned, fields.seq, &fields.time);
        }
        end.head = Some(Head {
            seq: fields.seq,
            hash: hash.to_owned(),
            signed,
        });
    }
}

/// Refuses `keyring` generations older than (or missing from) what `checkpoint` vouches for.
pub fn check_key_generations(
    checkpoint: &Checkpoint,
    keyring: &BTreeMap<String, u64>,
) -> Result<(), Error> {
    for (jurisdiction, vouched) in &checkpoint.key_generations {
        let held = keyring.get(jurisdiction).copied().unwrap_or(0);
        if held < *vouched {
            return Err(Error::KeyringRolledBack {
                jurisdiction: crate::record::shown(jurisdiction),
                keyring: held,
                checkpoint: *vouched,
                seq: checkpoint.seq,
                signed_at: checkpoint.signed_at.clone(),
            });
        }
    }
    Ok(())
}

impl DecisionLog {
    /// Opens (or creates) the log in `dir` and starts its writer thread. The chain
    /// continues from the last intact entry; a torn final line (a crash mid-write) is
    /// left in place, reported, and the writer continues in a fresh segment.
    pub fn open(dir: &Path) -> Result<(Self, OpenState), Error> {
        Self::open_with(dir, LogOptions::default())
    }

    /// As [`DecisionLog::open`], rotating segments after `max_segment_bytes`, without
    /// checkpoints.
    pub fn open_with_segment_size(
        dir: &Path,
        max_segment_bytes: u64,
    ) -> Result<(Self, OpenState), Error> {
        Self::open_with(
            dir,
            LogOptions {
                max_segment_bytes,
                ..LogOptions::default()
            },
        )
    }

    /// As [`DecisionLog::open`], with explicit rotation and checkpoint options.
    pub fn open_with(dir: &Path, options: LogOptions) -> Result<(Self, OpenState), Error> {
        let open_error = |path: &Path, reason: String| Error::Open {
            path: path.to_owned(),
            reason,
        };
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|error| open_error(dir, error.to_string()))?;
        let lock = crate::fsutil::LockFile::try_acquire(
            &dir.join(WRITER_LOCK_FILE),
            &options.holder,
            LOCK_PATIENCE,
        )
        .map_err(|error| match error {
            crate::fsutil::LockError::Held { holder, .. } => Error::Locked {
                dir: dir.to_owned(),
                holder: holder.to_string(),
            },
            other => open_error(dir, other.to_string()),
        })?;
        let numbers = segment_numbers(dir).map_err(|error| open_error(dir, error.to_string()))?;
        // Walking back from the newest segment: the chain head, and (when this writer
        // signs or checks the keyring) the newest checkpoint and every entry after it,
        // which may span segments, sealed ones included.
        let wants_checkpoint = options.signer.is_some() || options.key_generations.is_some();
        let mut head = None;
        let mut newest_checkpoint = None;
        let mut unsigned = None;
        let mut torn_tail = None;
        let mut segment = numbers.last().copied().unwrap_or(1);
        for (index, number) in numbers.iter().rev().enumerate() {
            let path = segment_path(dir, *number);
            // A sealed segment is never appended to; its marker says where the chain stands.
            let marker =
                read_failed_marker(dir, *number).map_err(|reason| open_error(&path, reason))?;
            if index == 0 && marker.is_some() {
                segment = number + 1;
            }
            if marker.is_none() || wants_checkpoint {
                let until = marker.as_ref().map(|marker| marker.last_durable_seq);
                let end = segment_head(&path, until).map_err(|reason| open_error(&path, reason))?;
                if index == 0 && end.torn && marker.is_none() {
                    torn_tail = Some(path.clone());
                    segment = number + 1;
                }
                if head.is_none() && marker.is_none() {
                    head = end.head;
                } else if head.is_none()
                    && let Some(marker) = &marker
                {
                    let signed = end.head.as_ref().is_some_and(|end| {
                        end.signed && end.seq == marker.last_durable_seq && end.hash == marker.head
                    });
                    head = Some(Head {
                        seq: marker.last_durable_seq,
                        hash: marker.head.clone(),
                        signed,
                    });
                }
                unsigned = UnsignedSpan::join(end.first_unsigned, unsigned);
                if end.checkpoint.is_some() {
                    newest_checkpoint = end.checkpoint;
                    break;
                }
            } else if head.is_none()
                && let Some(marker) = marker
            {
                head = Some(Head {
                    seq: marker.last_durable_seq,
                    hash: marker.head,
                    signed: false,
                });
            }
            if head.is_some() && !wants_checkpoint {
                break;
            }
        }
        if let (Some(checkpoint), Some(keyring)) = (&newest_checkpoint, &options.key_generations) {
            // The generations count only if this log's key signed them: a checkpoint
            // planted with another key, or altered, would switch the check off.
            if let Some(signer) = &options.signer {
                let verifier = signer.verifier();
                if checkpoint.key_id != verifier.key_id() {
                    return Err(open_error(
                        dir,
                        format!(
                            "the newest checkpoint (seq {}) is signed by key {}, not by this checkpoint key {}: use the --checkpoint-key that signs this log",
                            checkpoint.seq,
                            crate::record::shown(&checkpoint.key_id),
                            verifier.key_id()
                        ),
                    ));
                }
                verifier.check(checkpoint).map_err(|problem| {
                    open_error(
                        dir,
                        format!("the newest checkpoint (seq {}): {problem}", checkpoint.seq),
                    )
                })?;
            }
            check_key_generations(checkpoint, keyring)?;
        }
        let key_generations = Arc::new(std::sync::Mutex::new(
            options.key_generations.clone().unwrap_or_default(),
        ));
        let Head {
            seq,
            hash: last_hash,
            signed: ends_signed,
        } = head.unwrap_or_else(|| Head {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
            signed: false,
        });
        let path = segment_path(dir, segment);
        let file = open_segment(&path).map_err(|error| open_error(&path, error.to_string()))?;
        let segment_bytes = file
            .metadata()
            .map_err(|error| open_error(&path, error.to_string()))?
            .len();
        let healthy = Arc::new(AtomicBool::new(true));
        let problem = Arc::new(Problem::default());
        let mut writer = Writer {
            dir: dir.to_owned(),
            file,
            segment,
            segment_bytes,
            segment_started: Instant::now(),
            options,
            last_checkpoint: None,
            // A log that ends in a checkpoint needs no new one until entries follow.
            checkpointed_seq: if ends_signed { seq } else { 0 },
            seq,
            last_hash,
            failure: None,
            healthy: Arc::clone(&healthy),
            problem: Arc::clone(&problem),
            key_generations: Arc::clone(&key_generations),
            unsigned: if ends_signed { None } else { unsigned },
            _lock: lock,
        };
        // A log that ends unsigned (a crash, a sealed segment) gets a checkpoint as the
        // writer's first entry; `commit` reports a tail older than the verifier's slack
        // instead of vouching for it.
        if !ends_signed && seq > 0 && writer.options.signer.is_some() {
            writer.last_checkpoint = None;
            writer.commit(&[]);
            if let Some(failure) = &writer.failure {
                return Err(open_error(
                    dir,
                    format!(
                        "cannot sign or report the inherited tail: {}",
                        failure.reason
                    ),
                ));
            }
        }
        let (sender, receiver) = mpsc::channel(8 * MAX_BATCH);
        let thread = std::thread::Builder::new()
            .name("decision-log".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|error| open_error(dir, format!("cannot start writer: {error}")))?;
        Ok((
            Self {
                sender,
                healthy,
                problem,
                key_generations,
                writer: Arc::new(std::sync::Mutex::new(Some(thread))),
                dir: dir.to_owned(),
            },
            OpenState {
                last_seq: seq,
                segment,
                torn_tail,
                newest_checkpoint,
            },
        ))
    }

    /// Appends `entry` and returns once it is durable on disk (or failed).
    pub async fn append(&self, entry: Entry) -> Result<Appended, Error> {
        let (reply, receipt) = oneshot::channel();
        self.sender
            .send(Request::Append(Job { entry, reply }))
            .await
            .map_err(|_| Error::Unavailable("log writer stopped".to_owned()))?;
        receipt
            .await
            .map_err(|_| Error::Unavailable("log writer stopped".to_owned()))?
    }

    /// Writes a checkpoint over the current head now, unless the last entry already is
    /// one; returns the sequence number of the latest checkpoint (0: none, no signer).
    pub async fn checkpoint(&self) -> Result<u64, Error> {
        let (reply, receipt) = oneshot::channel();
        self.sender
            .send(Request::Checkpoint(reply))
            .await
            .map_err(|_| Error::Unavailable("log writer stopped".to_owned()))?;
        receipt
            .await
            .map_err(|_| Error::Unavailable("log writer stopped".to_owned()))?
    }

    /// Closes this handle and, if it was the last one, waits (blocking) until the writer
    /// has signed the final head and let go of the writer lock. Call it outside async
    /// code; a handle that is merely dropped lets the writer finish in the background.
    pub fn close(self) {
        let Self { sender, writer, .. } = self;
        drop(sender);
        if Arc::strong_count(&writer) == 1
            && let Some(thread) = writer.lock().ok().and_then(|mut slot| slot.take())
        {
            let _ = thread.join();
        }
    }

    /// Sets the keyring generations that checkpoints from now on vouch for (after a
    /// key change, before its `key_event` entries are appended).
    pub fn set_key_generations(&self, generations: BTreeMap<String, u64>) {
        if let Ok(mut slot) = self.key_generations.lock() {
            *slot = generations;
        }
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Why the log refuses appends, while it does.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .reason
            .lock()
            .ok()
            .and_then(|reason| reason.clone())
    }

    /// Commits that failed since the log was opened.
    pub fn failed_commits(&self) -> u64 {
        self.problem.failed_commits.load(Ordering::Relaxed)
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Writer {
    fn run(&mut self, mut receiver: mpsc::Receiver<Request>) {
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        let mut checkpoint_requests = Vec::new();
        while let Some(first) = receiver.blocking_recv() {
            let mut next = Some(first);
            while let Some(request) = next.take() {
                match request {
                    Request::Append(job) => batch.push(job),
                    Request::Checkpoint(reply) => checkpoint_requests.push(reply),
                }
                if batch.len() < MAX_BATCH {
                    next = receiver.try_recv().ok();
                }
            }
            if !checkpoint_requests.is_empty() {
                // Asked for explicitly: this commit carries one.
                self.last_checkpoint = None;
            }
            let results = self.commit(&batch);
            for (job, result) in batch.drain(..).zip(results) {
                // A requester that gave up has nothing to be told.
                let _ = job.reply.send(result);
            }
            for reply in checkpoint_requests.drain(..) {
                let answer = match &self.failure {
                    None => Ok(self.checkpointed_seq),
                    Some(failure) => Err(Error::Unavailable(failure.reason.clone())),
                };
                let _ = reply.send(answer);
            }
        }
        // Every handle is gone: vouch for the final head so a clean shutdown leaves
        // nothing unsigned.
        if self.failure.is_none() {
            self.last_checkpoint = None;
            let _ = self.commit(&[]);
        }
    }

    fn checkpoint_due(&self) -> bool {
        self.options.signer.is_some()
            && self
                .last_checkpoint
                .is_none_or(|at| at.elapsed() >= self.options.checkpoint_interval)
    }

    fn rotation_due(&self) -> bool {
        self.segment_bytes >= self.options.max_segment_bytes
            || (self.segment_bytes > 0
                && self.segment_started.elapsed() >= self.options.max_segment_age)
    }

    /// Writes and fsyncs a batch; every entry gets the same durable-or-not answer.
    fn commit(&mut self, batch: &[Job]) -> Vec<Result<Appended, Error>> {
        if self.failure.is_some()
            && let Err(error) = self.recover()
        {
            return batch.iter().map(|_| Err(error.clone())).collect();
        }
        // A checkpoint alone (an empty batch) closes the segment it signs; only
        // entries start a new one.
        if !batch.is_empty()
            && self.rotation_due()
            && let Err(error) = self.rotate()
        {
            return self.fail(
                format!("cannot start segment {}: {error}", self.segment + 1),
                None,
                batch.len(),
            );
        }
        let mut buffer = String::with_capacity(batch.len() * 1024);
        let mut seq = self.seq;
        let mut last_hash = self.last_hash.clone();
        let mut receipts = Vec::with_capacity(batch.len());
        let mut unsigned = self.unsigned.clone();
        for job in batch {
            seq += 1;
            UnsignedSpan::extend(&mut unsigned, seq, &job.entry.time);
            match chain_line(seq, &last_hash, &job.entry) {
                Ok((line, hash)) => {
                    buffer.push_str(&line);
                    buffer.push('\n');
                    last_hash = hash;
                    receipts.push(Appended { seq });
                }
                Err(error) => return batch.iter().map(|_| Err(error.clone())).collect(),
            }
        }
        // A checkpoint rides along with the batch and its fsync: it signs the head
        // after the batch's last entry and is itself the next entry of the chain.
        let mut checkpoint_line = false;
        if self.checkpoint_due()
            && seq > self.checkpointed_seq
            && let Some(signer) = &self.options.signer
        {
            let now = time::OffsetDateTime::now_utc();
            let signed_at = crate::record::rfc3339(now);
            // The verifier refuses a checkpoint over entries written more than its
            // slack before it (that is what removed checkpoints look like). Entries that
            // waited that long (a crash, a sealed segment, a stalled disk) are reported
            // in an `unsigned_tail` entry instead, which the checkpoint then signs.
            if let Some(span) = unsigned.take_if(|span| !span.fits(now, REPORT_BEFORE_SLACK)) {
                tracing::warn!(
                    from_seq = span.first_seq,
                    to_seq = seq,
                    first_time = span.first_time,
                    "decision log entries waited longer than the verifier's slack for a checkpoint: reported in an `unsigned_tail` entry, not signed"
                );
                let mut entry = Entry::bare(
                    signed_at.clone(),
                    now.unix_timestamp(),
                    String::new(),
                    UNSIGNED_TAIL_KIND,
                    "reported".to_owned(),
                );
                entry.unsigned_tail = Some(UnsignedTailEntry {
                    from_seq: span.first_seq,
                    to_seq: seq,
                    first_time: span.first_time,
                });
                match chain_line(seq + 1, &last_hash, &entry) {
                    Ok((line, hash)) => {
                        buffer.push_str(&line);
                        buffer.push('\n');
                        seq += 1;
                        last_hash = hash;
                    }
                    Err(error) => return batch.iter().map(|_| Err(error.clone())).collect(),
                }
            }
            let generations = self
                .key_generations
                .lock()
                .map(|generations| generations.clone())
                .unwrap_or_default();
            let entry =
                Entry::checkpoint(signer.sign_with(seq, &last_hash, &signed_at, &generations));
            if let Ok((line, hash)) = chain_line(seq + 1, &last_hash, &entry) {
                buffer.push_str(&line);
                buffer.push('\n');
                seq += 1;
                last_hash = hash;
                checkpoint_line = true;
            }
        }
        if buffer.is_empty() {
            return Vec::new();
        }
        let written = self
            .file
            .write_all(buffer.as_bytes())
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.seq = seq;
                self.last_hash = last_hash;
                self.segment_bytes += buffer.len() as u64;
                if checkpoint_line {
                    self.last_checkpoint = Some(Instant::now());
                    self.checkpointed_seq = seq;
                    unsigned = None;
                }
                self.unsigned = unsigned;
                receipts.into_iter().map(Ok).collect()
            }
            // After a failed write or fsync the kernel may have dropped dirty pages;
            // retrying on the same file could "succeed" without the data (fsyncgate),
            // so that segment is sealed and never written again.
            Err(error) => self.fail(
                format!("write to segment {} failed: {error}", self.segment),
                Some(self.segment),
                batch.len(),
            ),
        }
    }

    fn fail(
        &mut self,
        reason: String,
        seal: Option<u64>,
        count: usize,
    ) -> Vec<Result<Appended, Error>> {
        tracing::error!(%reason, "decision log failed; refusing requests until a new segment can be written");
        self.healthy.store(false, Ordering::Relaxed);
        self.problem.set(Some(reason.clone()));
        self.problem.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.failure = Some(Failure {
            reason: reason.clone(),
            seal,
        });
        (0..count)
            .map(|_| Err(Error::Unavailable(reason.clone())))
            .collect()
    }

    /// Seals the failed segment (if not yet done) and opens the next one. Until both
    /// succeed, every append fails.
    fn recover(&mut self) -> Result<(), Error> {
        let Some(failure) = &self.failure else {
            return Ok(());
        };
        let reason = failure.reason.clone();
        if let Some(segment) = failure.seal {
            let marker = FailedMarker {
                segment,
                last_durable_seq: self.seq,
                head: self.last_hash.clone(),
                reason: reason.clone(),
            };
            write_failed_marker(&self.dir, &marker).map_err(|error| {
                Error::Unavailable(format!("{reason}; sealing it failed too: {error}"))
            })?;
            if let Some(failure) = &mut self.failure {
                failure.seal = None;
            }
        }
        self.rotate().map_err(|error| {
            Error::Unavailable(format!(
                "{reason}; cannot start segment {}: {error}",
                self.segment + 1
            ))
        })?;
        tracing::warn!(
            segment = self.segment,
            "decision log writable again; continuing in a new segment"
        );
        self.failure = None;
        self.problem.set(None);
        self.healthy.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let next = self.segment + 1;
        self.file = open_segment(&segment_path(&self.dir, next))?;
        self.segment = next;
        self.segment_bytes = 0;
        self.segment_started = Instant::now();
        // Each segment gets a checkpoint with its first batch.
        self.last_checkpoint = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
