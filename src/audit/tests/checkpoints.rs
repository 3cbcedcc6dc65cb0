//! Signed checkpoints: signing, forging, truncation, key generations.

use std::collections::BTreeMap;
use std::fs;

use super::*;

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

/// The key generations each checkpoint in `dir`'s first segment vouches for, in order.
fn vouched_generations(dir: &std::path::Path) -> Vec<BTreeMap<String, u64>> {
    lines_of(&segment_path(dir, 1))
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|value| value["kind"] == CHECKPOINT_KIND)
        .map(|value| {
            // Absent when the checkpoint vouches for no generation.
            serde_json::from_value(value["checkpoint"]["key_generations"].clone())
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn new_generations_get_a_checkpoint_of_their_own_and_a_reopened_log_vouches_only_for_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let us = |generation: u64| BTreeMap::from([("US".to_owned(), generation)]);
    let runtime = runtime();
    let (log, _) = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            signer: Some(signer()),
            key_generations: Some(us(1)),
            ..LogOptions::default()
        },
    )
    .unwrap();
    runtime.block_on(async {
        log.append(entry(0)).await.unwrap();
        log.set_key_generations(us(1));
        log.checkpoint().await.unwrap();
        // A key change's events are in; the generations rise with nothing after them.
        log.set_key_generations(us(2));
        log.checkpoint().await.unwrap();
        // Nothing new: no further checkpoint.
        log.checkpoint().await.unwrap();
    });
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let vouched = vouched_generations(dir.path());
    assert_eq!(vouched.last(), Some(&us(2)), "{vouched:?}");
    assert_eq!(
        vouched.iter().filter(|g| **g == us(2)).count(),
        1,
        "{vouched:?}"
    );

    // A keyring ahead of the log (a change saved, never logged) is not vouched for by
    // what the writer signs at open or with the next entries: only once the caller
    // raises the generations (after writing the `unlogged` events).
    let (log, _) = DecisionLog::open_with(
        dir.path(),
        LogOptions {
            signer: Some(signer()),
            key_generations: Some(us(3)),
            ..LogOptions::default()
        },
    )
    .unwrap();
    runtime.block_on(async {
        log.append(entry(1)).await.unwrap();
        log.checkpoint().await.unwrap();
    });
    assert_eq!(vouched_generations(dir.path()).last(), Some(&us(2)));
    runtime.block_on(async {
        log.set_key_generations(us(3));
        log.checkpoint().await.unwrap();
    });
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(vouched_generations(dir.path()).last(), Some(&us(3)));
    verify_signed(dir.path()).unwrap();
}
