//! `ringfence audit`.

use super::*;

#[test]
fn audit_verify_names_the_first_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::create_dir_all(&log).unwrap();
    let mut text = String::new();
    let mut prev = ringfence::audit::GENESIS_HASH.to_owned();
    for seq in 1..=3 {
        let entry = ringfence::audit::Entry {
            time: "2026-11-23T00:00:00Z".to_owned(),
            request_time: 0,
            request_id: format!("r{seq}"),
            kind: "authorize".to_owned(),
            service: None,
            principal: None,
            authentication: "test".to_owned(),
            action: None,
            purpose: String::new(),
            ticket: String::new(),
            record: None,
            policy_set: None,
            fields: vec![],
            outcome: "decided".to_owned(),
            checkpoint: None,
            key_event: None,
            unsigned_tail: None,
            key_admin: None,
        };
        let (line, hash) = ringfence::audit::chain_line(seq, &prev, &entry).unwrap();
        text.push_str(&line);
        text.push('\n');
        prev = hash;
    }
    let segment = ringfence::audit::segment_path(&log, 1);
    std::fs::write(&segment, &text).unwrap();
    let ok = run(ringfence().args(["audit", "verify", "--log"]).arg(&log));
    ok.succeeded();
    // Every audit command also finds the log through the data directory.
    for command in ["verify", "query", "checkpoint"] {
        let by_data_dir = run(ringfence()
            .args(["audit", command, "--data-dir"])
            .arg(dir.path()));
        let expected = if command == "checkpoint" { 1 } else { 0 };
        assert_eq!(
            by_data_dir.code, expected,
            "{command}: {}",
            by_data_dir.stderr
        );
        assert!(
            !by_data_dir.stderr.contains("not a decision log directory"),
            "{command}: {}",
            by_data_dir.stderr
        );
    }
    assert!(
        ok.stdout.contains(
            "intact: 3 entries (3 decisions, 0 checkpoints, 0 key events) in 1 segment(s)"
        ),
        "{}",
        ok.stdout
    );

    std::fs::write(&segment, text.replacen("\"r2\"", "\"r9\"", 1)).unwrap();
    let bad = run(ringfence().args(["audit", "verify", "--log"]).arg(&log));
    assert_eq!(bad.code, 4);
    bad.complains("decisions-000001.jsonl: line 2 (seq 2): hash mismatch");
}
