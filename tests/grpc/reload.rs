//! Policy reloads while requests run.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_take_effect_without_restart_and_bad_edits_are_refused() {
    let (server, policies) = start_with_own_policies().await;
    let mut client = server.client().await;
    let before = status(&mut client).await;
    assert_eq!(before.last_reload.as_ref().unwrap().trigger, "startup");
    let (hash, allowed) = lena_reads_restricted(&mut client).await;
    assert_eq!(hash, before.policy_set);
    assert_eq!(allowed, [true; 4]);

    // A valid edit: legal loses the restricted fields, no restart.
    let us = policies.join("us-data.cedar");
    let original = std::fs::read_to_string(&us).unwrap();
    replace_file(&us, &without_legal_policy(&original));
    let after = wait_for_status(&mut client, |s| s.policy_set != before.policy_set).await;
    assert_eq!(after.reloads_succeeded, 1);
    assert_eq!(after.last_reload.as_ref().unwrap().trigger, "file-change");
    let (hash, allowed) = lena_reads_restricted(&mut client).await;
    assert_eq!(hash, after.policy_set);
    assert_eq!(allowed, [false; 4]);

    // A bad edit is refused with its diagnostics; the running set keeps serving.
    replace_file(
        &us,
        &format!("{original}\npermit (principal, action, resource) when {{ oops }};\n"),
    );
    let refused = wait_for_status(&mut client, |s| s.reloads_failed == 1).await;
    let last = refused.last_reload.unwrap();
    assert!(!last.succeeded);
    assert!(
        last.diagnostics.iter().any(|d| d.contains("us-data.cedar")),
        "{:?}",
        last.diagnostics
    );
    assert_eq!(refused.policy_set, after.policy_set);
    let (hash, allowed) = lena_reads_restricted(&mut client).await;
    assert_eq!((hash, allowed), (after.policy_set.clone(), vec![false; 4]));

    // Test suites are not part of the set: editing them reloads nothing.
    std::fs::write(policies.join("tests/extra.yaml"), "cases: []\n").unwrap();
    tokio::time::sleep(ringfence::reload::SETTLE * 4).await;
    assert_eq!(status(&mut client).await.reloads_failed, 1);

    // Each decision log entry names the set that decided it.
    let sets: Vec<String> = server
        .log_entries()
        .iter()
        .filter(|entry| entry["kind"] == "authorize")
        .map(|entry| entry["policy_set"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        sets,
        [
            before.policy_set.clone(),
            after.policy_set.clone(),
            after.policy_set.clone()
        ]
    );
    server.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_reloads_see_the_old_set_or_the_new_one_never_a_mix() {
    let (server, policies) = start_with_own_policies().await;
    let us = policies.join("us-data.cedar");
    let with_legal = std::fs::read_to_string(&us).unwrap();
    let without_legal = without_legal_policy(&with_legal);
    let mut client = server.client().await;
    let hash_with = status(&mut client).await.policy_set;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut askers = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        let stop = std::sync::Arc::clone(&stop);
        askers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.push(lena_reads_restricted(&mut client).await);
            }
            seen
        }));
    }
    let mut hash_without = String::new();
    for round in 0..3 {
        replace_file(&us, &without_legal);
        let changed = wait_for_status(&mut client, |s| s.policy_set != hash_with).await;
        hash_without = changed.policy_set;
        replace_file(&us, &with_legal);
        wait_for_status(&mut client, |s| s.policy_set == hash_with).await;
        assert_eq!(status(&mut client).await.reloads_succeeded, 2 * (round + 1));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut counts = [0usize; 2];
    for asker in askers {
        for (hash, allowed) in asker.await.unwrap() {
            if hash == hash_with {
                assert_eq!(
                    allowed, [true; 4],
                    "a mix under the set with the legal policy"
                );
                counts[0] += 1;
            } else {
                assert_eq!(hash, hash_without, "an unknown policy set");
                assert_eq!(allowed, [false; 4], "a mix under the set without it");
                counts[1] += 1;
            }
        }
    }
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "both sets must have answered: {counts:?}"
    );
    server.running.stop().await.unwrap();
}
