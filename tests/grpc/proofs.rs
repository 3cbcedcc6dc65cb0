//! The proof guard (`serve --prove enforce`): a policy set whose invariants do not
//! prove, or that weakens an invariant without an acknowledgement, never serves; the
//! set that was serving keeps serving and `GetStatus` says why.

use std::path::{Path, PathBuf};

use ringfence::policy::prove::ProveOptions;
use ringfence::policy::{ProofGuard, ProofMode};
use ringfence::{ServeConfig, server};

use super::*;

fn cvc5() -> Option<PathBuf> {
    system_tools::system_tool("the cvc5 SMT solver", "CVC5", "cvc5", &["--version"])
}

fn guarded(dir: &Path, policies: &Path, mode: ProofMode, solver: &Path) -> ServeConfig {
    ServeConfig {
        policies: policies.to_owned(),
        proof: ProofGuard {
            mode,
            options: ProveOptions {
                solver: solver.to_owned(),
                query_timeout: std::time::Duration::from_secs(60),
                total_timeout: std::time::Duration::from_secs(600),
            },
        },
        ..test_config(dir)
    }
}

/// A server under `--prove enforce` on a private copy of the shipped policies.
async fn start_enforcing(solver: &Path) -> (TestServer, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    let config = guarded(dir.path(), &policies, ProofMode::Enforce, solver);
    let running = server::start(config.clone()).await.unwrap();
    (
        TestServer {
            running,
            dir,
            config,
        },
        policies,
    )
}

/// Stops the server and keeps its directory (data and policies) for a restart.
async fn stop(server: TestServer) -> (tempfile::TempDir, ServeConfig) {
    let TestServer {
        running,
        dir,
        config,
    } = server;
    running.stop().await.unwrap();
    (dir, config)
}

fn edit(path: &Path, old: &str, new: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(old), "{} lacks {old:?}", path.display());
    replace_file(path, &text.replacen(old, new, 1));
}

/// The parent-company read forbid, neutered: parent-company staff may read US public
/// fields (and, through the gatekeeper team, more).
const FORBID_CONDITION: &str = "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"\n};\n\n@id(\"parent-company-services-never-read-us\")";
const FORBID_NEUTERED: &str = "false\n};\n\n@id(\"parent-company-services-never-read-us\")";

/// Bob (parent company) reading a US public field through the support tool: denied
/// by the shipped set, allowed by the violating one.
async fn bob_reads_us_handle(
    client: &mut pb::ringfence_client::RingfenceClient<tonic::transport::Channel>,
) -> bool {
    let ask = pb::AuthorizeRequest {
        record_type: "user_profile".into(),
        record_id: String::new(),
        jurisdiction: "US".into(),
        fields: vec!["user_handle".into()],
        purpose: "support".into(),
        ticket: "SUP-1".into(),
    };
    let answer = client
        .authorize(as_caller(ask, "us-support-tool", Some("bob")))
        .await
        .unwrap()
        .into_inner();
    answer.fields.iter().all(|field| field.allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_that_breaks_an_invariant_is_refused_and_the_running_set_keeps_serving() {
    let Some(solver) = cvc5() else { return };
    let (server, policies) = start_enforcing(&solver).await;
    let mut client = server.client().await;
    let before = status(&mut client).await;
    let proof = before.last_proof.clone().unwrap();
    assert_eq!(
        (proof.mode.as_str(), proof.verdict.as_str(), proof.refused),
        ("enforce", "proved", false)
    );
    assert!(
        proof.invariants >= 8 && proof.proved == proof.invariants,
        "{proof:?}"
    );
    assert_eq!(proof.policy_set, before.policy_set);
    assert!(!bob_reads_us_handle(&mut client).await);

    edit(
        &policies.join("us-data.cedar"),
        FORBID_CONDITION,
        FORBID_NEUTERED,
    );
    let refused = wait_for_status(&mut client, |s| s.reloads_failed == 1).await;
    assert_eq!(refused.reloads_refused_by_proof, 1);
    assert_eq!(
        refused.policy_set, before.policy_set,
        "the running set stays"
    );
    let last = refused.last_reload.unwrap();
    assert!(!last.succeeded);
    let said = last.diagnostics.join("\n");
    assert!(said.contains("refused by the proof guard"), "{said}");
    assert!(
        said.contains("invariant `parent-company-staff-never-read-us` is violated"),
        "{said}"
    );
    let proof = refused.last_proof.unwrap();
    assert_eq!((proof.verdict.as_str(), proof.refused), ("violated", true));
    assert_ne!(proof.policy_set, before.policy_set);
    // Still decided by the proved set.
    assert!(!bob_reads_us_handle(&mut client).await);

    // The fix proves (from the cache: the same set as at start) and serves.
    edit(
        &policies.join("us-data.cedar"),
        FORBID_NEUTERED,
        FORBID_CONDITION,
    );
    let fixed = wait_for_status(&mut client, |s| s.reloads_succeeded == 1).await;
    assert_eq!(fixed.policy_set, before.policy_set);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_solver_enforce_refuses_to_start_and_to_reload_and_says_why() {
    let Some(solver) = cvc5() else { return };
    let missing = Path::new("/nonexistent/cvc5");
    // At start: refused before anything is served.
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    let config = guarded(dir.path(), &policies, ProofMode::Enforce, missing);
    let error = server::start(config).await.err().unwrap().to_string();
    assert!(error.contains("solver unavailable"), "{error}");
    assert!(error.contains("/nonexistent/cvc5"), "{error}");

    // On reload: the solver is there at start and gone when the policies change.
    let bin = tempfile::tempdir().unwrap();
    let wrapper = bin.path().join("cvc5");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{}' \"$@\"\n", solver.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (server, policies) = start_enforcing(&wrapper).await;
    let mut client = server.client().await;
    let before = status(&mut client).await;
    assert_eq!(before.last_proof.unwrap().verdict, "proved");
    std::fs::remove_file(&wrapper).unwrap();
    // A harmless edit (a description): a new set, which cannot be proved now.
    edit(
        &policies.join("us-data.cedar"),
        "may read US pii and sensitive fields for a stated purpose with a ticket",
        "may read US pii and sensitive fields for a stated purpose, with a ticket",
    );
    let refused = wait_for_status(&mut client, |s| s.reloads_failed == 1).await;
    assert_eq!(refused.reloads_refused_by_proof, 1);
    assert_eq!(refused.policy_set, before.policy_set);
    let said = refused.last_reload.unwrap().diagnostics.join("\n");
    assert!(said.contains("solver unavailable"), "{said}");
    assert!(said.contains(&wrapper.display().to_string()), "{said}");
    let proof = refused.last_proof.unwrap();
    assert_eq!((proof.verdict.as_str(), proof.refused), ("unproven", true));
    let (_kept, config) = stop(server).await;

    // Under warn, the same set serves without a solver, and GetStatus says it is
    // unproven.
    let running = server::start(ServeConfig {
        proof: ProofGuard {
            mode: ProofMode::Warn,
            options: ProveOptions {
                solver: missing.to_owned(),
                query_timeout: std::time::Duration::from_secs(5),
                total_timeout: std::time::Duration::from_secs(600),
            },
        },
        ..config.clone()
    })
    .await
    .unwrap();
    let warned = TestServer {
        running,
        dir: tempfile::tempdir().unwrap(),
        config,
    };
    let mut client = warned.client().await;
    let proof = status(&mut client).await.last_proof.unwrap();
    assert_eq!(
        (proof.mode.as_str(), proof.verdict.as_str(), proof.refused),
        ("warn", "unproven", false)
    );
    assert!(
        proof
            .problems
            .iter()
            .any(|p| p.contains("solver unavailable")),
        "{proof:?}"
    );
    stop(warned).await;
}

/// Weakening an invariant needs an acknowledgement naming its old and new hash, also
/// across a restart (the baseline is the set that served last, in the archive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weakened_invariant_needs_an_acknowledgement_also_across_a_restart() {
    let Some(solver) = cvc5() else { return };
    let (server, policies) = start_enforcing(&solver).await;
    let mut client = server.client().await;
    let before = status(&mut client).await;
    let shipped = ringfence::policy::PolicySnapshot::load(&policies).unwrap();
    let id = "nothing-reads-us-through-parent-company-services";
    let old_hash = shipped.invariants().get(id).unwrap().hash.clone();

    // Weaken the guard: only requests without a ticket count. The policies still
    // satisfy the weaker invariant, so only the weakening is refused.
    let guard_file = policies.join("invariants/ring-fence.cedar");
    let strong = "when { context.service.operator == Organization::\"parentco\" };";
    let weak = "when { context.service.operator == Organization::\"parentco\" && context.ticket == \"\" };";
    edit(&guard_file, strong, weak);
    let refused = wait_for_status(&mut client, |s| s.reloads_failed == 1).await;
    let said = refused.last_reload.unwrap().diagnostics.join("\n");
    assert!(
        said.contains(&format!("invariant `{id}` was changed")),
        "{said}"
    );
    assert!(said.contains(&old_hash), "{said}");
    assert_eq!(refused.policy_set, before.policy_set);

    // An acknowledgement that names other hashes does not count.
    let weakened = ringfence::policy::PolicySnapshot::load(&policies).unwrap();
    let new_hash = weakened.invariants().get(id).unwrap().hash.clone();
    let ack = |old: &str, new: &str| {
        format!(
            "invariants:\n  - invariant: {id}\n    old: {old}\n    new: {new}\n    reason: tickets make parent-company reads auditable (approved by compliance, CHG-7)\n"
        )
    };
    std::fs::write(policies.join("CHANGES.yaml"), ack(&new_hash, &old_hash)).unwrap();
    let refused = wait_for_status(&mut client, |s| s.reloads_failed == 2).await;
    assert_eq!(refused.policy_set, before.policy_set);
    // The right one does.
    replace_file(&policies.join("CHANGES.yaml"), &ack(&old_hash, &new_hash));
    let accepted = wait_for_status(&mut client, |s| s.policy_set != before.policy_set).await;
    assert_eq!(accepted.last_proof.unwrap().verdict, "proved");
    let weakened_set = accepted.policy_set.clone();
    let (_kept, config) = stop(server).await;

    // Deleting the invariant and restarting: the baseline is the set that served
    // last (archived in the data directory), so a restart does not bypass the check.
    std::fs::remove_file(policies.join("CHANGES.yaml")).unwrap();
    let statements = policies.join("invariants/invariants.yaml");
    let text = std::fs::read_to_string(&statements).unwrap();
    let start = text.find(&format!("  - id: {id}\n")).unwrap();
    let end = start + text[start..].find("\n\n").unwrap() + 2;
    std::fs::write(&statements, format!("{}{}", &text[..start], &text[end..])).unwrap();
    std::fs::remove_file(&guard_file).unwrap();
    let kept: String = text[..start].to_owned() + &text[end..];
    assert!(!kept.contains(id));
    // The guard file held the other guards too: put them back without this one.
    let guards =
        std::fs::read_to_string(common::shipped_policies().join("invariants/ring-fence.cedar"))
            .unwrap();
    let g_start = guards
        .find("@id(\"reading-us-through-a-parent-company-service\")")
        .unwrap();
    let g_end = g_start + guards[g_start..].find("};\n").unwrap() + 3;
    std::fs::write(
        &guard_file,
        format!("{}{}", &guards[..g_start], &guards[g_end..]),
    )
    .unwrap();
    let error = server::start(config.clone())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains(&format!("invariant `{id}` was deleted")),
        "{error}"
    );
    assert!(
        error.contains(&new_hash),
        "the baseline is the weakened set that served: {error}"
    );
    std::fs::write(policies.join("CHANGES.yaml"), ack(&new_hash, "deleted")).unwrap();
    let running = server::start(config.clone()).await.unwrap();
    let restarted = TestServer {
        running,
        dir: tempfile::tempdir().unwrap(),
        config,
    };
    let mut client = restarted.client().await;
    let now = status(&mut client).await;
    assert_ne!(now.policy_set, weakened_set);
    stop(restarted).await;
}

/// Only a set that proved becomes the baseline of later starts: serving a weakened set
/// under `warn` (or `off`) does not excuse it under `enforce` afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_under_warn_does_not_move_the_baseline() {
    let Some(solver) = cvc5() else { return };
    let (server, policies) = start_enforcing(&solver).await;
    let serving = server.data_dir().join("policy-sets/SERVING");
    let proved = std::fs::read_to_string(&serving).unwrap();
    let (_kept, config) = stop(server).await;

    let guard_file = policies.join("invariants/ring-fence.cedar");
    edit(
        &guard_file,
        "when { context.service.operator == Organization::\"parentco\" };",
        "when { context.service.operator == Organization::\"parentco\" && context.ticket == \"\" };",
    );
    for mode in [ProofMode::Warn, ProofMode::Off] {
        let running = server::start(ServeConfig {
            proof: ProofGuard {
                mode,
                ..config.proof.clone()
            },
            ..config.clone()
        })
        .await
        .unwrap();
        let served = TestServer {
            running,
            dir: tempfile::tempdir().unwrap(),
            config: config.clone(),
        };
        stop(served).await;
        assert_eq!(
            std::fs::read_to_string(&serving).unwrap(),
            proved,
            "{mode:?}"
        );
    }
    let error = server::start(config).await.err().unwrap().to_string();
    assert!(
        error.contains("invariant `nothing-reads-us-through-parent-company-services` was changed"),
        "{error}"
    );
}

/// `invariants/` created while the server runs is part of the next set: watched
/// recursively, proved, and shown by GetStatus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_added_while_serving_are_proved_on_reload() {
    let Some(solver) = cvc5() else { return };
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    let staged = dir.path().join("staged-invariants");
    std::fs::rename(policies.join("invariants"), &staged).unwrap();
    let config = guarded(dir.path(), &policies, ProofMode::Enforce, &solver);
    let running = server::start(config.clone()).await.unwrap();
    let server = TestServer {
        running,
        dir,
        config,
    };
    let mut client = server.client().await;
    let before = status(&mut client).await;
    assert_eq!(before.last_proof.clone().unwrap().invariants, 0);

    std::fs::rename(&staged, policies.join("invariants")).unwrap();
    let after = wait_for_status(&mut client, |s| s.policy_set != before.policy_set).await;
    let proof = after.last_proof.unwrap();
    assert_eq!(
        (proof.verdict.as_str(), proof.policy_set.as_str()),
        ("proved", after.policy_set.as_str())
    );
    assert!(proof.invariants >= 8, "{proof:?}");

    // An edit inside the new directory reloads too.
    edit(
        &policies.join("invariants/invariants.yaml"),
        "description: Nobody decrypts US data through a service the parent company operates",
        "description: Nobody reads US data through a parent-company service",
    );
    let edited = wait_for_status(&mut client, |s| s.policy_set != after.policy_set).await;
    assert_eq!(edited.last_proof.unwrap().verdict, "proved");
    stop(server).await;
}
