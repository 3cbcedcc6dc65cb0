//! The facts ringfence guarantees about every request it builds, written as Cedar
//! conditions per request environment: what a proof assumes instead of reporting as a
//! counterexample. Generated from the directory's jurisdictions, the field catalog and
//! the identity code; never from people or services, so that invariants hold for every
//! directory. May not run the solver.

use std::str::FromStr;

use cedar_policy::{Policy, PolicyId, PolicySet, RequestEnv, ValidationMode, Validator};

use super::super::PolicySnapshot;
use crate::identity;

/// Id of the generated facts policy inside a checked set.
pub const FACTS_ID: &str = "ringfence:facts";

/// A fact, in words and as a Cedar condition.
#[derive(Debug, Clone)]
pub struct Fact {
    /// What it says, for reports.
    pub says: String,
    /// The condition.
    pub cedar: String,
}

/// A Cedar string literal.
pub fn cedar_str(text: &str) -> String {
    format!("\"{}\"", text.escape_debug())
}

fn one_of(what: &str, values: &[String]) -> String {
    if values.is_empty() {
        return "false".to_owned();
    }
    format!("[{}].contains({what})", values.join(", "))
}

/// Every fact that may hold for `env`'s principal, action and resource types, before
/// type checking (see [`facts_for`]).
fn candidates(snapshot: &PolicySnapshot, env: &RequestEnv) -> Vec<Fact> {
    let principal = env.principal().to_string();
    let resource = env.resource().to_string();
    let mut facts = vec![Fact {
        says: "the request time is a Unix time from 1970 to 9999".to_owned(),
        cedar: "context.request_time >= 0 && context.request_time <= 253402300799".to_owned(),
    }];
    let methods: Vec<String> = match principal.as_str() {
        "Employee" => vec![
            identity::METHOD_MTLS_TOKEN,
            identity::METHOD_MTLS_UNBOUND_TOKEN,
            identity::METHOD_DANGER,
        ],
        "Service" => vec![identity::METHOD_MTLS, identity::METHOD_DANGER],
        _ => identity::METHODS.to_vec(),
    }
    .into_iter()
    .map(cedar_str)
    .collect();
    facts.push(Fact {
        says: format!(
            "`context.authentication` is one the identity code sets for a{} {principal}",
            if principal.starts_with(['A', 'E', 'I', 'O', 'U']) {
                "n"
            } else {
                ""
            }
        ),
        cedar: one_of("context.authentication", &methods),
    });
    if principal == "Service" {
        facts.push(Fact {
            says: "a service acting alone is `context.service`".to_owned(),
            cedar: "principal == context.service".to_owned(),
        });
    }
    let jurisdictions: Vec<String> = snapshot
        .jurisdictions()
        .iter()
        .map(|j| format!("Jurisdiction::{}", cedar_str(j.as_str())))
        .collect();
    facts.push(Fact {
        says: format!("the {resource} is generated for a jurisdiction of the directory"),
        cedar: one_of("resource.jurisdiction", &jurisdictions),
    });
    facts.push(Fact {
        says: format!("the {resource}'s parent is its `jurisdiction`"),
        cedar: "resource in resource.jurisdiction".to_owned(),
    });
    // Only when the schema lets no jurisdiction have a parent: otherwise a field of
    // US could be `in` another jurisdiction that US is in.
    for jurisdiction in jurisdictions
        .iter()
        .filter(|_| !snapshot.shape.jurisdictions_nest)
    {
        facts.push(Fact {
            says: format!("the {resource} is in {jurisdiction} only if that is its `jurisdiction`"),
            cedar: format!(
                "(resource in {jurisdiction}) == (resource.jurisdiction == {jurisdiction})"
            ),
        });
    }
    if resource == "Field" {
        // Grouped by classification and record type, each group's fields one set
        // literal: flat, whatever the size of the catalog.
        let mut groups: std::collections::BTreeMap<(&str, &str), Vec<String>> =
            std::collections::BTreeMap::new();
        for (record_type, field, classification) in snapshot.catalog().entries() {
            groups
                .entry((classification, record_type.as_str()))
                .or_default()
                .push(cedar_str(field.as_str()));
        }
        let fields: Vec<String> = groups
            .into_iter()
            .map(|((classification, record_type), fields)| {
                format!(
                    "(resource.classification == {} && resource.record_type == {} && [{}].contains(resource.field))",
                    cedar_str(classification),
                    cedar_str(record_type),
                    fields.join(", ")
                )
            })
            .collect();
        facts.push(Fact {
            says: "the field, its record type and its classification are in the field catalog"
                .to_owned(),
            cedar: if fields.is_empty() {
                "false".to_owned()
            } else {
                fields.join(" || ")
            },
        });
    }
    facts
}

/// What today's directory says about the services and employees it lists, and about
/// how its teams and organizations nest: not assumed by proofs (invariants hold for
/// every directory), only used to look for a counterexample that today's directory can
/// replay as it is.
fn directory_candidates(snapshot: &PolicySnapshot, env: &RequestEnv) -> Vec<Fact> {
    let entities: Vec<serde_json::Value> = snapshot
        .entities
        .to_json_value()
        .ok()
        .and_then(|value| value.as_array().cloned())
        .unwrap_or_default();
    let uid = |value: &serde_json::Value| -> Option<(String, String)> {
        let uid = value.get("__entity").unwrap_or(value);
        Some((
            uid.get("type")?.as_str()?.to_owned(),
            uid.get("id")?.as_str()?.to_owned(),
        ))
    };
    let literal = |(kind, id): &(String, String)| format!("{kind}::{}", cedar_str(id));
    // Groups: entity types that are neither people, services nor generated.
    let groups: Vec<(String, String)> = entities
        .iter()
        .filter_map(|e| e.get("uid").and_then(uid))
        .filter(|(kind, _)| {
            !matches!(
                kind.as_str(),
                "Employee" | "Service" | "Field" | "Jurisdiction" | "KeyRing" | "DataSubjects"
            )
        })
        .collect();
    let mut facts = Vec::new();
    let principal = env.principal().to_string();
    for entity in &entities {
        let Some(this) = entity.get("uid").and_then(uid) else {
            continue;
        };
        let ancestors: Vec<(String, String)> = {
            let api = cedar_policy::EntityUid::from_str(&literal(&this));
            match api {
                Ok(api) => groups
                    .iter()
                    .filter(|group| {
                        cedar_policy::EntityUid::from_str(&literal(group))
                            .is_ok_and(|g| snapshot.entities.is_ancestor_of(&g, &api))
                    })
                    .cloned()
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        let membership = |subject: &str| -> Vec<String> {
            groups
                .iter()
                .filter(|group| **group != this)
                .map(|group| {
                    if ancestors.contains(group) {
                        format!("{subject} in {}", literal(group))
                    } else {
                        format!("!({subject} in {})", literal(group))
                    }
                })
                .collect()
        };
        let subjects: Vec<&str> = match this.0.as_str() {
            "Service" if principal == "Service" => vec!["context.service", "principal"],
            "Service" => vec!["context.service"],
            "Employee" if principal == "Employee" => vec!["principal"],
            kind if groups.iter().any(|(k, _)| k == kind) => {
                // How the directory nests its groups, e.g. a team in its organization.
                for condition in membership(&literal(&this)) {
                    facts.push(Fact {
                        says: format!("the directory nests {}", literal(&this)),
                        cedar: condition,
                    });
                }
                continue;
            }
            _ => continue,
        };
        for subject in subjects {
            let mut conditions = membership(subject);
            if let Some(attrs) = entity.get("attrs").and_then(serde_json::Value::as_object) {
                for (name, value) in attrs {
                    let read = format!("{subject}.{name}");
                    let condition = match value {
                        serde_json::Value::String(text) => format!("{read} == {}", cedar_str(text)),
                        serde_json::Value::Bool(b) => format!("{read} == {b}"),
                        serde_json::Value::Number(n) if n.is_i64() => format!("{read} == {n}"),
                        serde_json::Value::Array(items) => {
                            let strings: Option<Vec<String>> = items
                                .iter()
                                .map(|item| item.as_str().map(cedar_str))
                                .collect();
                            match strings {
                                Some(strings) if strings.is_empty() => format!("{read}.isEmpty()"),
                                Some(strings) => {
                                    let set = format!("[{}]", strings.join(", "));
                                    format!(
                                        "{read}.containsAll({set}) && {set}.containsAll({read})"
                                    )
                                }
                                None => continue,
                            }
                        }
                        other => match uid(other) {
                            Some(target) if other.get("__entity").is_some() => {
                                format!("{read} == {}", literal(&target))
                            }
                            _ => continue,
                        },
                    };
                    conditions.push(condition);
                }
            }
            if conditions.is_empty() {
                continue;
            }
            facts.push(Fact {
                says: format!("{subject} is {} as the directory lists it", literal(&this)),
                cedar: format!(
                    "{subject} != {} || ({})",
                    literal(&this),
                    conditions.join(" && ")
                ),
            });
        }
    }
    facts
}

/// Today's directory as facts that type-check for `env` (see
/// [`directory_candidates`]).
pub fn directory_facts_for(snapshot: &PolicySnapshot, env: &RequestEnv) -> Vec<Fact> {
    type_checked(snapshot, env, directory_candidates(snapshot, env))
}

/// The facts that type-check for `env` (a custom schema may lack an attribute a fact
/// reads; leaving that fact out can only add counterexamples, never hide one).
pub fn facts_for(snapshot: &PolicySnapshot, env: &RequestEnv) -> Vec<Fact> {
    type_checked(snapshot, env, candidates(snapshot, env))
}

fn type_checked(snapshot: &PolicySnapshot, env: &RequestEnv, candidates: Vec<Fact>) -> Vec<Fact> {
    let validator = Validator::new(snapshot.schema.clone());
    let scope = format!(
        "principal is {}, action == {}, resource is {}",
        env.principal(),
        env.action(),
        env.resource()
    );
    candidates
        .into_iter()
        .filter(|fact| {
            let text = format!("forbid ({scope}) unless {{ {} }};", fact.cedar);
            PolicySet::from_str(&text).is_ok_and(|set| {
                validator
                    .validate(&set, ValidationMode::Strict)
                    .validation_passed()
            })
        })
        .collect()
}

/// The facts as one policy: `effect` `forbid` (added to the checked policies, so that
/// only requests satisfying the facts can be allowed) or `permit` (alone, to check that
/// some request satisfies them).
pub fn facts_policy(facts: &[Fact], permit: bool) -> Result<Policy, String> {
    let condition = if facts.is_empty() {
        "true".to_owned()
    } else {
        facts
            .iter()
            .map(|fact| format!("({})", fact.cedar))
            .collect::<Vec<_>>()
            .join(" && ")
    };
    let text = if permit {
        format!("permit (principal, action, resource) when {{ {condition} }};")
    } else {
        format!("forbid (principal, action, resource) unless {{ {condition} }};")
    };
    Policy::parse(Some(PolicyId::new(FACTS_ID)), text)
        .map_err(|error| format!("the generated facts do not parse: {error}"))
}
