//! The log handle: opening a log directory (the writer lock, the chain head and
//! what a crash left behind) and starting its writer; appends and checkpoints go to
//! the writer thread. May not write lines itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::*;

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
    /// Where the log counts commits and the decisions of durable entries.
    pub metrics: Arc<crate::metrics::Metrics>,
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
            metrics: Arc::default(),
        }
    }
}

/// A receipt that an entry is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's sequence number.
    pub seq: u64,
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
    metrics: Arc<crate::metrics::Metrics>,
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
        let lock = lock_dir(dir, &options.holder)?;
        let wants_checkpoint = options.signer.is_some() || options.key_generations.is_some();
        let Scan {
            head,
            newest_checkpoint,
            unsigned,
            torn_tail,
            segment,
        } = scan(dir, wants_checkpoint)?;
        if let (Some(checkpoint), Some(keyring)) = (&newest_checkpoint, &options.key_generations) {
            check_newest_checkpoint(dir, checkpoint, options.signer.as_ref())?;
            check_key_generations(checkpoint, keyring)?;
        }
        // Checkpoints vouch for what the log has vouched for so far: a keyring ahead of
        // it (a change saved but never logged) is vouched for only after its
        // `unlogged` events are written and the caller raises the generations.
        let vouched = match (&options.key_generations, &newest_checkpoint) {
            (Some(_), Some(checkpoint)) => checkpoint.key_generations.clone(),
            _ => BTreeMap::new(),
        };
        let key_generations = Arc::new(std::sync::Mutex::new(vouched.clone()));
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
        let checkpointed_generations = vouched;
        let metrics = Arc::clone(&options.metrics);
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
            checkpointed_generations,
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
                metrics,
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
        let tally = self.metrics.tally(&entry);
        let (reply, receipt) = oneshot::channel();
        self.sender
            .send(Request::Append(Job { entry, reply }))
            .await
            .map_err(|_| Error::Unavailable("log writer stopped".to_owned()))?;
        let appended = receipt
            .await
            .map_err(|_| Error::Unavailable("log writer stopped".to_owned()))??;
        self.metrics.logged(tally);
        Ok(appended)
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
    /// key change's `key_event` entries are in the log; a checkpoint follows even when
    /// no other entry does).
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

    /// The metrics the log counts into (those of the server that opened it).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }
}

/// Creates the log directory (0700) and takes its writer lock.
fn lock_dir(dir: &Path, holder: &str) -> Result<crate::fsutil::LockFile, Error> {
    let open_error = |path: &Path, reason: String| Error::Open {
        path: path.to_owned(),
        reason,
    };
    crate::fsutil::create_private_dir(dir).map_err(|error| open_error(dir, error.to_string()))?;
    crate::fsutil::LockFile::try_acquire(&dir.join(WRITER_LOCK_FILE), holder, LOCK_PATIENCE)
        .map_err(|error| match error {
            crate::fsutil::LockError::Held { holder, .. } => Error::Locked {
                dir: dir.to_owned(),
                holder: holder.to_string(),
            },
            other => open_error(dir, other.to_string()),
        })
}

/// What a log directory holds, read walking back from the newest segment.
struct Scan {
    /// The chain head.
    head: Option<Head>,
    newest_checkpoint: Option<Checkpoint>,
    /// The entries after the newest checkpoint.
    unsigned: Option<UnsignedSpan>,
    /// The newest segment, when it ends in a torn line.
    torn_tail: Option<PathBuf>,
    /// The segment to write next.
    segment: u64,
}

/// Walks back from the newest segment: the chain head, and (when `wants_checkpoint`:
/// this writer signs or checks the keyring) the newest checkpoint and every entry after
/// it, which may span segments, sealed ones included.
fn scan(dir: &Path, wants_checkpoint: bool) -> Result<Scan, Error> {
    let open_error = |path: &Path, reason: String| Error::Open {
        path: path.to_owned(),
        reason,
    };
    let numbers = segment_numbers(dir).map_err(|error| open_error(dir, error.to_string()))?;
    // Walking back from the newest segment: the chain head, and (when this writer
    // signs or checks the keyring) the newest checkpoint and every entry after it,
    // which may span segments, sealed ones included.
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
    Ok(Scan {
        head,
        newest_checkpoint,
        unsigned,
        torn_tail,
        segment,
    })
}

/// The newest checkpoint's key generations count only if this log's key signed them: a
/// checkpoint planted with another key, or altered, would switch the check off.
fn check_newest_checkpoint(
    dir: &Path,
    checkpoint: &Checkpoint,
    signer: Option<&CheckpointSigner>,
) -> Result<(), Error> {
    let open_error = |path: &Path, reason: String| Error::Open {
        path: path.to_owned(),
        reason,
    };
    let Some(signer) = signer else {
        return Ok(());
    };
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
    })
}
