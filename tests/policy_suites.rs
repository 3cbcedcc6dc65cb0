//! The shipped policy test suites: they pass against the shipped policies, cover every
//! policy, and have teeth: deleting or weakening the parent-company forbids makes them
//! fail.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use ringfence::policy::PolicySnapshot;
use ringfence::policy::suite::{self, Report, Suite};

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn run_suites(policies: &Path) -> Report {
    let snapshot = PolicySnapshot::load(policies).unwrap();
    let suites = Suite::load_all(&shipped()).unwrap();
    suite::run(&snapshot, &suites, None)
}

#[test]
fn shipped_suites_pass_and_cover_every_policy() {
    let report = run_suites(&shipped());
    assert_eq!(report.failed(), 0, "{}", report.human());
    assert!(report.passed() >= 30, "{}", report.summary());
    assert!(report.coverage.uncovered.is_empty(), "{}", report.human());
    assert_eq!(report.coverage.percent(), 100.0);
    // Matrix cases expand: far more decisions than cases.
    assert!(
        report.checks() > 20 * report.passed(),
        "{}",
        report.summary()
    );
}

/// A copy of the shipped policies with `file` rewritten by `mutate`.
fn mutated_file(file: &str, mutate: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let file = dir.path().join(file);
    let original = std::fs::read_to_string(&file).unwrap();
    let changed = mutate(&original);
    assert_ne!(changed, original, "the mutation did not apply");
    std::fs::write(&file, changed).unwrap();
    dir
}

/// Cuts the policy with `id` (from its annotation to its closing `;`) out of a file.
fn without_policy(text: &str, id: &str) -> String {
    let start = text.find(&format!("@id(\"{id}\")")).unwrap();
    let end = start + text[start..].find("};").unwrap() + 2;
    format!("{}{}", &text[..start], &text[end..])
}

type Mutation = Box<dyn Fn(&str) -> String>;

#[test]
fn suites_fail_when_the_parent_company_forbids_are_deleted_or_weakened() {
    let forbid_condition = "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"";
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "employee forbid deleted",
            Box::new(|text| without_policy(text, "parent-company-never-reads-us")),
        ),
        (
            "service forbid deleted",
            Box::new(|text| without_policy(text, "parent-company-services-never-read-us")),
        ),
        (
            "forbid keyed on membership only",
            Box::new(move |text| {
                text.replace(forbid_condition, "principal in Organization::\"parentco\"")
            }),
        ),
        (
            "forbid keyed on employer only",
            Box::new(move |text| {
                text.replace(
                    forbid_condition,
                    "principal.employer == Organization::\"parentco\"",
                )
            }),
        ),
        (
            "forbid limited to pii",
            Box::new(move |text| {
                text.replace(
                    forbid_condition,
                    &format!("({forbid_condition}) && resource.classification == \"pii\""),
                )
            }),
        ),
        (
            "forbid limited to requests without a ticket",
            Box::new(move |text| {
                text.replace(
                    forbid_condition,
                    &format!("({forbid_condition}) && context.ticket == \"\""),
                )
            }),
        ),
        (
            "forbid turned into a permit",
            Box::new(|text| {
                text.replacen(
                    "forbid (\n  principal is Employee,",
                    "permit (\n  principal is Employee,",
                    1,
                )
            }),
        ),
    ];
    for (what, mutate) in mutations {
        assert_suite_fails("us-data.cedar", "parent-company", what, mutate);
    }
}

/// Asserts that the suite `suite_name` fails once `file` is rewritten by `mutate`.
fn assert_suite_fails(file: &str, suite_name: &str, what: &str, mutate: Mutation) {
    let dir = mutated_file(file, mutate);
    let report = run_suites(dir.path());
    let failed = report
        .suites
        .iter()
        .filter(|suite| suite.name == suite_name)
        .flat_map(|suite| &suite.cases)
        .filter(|case| !case.passed())
        .count();
    assert!(
        failed > 0,
        "{what}: the {suite_name} suite still passes:\n{}",
        report.human()
    );
}

#[test]
fn the_key_admin_suite_fails_when_key_administration_is_widened() {
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "parent-company forbid deleted",
            Box::new(|text| without_policy(text, "parent-company-never-administers-us-keys")),
        ),
        (
            "parent-company service forbid deleted",
            Box::new(|text| {
                without_policy(text, "parent-company-services-never-administer-us-keys")
            }),
        ),
        (
            "destroy no longer needs its purpose",
            Box::new(|text| text.replace(" &&\n  context.purpose == \"key-destruction\"", "")),
        ),
        (
            "the key-admin role no longer required",
            Box::new(|text| text.replace("principal.roles.contains(\"key-admin\") &&", "")),
        ),
        (
            "any service may administer keys",
            Box::new(|text| {
                text.replacen("context.service == Service::\"us-key-console\" &&", "", 1)
            }),
        ),
        (
            "forbid keyed on employer only",
            Box::new(|text| {
                text.replace(
                    "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"",
                    "principal.employer == Organization::\"parentco\"",
                )
            }),
        ),
        (
            "forbid keyed on membership only",
            Box::new(|text| {
                text.replace(
                    "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"",
                    "principal in Organization::\"parentco\"",
                )
            }),
        ),
        (
            "proven identity no longer required",
            Box::new(|text| text.replace("context.authentication == \"mtls+token\" &&", "")),
        ),
        (
            "the key console may read user data",
            Box::new(|text| without_policy(text, "key-console-never-touches-user-data")),
        ),
    ];
    for (what, mutate) in mutations {
        assert_suite_fails("key-admin.cedar", "key-admin", what, mutate);
    }
}
