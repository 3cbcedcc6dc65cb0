//! The concrete view of `policy diff`: both sets decided by the normal authorizer over
//! the people and services of both directories, every action, jurisdiction and catalog
//! field, and the context values and times the policies can tell apart. May not run
//! the solver.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::{Value, json};

use super::CellChange;
use crate::policy::analysis::ContextUse;
use crate::policy::{Action, PolicySnapshot, Principal, RequestFacts, ResourceKind};
use crate::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

/// Values of a context attribute that the policies of either set can tell apart:
/// each literal it is compared with, the empty string and one value equal to none.
fn classes(
    old: &PolicySnapshot,
    new: &PolicySnapshot,
    name: &str,
    incomplete: &mut Vec<String>,
) -> Vec<String> {
    let mut values: BTreeSet<String> = BTreeSet::new();
    values.insert(String::new());
    let mut raw = false;
    for snapshot in [old, new] {
        match snapshot.observed.context_use(name) {
            ContextUse::Unused => {}
            ContextUse::Literals(literals) => values.extend(literals.iter().cloned()),
            // Used as is: the literals any policy compares it with, and a value
            // matching each `like` pattern, mark the boundaries we know of.
            ContextUse::Raw => {
                raw = true;
                if let Some(literals) = snapshot.observed.context_literals.get(name) {
                    values.extend(literals.iter().cloned());
                }
                for policy in snapshot.all_policies.policies() {
                    if let Ok(est) = policy.to_json() {
                        like_samples(&est, name, &mut values);
                    }
                }
            }
        }
    }
    if raw {
        incomplete.push(format!(
            "a policy uses `context.{name}` other than by comparing it with literals: the concrete view samples the literals, a match of each `like` pattern, \"\" and one other value"
        ));
    }
    let mut other = "other".to_owned();
    while values.contains(&other) {
        other.push('-');
    }
    values.insert(other);
    values
        .into_iter()
        .filter(|v| StatedPurpose::new(v, "").is_ok())
        .collect()
}

/// A value matching each `like` pattern applied to `context.<name>` in `est`.
fn like_samples(est: &Value, name: &str, into: &mut BTreeSet<String>) {
    match est {
        Value::Object(map) => {
            if let Some(like) = map.get("like")
                && like
                    .get("left")
                    .and_then(|left| left.get("."))
                    .is_some_and(|dot| {
                        dot.get("left") == Some(&json!({"Var": "context"}))
                            && dot.get("attr").and_then(Value::as_str) == Some(name)
                    })
                && let Some(Value::Array(pattern)) = like.get("pattern")
            {
                let sample: String = pattern
                    .iter()
                    .map(|part| match part.get("Literal").and_then(Value::as_str) {
                        Some(literal) => literal.to_owned(),
                        None => "x".to_owned(),
                    })
                    .collect();
                into.insert(sample);
            }
            for inner in map.values() {
                like_samples(inner, name, into);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| like_samples(item, name, into)),
        _ => {}
    }
}

fn ids_of(snapshot: &PolicySnapshot, kind: &str) -> BTreeSet<String> {
    snapshot
        .entities
        .iter()
        .map(cedar_policy::Entity::uid)
        .filter(|uid| uid.type_name().to_string() == kind)
        .map(|uid| uid.id().unescaped().to_owned())
        .collect()
}

/// The concrete view's outcome.
pub(super) struct Concrete {
    pub(super) checked: usize,
    pub(super) cells: Vec<CellChange>,
    pub(super) incomplete: Vec<String>,
}

/// Changed groups kept for the report; more are counted in `incomplete`.
const MAX_GROUPS: usize = 100_000;

/// Decides both sets over the concrete cells, until `deadline`; the changed ones are
/// grouped by everything but the field, then by context.
pub(super) fn cells(old: &PolicySnapshot, new: &PolicySnapshot, deadline: Instant) -> Concrete {
    let mut incomplete = Vec::new();
    let employees: BTreeSet<String> = ids_of(old, "Employee")
        .union(&ids_of(new, "Employee"))
        .cloned()
        .collect();
    let services: BTreeSet<String> = ids_of(old, "Service")
        .union(&ids_of(new, "Service"))
        .cloned()
        .collect();
    let jurisdictions: BTreeSet<Jurisdiction> = old
        .jurisdictions()
        .union(new.jurisdictions())
        .cloned()
        .collect();
    let mut record_types: BTreeMap<RecordType, BTreeSet<FieldName>> = BTreeMap::new();
    for snapshot in [old, new] {
        for (record_type, field, _) in snapshot.catalog().entries() {
            record_types
                .entry(record_type.clone())
                .or_default()
                .insert(field.clone());
        }
    }
    let actions: BTreeSet<Action> = old.declared.union(&new.declared).copied().collect();
    let purposes = classes(old, new, "purpose", &mut incomplete);
    let tickets = classes(old, new, "ticket", &mut incomplete);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // A policy that reads the time may open or close access later: sample the epoch,
    // now and the year 2100 (not every boundary: said in `incomplete`).
    let times: Vec<i64> = if [old, new]
        .iter()
        .any(|s| s.observed.context_use("request_time") != ContextUse::Unused)
    {
        incomplete.push("a policy reads `context.request_time`: the concrete view samples only 1970, now and 2100".to_owned());
        vec![0, now, 4_102_444_800]
    } else {
        vec![now]
    };
    let mut groups_dropped = 0usize;

    let mut checked = 0;
    // By everything but the field: the fields that changed that way.
    let mut changed: BTreeMap<CellChange, Vec<String>> = BTreeMap::new();
    let mut principals: Vec<(Principal, String)> = Vec::new();
    for employee in &employees {
        for service in &services {
            principals.push((Principal::Employee(employee.clone()), service.clone()));
        }
    }
    for service in &services {
        principals.push((Principal::Service(service.clone()), service.clone()));
    }
    let verdict = |decided: &Result<bool, String>| match decided {
        Ok(true) => "allow".to_owned(),
        Ok(false) => "deny".to_owned(),
        Err(why) => format!("deny ({why})"),
    };
    'grid: for action in &actions {
        for (principal, service) in &principals {
            if Instant::now() > deadline {
                incomplete.push(format!(
                    "stopped at the deadline after {checked} cells: the concrete view covers only part of the directory"
                ));
                break 'grid;
            }
            let methods: &[&str] = match principal {
                Principal::Employee(_) => &[
                    crate::identity::METHOD_MTLS_TOKEN,
                    crate::identity::METHOD_MTLS_UNBOUND_TOKEN,
                    crate::identity::METHOD_DANGER,
                ],
                Principal::Service(_) => {
                    if action.resource_kind().is_jurisdictional() {
                        // A service alone never administers: refused before Cedar.
                        continue;
                    }
                    &[crate::identity::METHOD_MTLS, crate::identity::METHOD_DANGER]
                }
            };
            for purpose in &purposes {
                for ticket in &tickets {
                    let Ok(stated) = StatedPurpose::new(purpose, ticket) else {
                        continue;
                    };
                    for (authentication, request_time) in methods
                        .iter()
                        .flat_map(|m| times.iter().map(move |t| (m, *t)))
                    {
                        let facts = RequestFacts {
                            principal,
                            service,
                            authentication,
                            stated: &stated,
                            request_time,
                        };
                        for jurisdiction in &jurisdictions {
                            let mut note =
                                |resource: String,
                                 field: Option<&FieldName>,
                                 before: String,
                                 after: String| {
                                    let key = CellChange {
                                        action: action.as_str().to_owned(),
                                        principal: principal.to_string(),
                                        service: service.clone(),
                                        jurisdiction: jurisdiction.to_string(),
                                        resource,
                                        contexts: vec![(
                                            purpose.clone(),
                                            ticket.clone(),
                                            (*authentication).to_owned(),
                                        )],
                                        old: before,
                                        new: after,
                                        fields: Vec::new(),
                                    };
                                    if changed.len() >= MAX_GROUPS && !changed.contains_key(&key) {
                                        groups_dropped += 1;
                                        return;
                                    }
                                    let fields = changed.entry(key).or_default();
                                    if let Some(field) = field {
                                        fields.push(field.to_string());
                                    }
                                };
                            if action.resource_kind() == ResourceKind::Field {
                                for (record_type, fields) in &record_types {
                                    let fields: Vec<FieldName> = fields.iter().cloned().collect();
                                    let before = decide_fields(
                                        old,
                                        *action,
                                        &facts,
                                        jurisdiction,
                                        record_type,
                                        &fields,
                                    );
                                    let after = decide_fields(
                                        new,
                                        *action,
                                        &facts,
                                        jurisdiction,
                                        record_type,
                                        &fields,
                                    );
                                    for ((field, b), a) in fields.iter().zip(&before).zip(&after) {
                                        checked += 1;
                                        let (b, a) = (verdict(b), verdict(a));
                                        if (b == "allow") != (a == "allow") {
                                            note(record_type.to_string(), Some(field), b, a);
                                        }
                                    }
                                }
                            } else {
                                checked += 1;
                                let decide = |s: &PolicySnapshot| {
                                    s.decide_key(*action, &facts, jurisdiction)
                                        .map(|d| d.allowed)
                                        .map_err(|e| e.to_string())
                                };
                                let (b, a) = (verdict(&decide(old)), verdict(&decide(new)));
                                if (b == "allow") != (a == "allow") {
                                    note(action.resource_kind().type_name().to_owned(), None, b, a);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Then the contexts in which the same fields changed the same way, together.
    let mut merged: BTreeMap<CellChange, Vec<(String, String, String)>> = BTreeMap::new();
    for (mut cell, fields) in changed {
        let contexts = std::mem::take(&mut cell.contexts);
        cell.fields = fields;
        merged.entry(cell).or_default().extend(contexts);
    }
    let cells = merged
        .into_iter()
        .map(|(mut cell, contexts)| {
            cell.contexts = contexts;
            cell
        })
        .collect();
    if groups_dropped > 0 {
        incomplete.push(format!(
            "more than {MAX_GROUPS} groups of cells changed: {groups_dropped} more are counted, not listed"
        ));
    }
    Concrete {
        checked,
        cells,
        incomplete,
    }
}

/// Each field's decision by `snapshot`, or why none could be made (a field, record
/// type, person or service it does not know).
fn decide_fields(
    snapshot: &PolicySnapshot,
    action: Action,
    facts: &RequestFacts<'_>,
    jurisdiction: &Jurisdiction,
    record_type: &RecordType,
    fields: &[FieldName],
) -> Vec<Result<bool, String>> {
    match snapshot.decide(action, facts, jurisdiction, record_type, fields) {
        Ok(verdicts) => verdicts.iter().map(|v| Ok(v.allowed)).collect(),
        // Some field is unknown to this set: decide the ones it knows one by one.
        Err(_) if fields.len() > 1 => fields
            .iter()
            .flat_map(|field| {
                decide_fields(
                    snapshot,
                    action,
                    facts,
                    jurisdiction,
                    record_type,
                    std::slice::from_ref(field),
                )
            })
            .collect(),
        Err(error) => vec![Err(error.to_string())],
    }
}
