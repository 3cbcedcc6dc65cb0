//! Offline verification of a decision log directory: chain, sequence and hashes.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    CHECKPOINT_KIND, ChainFields, CheckpointVerifier, GENESIS_HASH, read_failed_marker,
    segment_numbers, segment_path, split_line,
};

/// What to check besides the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Check every checkpoint's signature with this key; require at least one
    /// checkpoint in a non-empty log.
    pub public_key: Option<CheckpointVerifier>,
    /// A checkpoint line saved earlier (as `audit checkpoint` prints it): the log must
    /// still contain it, unchanged. Detects truncation and rewriting back to it.
    pub saved_checkpoint: Option<String>,
}

/// A saved checkpoint line, parsed.
#[derive(Debug, Clone)]
struct Saved {
    seq: u64,
    hash: String,
}

fn parse_saved(line: &str, public_key: Option<&CheckpointVerifier>) -> Result<Saved, String> {
    let line = line.trim();
    let (body, hash) =
        split_line(line).ok_or_else(|| "the saved checkpoint is not a log line".to_owned())?;
    if hex::encode(Sha256::digest(body.as_bytes())) != hash {
        return Err("the saved checkpoint line is altered (hash mismatch)".to_owned());
    }
    let fields: ChainFields = serde_json::from_str(&body)
        .map_err(|error| format!("the saved checkpoint line: {error}"))?;
    let Some(checkpoint) = fields.checkpoint.filter(|_| fields.kind == CHECKPOINT_KIND) else {
        return Err("the saved line is not a checkpoint entry".to_owned());
    };
    if let Some(key) = public_key {
        key.check(&checkpoint)
            .map_err(|problem| format!("the saved checkpoint: {problem}"))?;
    }
    Ok(Saved {
        seq: fields.seq,
        hash: hash.to_owned(),
    })
}
/// Summary of an intact log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Entries verified.
    pub entries: u64,
    /// Segments read.
    pub segments: usize,
    /// Time of the first entry.
    pub first_time: Option<String>,
    /// Time of the last entry.
    pub last_time: Option<String>,
    /// Hash of the last entry: the chain head.
    pub head: String,
    /// Segments that end in a torn (incomplete) line, left by a crash mid-write.
    pub torn_tails: Vec<PathBuf>,
    /// Segments sealed after a failed write, with the number of lines in them after
    /// the last acknowledged entry (never acknowledged to any caller, not verified).
    pub failed_segments: Vec<(PathBuf, u64)>,
    /// Checkpoint entries found (each links to the head before it).
    pub checkpoints: u64,
    /// Keyring changes (`key_event` entries) verified.
    pub key_events: u64,
    /// Whether their signatures were checked (a public key was given).
    pub signatures_checked: bool,
    /// Sequence number of the last checkpoint entry.
    pub last_checkpoint: Option<u64>,
    /// When the last checkpoint was signed.
    pub last_checkpoint_signed_at: Option<String>,
    /// Entries after the last checkpoint: not yet vouched for by a signature (a crash,
    /// or entries written since the last checkpoint).
    pub unsigned_tail: u64,
    /// Sequence number of the saved checkpoint that was found intact, if one was given.
    pub saved_checkpoint: Option<u64>,
    /// Unsigned tails the writer found older than the slack and reported
    /// (`unsigned_tail` entries) instead of signing them: (first seq, last seq).
    pub reported_unsigned: Vec<(u64, u64)>,
    /// The first entry (seq, time) not yet vouched for by a checkpoint, format 2 only.
    #[serde(skip)]
    pending_unsigned: Option<super::writer::UnsignedSpan>,
}

/// The first problem found, located by segment, line and sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: line {line}{}: {problem}", segment.display(), seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct VerifyFailure {
    /// The segment file.
    pub segment: PathBuf,
    /// 1-based line within the segment (0 for problems with the segment itself).
    pub line: u64,
    /// Sequence number of the bad entry, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

/// Verifies every segment in `dir`: each line's hash, each `prev_hash` link, and
/// sequence numbers without gaps, duplicates or reordering across segments; each
/// checkpoint links to the head before it.
pub fn verify(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
    verify_with(dir, &VerifyOptions::default())
}

/// As [`verify`], also checking checkpoint signatures and a saved checkpoint.
pub fn verify_with(dir: &Path, options: &VerifyOptions) -> Result<VerifyReport, VerifyFailure> {
    let saved = options
        .saved_checkpoint
        .as_deref()
        .map(|line| parse_saved(line, options.public_key.as_ref()))
        .transpose()
        .map_err(|problem| VerifyFailure {
            segment: dir.to_owned(),
            line: 0,
            seq: None,
            problem,
        })?;
    let check = Checks {
        public_key: options.public_key.as_ref(),
        saved: saved.as_ref(),
    };
    let mut report = verify_chain(dir, &check)?;
    report.signatures_checked = options.public_key.is_some();
    report.unsigned_tail = report.entries - report.last_checkpoint.unwrap_or(0);
    let end = |problem: String| VerifyFailure {
        segment: dir.to_owned(),
        line: 0,
        seq: Some(report.entries),
        problem,
    };
    if let Some(saved) = &saved
        && report.saved_checkpoint.is_none()
    {
        return Err(end(format!(
            "the log ends at seq {} but the saved checkpoint is at seq {}: entries after seq {} were truncated",
            report.entries, saved.seq, report.entries
        )));
    }
    if options.public_key.is_some() && report.entries > 0 && report.checkpoints == 0 {
        return Err(end(
            "no signed checkpoint in the log: nothing vouches for it".to_owned(),
        ));
    }
    // The writer signs the head at least every second while entries come in, with the
    // entries in one write: unsigned entries timed well after the last checkpoint mean
    // later checkpoints were removed. A torn last line changes nothing: a real crash
    // leaves at most a second or two unsigned.
    if options.public_key.is_some()
        && report.unsigned_tail > 0
        && let (Some(signed), Some(last)) = (
            report
                .last_checkpoint_signed_at
                .as_deref()
                .and_then(parse_time),
            report.last_time.as_deref().and_then(parse_time),
        )
        && last - signed > UNSIGNED_TAIL_SLACK
    {
        return Err(end(format!(
            "the last {} entries are unsigned and end {} s after the last checkpoint (seq {}): checkpoints after it were removed, or the entries were added later",
            report.unsigned_tail,
            (last - signed).whole_seconds(),
            report.last_checkpoint.unwrap_or_default()
        )));
    }
    Ok(report)
}

/// How far unsigned entries may run past the last checkpoint (the writer checkpoints
/// every second while it writes; this leaves room for slow disks and clock steps).
pub const UNSIGNED_TAIL_SLACK: time::Duration = time::Duration::seconds(30);

fn parse_time(text: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

struct Checks<'a> {
    public_key: Option<&'a CheckpointVerifier>,
    saved: Option<&'a Saved>,
}

fn verify_chain(dir: &Path, check: &Checks<'_>) -> Result<VerifyReport, VerifyFailure> {
    let fail = |segment: &Path, line: u64, seq: Option<u64>, problem: String| VerifyFailure {
        segment: segment.to_owned(),
        line,
        seq,
        problem,
    };
    let numbers = segment_numbers(dir).map_err(|error| fail(dir, 0, None, error.to_string()))?;
    let mut report = VerifyReport {
        head: GENESIS_HASH.to_owned(),
        ..VerifyReport::default()
    };
    for (expected_segment, number) in (1..).zip(numbers) {
        let path = segment_path(dir, number);
        if number != expected_segment {
            return Err(fail(
                &segment_path(dir, expected_segment),
                0,
                None,
                format!("segment {expected_segment} is missing"),
            ));
        }
        report.segments += 1;
        let marker =
            read_failed_marker(dir, number).map_err(|problem| fail(&path, 0, None, problem))?;
        if let Some(marker) = &marker {
            if marker.segment != number || marker.last_durable_seq < report.entries {
                return Err(fail(
                    &path,
                    0,
                    None,
                    "failure marker does not match the entries before this segment".to_owned(),
                ));
            }
            if marker.last_durable_seq == report.entries {
                // Nothing in this segment was ever acknowledged; it need not be readable.
                if marker.head != report.head {
                    return Err(fail(
                        &path,
                        0,
                        None,
                        "failure marker head does not match the chain".to_owned(),
                    ));
                }
                report.failed_segments.push((path.clone(), 0));
                continue;
            }
        }
        let is_file = std::fs::metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false);
        if !is_file {
            return Err(fail(&path, 0, None, "not a regular file".to_owned()));
        }
        let bytes =
            std::fs::read(&path).map_err(|error| fail(&path, 0, None, error.to_string()))?;
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // Text after the last newline is a line whose write never completed.
        if lines.pop().is_some_and(|last| !last.is_empty()) && marker.is_none() {
            report.torn_tails.push(path.clone());
        }
        let total = lines.len() as u64;
        for (index, raw) in lines.into_iter().enumerate() {
            let line_number = index as u64 + 1;
            if let Some(marker) = &marker
                && report.entries == marker.last_durable_seq
            {
                // The rest was written by the failed batch and never acknowledged.
                report
                    .failed_segments
                    .push((path.clone(), total - index as u64));
                break;
            }
            verify_line(&path, line_number, raw, &mut report, check)?;
        }
        if let Some(marker) = &marker {
            if report.entries != marker.last_durable_seq || report.head != marker.head {
                return Err(fail(
                    &path,
                    total,
                    None,
                    format!(
                        "segment ends before seq {}, its last acknowledged entry: entries deleted",
                        marker.last_durable_seq
                    ),
                ));
            }
            if report
                .failed_segments
                .last()
                .is_none_or(|(last, _)| last != &path)
            {
                report.failed_segments.push((path.clone(), 0));
            }
        }
    }
    Ok(report)
}

/// Checks one complete line against the chain so far and advances it.
fn verify_line(
    path: &Path,
    line_number: u64,
    raw: &[u8],
    report: &mut VerifyReport,
    check: &Checks<'_>,
) -> Result<(), VerifyFailure> {
    let fail = |seq: Option<u64>, problem: String| VerifyFailure {
        segment: path.to_owned(),
        line: line_number,
        seq,
        problem,
    };
    let expected_seq = report.entries + 1;
    let text =
        std::str::from_utf8(raw).map_err(|_| fail(None, "not UTF-8: entry altered".to_owned()))?;
    let (body, hash) = split_line(text)
        .ok_or_else(|| fail(None, "not a chained entry (no trailing hash)".to_owned()))?;
    let fields: Result<ChainFields, _> = serde_json::from_str(&body);
    let seq = fields.as_ref().ok().map(|f| f.seq);
    if hex::encode(Sha256::digest(body.as_bytes())) != hash {
        return Err(fail(seq, "hash mismatch: entry altered".to_owned()));
    }
    let fields = fields.map_err(|error| fail(None, error.to_string()))?;
    // Entries before format 2 carry no `format`; a newer one needs a newer verifier.
    if let Some(problem) = fields.format_problem() {
        return Err(fail(Some(fields.seq), problem));
    }
    if fields.seq != expected_seq {
        return Err(fail(
            Some(fields.seq),
            format!("expected seq {expected_seq}: entries deleted, duplicated or reordered"),
        ));
    }
    if fields.prev_hash != report.head {
        return Err(fail(
            Some(fields.seq),
            format!("prev_hash does not link to seq {}", report.entries),
        ));
    }
    if fields.kind == super::UNSIGNED_TAIL_KIND {
        // The writer's report of entries it would not vouch for.
        if let Some(span) = report.pending_unsigned.take() {
            report
                .reported_unsigned
                .push((span.first_seq, report.entries));
        }
    } else if fields.kind != CHECKPOINT_KIND && fields.format.is_some() {
        super::writer::UnsignedSpan::extend(&mut report.pending_unsigned, fields.seq, &fields.time);
    }
    if fields.kind == CHECKPOINT_KIND {
        let Some(checkpoint) = &fields.checkpoint else {
            return Err(fail(
                Some(fields.seq),
                "checkpoint entry without a signature".to_owned(),
            ));
        };
        if checkpoint.seq != report.entries || checkpoint.head != report.head {
            return Err(fail(
                Some(fields.seq),
                format!(
                    "checkpoint vouches for seq {} but follows seq {}: checkpoint moved or chain rewritten",
                    checkpoint.seq, report.entries
                ),
            ));
        }
        if let Some(key) = check.public_key {
            key.check(checkpoint)
                .map_err(|problem| fail(Some(fields.seq), format!("checkpoint {problem}")))?;
            // The writer signs within a second of writing; a checkpoint over entries
            // written long before it signs what no one vouched for when it was written
            // (checkpoints removed and entries added later, or a restart over an old
            // tail that did not report it).
            if let Some(span) = report.pending_unsigned.take()
                && !parse_time(&checkpoint.signed_at)
                    .is_some_and(|signed| span.fits(signed, UNSIGNED_TAIL_SLACK))
            {
                return Err(fail(
                    Some(fields.seq),
                    format!(
                        "this checkpoint signs entries from seq {} written more than {} s before or after it: checkpoints were removed and entries added later, or a restart signed an old unsigned tail without reporting it",
                        span.first_seq,
                        UNSIGNED_TAIL_SLACK.whole_seconds()
                    ),
                ));
            }
        }
        report.pending_unsigned = None;
        report.checkpoints += 1;
        report.last_checkpoint = Some(fields.seq);
        report.last_checkpoint_signed_at = Some(checkpoint.signed_at.clone());
    } else if fields.checkpoint.is_some() {
        return Err(fail(
            Some(fields.seq),
            format!("a `{}` entry carries a checkpoint", fields.kind),
        ));
    }
    if fields.kind == super::KEY_EVENT_KIND {
        report.key_events += 1;
    }
    if let Some(saved) = check.saved
        && saved.seq == fields.seq
    {
        if saved.hash != hash {
            return Err(fail(
                Some(fields.seq),
                "differs from the saved checkpoint: the log was rewritten".to_owned(),
            ));
        }
        report.saved_checkpoint = Some(fields.seq);
    }
    report.entries = fields.seq;
    report.head = hash.to_owned();
    if report.first_time.is_none() {
        report.first_time = Some(fields.time.clone());
    }
    report.last_time = Some(fields.time);
    Ok(())
}
