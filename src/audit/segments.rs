//! The log's files on disk: segment names and listing, the `.failed` markers of
//! sealed segments, and reading a segment's head (last entry, last checkpoint, key
//! generations). May not append.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::*;

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

pub(super) fn write_failed_marker(dir: &Path, marker: &FailedMarker) -> std::io::Result<()> {
    let text = serde_json::to_string(marker).map_err(std::io::Error::other)?;
    // Whole or not at all: a marker torn by a crash would keep `serve` from starting.
    crate::fsutil::write_private_file(&failed_marker_path(dir, marker.segment), text.as_bytes())
}

pub(super) fn open_segment(path: &Path) -> std::io::Result<File> {
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

/// Longest line accepted when reading a segment back; entries are far smaller.
pub const MAX_LINE_BYTES: u64 = 16 * 1024 * 1024;

/// The last entry of a segment.
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) hash: String,
    /// Whether it is a checkpoint.
    pub(super) signed: bool,
}

/// What reading one segment found.
#[derive(Default)]
pub(super) struct SegmentEnd {
    pub(super) head: Option<Head>,
    pub(super) torn: bool,
    pub(super) checkpoint: Option<Checkpoint>,
    /// The first entry (seq, time) after the segment's last checkpoint (or its first
    /// entry when it has none).
    pub(super) first_unsigned: Option<UnsignedSpan>,
}

/// The chain head in one segment, whether its end is torn, and its last checkpoint.
/// With `until` (a sealed segment's last acknowledged seq) the lines after it, which
/// no one acknowledged, are not read.
pub(super) fn segment_head(path: &Path, until: Option<u64>) -> Result<SegmentEnd, String> {
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
