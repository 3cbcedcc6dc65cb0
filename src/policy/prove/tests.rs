use std::path::{Path, PathBuf};

use super::*;
use crate::policy::suite;

#[path = "../../../tests/common/system_tools.rs"]
mod system_tools;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, target).unwrap();
        }
    }
}

/// The shipped policy directory, invariants and suites included, in a temporary
/// directory.
fn copy_of_shipped() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&shipped(), dir.path());
    dir
}

fn edit(dir: &Path, file: &str, old: &str, new: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(old), "{file} does not contain {old:?}");
    std::fs::write(&path, text.replacen(old, new, 1)).unwrap();
}

/// cvc5, or `None` (with a SKIPPED line) when it is missing outside `scripts/test`.
fn solver() -> Option<ProveOptions> {
    let path =
        system_tools::system_tool("the cvc5 SMT solver", SOLVER_ENV, "cvc5", &["--version"])?;
    Some(ProveOptions {
        solver: path,
        query_timeout: Duration::from_secs(60),
        total_timeout: Duration::from_secs(600),
    })
}

fn outcome<'a>(report: &'a ProofReport, id: &str) -> &'a Outcome {
    &report
        .invariants
        .iter()
        .find(|proof| proof.id == id)
        .unwrap_or_else(|| panic!("no invariant {id}"))
        .outcome
}

#[test]
fn the_shipped_invariants_prove() {
    let Some(options) = solver() else { return };
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    assert!(snapshot.invariants().list.len() >= 8);
    let report = prove_blocking(&snapshot, &options);
    assert_eq!(report.verdict(), Verdict::Proved, "{}", report.human());
    for proof in &report.invariants {
        assert!(matches!(proof.outcome, Outcome::Proved), "{}", proof.id);
    }
    // The facts assumed are stated, per environment, and include the ones the issue
    // names: a field's jurisdiction is its parent, the catalog, a service alone is
    // `context.service`, the authentication methods of the identity code.
    let facts = report.json()["facts"].to_string();
    for needle in [
        "resource in resource.jurisdiction",
        "resource.classification ==",
        "principal == context.service",
        "mtls+token",
    ] {
        assert!(facts.contains(needle), "{needle} not assumed: {facts}");
    }
}

/// One mutation of the shipped policies per shipped invariant: the invariant is
/// violated, and its counterexample, pasted as a suite case, really is allowed by the
/// normal authorizer.
#[test]
fn each_shipped_invariant_has_a_mutation_that_violates_it_with_a_counterexample_that_replays() {
    let Some(options) = solver() else { return };
    let mutations: &[(&str, &str, &str, &str)] = &[
        (
            "parent-company-staff-never-read-us",
            "us-data.cedar",
            "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"\n};\n\n@id(\"parent-company-services-never-read-us\")",
            "false\n};\n\n@id(\"parent-company-services-never-read-us\")",
        ),
        (
            "nothing-reads-us-through-parent-company-services",
            "us-data.cedar",
            "when { context.service.operator == Organization::\"parentco\" };",
            "when { context.service.operator == Organization::\"parentco\" && context.ticket == \"\" };",
        ),
        (
            "parent-company-staff-never-write-us",
            "us-data.cedar",
            "action == Action::\"encrypt\",\n  resource in Jurisdiction::\"US\"\n)\nwhen {\n  principal in Organization::\"parentco\" ||",
            "action == Action::\"encrypt\",\n  resource in Jurisdiction::\"US\"\n)\nwhen {\n  principal in Team::\"parentco-eng\" ||",
        ),
        (
            "parent-company-never-touches-us-keys-or-subjects",
            "key-admin.cedar",
            "action in [Action::\"rotate_key\", Action::\"retire_key\", Action::\"unretire_key\", Action::\"destroy_key\", Action::\"view_keys\", Action::\"shred\"],\n  resource in Jurisdiction::\"US\"\n)\nwhen {\n  principal in Organization::\"parentco\" ||",
            "action in [Action::\"rotate_key\", Action::\"retire_key\", Action::\"unretire_key\", Action::\"destroy_key\", Action::\"shred\"],\n  resource in Jurisdiction::\"US\"\n)\nwhen {\n  principal in Organization::\"parentco\" ||",
        ),
        (
            "no-reading-without-a-purpose",
            "other-jurisdictions.cedar",
            "context.purpose != \"\"",
            "true",
        ),
        (
            "services-write-only-their-jurisdiction",
            "company-wide.cedar",
            "when { resource.jurisdiction == context.service.jurisdiction };",
            "when { resource.jurisdiction == context.service.jurisdiction || context.ticket == \"MIGRATE\" };",
        ),
        (
            "policies-never-error",
            "company-wide.cedar",
            "when { resource.classification == \"public\" };",
            "when { resource.classification == \"public\" && context.request_time * context.request_time > 0 };",
        ),
    ];
    for (invariant, file, old, new) in mutations {
        let dir = copy_of_shipped();
        edit(dir.path(), file, old, new);
        let snapshot = PolicySnapshot::load(dir.path())
            .unwrap_or_else(|error| panic!("{invariant}: mutation does not load: {error}"));
        let report = prove_blocking(&snapshot, &options);
        let Outcome::Violated(counterexample) = outcome(&report, invariant) else {
            panic!(
                "{invariant}: not violated by its mutation:\n{}",
                report.human()
            );
        };
        assert_eq!(report.verdict(), Verdict::Violated);
        assert!(
            counterexample.replay.is_ok(),
            "{invariant}: the counterexample does not replay: {:?}\n{}",
            counterexample.replay,
            counterexample.suite
        );
        // Independently of `replay`: pasted under tests/, the case fails, and the
        // normal authorizer allows the request (or errs, for `never_errors`).
        let pasted = suite::Suite::parse(
            "counterexample",
            &dir.path().join("tests/counterexample.yaml"),
            &counterexample.suite,
        )
        .unwrap_or_else(|error| panic!("{invariant}: {error}\n{}", counterexample.suite));
        let run = suite::run(&snapshot, &[pasted], None);
        assert_eq!(run.failed(), 1, "{invariant}: {}", run.human());
        let failure = &run.suites[0].cases[0].failures[0];
        let expected = if *invariant == "policies-never-error" {
            "evaluation error"
        } else {
            "expected deny, got allow"
        };
        assert!(failure.contains(expected), "{invariant}: {failure}");
        // The unmutated policies deny the same case: it is a regression test now.
        let fixed = PolicySnapshot::load(&shipped()).unwrap();
        let pasted = suite::Suite::parse(
            "counterexample",
            Path::new("counterexample.yaml"),
            &counterexample.suite,
        )
        .unwrap();
        if *invariant != "policies-never-error" {
            let run = suite::run(&fixed, &[pasted], None);
            assert_eq!(run.failed(), 0, "{invariant}: {}", run.human());
        }
    }
}

/// `always_denies` over service principals: the shipped schema admits no service on
/// key actions, so the invariant starts to matter when a schema change admits them.
#[test]
fn a_schema_that_lets_services_administer_keys_violates_services_never_administer_keys() {
    let Some(options) = solver() else { return };
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "schema.cedarschema",
        "action rotate_key, retire_key, unretire_key, destroy_key, view_keys appliesTo {\n  principal: [Employee],",
        "action rotate_key, retire_key, unretire_key, destroy_key, view_keys appliesTo {\n  principal: [Employee, Service],",
    );
    std::fs::write(
        dir.path().join("automation.cedar"),
        "@id(\"rotation-bot\")\npermit (principal == Service::\"us-key-console\", action == Action::\"rotate_key\", resource in Jurisdiction::\"US\");\n",
    )
    .unwrap();
    let snapshot = PolicySnapshot::load(dir.path()).unwrap();
    let report = prove_blocking(&snapshot, &options);
    let Outcome::Violated(counterexample) = outcome(&report, "services-never-administer-keys")
    else {
        panic!("{}", report.human());
    };
    assert!(
        counterexample.environment.starts_with("Service rotate_key"),
        "{counterexample:?}"
    );
}

#[test]
fn without_the_solver_nothing_is_proved_and_the_report_says_why() {
    let snapshot = PolicySnapshot::load(&shipped()).unwrap();
    let options = ProveOptions {
        solver: PathBuf::from("/nonexistent/cvc5"),
        query_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(600),
    };
    let report = prove_blocking(&snapshot, &options);
    assert_eq!(report.verdict(), Verdict::Unproven);
    let problems = report.problems().join("\n");
    assert!(problems.contains("solver unavailable"), "{problems}");
    assert!(problems.contains("/nonexistent/cvc5"), "{problems}");
}

#[test]
fn facts_that_no_request_satisfies_prove_nothing() {
    let Some(options) = solver() else { return };
    let dir = copy_of_shipped();
    // A directory without jurisdictions: no field exists, so "nobody reads US" would
    // hold vacuously. The prover refuses to call that a proof.
    let directory = std::fs::read_to_string(dir.path().join("directory.json")).unwrap();
    let kept: Vec<&str> = directory
        .lines()
        .filter(|line| {
            !line.contains(
                "\"type\": \"Jurisdiction\", \"id\": \"US\"}, \"attrs\": {}, \"parents\": []",
            )
        })
        .filter(|line| {
            !line.contains(
                "\"type\": \"Jurisdiction\", \"id\": \"SG\"}, \"attrs\": {}, \"parents\": []",
            )
        })
        .filter(|line| {
            !line.contains(
                "\"type\": \"Jurisdiction\", \"id\": \"EU\"}, \"attrs\": {}, \"parents\": []",
            )
        })
        .collect();
    assert_eq!(kept.len() + 3, directory.lines().count());
    std::fs::write(dir.path().join("directory.json"), kept.join("\n")).unwrap();
    let snapshot = PolicySnapshot::load(dir.path()).unwrap();
    assert!(snapshot.jurisdictions().is_empty());
    let report = prove_blocking(&snapshot, &options);
    let Outcome::Unproven(why) = outcome(&report, "parent-company-staff-never-read-us") else {
        panic!("{}", report.human());
    };
    assert!(why.contains("no request satisfies the facts"), "{why}");
    // `never_errors` too: no policy errs on a request that cannot exist.
    let Outcome::Unproven(why) = outcome(&report, "policies-never-error") else {
        panic!("{}", report.human());
    };
    assert!(why.contains("no request satisfies the facts"), "{why}");
}

#[test]
fn invariant_files_are_checked_strictly() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "invariants/invariants.yaml",
            "never_allows: parent-company-staff-reading-us\n",
            "never_allows: parent-company-staff-readin-us\n",
            "names guard `parent-company-staff-readin-us`, which no `.cedar` file",
        ),
        (
            "invariants/invariants.yaml",
            "    implies: reads-with-a-stated-purpose\n",
            "    implies: reads-with-a-stated-purpose\n    always_denies: true\n",
            "state exactly one of",
        ),
        (
            "invariants/invariants.yaml",
            "    actions: decrypt\n    never_allows: parent-company-staff-reading-us",
            "    actions: read\n    never_allows: parent-company-staff-reading-us",
            "unknown action `read`",
        ),
        (
            "invariants/invariants.yaml",
            "  - id: policies-never-error\n",
            "  - id: policies-never-error\n    severity: high\n",
            "unknown field `severity`",
        ),
        (
            "invariants/ring-fence.cedar",
            "@id(\"reads-with-a-stated-purpose\")\n@description(\"Reading a public field, or any field with a stated purpose\")\npermit",
            "@id(\"reads-with-a-stated-purpose\")\n@description(\"Reading a public field, or any field with a stated purpose\")\nforbid",
            "must be a `permit`",
        ),
        (
            "invariants/ring-fence.cedar",
            "when { resource.classification == \"public\" || context.purpose != \"\" };",
            "when { resource.clasification == \"public\" || context.purpose != \"\" };",
            "guard",
        ),
    ];
    for (file, old, new, expected) in cases {
        let dir = copy_of_shipped();
        edit(dir.path(), file, old, new);
        let error = PolicySnapshot::load(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(expected),
            "{file}: {expected:?} not in {error}"
        );
    }
    // A guard no invariant names is a typo waiting to happen.
    let dir = copy_of_shipped();
    let path = dir.path().join("invariants/extra.cedar");
    std::fs::write(
        &path,
        "@id(\"orphan\")\npermit (principal, action == Action::\"decrypt\", resource);\n",
    )
    .unwrap();
    let error = PolicySnapshot::load(dir.path()).unwrap_err().to_string();
    assert!(
        error.contains("guard `orphan` is named by no invariant"),
        "{error}"
    );
}

#[test]
fn invariants_are_part_of_the_set_hash_and_their_own_hash_is_their_meaning() {
    let shipped_set = PolicySnapshot::load(&shipped()).unwrap();
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "invariants/invariants.yaml",
        "description: Nobody decrypts US data through a service the parent company operates",
        "description: Nobody reads US data through a parent-company service",
    );
    let reworded = PolicySnapshot::load(dir.path()).unwrap();
    assert_ne!(reworded.hash(), shipped_set.hash());
    let id = "nothing-reads-us-through-parent-company-services";
    assert_eq!(
        reworded.invariants().get(id).unwrap().hash,
        shipped_set.invariants().get(id).unwrap().hash,
        "a wording change keeps the invariant's hash"
    );
    edit(
        dir.path(),
        "invariants/ring-fence.cedar",
        "when { context.service.operator == Organization::\"parentco\" };",
        "when { context.service.operator == Organization::\"parentco\" && context.ticket == \"\" };",
    );
    let weakened = PolicySnapshot::load(dir.path()).unwrap();
    assert_ne!(
        weakened.invariants().get(id).unwrap().hash,
        shipped_set.invariants().get(id).unwrap().hash
    );
    // The archive keeps the invariants: an archived set loads back with them.
    let archive = tempfile::tempdir().unwrap();
    weakened.archive(archive.path()).unwrap();
    let back = PolicySnapshot::load_archived(archive.path(), weakened.hash()).unwrap();
    assert_eq!(
        back.invariants().get(id).unwrap().hash,
        weakened.invariants().get(id).unwrap().hash
    );
}

/// Schema names reach the solver inside SMT comments; a carriage return would end the
/// comment and let the schema assert anything (`(assert false)` proves every
/// invariant). Refused at load.
#[test]
fn control_characters_in_schema_names_are_refused() {
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "schema.cedarschema",
        "  roles: Set<String>,\n};",
        "  roles: Set<String>,\n  \"zz\\r(assert false)\\r;\"?: String,\n};",
    );
    let error = PolicySnapshot::load(dir.path()).unwrap_err().to_string();
    assert!(error.contains("control character"), "{error}");
}

/// "A field is in jurisdiction J only if J is its `jurisdiction`" is a fact only while
/// jurisdictions cannot nest; a schema that lets them must not hide a violation.
#[test]
fn nested_jurisdictions_are_not_assumed_away() {
    let Some(options) = solver() else { return };
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "schema.cedarschema",
        "entity Jurisdiction;",
        "entity Jurisdiction in [Jurisdiction];",
    );
    edit(
        dir.path(),
        "directory.json",
        "{\"uid\": {\"type\": \"Jurisdiction\", \"id\": \"US\"}, \"attrs\": {}, \"parents\": []}",
        "{\"uid\": {\"type\": \"Jurisdiction\", \"id\": \"US\"}, \"attrs\": {}, \"parents\": [{\"type\": \"Jurisdiction\", \"id\": \"SG\"}]}",
    );
    edit(
        dir.path(),
        "us-data.cedar",
        "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"\n};\n\n@id(\"parent-company-services-never-read-us\")",
        "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"\n}\nunless { resource in Jurisdiction::\"SG\" };\n\n@id(\"parent-company-services-never-read-us\")",
    );
    let snapshot = PolicySnapshot::load(dir.path()).unwrap();
    let report = prove_blocking(&snapshot, &options);
    assert!(
        matches!(
            outcome(&report, "parent-company-staff-never-read-us"),
            Outcome::Violated(_)
        ),
        "{}",
        report.human()
    );
}

/// The catalog fact stays flat: a catalog of 1,500 fields proves (it overflowed the
/// prover's stack as one `||` chain of 630).
#[test]
fn a_large_field_catalog_proves() {
    let Some(options) = solver() else { return };
    let dir = copy_of_shipped();
    let mut extra = String::from("\n[record_types.bulk_profile]\n");
    for i in 0..1500 {
        let class = ["public", "pii", "sensitive", "restricted"][i % 4];
        extra.push_str(&format!("field_{i} = \"{class}\"\n"));
    }
    let catalog = dir.path().join("fields.toml");
    let mut text = std::fs::read_to_string(&catalog).unwrap();
    text.push_str(&extra);
    std::fs::write(&catalog, text).unwrap();
    let snapshot = PolicySnapshot::load(dir.path()).unwrap();
    let report = prove_blocking(&snapshot, &options);
    assert_eq!(report.verdict(), Verdict::Proved, "{}", report.human());
}

#[test]
fn a_guard_must_apply_to_every_action_of_its_invariant_and_match_some_request() {
    // Named for `encrypt` too, a decrypt-only guard would prove "never encrypts" for
    // free.
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "invariants/invariants.yaml",
        "    actions: decrypt\n    never_allows: parent-company-staff-reading-us",
        "    actions: [decrypt, encrypt]\n    never_allows: parent-company-staff-reading-us",
    );
    let error = PolicySnapshot::load(dir.path()).unwrap_err().to_string();
    assert!(
        error
            .contains("guard `parent-company-staff-reading-us` does not apply to action `encrypt`"),
        "{error}"
    );

    // A guard no request satisfies proves nothing.
    let Some(options) = solver() else { return };
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "invariants/ring-fence.cedar",
        "when { context.service.operator == Organization::\"parentco\" };",
        "when { context.service.operator == Organization::\"parentco\" && context.request_time < 0 };",
    );
    let snapshot = PolicySnapshot::load(dir.path()).unwrap();
    let report = prove_blocking(&snapshot, &options);
    let Outcome::Unproven(why) =
        outcome(&report, "nothing-reads-us-through-parent-company-services")
    else {
        panic!("{}", report.human());
    };
    assert!(why.contains("holds vacuously"), "{why}");
}

/// A counterexample about an employee of the directory, as the directory lists them,
/// names that employee (no renamed fixture that could never replay).
#[test]
fn a_counterexample_about_a_listed_employee_names_them() {
    let Some(options) = solver() else { return };
    let dir = copy_of_shipped();
    edit(
        dir.path(),
        "us-data.cedar",
        "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"\n};\n\n@id(\"parent-company-services-never-read-us\")",
        "principal in Organization::\"parentco\" ||\n  principal.employer == Organization::\"parentco\"\n}\nunless { principal == Employee::\"bob\" };\n\n@id(\"parent-company-services-never-read-us\")",
    );
    let snapshot = PolicySnapshot::load(dir.path()).unwrap();
    let report = prove_blocking(&snapshot, &options);
    let Outcome::Violated(counterexample) = outcome(&report, "parent-company-staff-never-read-us")
    else {
        panic!("{}", report.human());
    };
    assert!(
        counterexample.replay.is_ok(),
        "{:?}\n{}",
        counterexample.replay,
        counterexample.suite
    );
    assert!(
        counterexample.suite.contains("employee: bob"),
        "{}",
        counterexample.suite
    );
}

mod diffs {
    use super::*;
    use crate::policy::prove::diff::{Movement, PolicyDiff, diff_blocking};

    fn compare(change: impl Fn(&Path)) -> (PolicyDiff, PolicySnapshot) {
        let options = solver().unwrap_or_else(|| ProveOptions {
            solver: PathBuf::from("/nonexistent/cvc5"),
            query_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(600),
        });
        let old = PolicySnapshot::load(&shipped()).unwrap();
        let dir = copy_of_shipped();
        change(dir.path());
        let new = PolicySnapshot::load(dir.path()).unwrap();
        (diff_blocking(&old, &new, &options), new)
    }

    fn movement(diff: &PolicyDiff, action: &str, principal: &str) -> Movement {
        diff.summary()
            .into_iter()
            .find(|s| s.action == action && s.principal == principal)
            .map(|s| s.movement)
            .unwrap_or(Movement::Neither)
    }

    fn only(diff: &PolicyDiff, action: &str, principal: &str, expected: Movement) {
        for summary in diff.summary() {
            let want = if summary.action == action && summary.principal == principal {
                expected
            } else {
                Movement::Neither
            };
            assert_eq!(
                summary.movement,
                want,
                "{} {}:\n{}",
                summary.action,
                summary.principal,
                diff.human()
            );
        }
        assert_eq!(
            movement(diff, action, principal),
            expected,
            "{}",
            diff.human()
        );
    }

    fn symbolic_example(
        diff: &PolicyDiff,
        widening: bool,
    ) -> Option<&crate::policy::prove::diff::Example> {
        diff.symbolic.iter().find_map(|env| {
            let found = if widening {
                &env.widening
            } else {
                &env.narrowing
            };
            found.as_ref().ok().and_then(Option::as_ref)
        })
    }

    #[test]
    fn a_narrowing_is_reported_with_a_confirmed_example_and_the_cells() {
        let has_solver = solver().is_some();
        let (diff, _) = compare(|dir| {
            let path = dir.join("us-data.cedar");
            let text = std::fs::read_to_string(&path).unwrap();
            let start = text.find("@id(\"us-legal-reads-restricted\")").unwrap();
            let end = text.find("@id(\"parent-company-never-reads-us\")").unwrap();
            std::fs::write(&path, format!("{}{}", &text[..start], &text[end..])).unwrap();
        });
        only(&diff, "decrypt", "Employee", Movement::Narrows);
        assert!(
            diff.cells
                .iter()
                .all(|c| c.narrows() && c.principal == "Employee::\"lena\""),
            "{}",
            diff.human()
        );
        assert!(!diff.cells.is_empty());
        if has_solver {
            let example = symbolic_example(&diff, false).unwrap();
            assert!(
                example.replay.is_ok(),
                "{:?}\n{}",
                example.replay,
                example.suite
            );
            assert!(example.suite.contains("expect: deny"));
        }
    }

    #[test]
    fn a_widening_is_reported_with_a_confirmed_example() {
        let Some(_) = solver() else { return };
        let (diff, _) = compare(|dir| {
            std::fs::write(
                dir.join("legal-sg.cedar"),
                "@id(\"us-legal-reads-sg\")\npermit (principal in Team::\"usds-legal\", action == Action::\"decrypt\", resource in Jurisdiction::\"SG\")\nwhen { context.purpose == \"legal-request\" && context.ticket != \"\" };\n",
            )
            .unwrap();
        });
        only(&diff, "decrypt", "Employee", Movement::Widens);
        let example = symbolic_example(&diff, true).unwrap();
        assert!(
            example.replay.is_ok(),
            "{:?}\n{}",
            example.replay,
            example.suite
        );
        assert!(example.suite.contains("expect: allow"));
        assert!(diff.cells.iter().all(|c| c.widens()) && !diff.cells.is_empty());
    }

    #[test]
    fn an_equivalent_refactoring_changes_nothing() {
        let Some(_) = solver() else { return };
        let (diff, _) = compare(|dir| {
            let path = dir.join("us-data.cedar");
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text
                .replacen(
                    "[\"pii\", \"sensitive\"].contains(resource.classification) &&\n  [\"support\"",
                    "(resource.classification == \"sensitive\" || resource.classification == \"pii\") &&\n  [\"support\"",
                    1,
                )
                .replace("us-gatekeeper-engineers-read-us", "us-gatekeepers-read-us-for-a-purpose");
            std::fs::write(&path, text).unwrap();
        });
        assert!(diff.files.iter().any(|f| f == "~ us-data.cedar"));
        for summary in diff.summary() {
            assert_eq!(summary.movement, Movement::Neither, "{}", diff.human());
            assert!(summary.unproven.is_none(), "{}", diff.human());
        }
        assert!(diff.cells.is_empty(), "{}", diff.human());
    }

    /// SymCC sees the Cedar text only: a reclassified field changes no policy, and
    /// the concrete cells show what it widens.
    #[test]
    fn a_catalog_reclassification_is_found_by_the_cells() {
        let (diff, _) = compare(|dir| {
            let path = dir.join("fields.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains("email = \"pii\""));
            std::fs::write(
                &path,
                text.replacen("email = \"pii\"", "email = \"public\"", 1),
            )
            .unwrap();
        });
        assert_eq!(
            movement(&diff, "decrypt", "Employee"),
            Movement::Widens,
            "{}",
            diff.human()
        );
        assert!(
            diff.cells
                .iter()
                .any(|c| c.widens() && c.fields.contains(&"email".to_owned())),
            "{}",
            diff.human()
        );
        // The parent company still reads nothing in the US.
        assert!(
            !diff.cells.iter().any(|c| c.jurisdiction == "US"
                && ["bob", "carol", "mei", "emil"]
                    .iter()
                    .any(|p| c.principal.contains(p))),
            "{}",
            diff.human()
        );
    }

    #[test]
    fn a_directory_move_is_reported_when_it_changes_a_decision_and_not_otherwise() {
        // Alice leaves the gatekeeper team: she can no longer read US pii.
        let (diff, _) = compare(|dir| {
            let path = dir.join("directory.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let alice = "\"location\": \"US\", \"roles\": [\"engineer\", \"gatekeeper\"]},\n   \"parents\": [{\"type\": \"Team\", \"id\": \"usds-gatekeeper-eng\"}]},\n  {\"uid\": {\"type\": \"Employee\", \"id\": \"kim\"}";
            assert!(text.contains(alice));
            std::fs::write(
                &path,
                text.replacen(
                    alice,
                    &alice.replace(
                        "[{\"type\": \"Team\", \"id\": \"usds-gatekeeper-eng\"}]",
                        "[]",
                    ),
                    1,
                ),
            )
            .unwrap();
        });
        assert_eq!(
            movement(&diff, "decrypt", "Employee"),
            Movement::Narrows,
            "{}",
            diff.human()
        );
        assert!(
            diff.cells
                .iter()
                .all(|c| c.principal == "Employee::\"alice\""),
            "{}",
            diff.human()
        );
        assert!(!diff.cells.is_empty());

        // Bob moves between parent-company teams that no policy names: nothing changes.
        let (diff, _) = compare(|dir| {
            let path = dir.join("directory.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let bob = "\"location\": \"CN\", \"roles\": [\"engineer\"]},\n   \"parents\": [{\"type\": \"Team\", \"id\": \"parentco-eng\"}]},";
            assert!(text.contains(bob));
            let text = text.replacen(bob, &bob.replace("parentco-eng", "parentco-analytics"), 1);
            let text = text.replacen(
                "  {\"uid\": {\"type\": \"Team\", \"id\": \"parentco-eng\"}",
                "  {\"uid\": {\"type\": \"Team\", \"id\": \"parentco-analytics\"}, \"attrs\": {},\n   \"parents\": [{\"type\": \"Organization\", \"id\": \"parentco\"}]},\n  {\"uid\": {\"type\": \"Team\", \"id\": \"parentco-eng\"}",
                1,
            );
            std::fs::write(&path, text).unwrap();
        });
        assert!(diff.files.iter().any(|f| f == "~ directory.json"));
        assert!(diff.cells.is_empty(), "{}", diff.human());
        // Without a solver nothing is known symbolically: `unknown`, never `neither`.
        let expected = if solver().is_some() {
            Movement::Neither
        } else {
            Movement::Unknown
        };
        for summary in diff.summary() {
            assert_eq!(summary.movement, expected, "{}", diff.human());
        }
    }

    /// Context used other than with literals: a value matching each `like` pattern and
    /// the year 2100 are in the grid, so a directory move that opens such a policy, or
    /// one that opens later, is found; the report says the grid samples them.
    #[test]
    fn like_patterns_and_time_gates_are_sampled_and_said_to_be() {
        let auditors = |gate: &'static str| {
            move |dir: &Path| {
                std::fs::write(
                    dir.join("audit.cedar"),
                    format!("@id(\"us-auditors\")\npermit (principal in Team::\"usds-legal\", action == Action::\"decrypt\", resource in Jurisdiction::\"SG\")\nwhen {{ resource.classification == \"pii\" && {gate} }};\n"),
                )
                .unwrap();
            }
        };
        for gate in [
            "context.purpose like \"audit-*\"",
            "context.request_time >= 1924992000",
        ] {
            // Both sets carry the policy; only the directory changes (kim joins legal).
            let old_dir = copy_of_shipped();
            auditors(gate)(old_dir.path());
            let old = PolicySnapshot::load(old_dir.path()).unwrap();
            let new_dir = copy_of_shipped();
            auditors(gate)(new_dir.path());
            let path = new_dir.path().join("directory.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let kim = "\"roles\": [\"engineer\", \"key-admin\"]},\n   \"parents\": [{\"type\": \"Team\", \"id\": \"usds-gatekeeper-eng\"}]}";
            assert!(text.contains(kim));
            std::fs::write(
                &path,
                text.replacen(
                    kim,
                    &kim.replace("}]}", "}, {\"type\": \"Team\", \"id\": \"usds-legal\"}]}"),
                    1,
                ),
            )
            .unwrap();
            let new = PolicySnapshot::load(new_dir.path()).unwrap();
            let options = ProveOptions {
                solver: PathBuf::from("/nonexistent/cvc5"),
                query_timeout: Duration::from_secs(5),
                total_timeout: Duration::from_secs(600),
            };
            let diff = crate::policy::prove::diff::diff_blocking(&old, &new, &options);
            assert!(
                diff.cells.iter().any(|c| c.widens()
                    && c.principal == "Employee::\"kim\""
                    && c.jurisdiction == "SG"),
                "{gate}: {}",
                diff.human()
            );
            assert!(!diff.incomplete.is_empty(), "{gate}: {}", diff.human());
        }
    }

    /// An acknowledgement counts only for the widening and the two set hashes it names.
    #[test]
    fn a_widening_acknowledgement_counts_only_for_its_hashes() {
        let widen = |dir: &Path| {
            let path = dir.join("fields.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(
                &path,
                text.replacen("email = \"pii\"", "email = \"public\"", 1),
            )
            .unwrap();
        };
        let (diff, new) = compare(widen);
        assert_eq!(
            diff.unacknowledged_widenings(&new),
            [("decrypt".to_owned(), "Employee".to_owned())]
        );
        let ack = |old: &str, new: &str| {
            format!(
                "widenings:\n  - action: decrypt\n    principal: Employee\n    old_set: {old}\n    new_set: {new}\n    reason: email is shown on public profiles now (PRIV-12)\n"
            )
        };
        let (old_hash, new_hash) = (diff.old_set.clone(), diff.new_set.clone());
        let (diff, new) = compare(|dir| {
            widen(dir);
            std::fs::write(dir.join("CHANGES.yaml"), ack(&old_hash, &new_hash)).unwrap();
        });
        assert_eq!(
            diff.new_set, new_hash,
            "CHANGES.yaml is not part of the set's hash"
        );
        assert!(diff.unacknowledged_widenings(&new).is_empty());
        let (diff, new) = compare(|dir| {
            widen(dir);
            std::fs::write(dir.join("CHANGES.yaml"), ack(&new_hash, &old_hash)).unwrap();
        });
        assert_eq!(diff.unacknowledged_widenings(&new).len(), 1);
    }
}
