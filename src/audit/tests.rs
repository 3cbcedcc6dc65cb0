use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

fn entry(n: usize) -> Entry {
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
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn write_entries(dir: &Path, count: usize, segment_bytes: u64) -> OpenState {
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

#[test]
fn concurrent_appends_chain_and_verify_across_restarts_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    // Each round is one or more group commits; a segment fills up after the first.
    for round in 0..4u64 {
        let state = write_entries(dir.path(), 20, 4096);
        assert_eq!(state.last_seq, round * 20);
    }
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.entries, 80);
    assert!(report.segments > 2, "rotation by size: {report:?}");
    assert!(report.torn_tails.is_empty());
}

#[test]
fn chain_line_round_trips() {
    let (line, hash) = chain_line(7, GENESIS_HASH, &entry(1)).unwrap();
    let (body, claimed) = split_line(&line).unwrap();
    assert_eq!(claimed, hash);
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["seq"], 7);
    assert_eq!(value["hash"], hash.as_str());
    assert!(body.ends_with("\"outcome\":\"decided\"}"), "{body}");
}

fn lines_of(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn tampering_is_detected_and_located() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 6, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let original = lines_of(&segment);

    let cases: Vec<(&str, Vec<String>, u64)> = vec![
        (
            "edit",
            {
                let mut lines = original.clone();
                lines[2] = lines[2].replace("alice", "alicf");
                lines
            },
            3,
        ),
        (
            "delete",
            {
                let mut lines = original.clone();
                lines.remove(3);
                lines
            },
            4,
        ),
        (
            "swap",
            {
                let mut lines = original.clone();
                lines.swap(1, 2);
                lines
            },
            2,
        ),
        (
            "rehash after edit",
            {
                // An attacker who recomputes the edited entry's own hash still breaks the link.
                let mut lines = original.clone();
                let (body, _) = split_line(&lines[2]).unwrap();
                let edited = body.replace("alice", "alicf");
                let hash = hex::encode(Sha256::digest(edited.as_bytes()));
                lines[2] = format!("{},\"hash\":\"{hash}\"}}", &edited[..edited.len() - 1]);
                lines
            },
            4,
        ),
    ];
    for (what, lines, bad_line) in cases {
        write_lines(&segment, &lines);
        let failure = verify(dir.path()).unwrap_err();
        assert_eq!(failure.line, bad_line, "{what}: {failure}");
        assert_eq!(failure.segment, segment, "{what}");
    }
}

#[test]
fn torn_tail_is_reported_and_the_writer_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 3, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let mut text = fs::read_to_string(&segment).unwrap();
    text.push_str("{\"seq\":4,\"prev_h");
    fs::write(&segment, &text).unwrap();
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.torn_tails, vec![segment.clone()]);

    let state = write_entries(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    assert_eq!(state.torn_tail, Some(segment.clone()));
    assert_eq!(state.segment, 2);
    assert_eq!(
        fs::read_to_string(&segment).unwrap(),
        text,
        "torn segment left untouched"
    );
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.entries, 5);
    assert_eq!(report.segments, 2);
}

#[test]
fn a_missing_segment_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        write_entries(dir.path(), 10, 2048);
    }
    fs::remove_file(segment_path(dir.path(), 2)).unwrap();
    let failure = verify(dir.path()).unwrap_err();
    assert!(
        failure.problem.contains("segment 2 is missing"),
        "{failure}"
    );
}

#[cfg(unix)]
#[test]
fn a_failed_write_fails_closed_then_resumes_in_a_new_segment() {
    // /dev/full accepts opens and fails every write with ENOSPC.
    if !Path::new("/dev/full").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    // A zero segment size rotates before every batch: the first batch goes to segment 2,
    // which is /dev/full.
    let (log, _) = DecisionLog::open_with_segment_size(dir.path(), 0).unwrap();
    std::os::unix::fs::symlink("/dev/full", segment_path(dir.path(), 2)).unwrap();
    runtime.block_on(async {
        let error = log.append(entry(1)).await.unwrap_err();
        assert!(
            error.to_string().contains("decision log unavailable"),
            "{error}"
        );
        assert!(!log.is_healthy());
        // The next append seals segment 2 and continues in a fresh segment.
        let appended = log.append(entry(2)).await.unwrap();
        assert_eq!(appended.seq, 1, "the failed entry was never acknowledged");
        assert!(log.is_healthy());
    });
    let marker = read_failed_marker(dir.path(), 2).unwrap().unwrap();
    assert_eq!(marker.last_durable_seq, 0);
    assert_eq!(marker.head, GENESIS_HASH);
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.entries, 1);
    assert_eq!(report.failed_segments.len(), 1);
    // A restart continues the chain after the sealed segment.
    drop(log);
    let state = write_entries(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    assert_eq!(state.last_seq, 1);
    assert_eq!(verify(dir.path()).unwrap().entries, 3);
}

#[test]
fn entries_after_the_last_acknowledged_one_in_a_sealed_segment_are_not_chained() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 4, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let lines = lines_of(&segment);
    let (_, head_of_2) = split_line(&lines[1]).unwrap();
    // As if the batch holding seq 3 and 4 failed its fsync: sealed after seq 2.
    let marker = FailedMarker {
        segment: 1,
        last_durable_seq: 2,
        head: head_of_2.to_owned(),
        reason: "test".to_owned(),
    };
    fs::write(
        failed_marker_path(dir.path(), 1),
        serde_json::to_string(&marker).unwrap(),
    )
    .unwrap();
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.entries, 2);
    assert_eq!(report.failed_segments, vec![(segment.clone(), 2)]);
    // The writer continues from seq 2 in segment 2.
    let state = write_entries(dir.path(), 1, DEFAULT_SEGMENT_BYTES);
    assert_eq!((state.last_seq, state.segment), (2, 2));
    assert_eq!(verify(dir.path()).unwrap().entries, 3);
    // Deleting an acknowledged entry of the sealed segment is still detected.
    write_lines(&segment, &lines[..1]);
    let failure = verify(dir.path()).unwrap_err();
    assert!(failure.problem.contains("entries deleted"), "{failure}");
}

fn signer() -> CheckpointSigner {
    CheckpointSigner::from_seed(&[3u8; 32])
}

fn public_key() -> CheckpointVerifier {
    CheckpointVerifier::from_pem(&signer().public_key_pem().unwrap()).unwrap()
}

/// Appends `count` entries one after another (one commit each) with a checkpoint in
/// every commit, then closes the log (which signs the final head).
fn write_signed(dir: &Path, count: usize, max_segment_bytes: u64) {
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

fn with_key() -> VerifyOptions {
    VerifyOptions {
        public_key: Some(public_key()),
        saved_checkpoint: None,
    }
}

#[test]
fn checkpoints_are_chained_signed_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 3, DEFAULT_SEGMENT_BYTES);
    let lines = lines_of(&segment_path(dir.path(), 1));
    // entry, checkpoint, entry, checkpoint, entry, checkpoint.
    let kinds: Vec<String> = lines
        .iter()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "decrypt",
            "checkpoint",
            "decrypt",
            "checkpoint",
            "decrypt",
            "checkpoint"
        ]
    );
    let report = verify_with(dir.path(), &with_key()).unwrap();
    assert_eq!((report.entries, report.checkpoints), (6, 3));
    assert_eq!((report.last_checkpoint, report.unsigned_tail), (Some(6), 0));
    assert!(report.signatures_checked);
    // Without a key the chain still verifies; signatures are not claimed.
    let unkeyed = verify(dir.path()).unwrap();
    assert!(!unkeyed.signatures_checked);
    // A log with entries and no checkpoint does not pass a keyed verification.
    let plain = tempfile::tempdir().unwrap();
    write_entries(plain.path(), 2, DEFAULT_SEGMENT_BYTES);
    let failure = verify_with(plain.path(), &with_key()).unwrap_err();
    assert!(
        failure.problem.contains("no signed checkpoint"),
        "{failure}"
    );
}

/// Re-chains `lines` from their bodies as an attacker with the old key would not be
/// able to, but one with `forger` can: recomputed hashes, re-signed checkpoints.
fn rechain(lines: &[String], forger: Option<&CheckpointSigner>) -> Vec<String> {
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

#[test]
fn tampering_with_a_signed_log_is_detected_with_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 4, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let original = lines_of(&segment);
    assert_eq!(original.len(), 8);

    // Rewriting an entry and recomputing every hash after it: the checkpoints after the
    // edit vouch for heads that no longer exist.
    let mut edited = original.clone();
    edited[2] = edited[2].replace("\"request_id\":\"req-1\"", "\"request_id\":\"rX\"");
    assert_ne!(edited[2], original[2]);
    write_lines(&segment, &rechain(&edited, None));
    let failure = verify_with(dir.path(), &with_key()).unwrap_err();
    assert_eq!((failure.line, failure.seq), (4, Some(4)), "{failure}");
    assert!(failure.problem.contains("checkpoint"), "{failure}");

    // Deleting an entry and re-chaining: same.
    let mut deleted = original.clone();
    deleted.remove(0);
    write_lines(&segment, &rechain(&deleted, None));
    assert!(verify_with(dir.path(), &with_key()).is_err());

    // Re-signing every checkpoint with another key: the chain is consistent, the
    // signatures are not the auditor's.
    let forger = CheckpointSigner::from_seed(&[9u8; 32]);
    write_lines(&segment, &rechain(&edited, Some(&forger)));
    assert!(verify(dir.path()).is_ok(), "consistent without the key");
    let failure = verify_with(dir.path(), &with_key()).unwrap_err();
    assert_eq!(failure.line, 2, "{failure}");
    assert!(
        failure.problem.contains("not by the given public key"),
        "{failure}"
    );

    // A forged signature that claims the right key id.
    let mut relabelled = original.clone();
    let mut checkpoint_entry: Entry = serde_json::from_str(&relabelled[1]).unwrap();
    let mut forged = forger.sign(
        1,
        &checkpoint_entry.checkpoint.as_ref().unwrap().head,
        "2026-01-01T00:00:00Z",
    );
    forged.key_id = public_key().key_id().to_owned();
    checkpoint_entry.checkpoint = Some(forged);
    // `rechain` recomputes every link.
    relabelled[1] = serde_json::to_string(&checkpoint_entry).unwrap();
    write_lines(&segment, &rechain(&relabelled, None));
    let failure = verify_with(dir.path(), &with_key()).unwrap_err();
    assert!(failure.problem.contains("does not verify"), "{failure}");
    write_lines(&segment, &original);
    verify_with(dir.path(), &with_key()).unwrap();
}

#[test]
fn truncation_is_detected_against_a_saved_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 4, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let original = lines_of(&segment);
    // The auditor saved the checkpoint at seq 6 (vouching for seq 5).
    let saved = VerifyOptions {
        public_key: Some(public_key()),
        saved_checkpoint: Some(original[5].clone()),
    };
    let report = verify_with(dir.path(), &saved).unwrap();
    assert_eq!(report.saved_checkpoint, Some(6));

    // Truncating back past it: the remaining chain is intact, but the saved checkpoint
    // is gone.
    write_lines(&segment, &original[..4]);
    assert!(verify_with(dir.path(), &with_key()).is_ok());
    let failure = verify_with(dir.path(), &saved).unwrap_err();
    assert!(failure.problem.contains("truncated"), "{failure}");
    assert_eq!(failure.seq, Some(4));

    // Rewriting everything consistently (recomputed hashes, no checkpoints after the
    // edit) still differs from the saved line.
    let mut rewritten = original[..5].to_vec();
    rewritten[0] = rewritten[0].replace("\"request_id\":\"req-0\"", "\"request_id\":\"rX\"");
    assert_ne!(rewritten[0], original[0]);
    rewritten.truncate(1);
    write_lines(&segment, &rechain(&rewritten, None));
    assert!(verify_with(dir.path(), &saved).is_err());

    // Unsigned entries appended well after the last checkpoint: a checkpoint that the
    // writer would have written is missing.
    let mut appended = original.clone();
    let mut late = entry(9);
    late.time = "2099-01-01T00:00:00Z".to_owned();
    appended.push(serde_json::to_string(&late).unwrap());
    write_lines(&segment, &rechain(&appended, None));
    assert!(verify(dir.path()).is_ok(), "the chain itself is intact");
    let failure = verify_with(dir.path(), &with_key()).unwrap_err();
    assert!(failure.problem.contains("unsigned"), "{failure}");
    // One written right after the last checkpoint (a crash before the next one) is
    // reported, not refused.
    let mut appended = original.clone();
    let mut prompt = entry(9);
    prompt.time = serde_json::from_str::<serde_json::Value>(&original[7]).unwrap()["time"]
        .as_str()
        .unwrap()
        .to_owned();
    appended.push(serde_json::to_string(&prompt).unwrap());
    write_lines(&segment, &rechain(&appended, None));
    assert_eq!(
        verify_with(dir.path(), &with_key()).unwrap().unsigned_tail,
        1
    );

    // A saved line that is not a checkpoint, or altered, is refused up front.
    let not_checkpoint = VerifyOptions {
        public_key: None,
        saved_checkpoint: Some(original[0].clone()),
    };
    assert!(
        verify_with(dir.path(), &not_checkpoint)
            .unwrap_err()
            .problem
            .contains("not a checkpoint")
    );
    let altered = VerifyOptions {
        public_key: None,
        saved_checkpoint: Some(original[5].replace("\"seq\":6", "\"seq\":7")),
    };
    assert!(
        verify_with(dir.path(), &altered)
            .unwrap_err()
            .problem
            .contains("altered")
    );
}

#[test]
fn segments_rotate_by_age_and_a_dropped_segment_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let (log, _) = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            max_segment_age: std::time::Duration::from_millis(100),
            signer: Some(signer()),
            ..LogOptions::default()
        },
    )
    .unwrap();
    runtime.block_on(async {
        for n in 0..3 {
            log.append(entry(n)).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
        log.checkpoint().await.unwrap();
    });
    let report = verify_with(dir.path(), &with_key()).unwrap();
    assert_eq!(report.segments, 3, "{report:?}");
    // Each segment starts with its entry and a checkpoint: the chain spans segments.
    assert_eq!(report.checkpoints, 3);
    assert_eq!(report.unsigned_tail, 0);
    fs::remove_file(segment_path(dir.path(), 2)).unwrap();
    let failure = verify_with(dir.path(), &with_key()).unwrap_err();
    assert!(
        failure.problem.contains("segment 2 is missing"),
        "{failure}"
    );
}

#[test]
fn a_second_writer_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            holder: "`first writer` (pid 1)".to_owned(),
            ..LogOptions::default()
        },
    )
    .unwrap();
    let error = DecisionLog::open(dir.path()).unwrap_err();
    assert!(matches!(error, Error::Locked { .. }), "{error}");
    assert!(
        error.to_string().contains("`first writer` (pid 1)"),
        "{error}"
    );
    drop(log);
    // Once the first writer is gone the directory is free again.
    write_entries(dir.path(), 1, DEFAULT_SEGMENT_BYTES);
}

#[test]
fn entries_of_unknown_format_are_refused_and_old_entries_verify() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let lines = lines_of(&segment);
    assert!(
        lines
            .iter()
            .all(|line| line.starts_with("{\"seq\":") && line.contains(",\"format\":2,"))
    );
    // Format-1 entries (no `format` member, as written before) still verify.
    let mut prev = GENESIS_HASH.to_owned();
    let mut old = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let (body, _) = split_line(line).unwrap();
        let body = body.replace(",\"format\":2", "");
        let body = body.replacen(
            &format!("\"prev_hash\":\"{}\"", split_prev(line)),
            &format!("\"prev_hash\":\"{prev}\""),
            1,
        );
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        old.push(format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]));
        prev = hash;
        assert_eq!(index + 1, old.len());
    }
    write_lines(&segment, &old);
    assert_eq!(verify(dir.path()).unwrap().entries, 2);
    // A format this verifier does not know is named, not guessed at.
    let newer: Vec<String> = {
        let (body, _) = split_line(&lines[0]).unwrap();
        let body = body.replace(",\"format\":2,", ",\"format\":3,");
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        vec![format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1])]
    };
    write_lines(&segment, &newer);
    let failure = verify(dir.path()).unwrap_err();
    assert!(
        failure.problem.contains("entry format 3 is unknown"),
        "{failure}"
    );
}

fn split_prev(line: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value["prev_hash"].as_str().unwrap().to_owned()
}

#[test]
fn a_keyring_older_than_the_newest_checkpoint_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let generations = |us: u64| {
        Some(BTreeMap::from([
            ("US".to_owned(), us),
            ("SG".to_owned(), 1),
        ]))
    };
    let runtime = runtime();
    let (log, _) = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            signer: Some(signer()),
            key_generations: generations(1),
            ..LogOptions::default()
        },
    )
    .unwrap();
    runtime.block_on(async {
        log.append(entry(0)).await.unwrap();
        log.set_key_generations(generations(3).unwrap());
        log.append(entry(1)).await.unwrap();
        log.checkpoint().await.unwrap();
    });
    drop(log);
    let before = fs::read(segment_path(dir.path(), 1)).unwrap();
    for (keyring, refused) in [
        (generations(2), true),
        (generations(3), false),
        (generations(4), false),
    ] {
        let result = DecisionLog::open_with(
            dir.path(),
            LogOptions {
                signer: Some(signer()),
                key_generations: keyring,
                ..LogOptions::default()
            },
        );
        match result {
            Err(error) => {
                assert!(refused, "{error}");
                assert!(
                    error.to_string().contains("`US` is at generation 2"),
                    "{error}"
                );
                assert!(
                    error.to_string().contains("vouches for generation 3"),
                    "{error}"
                );
            }
            Ok((log, state)) => {
                assert!(!refused);
                assert_eq!(state.newest_checkpoint.unwrap().key_generations["US"], 3);
                drop(log);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    // A jurisdiction the checkpoint vouches for may not vanish from the keyring.
    let missing = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            key_generations: Some(BTreeMap::from([("US".to_owned(), 3)])),
            ..LogOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("`SG` is at generation 0"),
        "{missing}"
    );
    assert_eq!(
        fs::read(segment_path(dir.path(), 1)).unwrap(),
        before,
        "nothing written"
    );
    let verifier = public_key();
    verify_with(
        dir.path(),
        &VerifyOptions {
            public_key: Some(verifier),
            saved_checkpoint: None,
        },
    )
    .unwrap();
}

/// Appends `entry` to the last segment, chained to its last line, as a writer that
/// crashed (or a forger) would leave it; returns its seq.
fn append_chained(dir: &Path, entry: &Entry) -> u64 {
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

fn at(offset_seconds: i64) -> String {
    crate::record::rfc3339(
        time::OffsetDateTime::now_utc() + time::Duration::seconds(offset_seconds),
    )
}

fn verify_signed(dir: &Path) -> Result<VerifyReport, VerifyFailure> {
    verify_with(
        dir,
        &VerifyOptions {
            public_key: Some(public_key()),
            saved_checkpoint: None,
        },
    )
}

#[test]
fn a_fake_torn_tail_does_not_exempt_a_late_unsigned_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 3, DEFAULT_SEGMENT_BYTES);
    let mut late = entry(9);
    late.time = at(120);
    let seq = append_chained(dir.path(), &late);
    // A line without its newline, as a crash would leave it.
    let segment = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&segment).unwrap();
    bytes.extend_from_slice(format!("{{\"seq\":{}", seq + 1).as_bytes());
    fs::write(&segment, bytes).unwrap();
    let failure = verify_signed(dir.path()).unwrap_err();
    assert!(failure.problem.contains("unsigned"), "{failure}");
}

#[test]
fn a_restart_signs_a_recent_tail_first_and_reports_an_old_one() {
    // The newest entry first and older ones after it (a forger's trick) count as old.
    for (offsets, reported) in [(vec![0], false), (vec![-120], true), (vec![0, -120], true)] {
        let offset = offsets.clone();
        let dir = tempfile::tempdir().unwrap();
        write_signed(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
        let mut first = None;
        for offset in offsets {
            let mut tail = entry(5);
            tail.time = at(offset);
            let appended = append_chained(dir.path(), &tail);
            first.get_or_insert(appended);
        }
        let seq = first.unwrap();
        let last = seq + offset.len() as u64 - 1;
        // The writer starts again after the crash.
        let (log, _) = DecisionLog::open_with(
            dir.path(),
            LogOptions {
                signer: Some(signer()),
                ..LogOptions::default()
            },
        )
        .unwrap();
        log.close();
        let lines = lines_of(&segment_path(dir.path(), 1));
        let kinds: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let after: Vec<&str> = kinds[last as usize..].iter().map(String::as_str).collect();
        if reported {
            assert_eq!(after, ["unsigned_tail", "checkpoint"], "offsets {offset:?}");
            let report = verify_signed(dir.path()).unwrap();
            assert_eq!(report.reported_unsigned, vec![(seq, last)]);
        } else {
            assert_eq!(after, ["checkpoint"], "the first entry is a checkpoint");
            let report = verify_signed(dir.path()).unwrap();
            assert!(report.reported_unsigned.is_empty());
            assert_eq!(report.unsigned_tail, 0);
        }
    }
}

#[test]
fn a_checkpoint_over_an_old_unreported_tail_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    let mut old = entry(5);
    old.time = at(-120);
    let seq = append_chained(dir.path(), &old);
    // What the writer did before: sign whatever it inherited.
    let lines = lines_of(&segment_path(dir.path(), 1));
    let head = serde_json::from_str::<serde_json::Value>(lines.last().unwrap()).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    append_chained(
        dir.path(),
        &Entry::checkpoint(signer().sign(seq, &head, &at(0))),
    );
    let failure = verify_signed(dir.path()).unwrap_err();
    assert!(
        failure.problem.contains("signs entries from seq"),
        "{failure}"
    );
}

/// Reopens the log in `dir` with the checkpoint key and closes it again (the restart
/// signs, or reports, what it inherited).
fn restart_signed(dir: &Path) {
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

#[test]
fn a_restart_reports_an_old_unsigned_tail_that_spans_segments() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    let mut old = entry(5);
    old.time = at(-120);
    let old_seq = append_chained(dir.path(), &old);
    // A writer without the checkpoint key continues in a new segment with a fresh entry:
    // the head segment alone looks recent, the tail it belongs to does not.
    write_entries(dir.path(), 1, 0);
    assert_eq!(segment_numbers(dir.path()).unwrap(), [1, 2]);
    restart_signed(dir.path());
    let report = verify_signed(dir.path()).unwrap();
    assert_eq!(report.reported_unsigned, vec![(old_seq, old_seq + 1)]);
    assert_eq!(report.unsigned_tail, 0);
}

#[test]
fn a_restart_reports_an_old_unsigned_tail_in_a_sealed_segment() {
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    let mut old = entry(5);
    old.time = at(-120);
    let old_seq = append_chained(dir.path(), &old);
    let lines = lines_of(&segment_path(dir.path(), 1));
    let (_, head) = split_line(lines.last().unwrap()).unwrap();
    // Sealed after the old entry, as a failed fsync of the batch after it leaves it.
    let marker = FailedMarker {
        segment: 1,
        last_durable_seq: old_seq,
        head: head.to_owned(),
        reason: "test".to_owned(),
    };
    fs::write(
        failed_marker_path(dir.path(), 1),
        serde_json::to_string(&marker).unwrap(),
    )
    .unwrap();
    restart_signed(dir.path());
    let report = verify_signed(dir.path()).unwrap();
    assert_eq!(report.reported_unsigned, vec![(old_seq, old_seq)]);
    assert_eq!(report.unsigned_tail, 0);
}

#[test]
fn entries_that_waited_longer_than_the_slack_are_reported_not_signed() {
    // A disk that stalls (or a writer that recovers after a long failure) leaves entries
    // older than the verifier's slack by the time a checkpoint could sign them.
    let dir = tempfile::tempdir().unwrap();
    write_signed(dir.path(), 1, DEFAULT_SEGMENT_BYTES);
    let runtime = runtime();
    let (log, _) = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            checkpoint_interval: std::time::Duration::ZERO,
            signer: Some(signer()),
            ..LogOptions::default()
        },
    )
    .unwrap();
    let (stale_seq, fresh_seq) = runtime.block_on(async {
        let mut stale = entry(7);
        stale.time = at(-120);
        let stale_seq = log.append(stale).await.unwrap().seq;
        let fresh_seq = log.append(entry(8)).await.unwrap().seq;
        (stale_seq, fresh_seq)
    });
    log.close();
    let report = verify_signed(dir.path()).unwrap();
    assert_eq!(report.reported_unsigned, vec![(stale_seq, stale_seq)]);
    assert!(fresh_seq > stale_seq + 1, "the report is its own entry");
    assert_eq!(report.unsigned_tail, 0);
}
