//! `ringfence policy`: validate, explain, test.

use super::*;

#[test]
fn policy_validate_accepts_the_shipped_set_and_names_file_and_line_of_errors() {
    let ok = run(ringfence()
        .args(["policy", "validate", "--policies"])
        .arg(shipped_policies()));
    ok.succeeded();
    ok.says("valid: 19 policies");

    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    std::fs::write(
        dir.path().join("new.cedar"),
        "@id(\"typo\")\npermit (principal, action == Action::\"decrypt\", resource)\nwhen { resource.clasification == \"public\" };\n",
    )
    .unwrap();
    let bad = run(ringfence()
        .args(["policy", "validate", "--policies"])
        .arg(dir.path()));
    assert_eq!(bad.code, 3, "{}", bad.stderr);
    bad.complains("new.cedar:3:");
    bad.complains("clasification");

    // `serve` refuses to start on the same set, before binding anything.
    let data = tempfile::tempdir().unwrap();
    let serve = run(ringfence()
        .args(["serve", "--listen", "127.0.0.1:0", "--policies"])
        .arg(dir.path())
        .arg("--data-dir")
        .arg(data.path().join("d")));
    assert_eq!(serve.code, 3, "{}", serve.stderr);
    serve.complains("new.cedar:3:");
    assert!(!serve.stderr.contains("listening"), "{}", serve.stderr);
}

#[test]
fn policy_explain_says_why() {
    let out = run(ringfence()
        .args(["policy", "explain", "--policies"])
        .arg(shipped_policies())
        .args([
            "--employee",
            "carol",
            "--service",
            "us-support-tool",
            "--record-type",
            "user_profile",
            "--jurisdiction",
            "US",
            "--field",
            "email",
            "--purpose",
            "support",
            "--ticket",
            "INC-1",
        ]));
    out.succeeded();
    out.says("DENY");
    assert!(
        out.stdout
            .contains("determined by parent-company-never-reads-us (")
            && out.stdout.contains("us-data.cedar)"),
        "{}",
        out.stdout
    );

    let out = run(ringfence()
        .args(["policy", "explain", "--policies"])
        .arg(shipped_policies())
        .args([
            "--employee",
            "alice",
            "--service",
            "us-support-tool",
            "--record-type",
            "user_profile",
            "--jurisdiction",
            "US",
        ]));
    out.succeeded();
    assert_eq!(
        out.stdout.lines().count(),
        21,
        "a header and the 20 catalog fields: {}",
        out.stdout
    );
    out.says("no policy permits this (default deny)");
    out.says("determined by public-fields-readable-by-employees");

    let out = run(ringfence()
        .args(["policy", "explain", "--policies"])
        .arg(shipped_policies())
        .args([
            "--employee",
            "mallory",
            "--service",
            "us-support-tool",
            "--record-type",
            "user_profile",
            "--jurisdiction",
            "US",
        ]));
    assert_eq!(out.code, 1);
    out.complains("unknown principal");
}

#[test]
fn policy_test_reports_cases_and_coverage_with_distinct_exit_codes() {
    let shipped = shipped_policies();
    let ok = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(&shipped));
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    ok.says(" passed, 0 failed");
    ok.says("PASS every parent-company employee is denied every US profile field");
    ok.says("policy coverage: 100.0% (19 of 19");

    let json = run(ringfence()
        .args(["policy", "test", "--format", "json", "--policies"])
        .arg(&shipped));
    json.succeeded();
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(report["passed"].as_u64().unwrap() >= 30);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["coverage"]["uncovered"], serde_json::json!([]));

    let junit = run(ringfence()
        .args([
            "policy",
            "test",
            "--format",
            "junit",
            "--min-coverage",
            "100",
            "--policies",
        ])
        .arg(&shipped));
    junit.succeeded();
    assert!(junit.stdout.starts_with("<?xml"), "{}", junit.stdout);
    junit.says("failures=\"0\"");

    // Coverage below the threshold: the filter runs only one suite.
    let low = run(ringfence()
        .args([
            "policy",
            "test",
            "--filter",
            "parent-company/*",
            "--min-coverage",
            "90%",
            "--policies",
        ])
        .arg(&shipped));
    assert_eq!(low.code, 6, "{}{}", low.stdout, low.stderr);
    low.complains("below --min-coverage 90%");
    low.complains("us-legal-reads-restricted");

    // A weakened forbid: the cases that pin it fail, and say how.
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    let us = dir.path().join("us-data.cedar");
    let text = std::fs::read_to_string(&us).unwrap();
    std::fs::write(
        &us,
        text.replace(
            " ||\n  principal.employer == Organization::\"parentco\"",
            "",
        ),
    )
    .unwrap();
    let failed = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(failed.code, 5, "{}{}", failed.stdout, failed.stderr);
    failed.says("FAIL parent-company employees on US-only teams are denied by employer");
    failed.says("Employee::\"pat\"");
    failed.says("expected deny, got allow");
    let failed_junit = run(ringfence()
        .args(["policy", "test", "--format", "junit", "--policies"])
        .arg(dir.path()));
    assert_eq!(failed_junit.code, 5);
    failed_junit.says("<failure message=");

    // A typo in a suite is an invalid suite, not a pass.
    std::fs::write(&us, &text).unwrap();
    std::fs::write(
        dir.path().join("tests/typo.yaml"),
        "cases:\n  - name: x\n    service: us-signup\n    expcet: deny\n",
    )
    .unwrap();
    let typo = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(typo.code, 7, "{}{}", typo.stdout, typo.stderr);
    typo.complains("typo.yaml:4:");
    typo.complains("unknown field `expcet`");

    // Invalid policies come first.
    std::fs::write(&us, "permit (principal, action, resource) when { nope };").unwrap();
    let invalid = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(invalid.code, 3, "{}{}", invalid.stdout, invalid.stderr);
}

#[test]
fn policy_prove_proves_the_shipped_set_and_exits_by_verdict() {
    let Some(cvc5) =
        system_tools::system_tool("the cvc5 SMT solver", "CVC5", "cvc5", &["--version"])
    else {
        return;
    };
    let ok = run(ringfence()
        .args(["policy", "prove", "--solver"])
        .arg(&cvc5)
        .arg("--policies")
        .arg(shipped_policies()));
    ok.succeeded();
    ok.says("proved    parent-company-staff-never-read-us");
    ok.says("proved: 8 invariants of policy set");

    // A violation: exit 9, the counterexample as a suite case, in every format.
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    let us = dir.path().join("us-data.cedar");
    let text = std::fs::read_to_string(&us).unwrap();
    std::fs::write(
        &us,
        text.replace(
            "when { context.service.operator == Organization::\"parentco\" };",
            "when { context.service.operator == Organization::\"parentco\" && context.purpose == \"\" };",
        ),
    )
    .unwrap();
    let violated = run(ringfence()
        .args(["policy", "prove", "--solver"])
        .arg(&cvc5)
        .arg("--policies")
        .arg(dir.path()));
    assert_eq!(violated.code, 9, "{}{}", violated.stdout, violated.stderr);
    violated.says("VIOLATED  nothing-reads-us-through-parent-company-services");
    violated.says("replayed through the authorizer");
    violated.says("expect: deny");
    let json = run(ringfence()
        .args(["policy", "prove", "--format", "json", "--solver"])
        .arg(&cvc5)
        .arg("--policies")
        .arg(dir.path()));
    assert_eq!(json.code, 9);
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(report["verdict"], "violated");
    let violation = report["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["outcome"] == "violated")
        .unwrap();
    assert_eq!(
        violation["id"],
        "nothing-reads-us-through-parent-company-services"
    );
    assert_eq!(violation["counterexample"]["replayed"], true);
    // Pasted under tests/, the counterexample makes `policy test` fail.
    std::fs::write(
        dir.path().join("tests/counterexample.yaml"),
        violation["counterexample"]["suite"].as_str().unwrap(),
    )
    .unwrap();
    let tested = run(ringfence()
        .args(["policy", "test", "--policies"])
        .arg(dir.path()));
    assert_eq!(tested.code, 5, "{}", tested.stdout);
    tested.says("expected deny, got allow");
    let junit = run(ringfence()
        .args(["policy", "prove", "--format", "junit", "--solver"])
        .arg(&cvc5)
        .arg("--policies")
        .arg(dir.path()));
    assert_eq!(junit.code, 9);
    junit.says("failures=\"1\"");

    // No solver: exit 10, and why.
    let unproven = run(ringfence()
        .args([
            "policy",
            "prove",
            "--solver",
            "/nonexistent/cvc5",
            "--policies",
        ])
        .arg(shipped_policies()));
    assert_eq!(unproven.code, 10, "{}", unproven.stdout);
    unproven.says("UNPROVEN");
    unproven.says("solver unavailable: cannot run `/nonexistent/cvc5`");
}

/// The solver runs without the server's environment: the master key in
/// `RINGFENCE_MASTER_KEY` never reaches it.
#[test]
fn the_solver_does_not_inherit_the_environment() {
    let Some(cvc5) =
        system_tools::system_tool("the cvc5 SMT solver", "CVC5", "cvc5", &["--version"])
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("environment");
    let wrapper = dir.path().join("cvc5");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nenv > '{}'\nexec '{}' \"$@\"\n",
            seen.display(),
            cvc5.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let secret = "a".repeat(64);
    let proved = run(ringfence()
        .env("RINGFENCE_MASTER_KEY", &secret)
        .args(["policy", "prove", "--solver"])
        .arg(&wrapper)
        .arg("--policies")
        .arg(shipped_policies()));
    proved.succeeded();
    let environment = std::fs::read_to_string(&seen).unwrap();
    assert!(environment.contains("PATH="), "{environment}");
    assert!(
        !environment.contains("RINGFENCE_MASTER_KEY"),
        "{environment}"
    );
    assert!(!environment.contains(&secret));
}

/// `policy diff` in CI: a widening fails `--fail-on-widening` until CHANGES.yaml
/// acknowledges exactly it, between exactly these two sets.
#[test]
fn policy_diff_fails_on_an_unacknowledged_widening() {
    let Some(cvc5) =
        system_tools::system_tool("the cvc5 SMT solver", "CVC5", "cvc5", &["--version"])
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    let catalog = dir.path().join("fields.toml");
    let text = std::fs::read_to_string(&catalog).unwrap();
    std::fs::write(
        &catalog,
        text.replacen("email = \"pii\"", "email = \"public\"", 1),
    )
    .unwrap();
    let diff = |extra: &[&str]| {
        run(ringfence()
            .args(["policy", "diff", "--solver"])
            .arg(&cvc5)
            .args(extra)
            .arg(shipped_policies())
            .arg(dir.path()))
    };
    let report = diff(&[]);
    report.succeeded();
    report.says("decrypt        Employee  widens");
    report.says("~ fields.toml");
    let failed = diff(&["--fail-on-widening"]);
    assert_eq!(failed.code, 11, "{}{}", failed.stdout, failed.stderr);
    failed.complains("unacknowledged widening: decrypt by Employee");
    // The message carries the acknowledgement to add; adding it passes.
    let at = failed.stderr.find("  widenings:").unwrap();
    let ack = failed.stderr[at..].replace(
        "<why, and who approved it>",
        "email is public on profiles now (PRIV-12)",
    );
    std::fs::write(
        dir.path().join("CHANGES.yaml"),
        ack.trim_end().to_owned() + "\n",
    )
    .unwrap();
    diff(&["--fail-on-widening"]).succeeded();
    let json = diff(&["--format", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(
        parsed["cells"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["old"] == "deny" && c["new"] == "allow"),
        "{}",
        json.stdout
    );
}
