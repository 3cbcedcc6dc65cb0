use std::fs;
use std::path::Path;

pub(super) use super::*;

pub(super) fn entry(n: usize) -> Entry {
    Entry {
        // Written now, as the writer would see it (checkpoints sign within seconds).
        time: crate::record::rfc3339_now(),
        request_time: 1_790_000_000,
        request_id: format!("req-{n}"),
        kind: "decrypt".to_owned(),
        service: Some("us-support-tool".to_owned()),
        principal: Some("Employee::\"alice\"".to_owned()),
        authentication: "test".to_owned(),
        action: Some("decrypt".to_owned()),
        purpose: "support".to_owned(),
        ticket: "INC-1".to_owned(),
        record: Some(RecordEntry {
            subject: None,
            record_type: "user_profile".to_owned(),
            record_id: format!("u-{n}"),
            jurisdiction: "US".to_owned(),
        }),
        policy_set: Some("ab".repeat(32)),
        fields: vec![FieldEntry {
            field: "email".to_owned(),
            classification: "pii".to_owned(),
            decision: "allow".to_owned(),
            policies: vec!["p".to_owned()],
            errors: vec![],
            key_version: Some(1),
            outcome: "decrypt".to_owned(),
        }],
        outcome: "decided".to_owned(),
        checkpoint: None,
        key_event: None,
        unsigned_tail: None,
        key_admin: None,
    }
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub(super) fn write_entries(dir: &Path, count: usize, segment_bytes: u64) -> OpenState {
    let runtime = runtime();
    let (log, state) = DecisionLog::open_with_segment_size(dir, segment_bytes).unwrap();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..count {
            let log = log.clone();
            tasks.push(tokio::spawn(
                async move { log.append(entry(n)).await.unwrap() },
            ));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap().seq);
        }
        seqs.sort_unstable();
        let first = state.last_seq + 1;
        assert_eq!(seqs, (first..first + count as u64).collect::<Vec<_>>());
    });
    state
}

pub(super) fn lines_of(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub(super) fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

pub(super) fn signer() -> CheckpointSigner {
    CheckpointSigner::from_seed(&[3u8; 32])
}

pub(super) fn public_key() -> CheckpointVerifier {
    CheckpointVerifier::from_pem(&signer().public_key_pem().unwrap()).unwrap()
}

/// Appends `count` entries one after another (one commit each) with a checkpoint in
/// every commit, then closes the log (which signs the final head).
pub(super) fn write_signed(dir: &Path, count: usize, max_segment_bytes: u64) {
    let runtime = runtime();
    let (log, _) = DecisionLog::open_with(
        dir,
        LogOptions {
            max_segment_bytes,
            checkpoint_interval: std::time::Duration::ZERO,
            signer: Some(signer()),
            ..LogOptions::default()
        },
    )
    .unwrap();
    runtime.block_on(async {
        for n in 0..count {
            log.append(entry(n)).await.unwrap();
        }
        log.checkpoint().await.unwrap();
    });
}

pub(super) fn with_key() -> VerifyOptions {
    VerifyOptions {
        public_key: Some(public_key()),
        saved_checkpoint: None,
    }
}

/// Re-chains `lines` from their bodies as an attacker with the old key would not be
/// able to, but one with `forger` can: recomputed hashes, re-signed checkpoints.
pub(super) fn rechain(lines: &[String], forger: Option<&CheckpointSigner>) -> Vec<String> {
    let mut prev = GENESIS_HASH.to_owned();
    let mut out = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let mut entry: Entry = serde_json::from_str(line).unwrap();
        let seq = index as u64 + 1;
        if let (Some(checkpoint), Some(forger)) = (&entry.checkpoint, forger) {
            entry.checkpoint = Some(forger.sign(seq - 1, &prev, &checkpoint.signed_at));
        }
        let (line, hash) = chain_line(seq, &prev, &entry).unwrap();
        out.push(line);
        prev = hash;
    }
    out
}

pub(super) fn split_prev(line: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value["prev_hash"].as_str().unwrap().to_owned()
}

/// Appends `entry` to the last segment, chained to its last line, as a writer that
/// crashed (or a forger) would leave it; returns its seq.
pub(super) fn append_chained(dir: &Path, entry: &Entry) -> u64 {
    let numbers = segment_numbers(dir).unwrap();
    let segment = segment_path(dir, *numbers.last().unwrap());
    let mut lines = lines_of(&segment);
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let seq = last["seq"].as_u64().unwrap() + 1;
    let (line, _) = chain_line(seq, last["hash"].as_str().unwrap(), entry).unwrap();
    lines.push(line);
    write_lines(&segment, &lines);
    seq
}

pub(super) fn at(offset_seconds: i64) -> String {
    crate::record::rfc3339(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(offset_seconds),
    )
}

pub(super) fn verify_signed(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
    verify_with(
        dir,
        &VerifyOptions {
            public_key: Some(public_key()),
            saved_checkpoint: None,
        },
    )
}

/// Reopens the log in `dir` with the checkpoint key and closes it again (the restart
/// signs, or reports, what it inherited).
pub(super) fn restart_signed(dir: &Path) {
    let (log, _) = DecisionLog::open_with(
        dir,
        LogOptions {
            signer: Some(signer()),
            ..LogOptions::default()
        },
    )
    .unwrap();
    log.close();
}

mod chain;
mod checkpoints;
mod unsigned_tail;
