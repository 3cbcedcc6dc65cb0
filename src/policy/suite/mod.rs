//! Policy test suites: YAML files under `policies/tests/` that pin what a policy set
//! allows and forbids, in the terms compliance staff use (people, services, fields,
//! purposes). `ringfence policy test` and the project's own `cargo test` run them with
//! this one runner.
//!
//! A case names who asks (an employee, every employee of a team or organization, or a
//! service acting alone), through which service, the action, the record type,
//! jurisdiction(s), field(s) or classification(s), purpose and ticket, and the expected
//! decision. Any of these may be a list: the case then checks every combination (a
//! matrix). Unknown keys are errors, so a typo cannot make a case silently pass.
//! The format is documented in `policies/README.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

mod format;
mod report;

pub use format::{Case, Suite, SuiteError};
pub use report::{CaseReport, Coverage, Report, SuiteReport};

use format::{Expected, Fields, Principals};
use report::describe;
pub(super) use report::xml;

use super::{Action, FieldDecision, PolicySnapshot, Principal, RequestFacts, ResourceKind};
use crate::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

/// Directory of test suites inside the policy directory.
pub const TESTS_DIR: &str = "tests";
/// Failures listed per case before the rest are counted only.
const FAILURES_SHOWN: usize = 20;
/// `authentication` in the context of test requests, as a deployed server sets it:
/// an employee with a token, or a service with its certificate alone.
fn authentication_of(principal: &Principal) -> &'static str {
    match principal {
        Principal::Employee(_) => crate::identity::METHOD_MTLS_TOKEN,
        Principal::Service(_) => crate::identity::METHOD_MTLS,
    }
}

/// Chooses cases by suite name and case name.
pub type Selector<'a> = &'a dyn Fn(&str, &str) -> bool;

/// Runs `suites` against `snapshot`. `selected` chooses cases by suite and case name
/// (all when `None`). Coverage counts the cases that ran.
pub fn run(snapshot: &PolicySnapshot, suites: &[Suite], selected: Option<Selector<'_>>) -> Report {
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    let mut reports = Vec::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for suite in suites {
        let chosen: Vec<&Case> = suite
            .cases
            .iter()
            .filter(|case| selected.is_none_or(|select| select(&suite.name, &case.name)))
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let fixtures;
        let snapshot_for_suite = if suite.fixtures.is_empty() {
            Ok(snapshot)
        } else {
            match snapshot.with_fixtures(suite.fixtures.clone()) {
                Ok(with) => {
                    fixtures = with;
                    Ok(&fixtures)
                }
                Err(error) => Err(format!("the suite's fixtures are invalid: {error}")),
            }
        };
        let cases = chosen
            .into_iter()
            .map(|case| match &snapshot_for_suite {
                Ok(snapshot) => run_case(snapshot, case, now, &mut covered),
                Err(error) => CaseReport {
                    name: case.name.clone(),
                    checks: 0,
                    failures: vec![error.clone()],
                    more_failures: 0,
                },
            })
            .collect();
        reports.push(SuiteReport {
            name: suite.name.clone(),
            path: suite.path.clone(),
            cases,
        });
    }
    let uncovered = snapshot
        .policy_files()
        .keys()
        .filter(|id| !covered.contains_key(*id))
        .cloned()
        .collect();
    Report {
        policy_set: snapshot.hash().to_owned(),
        suites: reports,
        coverage: Coverage { covered, uncovered },
    }
}

fn run_case(
    snapshot: &PolicySnapshot,
    case: &Case,
    now: i64,
    covered: &mut BTreeMap<String, usize>,
) -> CaseReport {
    let mut report = CaseReport {
        name: case.name.clone(),
        checks: 0,
        failures: Vec::new(),
        more_failures: 0,
    };
    if let Some(expected) = &case.determined_by {
        for id in expected {
            if !snapshot.policy_files().contains_key(id) {
                report.fail(format!(
                    "`determined_by` names `{id}`, which is not a policy of this set"
                ));
            }
        }
        if !report.failures.is_empty() {
            return report;
        }
    }
    let principals: Vec<Option<Principal>> = match &case.principals {
        Principals::Employees(ids) => ids
            .iter()
            .map(|id| Some(Principal::Employee(id.clone())))
            .collect(),
        Principals::EmployeesIn(group) => match snapshot.employees_in(group) {
            Ok(ids) if ids.is_empty() => {
                report.fail(format!(
                    "`employees_in: {group}` matches no employee, so the case checks nothing"
                ));
                return report;
            }
            Ok(ids) => ids
                .into_iter()
                .map(|id| Some(Principal::Employee(id)))
                .collect(),
            Err(error) => {
                report.fail(format!("`employees_in`: {error}"));
                return report;
            }
        },
        Principals::Services => vec![None],
    };
    // A key action has one resource per jurisdiction, its `KeyRing`: no fields.
    let record_type = case.record_type.as_ref();
    let fields: Vec<FieldName> = match record_type.map(|r| (r, snapshot.catalog().fields(r))) {
        None => Vec::new(),
        Some((record_type, None)) => {
            report.fail(format!(
                "unknown record type `{record_type}`: not in the field catalog"
            ));
            return report;
        }
        Some((record_type, Some(all))) => match &case.fields {
            Fields::Named(names) => names.clone(),
            Fields::All => all.cloned().collect(),
            Fields::Classified(classes) => {
                if let Some(unknown) = classes
                    .iter()
                    .find(|class| !snapshot.catalog().classifications().contains(class))
                {
                    report.fail(format!(
                        "unknown classification `{unknown}`: the catalog has {}",
                        snapshot.catalog().classifications().join(", ")
                    ));
                    return report;
                }
                let matching: Vec<FieldName> = all
                    .filter(|field| {
                        snapshot
                            .catalog()
                            .classification(record_type, field)
                            .is_some_and(|class| classes.iter().any(|c| c == class))
                    })
                    .cloned()
                    .collect();
                if matching.is_empty() {
                    report.fail(format!(
                        "no field of `{}` is classified {}, so the case checks nothing",
                        record_type,
                        classes.join(" or ")
                    ));
                    return report;
                }
                matching
            }
        },
    };
    for (action, principal) in case
        .actions
        .iter()
        .flat_map(|action| principals.iter().map(move |principal| (*action, principal)))
    {
        for service in &case.services {
            let principal = principal
                .clone()
                .unwrap_or_else(|| Principal::Service(service.clone()));
            let methods: Vec<&str> = if case.authentications.is_empty() {
                vec![authentication_of(&principal)]
            } else {
                case.authentications.iter().map(String::as_str).collect()
            };
            for (authentication, jurisdiction) in methods
                .iter()
                .flat_map(|method| case.jurisdictions.iter().map(move |j| (*method, j)))
            {
                for purpose in &case.purposes {
                    for ticket in &case.tickets {
                        let Ok(stated) = StatedPurpose::new(purpose, ticket) else {
                            // Checked when the suite was parsed.
                            continue;
                        };
                        let facts = RequestFacts {
                            principal: &principal,
                            service,
                            authentication,
                            stated: &stated,
                            request_time: case.at.unwrap_or(now),
                        };
                        let resource = match record_type {
                            Some(record_type) => format!("{jurisdiction}/{record_type}"),
                            None => format!(
                                "{}::\"{jurisdiction}\"",
                                action.resource_kind().type_name()
                            ),
                        };
                        let situation = format!(
                            "{principal} via {} ({authentication}), {} {resource}, purpose {purpose:?}, ticket {ticket:?}",
                            Principal::Service(service.clone()),
                            action.as_str(),
                        );
                        let decided = match (action.resource_kind(), record_type) {
                            (ResourceKind::Field, Some(record_type)) => snapshot
                                .decide_each(action, &facts, jurisdiction, record_type, &fields)
                                .map(|decisions| {
                                    fields
                                        .iter()
                                        .map(|field| format!(", field {field}"))
                                        .zip(decisions)
                                        .collect::<Vec<_>>()
                                }),
                            _ => match snapshot.decide_key(action, &facts, jurisdiction) {
                                // A service alone is refused before Cedar: a deny.
                                Err(super::Error::NotAnEmployee(_)) => Ok(FieldDecision::refused()),
                                decided => decided,
                            }
                            .map(|decision| vec![(String::new(), decision)]),
                        };
                        let decisions = match decided {
                            Ok(decisions) => decisions,
                            Err(error) => {
                                report.fail(format!("{situation}: {error}"));
                                continue;
                            }
                        };
                        for (target, decision) in &decisions {
                            report.checks += 1;
                            for id in &decision.policies {
                                *covered.entry(id.clone()).or_default() += 1;
                            }
                            check(case, decision, &mut report, || {
                                format!("{situation}{target}")
                            });
                        }
                    }
                }
            }
        }
    }
    report
}

fn check(
    case: &Case,
    decision: &FieldDecision,
    report: &mut CaseReport,
    situation: impl Fn() -> String,
) {
    let expected_allow = case.expect == Expected::Allow;
    // A deny caused by an evaluation error is fail-closed, not what any case means.
    if decision.allowed != expected_allow || !decision.errors.is_empty() {
        let expected = if expected_allow { "allow" } else { "deny" };
        report.fail(format!(
            "{}: expected {expected}, got {}",
            situation(),
            describe(decision)
        ));
        return;
    }
    if let Some(expected) = &case.determined_by {
        let actual: BTreeSet<String> = decision.policies.iter().cloned().collect();
        if &actual != expected {
            let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
            report.fail(format!(
                "{}: expected determined by [{}], got {}",
                situation(),
                expected.join(", "),
                describe(decision)
            ));
        }
    }
}

#[cfg(test)]
mod tests;
