use std::path::Path;

use super::report::xml;
use super::*;

fn snapshot() -> PolicySnapshot {
    PolicySnapshot::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
}

fn suite(text: &str) -> Result<Suite, String> {
    Suite::parse("t", Path::new("tests/t.yaml"), text)
}

fn run_one(text: &str) -> Report {
    run(&snapshot(), &[suite(text).unwrap()], None)
}

const HEADER: &str = "
defaults:
  service: us-support-tool
  action: decrypt
  record_type: user_profile
  jurisdiction: US
cases:
";

#[test]
fn a_matrix_checks_every_combination_and_field() {
    let report = run_one(&format!(
        "{HEADER}
  - name: m
    employee: [alice, lena]
    jurisdiction: [US, SG]
    classification: pii
    purpose: [a, b, c]
    expect: deny
"
    ));
    // 2 employees x 2 jurisdictions x 3 purposes x 6 pii fields.
    assert_eq!(report.checks(), 2 * 2 * 3 * 6);
    assert_eq!((report.passed(), report.failed()), (1, 0));
}

#[test]
fn a_wrong_expectation_fails_and_says_what_happened() {
    let report = run_one(&format!(
        "{HEADER}
  - name: wrong
    employee: alice
    field: email
    purpose: support
    ticket: T-1
    expect: deny
"
    ));
    assert_eq!((report.passed(), report.failed()), (0, 1));
    let failure = &report.suites[0].cases[0].failures[0];
    assert!(failure.contains("Employee::\"alice\""), "{failure}");
    assert!(failure.contains("field email"), "{failure}");
    assert!(
        failure
            .contains("expected deny, got allow (determined by us-gatekeeper-engineers-read-us)"),
        "{failure}"
    );
}

#[test]
fn determined_by_must_match_exactly() {
    let base = format!(
        "{HEADER}
  - name: d
    employee: alice
    field: email
    purpose: support
    ticket: T-1
    expect: allow
"
    );
    let exact = run_one(&format!(
        "{base}    determined_by: [us-gatekeeper-engineers-read-us]\n"
    ));
    assert_eq!(exact.failed(), 0, "{}", exact.human());
    let other = run_one(&format!(
        "{base}    determined_by: [us-legal-reads-restricted]\n"
    ));
    assert_eq!(other.failed(), 1);
    let none = run_one(&format!("{base}    determined_by: []\n"));
    assert_eq!(none.failed(), 1);
    let unknown = run_one(&format!("{base}    determined_by: [no-such-policy]\n"));
    assert!(
        unknown.suites[0].cases[0].failures[0].contains("not a policy of this set"),
        "{}",
        unknown.human()
    );
}

#[test]
fn unknown_keys_are_errors_with_a_line() {
    let error = suite(&format!(
        "{HEADER}
  - name: typo
    employee: alice
    expcet: deny
"
    ))
    .unwrap_err();
    assert!(error.contains("tests/t.yaml:"), "{error}");
    assert!(error.contains("unknown field `expcet`"), "{error}");
    let in_defaults = suite("defaults:\n  servce: x\ncases: []\n").unwrap_err();
    assert!(
        in_defaults.contains("unknown field `servce`"),
        "{in_defaults}"
    );
    let at_top = suite("case: []\n").unwrap_err();
    assert!(at_top.contains("unknown field `case`"), "{at_top}");
}

#[test]
fn malformed_cases_are_rejected_before_running() {
    let problems = [
        ("employee: alice\n    employees_in: Team::\"x\"", "not both"),
        (
            "employee: alice\n    field: email\n    classification: pii",
            "not both",
        ),
        ("employee: []", "empty list"),
        (
            "employee: alice\n    record_type: \"bad type\"",
            "record_type",
        ),
        ("employee: alice\n    at: yesterday", "RFC 3339"),
        ("employee: alice\n    purpose: \"a\\nb\"", "purpose"),
        (
            "employee: alice\n    authentication: mtls-token",
            "not an authentication method",
        ),
        (
            "employee: alice\n    action: [decrypt, rotate_key]",
            "mixes actions on different resources",
        ),
        (
            "employee: kim\n    action: rotate_key\n    record_type: user_profile",
            "do not apply",
        ),
    ];
    for (body, expected) in problems {
        let error = suite(&format!(
            "{HEADER}\n  - name: bad\n    {body}\n    expect: deny\n"
        ))
        .unwrap_err();
        assert!(error.contains("case \"bad\""), "{body}: {error}");
        assert!(error.contains(expected), "{body}: {error}");
    }
    let missing =
        suite("cases:\n  - name: x\n    employee: alice\n    expect: deny\n").unwrap_err();
    assert!(missing.contains("`service` is missing"), "{missing}");
    let duplicate = suite(&format!(
        "{HEADER}  - {{name: x, employee: alice, expect: deny}}\n  - {{name: x, employee: lena, expect: deny}}\n"
    ))
    .unwrap_err();
    assert!(duplicate.contains("duplicate case name"), "{duplicate}");
    assert!(suite("cases: []\n").unwrap_err().contains("no cases"));
    assert!(suite("cases:\n  - name: x\n    expect: maybe\n").is_err());
}

#[test]
fn cases_that_would_check_nothing_fail() {
    let report = run_one(&format!(
        "{HEADER}
  - name: a group
    employees_in: Team::\"usds-legal\"
    classification: public
    expect: allow
  - name: no such group
    employees_in: Team::\"nobody\"
    expect: deny
  - name: not a reference
    employees_in: parentco
    expect: deny
  - name: unknown classification
    employee: alice
    classification: secret
    expect: deny
  - name: unknown principal
    employee: alcie
    field: email
    expect: deny
  - name: unknown field
    employee: alice
    field: emial
    expect: deny
"
    ));
    let cases = &report.suites[0].cases;
    assert!(cases[0].passed(), "{}", report.human());
    let expect = [
        "",
        "`Team::\"nobody\"` is not in the directory",
        "is not an entity reference",
        "unknown classification `secret`",
        "unknown principal",
        "unknown field `emial`",
    ];
    for (case, expected) in cases.iter().zip(expect).skip(1) {
        assert!(!case.passed(), "{} passed", case.name);
        assert!(
            case.failures[0].contains(expected),
            "{}: {:?}",
            case.name,
            case.failures
        );
    }
}

#[test]
fn fixtures_add_people_for_one_suite_and_are_validated() {
    let with_fixture = "
fixtures:
  - uid: {type: Employee, id: new-hire}
    attrs:
      employer: {__entity: {type: Organization, id: usds}}
      location: US
      roles: []
    parents: [{type: Team, id: usds-gatekeeper-eng}]
";
    let report = run_one(&format!(
        "{with_fixture}{HEADER}
  - name: new hire gets the team's access
    employee: new-hire
    field: email
    purpose: support
    ticket: T-1
    expect: allow
  - name: the team now has four members
    employees_in: Team::\"usds-gatekeeper-eng\"
    classification: restricted
    purpose: support
    ticket: T-1
    expect: deny
"
    ));
    assert_eq!(report.failed(), 0, "{}", report.human());
    // alice, carol, kim and the new hire, 4 restricted fields each.
    assert_eq!(report.suites[0].cases[1].checks, 4 * 4);

    let bad = run_one(&format!(
        "
fixtures:
  - uid: {{type: Employee, id: x}}
    attrs: {{location: US}}
    parents: []
{HEADER}  - {{name: a, employee: x, expect: deny}}
"
    ));
    assert_eq!(bad.failed(), 1);
    assert!(
        bad.suites[0].cases[0].failures[0].contains("fixtures are invalid"),
        "{}",
        bad.human()
    );
    let field = run_one(&format!(
        "
fixtures:
  - uid: {{type: Field, id: x}}
    attrs: {{}}
    parents: []
{HEADER}  - {{name: a, employee: alice, expect: deny}}
"
    ));
    assert!(field.suites[0].cases[0].failures[0].contains("`Field` entities cannot be fixtures"));
}

#[test]
fn coverage_names_policies_no_case_exercised() {
    let report = run_one(&format!(
        "{HEADER}
  - name: only the gatekeeper permit
    employee: alice
    field: email
    purpose: support
    ticket: T-1
    expect: allow
"
    ));
    assert_eq!(
        report.coverage.covered.keys().collect::<Vec<_>>(),
        ["us-gatekeeper-engineers-read-us"]
    );
    assert!(
        report
            .coverage
            .uncovered
            .contains(&"parent-company-never-reads-us".to_owned())
    );
    let policies = report.coverage.covered.len() + report.coverage.uncovered.len();
    assert_eq!(policies, 19, "the shipped set");
    assert!((report.coverage.percent() - 100.0 / 19.0).abs() < 1e-9);
}

#[test]
fn the_filter_selects_cases_and_coverage_follows_it() {
    let suite = suite(&format!(
        "{HEADER}
  - {{name: first, employee: alice, field: email, purpose: support, ticket: T, expect: allow}}
  - {{name: second, employee: bob, field: email, expect: deny}}
"
    ))
    .unwrap();
    let only_second = |_: &str, case: &str| case == "second";
    let report = run(&snapshot(), &[suite], Some(&only_second));
    assert_eq!(report.suites[0].cases.len(), 1);
    assert_eq!(
        report.coverage.covered.keys().collect::<Vec<_>>(),
        ["parent-company-never-reads-us"]
    );
}

#[test]
fn junit_is_escaped_and_counts_failures() {
    let report = run_one(&format!(
        "{HEADER}
  - name: \"<b> & 'q'\"
    employee: alice
    field: email
    purpose: support
    ticket: T-1
    expect: deny
"
    ));
    let junit = report.junit(Some(100.0));
    assert!(
        junit.contains("name=\"&lt;b&gt; &amp; &apos;q&apos;\""),
        "{junit}"
    );
    assert!(
        junit.contains("<testsuites name=\"ringfence policy tests\" tests=\"2\" failures=\"2\">"),
        "{junit}"
    );
    assert!(
        junit.contains("<failure message=\"Employee::&quot;alice&quot;"),
        "{junit}"
    );
    assert!(!junit.contains("<b>"));
    assert_eq!(
        junit.matches("<testsuite ").count(),
        junit.matches("</testsuite>").count()
    );
    assert_eq!(xml("a\u{1}b\nc"), "ab&#10;c");
}
