//! Offline verification of a decision log directory: chain, sequence and hashes.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    ChainFields, GENESIS_HASH, read_failed_marker, segment_numbers, segment_path, split_line,
};

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
    /// Segments sealed after a failed write, with the number of lines in them after
    /// the last acknowledged entry (never acknowledged to any caller, not verified).
    pub failed_segments: Vec<(PathBuf, u64)>,
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
            verify_line(&path, line_number, raw, &mut report)?;
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
    report.entries = fields.seq;
    report.head = hash.to_owned();
    if report.first_time.is_none() {
        report.first_time = Some(fields.time.clone());
    }
    report.last_time = Some(fields.time);
    Ok(())
}
