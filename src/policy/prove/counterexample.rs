//! A solver's counterexample as a policy test case: the request and the people and
//! services it needs, written as a suite file that fails when pasted under
//! `policies/tests/`, and replayed through the normal authorizer to show that it does.
//! May not run the solver.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{EntityUid, EvalResult, RequestEnv};
use cedar_policy_symcc::Env;
use serde_json::{Value, json};

use super::super::analysis::JURISDICTION_TYPE;
use super::super::suite::{self, Suite};
use super::super::{DATA_SUBJECTS_TYPE, KEY_RING_TYPE, PolicySnapshot};
use super::invariants::{Claim, Invariant};

/// Id given to the counterexample's employee when the solver's id is empty or taken.
pub const EMPLOYEE_ID: &str = "counterexample-employee";
/// Id given to the counterexample's service when the solver's id is empty or taken.
pub const SERVICE_ID: &str = "counterexample-service";

/// A request that breaks an invariant.
#[derive(Debug, Clone)]
pub struct Counterexample {
    /// The request environment (`Employee decrypt Field`).
    pub environment: String,
    /// The request in one line.
    pub summary: String,
    /// A suite file (YAML) whose one case fails while the invariant is violated.
    pub suite: String,
    /// Whether the normal authorizer, given that suite, breaks the invariant too
    /// (`Ok`), or why the case does not reproduce it (`Err`).
    pub replay: Result<(), String>,
    /// The policy that errs (`never_errors` only).
    pub erring_policy: Option<String>,
}

type Uid = (String, String);

fn uid_of(value: &Value) -> Option<Uid> {
    let uid = value.get("__entity").unwrap_or(value);
    Some((
        uid.get("type")?.as_str()?.to_owned(),
        uid.get("id")?.as_str()?.to_owned(),
    ))
}

fn uid_json((kind, id): &Uid) -> Value {
    json!({"type": kind, "id": id})
}

fn api_uid(uid: &EntityUid) -> Uid {
    (uid.type_name().to_string(), uid.id().unescaped().to_owned())
}

/// Entity types that come from the catalog and directory and cannot be fixtures.
fn generated(kind: &str) -> bool {
    matches!(kind, "Field" | "Action")
        || kind == KEY_RING_TYPE
        || kind == DATA_SUBJECTS_TYPE
        || kind == JURISDICTION_TYPE
}

/// How a rendered case is named and introduced.
pub(super) struct CaseText {
    /// The case's name.
    pub name: String,
    /// The suite's description.
    pub description: String,
    /// Comment lines at the top (each starting with `# `).
    pub header: String,
    /// `allow` or `deny`.
    pub expect: &'static str,
}

/// A solver's request as a suite file.
pub(super) struct Rendered {
    /// The request environment.
    pub environment: String,
    /// The request in one line.
    pub summary: String,
    /// The suite file.
    pub suite: String,
}

impl Counterexample {
    pub(super) fn render(
        snapshot: &PolicySnapshot,
        invariant: &Invariant,
        env: &RequestEnv,
        found: &Env,
        erring_policy: Option<String>,
    ) -> Self {
        let what = match &invariant.claim {
            Claim::NeverAllows(_) => {
                "the policies allow this request, which the invariant says they never allow"
            }
            Claim::Implies(_) => {
                "the policies allow this request, which the invariant's guard does not"
            }
            Claim::AlwaysDenies => {
                "the policies allow this request; the invariant says they deny every one"
            }
            Claim::NeverErrors => {
                "a policy errs on this request (an erring forbid does not forbid)"
            }
        };
        let text = CaseText {
            name: format!("counterexample to invariant {}", invariant.id),
            description: format!(
                "Counterexample to invariant `{}` ({}): {what}",
                invariant.id, invariant.description
            ),
            header: format!(
                "# Found by `ringfence policy prove` in policy set {}.\n# Paste under policies/tests/: the case fails until the policies are fixed.\n",
                snapshot.hash()
            ),
            expect: "deny",
        };
        let rendered = render_case(snapshot, env, found, erring_policy.as_deref(), &text);
        let replay = replay(snapshot, &rendered.suite, erring_policy.is_some());
        Self {
            environment: rendered.environment,
            summary: rendered.summary,
            suite: rendered.suite,
            replay,
            erring_policy,
        }
    }
}

/// Renders the solver's request `found` as a suite file of one case, with the people
/// and services it needs as fixtures (resolved against `snapshot`'s directory).
pub(super) fn render_case(
    snapshot: &PolicySnapshot,
    env: &RequestEnv,
    found: &Env,
    erring_policy: Option<&str>,
    wording: &CaseText,
) -> Rendered {
    {
        let environment = format!(
            "{} {} {}",
            env.principal(),
            env.action().id().unescaped(),
            env.resource()
        );
        let entities: Vec<Value> = found
            .entities
            .to_json_value()
            .ok()
            .and_then(|value| value.as_array().cloned())
            .unwrap_or_default();
        let mut by_uid: BTreeMap<Uid, Value> = BTreeMap::new();
        for entity in entities {
            if let Some(uid) = entity.get("uid").and_then(uid_of) {
                by_uid.insert(uid, entity);
            }
        }
        let ancestors = |uid: &Uid| -> BTreeSet<Uid> {
            let mut seen = BTreeSet::new();
            let mut todo = vec![uid.clone()];
            while let Some(next) = todo.pop() {
                let parents = by_uid
                    .get(&next)
                    .and_then(|e| e.get("parents"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for parent in parents.iter().filter_map(uid_of) {
                    if seen.insert(parent.clone()) {
                        todo.push(parent);
                    }
                }
            }
            seen
        };
        let in_directory = |uid: &Uid| -> Option<Value> {
            let api =
                EntityUid::from_str(&format!("{}::{}", uid.0, super::facts::cedar_str(&uid.1)))
                    .ok()?;
            snapshot.entities.get(&api)?.to_json_value().ok()
        };
        // Every ancestor the directory gives an entity (transitively).
        let directory_ancestors = |uid: &Uid| -> BTreeSet<Uid> {
            EntityUid::from_str(&format!("{}::{}", uid.0, super::facts::cedar_str(&uid.1)))
                .ok()
                .and_then(|api| {
                    snapshot
                        .entities
                        .ancestors(&api)
                        .map(|found| found.map(api_uid).collect())
                })
                .unwrap_or_default()
        };
        let attrs_of = |uid: &Uid| -> Value {
            by_uid
                .get(uid)
                .and_then(|e| e.get("attrs"))
                .cloned()
                .unwrap_or_else(|| json!({}))
        };
        let context = |key: &str| found.request.context().and_then(|c| c.get(key));
        let text = |key: &str| match context(key) {
            Some(EvalResult::String(value)) => value,
            _ => String::new(),
        };
        let mut notes = Vec::new();
        let mut fixtures: Vec<Value> = Vec::new();
        let mut fixed: BTreeSet<Uid> = BTreeSet::new();
        // Entities the fixtures point to that the directory lacks become fixtures too.
        let mut referenced: Vec<Uid> = Vec::new();

        // The calling service.
        let service_uid = match context("service") {
            Some(EvalResult::EntityUid(uid)) => Some(api_uid(&uid)),
            _ => None,
        };
        let mut service_id = String::new();
        if let Some(uid) = &service_uid {
            let attrs = attrs_of(uid);
            let parents: Vec<Value> = ancestors(uid).iter().map(uid_json).collect();
            let directory = in_directory(uid);
            let same = directory.as_ref().is_some_and(|d| {
                d.get("attrs") == Some(&attrs)
                    && d.get("parents").and_then(Value::as_array).map(Vec::len)
                        == Some(parents.len())
            });
            if same {
                service_id = uid.1.clone();
            } else {
                service_id = if uid.1.is_empty() || directory.is_some() {
                    if directory.is_some() {
                        notes.push(format!(
                            "the solver's service {:?} differs from the directory's, so it is renamed `{SERVICE_ID}`",
                            uid.1
                        ));
                    }
                    SERVICE_ID.to_owned()
                } else {
                    uid.1.clone()
                };
                collect_refs(&attrs, &mut referenced);
                referenced.extend(ancestors(uid));
                fixtures.push(json!({
                    "uid": {"type": uid.0, "id": service_id},
                    "attrs": attrs,
                    "parents": parents,
                }));
                fixed.insert(uid.clone());
            }
        }

        // The principal: an employee, or the service itself.
        let principal = found.request.principal().map(api_uid);
        let mut employee_id = None;
        if let Some(uid) = principal.as_ref().filter(|uid| uid.0 == "Employee") {
            let attrs = attrs_of(uid);
            let all = ancestors(uid);
            // The directory's own employee, as the directory lists them: no fixture.
            let listed = in_directory(uid);
            let same = listed.as_ref().is_some_and(|entity| {
                entity.get("attrs") == Some(&attrs) && directory_ancestors(uid) == all
            });
            if same {
                employee_id = Some(uid.1.clone());
            }
            if listed.is_some() && !same {
                notes.push(format!(
                    "the solver's employee {:?} is renamed `{EMPLOYEE_ID}`: the directory has one of that id",
                    uid.1
                ));
            }
        }
        if let Some(uid) = principal
            .as_ref()
            .filter(|uid| uid.0 == "Employee" && employee_id.is_none())
        {
            let id = if uid.1.is_empty() || in_directory(uid).is_some() {
                EMPLOYEE_ID.to_owned()
            } else {
                uid.1.clone()
            };
            let attrs = attrs_of(uid);
            let all = ancestors(uid);
            collect_refs(&attrs, &mut referenced);
            referenced.extend(all.iter().cloned());
            fixtures.push(json!({
                "uid": {"type": "Employee", "id": id},
                "attrs": attrs,
                // Every ancestor directly: the directory's teams may sit elsewhere.
                "parents": all.iter().map(uid_json).collect::<Vec<_>>(),
            }));
            fixed.insert(uid.clone());
            employee_id = Some(id);
        }
        for uid in referenced {
            if generated(&uid.0) || fixed.contains(&uid) || in_directory(&uid).is_some() {
                continue;
            }
            fixed.insert(uid.clone());
            fixtures.push(json!({
                "uid": uid_json(&uid),
                "attrs": attrs_of(&uid),
                "parents": [],
            }));
        }

        // The resource.
        let resource = found.request.resource().map(api_uid);
        let resource_attrs = resource.as_ref().map(attrs_of).unwrap_or_default();
        let jurisdiction = resource_attrs
            .get("jurisdiction")
            .and_then(uid_of)
            .map(|uid| uid.1)
            .unwrap_or_default();
        let action = env.action().id().unescaped().to_owned();
        let request_time = match context("request_time") {
            Some(EvalResult::Long(seconds)) => seconds,
            _ => 0,
        };
        let at = time::OffsetDateTime::from_unix_timestamp(request_time)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned());

        let mut case = serde_norway::Mapping::new();
        let mut put = |key: &str, value: &str| {
            case.insert(key.into(), value.into());
        };
        put("name", &wording.name);
        if let Some(id) = &employee_id {
            put("employee", id);
        }
        put("service", &service_id);
        put("action", &action);
        put("jurisdiction", &jurisdiction);
        let field = resource_attrs.get("field").and_then(Value::as_str);
        let record_type = resource_attrs.get("record_type").and_then(Value::as_str);
        if let (Some(record_type), Some(field)) = (record_type, field) {
            put("record_type", record_type);
            put("field", field);
        }
        let purpose = text("purpose");
        let ticket = text("ticket");
        let authentication = text("authentication");
        put("purpose", &purpose);
        put("ticket", &ticket);
        put("authentication", &authentication);
        put("at", &at);
        put("expect", wording.expect);

        let classification = resource_attrs
            .get("classification")
            .and_then(Value::as_str)
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        let target = match (record_type, field) {
            (Some(record_type), Some(field)) => {
                format!("{jurisdiction}/{record_type}.{field}{classification}")
            }
            _ => format!(
                "{}::\"{jurisdiction}\"",
                resource.as_ref().map(|r| r.0.as_str()).unwrap_or("?")
            ),
        };
        let who = match (&employee_id, &principal) {
            (Some(id), Some(uid)) => {
                let attrs = attrs_of(uid);
                let ancestors: Vec<String> = ancestors(uid)
                    .iter()
                    .map(|(kind, id)| format!("{kind}::{id:?}"))
                    .collect();
                format!(
                    "Employee {id:?} (attributes {attrs}; in [{}])",
                    ancestors.join(", ")
                )
            }
            _ => "the service alone".to_owned(),
        };
        let service_attrs = service_uid.as_ref().map(attrs_of).unwrap_or_default();
        let mut summary = format!(
            "{who} via Service {service_id:?} (attributes {service_attrs}) may {action} {target} with purpose {purpose:?}, ticket {ticket:?}, authentication {authentication:?}"
        );
        if let Some(policy) = erring_policy {
            summary = format!("policy `{policy}` errs when {summary}");
        }
        let mut file = serde_norway::Mapping::new();
        file.insert("description".into(), wording.description.clone().into());
        if !fixtures.is_empty() {
            file.insert(
                "fixtures".into(),
                serde_norway::to_value(&fixtures).unwrap_or_default(),
            );
        }
        file.insert(
            "cases".into(),
            serde_norway::Value::Sequence(vec![serde_norway::Value::Mapping(case)]),
        );
        let mut suite = wording.header.clone();
        for note in &notes {
            suite.push_str(&format!("# Note: {note}.\n"));
        }
        suite.push_str(&serde_norway::to_string(&file).unwrap_or_default());
        Rendered {
            environment,
            summary,
            suite,
        }
    }
}

fn collect_refs(value: &Value, into: &mut Vec<Uid>) {
    match value {
        Value::Object(map) => {
            if let Some(uid) = map.get("__entity").and_then(uid_of) {
                into.push(uid);
            } else {
                for inner in map.values() {
                    collect_refs(inner, into);
                }
            }
        }
        Value::Array(values) => values.iter().for_each(|v| collect_refs(v, into)),
        _ => {}
    }
}

/// Runs the rendered suite through the normal authorizer: `Ok` when its one case fails
/// the way the invariant is broken (allowed; or an evaluation error for `never_errors`).
fn replay(snapshot: &PolicySnapshot, text: &str, erring: bool) -> Result<(), String> {
    let parsed = Suite::parse("counterexample", Path::new("counterexample.yaml"), text)
        .map_err(|problem| format!("the rendered suite does not parse: {problem}"))?;
    let report = suite::run(snapshot, &[parsed], None);
    let failures: Vec<String> = report
        .suites
        .iter()
        .flat_map(|s| s.cases.iter())
        .flat_map(|c| c.failures.iter().cloned())
        .collect();
    let expected = if erring {
        "evaluation error"
    } else {
        "expected deny, got allow"
    };
    match failures.as_slice() {
        [] => Err("the authorizer denies the rendered case: the counterexample needs a directory unlike this one".to_owned()),
        failures if failures.iter().all(|f| f.contains(expected)) => Ok(()),
        failures => Err(format!(
            "the rendered case fails otherwise: {}",
            failures.join("; ")
        )),
    }
}
