//! Entries that waited too long for a checkpoint are reported, not signed.

use std::fs;

use super::*;

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
