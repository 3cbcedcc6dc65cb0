//! Offline verification of a decision log directory: chain, sequence and hashes.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{ChainFields, GENESIS_HASH, segment_numbers, segment_path, split_line};

/// Summary of an intact log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
/// sequence numbers without gaps, duplicates or reordering across segments.
pub fn verify(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
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
        let bytes =
            std::fs::read(&path).map_err(|error| fail(&path, 0, None, error.to_string()))?;
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // Text after the last newline is a line whose write never completed.
        if lines.pop().is_some_and(|last| !last.is_empty()) {
            report.torn_tails.push(path.clone());
        }
        for (index, raw) in lines.into_iter().enumerate() {
            let line_number = index as u64 + 1;
            let expected_seq = report.entries + 1;
            let text = std::str::from_utf8(raw).map_err(|_| {
                fail(
                    &path,
                    line_number,
                    None,
                    "not UTF-8: entry altered".to_owned(),
                )
            })?;
            let (body, hash) = split_line(text).ok_or_else(|| {
                fail(
                    &path,
                    line_number,
                    None,
                    "not a chained entry (no trailing hash)".to_owned(),
                )
            })?;
            let fields: Result<ChainFields, _> = serde_json::from_str(&body);
            let seq = fields.as_ref().ok().map(|f| f.seq);
            if hex::encode(Sha256::digest(body.as_bytes())) != hash {
                return Err(fail(
                    &path,
                    line_number,
                    seq,
                    "hash mismatch: entry altered".to_owned(),
                ));
            }
            let fields =
                fields.map_err(|error| fail(&path, line_number, None, error.to_string()))?;
            if fields.seq != expected_seq {
                return Err(fail(
                    &path,
                    line_number,
                    Some(fields.seq),
                    format!(
                        "expected seq {expected_seq}: entries deleted, duplicated or reordered"
                    ),
                ));
            }
            if fields.prev_hash != report.head {
                return Err(fail(
                    &path,
                    line_number,
                    Some(fields.seq),
                    format!("prev_hash does not link to seq {}", report.entries),
                ));
            }
            report.entries = fields.seq;
            report.head = hash.to_owned();
            if report.first_time.is_none() {
                report.first_time = Some(fields.time.clone());
            }
            report.last_time = Some(fields.time);
        }
    }
    Ok(report)
}
