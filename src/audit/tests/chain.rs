//! The chain: appends, restarts, segments, torn tails, failed writes, tampering.

use std::fs;

use sha2::{Digest, Sha256};

use super::*;

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

/// Rewrites `lines` (as `write_entries` writes them) with `edit` applied to each hashed
/// body, and the chain linked and hashed again.
fn rechain(lines: &[String], edit: impl Fn(&str) -> String) -> Vec<String> {
    let mut prev = GENESIS_HASH.to_owned();
    let mut out = Vec::new();
    for line in lines {
        let (body, _) = split_line(line).unwrap();
        let body = edit(&body).replacen(
            &format!("\"prev_hash\":\"{}\"", split_prev(line)),
            &format!("\"prev_hash\":\"{prev}\""),
            1,
        );
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        out.push(format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]));
        prev = hash;
    }
    out
}

#[test]
fn entries_of_unknown_format_are_refused_and_old_entries_verify() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 2, DEFAULT_SEGMENT_BYTES);
    let segment = segment_path(dir.path(), 1);
    let lines = lines_of(&segment);
    assert!(lines.iter().all(|line| line.starts_with("{\"seq\":")
        && line.contains(",\"format\":3,")
        && line.contains(",\"field_groups\":[{")
        && !line.contains("\"fields\":[")));
    // Entries as formats 1 and 2 wrote them (format 1 has no `format` member; both
    // list fields one by one) still verify, also followed by format-3 entries.
    let expanded = |body: &str| {
        let mut entry: serde_json::Value = serde_json::from_str(body).unwrap();
        crate::audit::expand_fields(&mut entry);
        serde_json::to_string(&entry).unwrap()
    };
    for old_format in ["", ",\"format\":2"] {
        let old = rechain(&lines, |body| {
            expanded(body).replace(",\"format\":3", old_format)
        });
        assert!(
            old.iter()
                .all(|line| line.contains("\"fields\":[{\"field\":"))
        );
        write_lines(&segment, &old);
        assert_eq!(verify(dir.path()).unwrap().entries, 2);
        let mut mixed = old.clone();
        mixed.pop();
        mixed.push(lines[1].clone());
        let mixed = rechain(&mixed, str::to_owned);
        write_lines(&segment, &mixed);
        assert_eq!(verify(dir.path()).unwrap().entries, 2);
        // `query` reads both layouts as the same facts.
        let mut seen = Vec::new();
        crate::audit::for_each_entry(dir.path(), &Default::default(), |_, entry| {
            seen.push(entry["fields"].clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen[0], seen[1]);
        assert!(!seen[0].as_array().unwrap().is_empty());
    }
    // A layout that does not fit the format is refused, naming the entry.
    for (from, to, problem) in [
        (
            ",\"format\":3",
            ",\"format\":2",
            "has `field_groups`, which only format 3",
        ),
        (
            ",\"format\":3",
            "",
            "has `field_groups`, which only format 3",
        ),
    ] {
        write_lines(&segment, &rechain(&lines, |body| body.replace(from, to)));
        let failure = verify(dir.path()).unwrap_err();
        assert!(failure.problem.contains(problem), "{failure}");
    }
    write_lines(&segment, &rechain(&lines, expanded));
    let failure = verify(dir.path()).unwrap_err();
    assert!(
        failure.problem.contains("lists `fields` one by one"),
        "{failure}"
    );
    // Members that are there count, `null` included, and the field decisions are read
    // strictly: what `verify` passes is what `query` and `replay` read.
    let groups = r#""field_groups":[{"outcome":"decrypt","policies":["p"],"key_version":1,"fields":{"pii":["email"]}}]"#;
    assert!(lines[0].contains(groups), "{}", lines[0]);
    let as_fields = groups.replace("field_groups", "fields");
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![(groups, format!(r#"{groups},"fields":null"#))], "invalid type: null"),
        (vec![(groups, format!(r#"{groups},"fields":[]"#))], "lists `fields` one by one"),
        (vec![(",\"format\":3", ",\"format\":null".to_owned())], "invalid type: null"),
        (vec![(groups, r#""field_groups":null"#.to_owned())], "invalid type: null"),
        // Groups where format 2 lists fields one by one.
        (
            vec![(",\"format\":3", ",\"format\":2".to_owned()), (groups, as_fields.clone())],
            "unknown field `fields`",
        ),
        // An object that is half a field, half a group.
        (
            vec![(groups, r#""field_groups":[{"field":"nickname","classification":"public","decision":"allow","outcome":"decrypt","fields":{"restricted":["ssn"]}}]"#.to_owned())],
            "unknown field `field`",
        ),
        (
            vec![(r#""fields":{"pii":["email"]}"#, r#""fields":{"pii":["email"],"pii":["ssn"]}"#.to_owned())],
            "classification `pii` appears twice",
        ),
        (
            vec![(r#""fields":{"pii":["email"]}"#, r#""fields":{"pii":["email"],"public":["email"]}"#.to_owned())],
            "field `email` appears twice",
        ),
    ];
    let as_array = r#""field_groups":[["decrypt",null,["p"],[],1,{"pii":["email"]}]]"#;
    let cases = cases
        .into_iter()
        .chain([
            (
                vec![(groups, as_array.to_owned())],
                "invalid type: sequence, expected an object",
            ),
            (
                vec![
                    (",\"format\":3", ",\"format\":2".to_owned()),
                    (
                        groups,
                        r#""fields":[["email","pii","allow",["p"],[],1,"decrypt"]]"#.to_owned(),
                    ),
                ],
                "invalid type: sequence, expected an object",
            ),
        ])
        .collect::<Vec<_>>();
    for (edits, problem) in cases {
        let edited = rechain(&lines, |body| {
            edits
                .iter()
                .fold(body.to_owned(), |body, (from, to)| body.replace(from, to))
        });
        assert_ne!(edited, lines);
        write_lines(&segment, &edited);
        let failure = verify(dir.path()).unwrap_err();
        assert!(failure.problem.contains(problem), "{edits:?}: {failure}");
    }
    // Verify does not cap how much a line would take expanded (an entry the server
    // wrote always verifies); `query` and `replay` do, and say so.
    let names: Vec<String> = (0..100_000).map(|n| format!("f{n}")).collect();
    let wide = serde_json::json!([{"outcome": "denied", "errors": ["e".repeat(3000)],
        "fields": {"pii": names}}])
    .to_string();
    write_lines(
        &segment,
        &rechain(&lines, |body| {
            body.replace(groups, &format!(r#""field_groups":{wide}"#))
        }),
    );
    assert_eq!(verify(dir.path()).unwrap().entries, 2);
    let mut unexpanded = 0;
    crate::audit::for_each_entry(dir.path(), &Default::default(), |_, entry| {
        unexpanded += usize::from(entry.get("field_groups").is_some());
        Ok(())
    })
    .unwrap();
    assert_eq!(unexpanded, 2);
    // A format this verifier does not know is named, not guessed at.
    for (format, problem) in [
        (",\"format\":4,", "entry format 4 is unknown"),
        (
            ",\"format\":1,",
            "a format-1 entry carries no `format` member",
        ),
    ] {
        let newer = rechain(&lines[..1], |body| body.replace(",\"format\":3,", format));
        write_lines(&segment, &newer);
        let failure = verify(dir.path()).unwrap_err();
        assert!(failure.problem.contains(problem), "{failure}");
    }
}
