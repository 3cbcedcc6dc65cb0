//! The writer thread: batches appends, chains and fsyncs them (group commit), signs
//! checkpoints, rotates segments, and fails closed, then recovers in a new segment,
//! when a write fails. The only code that appends to the log.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::*;

/// Why the log is failing, and how often commits failed, for status reporting.
#[derive(Debug, Default)]
pub(super) struct Problem {
    pub(super) reason: std::sync::Mutex<Option<String>>,
    pub(super) failed_commits: std::sync::atomic::AtomicU64,
}

impl Problem {
    pub(super) fn set(&self, reason: Option<String>) {
        if let Ok(mut slot) = self.reason.lock() {
            *slot = reason;
        }
    }
}

pub(super) struct Job {
    pub(super) entry: Entry,
    pub(super) reply: oneshot::Sender<Result<Appended, Error>>,
}

// Nearly every request is an append: boxing it would add an allocation per entry.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    Append(Job),
    /// Sign the current head now (if anything is unsigned); answers the checkpoint's seq.
    Checkpoint(oneshot::Sender<Result<u64, Error>>),
}

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) file: File,
    pub(super) segment: u64,
    pub(super) segment_bytes: u64,
    pub(super) segment_started: Instant,
    pub(super) options: LogOptions,
    /// When the last checkpoint was written; `None` makes the next batch carry one.
    pub(super) last_checkpoint: Option<Instant>,
    /// Sequence number the last checkpoint vouched for.
    pub(super) checkpointed_seq: u64,
    /// Keyring generations the last checkpoint vouched for: new ones get a checkpoint
    /// of their own even when no entry followed it.
    pub(super) checkpointed_generations: BTreeMap<String, u64>,
    pub(super) seq: u64,
    pub(super) last_hash: String,
    pub(super) failure: Option<Failure>,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) problem: Arc<Problem>,
    pub(super) key_generations: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    /// The entries written since the last checkpoint (or `unsigned_tail` report).
    pub(super) unsigned: Option<UnsignedSpan>,
    /// Held for the writer's life: one process appends at a time.
    pub(super) _lock: crate::fsutil::LockFile,
}

/// The lines of one commit being built: the chain continues from the writer's head,
/// which moves only when they are durable.
struct Pending {
    buffer: String,
    seq: u64,
    last_hash: String,
    /// Entries since the last checkpoint, with this commit's.
    unsigned: Option<UnsignedSpan>,
    /// Whether a checkpoint ends the lines, and the generations it vouches for.
    checkpointed: Option<BTreeMap<String, u64>>,
}

impl Pending {
    /// Chains `entry` after the last line; returns its sequence number.
    fn push(&mut self, entry: &Entry) -> Result<u64, Error> {
        let seq = self.seq + 1;
        let (line, hash) = chain_line(seq, &self.last_hash, entry)?;
        self.buffer.push_str(&line);
        self.buffer.push('\n');
        self.seq = seq;
        self.last_hash = hash;
        Ok(seq)
    }
}

/// Why the writer is refusing appends, and what it must do before it may resume.
pub(super) struct Failure {
    pub(super) reason: String,
    /// The segment to seal with a marker (none when opening the next segment failed).
    pub(super) seal: Option<u64>,
}

/// How old the entries a checkpoint signs may be before the writer reports them in
/// an `unsigned_tail` entry instead: the verifier's slack, less a margin for the
/// moments between this check and the verifier's reading of `signed_at`.
pub(super) const REPORT_BEFORE_SLACK: time::Duration =
    super::verify::UNSIGNED_TAIL_SLACK.saturating_sub(time::Duration::seconds(5));

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

impl Writer {
    pub(super) fn run(&mut self, mut receiver: mpsc::Receiver<Request>) {
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

    pub(super) fn checkpoint_due(&self) -> bool {
        self.options.signer.is_some()
            && self
                .last_checkpoint
                .is_none_or(|at| at.elapsed() >= self.options.checkpoint_interval)
    }

    pub(super) fn rotation_due(&self) -> bool {
        self.segment_bytes >= self.options.max_segment_bytes
            || (self.segment_bytes > 0
                && self.segment_started.elapsed() >= self.options.max_segment_age)
    }

    /// Writes and fsyncs a batch; every entry gets the same durable-or-not answer.
    pub(super) fn commit(&mut self, batch: &[Job]) -> Vec<Result<Appended, Error>> {
        let refuse_all = |error: Error| batch.iter().map(|_| Err(error.clone())).collect();
        if self.failure.is_some()
            && let Err(error) = self.recover()
        {
            return refuse_all(error);
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
        let mut pending = Pending {
            buffer: String::with_capacity(batch.len() * 1024),
            seq: self.seq,
            last_hash: self.last_hash.clone(),
            unsigned: self.unsigned.clone(),
            checkpointed: None,
        };
        let mut receipts = Vec::with_capacity(batch.len());
        for job in batch {
            UnsignedSpan::extend(&mut pending.unsigned, pending.seq + 1, &job.entry.time);
            match pending.push(&job.entry) {
                Ok(seq) => receipts.push(Appended { seq }),
                Err(error) => return refuse_all(error),
            }
        }
        if let Err(error) = self.add_checkpoint(&mut pending) {
            return refuse_all(error);
        }
        if pending.buffer.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        match self.write(pending) {
            Ok(()) => {
                self.options
                    .metrics
                    .log()
                    .committed(receipts.len(), started.elapsed());
                receipts.into_iter().map(Ok).collect()
            }
            // After a failed write or fsync the kernel may have dropped dirty pages;
            // retrying on the same file could "succeed" without the data (fsyncgate),
            // so that segment is sealed and never written again.
            Err(error) => {
                self.options.metrics.log().write_failed();
                self.fail(
                    format!("write to segment {} failed: {error}", self.segment),
                    Some(self.segment),
                    batch.len(),
                )
            }
        }
    }

    /// When a checkpoint is due, adds it to `pending`: it rides along with the batch
    /// and its fsync, signs the head after the batch's last entry and is itself the
    /// next entry of the chain. Entries that waited longer than the verifier's slack
    /// are first reported in an `unsigned_tail` entry instead of being signed.
    fn add_checkpoint(&self, pending: &mut Pending) -> Result<(), Error> {
        let Some(signer) = &self.options.signer else {
            return Ok(());
        };
        let generations = self
            .key_generations
            .lock()
            .map(|generations| generations.clone())
            .unwrap_or_default();
        let nothing_new =
            pending.seq <= self.checkpointed_seq && generations == self.checkpointed_generations;
        if !self.checkpoint_due() || nothing_new {
            return Ok(());
        }
        let now = time::OffsetDateTime::now_utc();
        let signed_at = crate::record::rfc3339(now);
        // The verifier refuses a checkpoint over entries written more than its slack
        // before it (that is what removed checkpoints look like). Entries that waited
        // that long (a crash, a sealed segment, a stalled disk) are reported instead.
        if let Some(span) = pending
            .unsigned
            .take_if(|span| !span.fits(now, REPORT_BEFORE_SLACK))
        {
            tracing::warn!(
                from_seq = span.first_seq,
                to_seq = pending.seq,
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
                to_seq: pending.seq,
                first_time: span.first_time,
            });
            pending.push(&entry)?;
        }
        let checkpoint =
            signer.sign_with(pending.seq, &pending.last_hash, &signed_at, &generations);
        // A checkpoint that cannot be written is left for the next batch.
        if pending.push(&Entry::checkpoint(checkpoint)).is_ok() {
            pending.checkpointed = Some(generations);
        }
        Ok(())
    }

    /// Writes and fsyncs the lines of `pending`; on success they are the new head.
    fn write(&mut self, pending: Pending) -> std::io::Result<()> {
        self.file
            .write_all(pending.buffer.as_bytes())
            .and_then(|()| self.file.sync_data())?;
        self.seq = pending.seq;
        self.last_hash = pending.last_hash;
        self.segment_bytes += pending.buffer.len() as u64;
        self.unsigned = pending.unsigned;
        if let Some(generations) = pending.checkpointed {
            self.checkpointed_generations = generations;
            self.last_checkpoint = Some(Instant::now());
            self.checkpointed_seq = pending.seq;
            self.unsigned = None;
        }
        Ok(())
    }

    pub(super) fn fail(
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
    pub(super) fn recover(&mut self) -> Result<(), Error> {
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
            self.options.metrics.log().segment_sealed();
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

    pub(super) fn rotate(&mut self) -> std::io::Result<()> {
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
