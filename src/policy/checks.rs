//! Load-time checks of a policy set against what this service builds: whether the
//! schema declares key administration, that it accepts every request shape the
//! service makes, and that no permit grants key administration without naming it.
//! Pure functions of the schema and policy text; may not load files or decide.

use std::collections::BTreeSet;

use cedar_policy::{Context, Request, RestrictedExpression, Schema};
use serde_json::Value;

use super::Action;
use super::names::{KEY_RING_TYPE, ResourceKind, uid};

/// The actions `schema` declares, which are the ones this policy set decides.
/// `encrypt` and `decrypt` always (the schema must accept them); the key actions when
/// it declares the `KeyRing` entity type, `shred` when it declares `DataSubjects`
/// (and then, as [`probe_schema`] checks, the actions on them); `rewrap` when it
/// declares that action. A policy set written before an action existed loads and
/// decides what it did; the newer actions are refused for it.
pub(super) fn declared_actions(schema: &Schema) -> BTreeSet<Action> {
    let has_type = |name: &str| {
        schema
            .entity_types()
            .any(|entity_type| entity_type.to_string() == name)
    };
    let has_action = |id: &str| schema.actions().any(|uid| uid.id().unescaped() == id);
    Action::ALL
        .into_iter()
        .filter(|action| match action.resource_kind() {
            ResourceKind::Field => *action != Action::Rewrap || has_action(action.as_str()),
            kind => has_type(kind.type_name()),
        })
        .collect()
}

/// Why a policy would grant key administration without naming it: a `permit` whose
/// action scope is `action` alone (every action) and whose resource scope admits a
/// `KeyRing`. Written before key actions existed, such a permit would now also grant
/// `destroy_key`; it is refused with the fix. Forbids may stay broad.
pub(super) fn grants_key_actions_unnamed(est: &Value) -> Option<String> {
    if est.get("effect").and_then(Value::as_str) != Some("permit") {
        return None;
    }
    let every_action = est
        .get("action")
        .and_then(|scope| scope.get("op"))
        .and_then(Value::as_str)
        == Some("All");
    if !every_action {
        return None;
    }
    let resource = est.get("resource")?;
    let entity_type = |value: Option<&Value>| {
        value
            .map(|entity| entity.get("__entity").unwrap_or(entity))
            .and_then(|entity| entity.get("type"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    // The type the scope pins the resource to, when it pins one.
    let pinned = match resource.get("op").and_then(Value::as_str) {
        Some("==") => entity_type(resource.get("entity")),
        Some("is") => resource
            .get("entity_type")
            .and_then(Value::as_str)
            .map(str::to_owned),
        // `in` a Field: only that field (fields have no members).
        Some("in") => entity_type(resource.get("entity")).filter(|t| t == "Field"),
        _ => None,
    };
    if pinned.is_some_and(|t| t != KEY_RING_TYPE && t != super::names::DATA_SUBJECTS_TYPE) {
        return None;
    }
    Some(format!(
        "permits every action on a resource that may be a `{KEY_RING_TYPE}` or `DataSubjects`, so it would grant key administration (`destroy_key` and `shred` included): name its actions (`action in [Action::\"decrypt\", ...]`) or scope it to fields (`resource is Field`)"
    ))
}

/// Checks that the schema accepts the requests this service builds, so a schema edit
/// that breaks them fails at load, not on a request path.
pub(super) fn probe_schema(schema: &Schema, declared: &BTreeSet<Action>) -> Result<(), String> {
    let service = uid("Service", "probe").map_err(|e| e.to_string())?;
    let context = Context::from_pairs([
        (
            "purpose".to_owned(),
            RestrictedExpression::new_string(String::new()),
        ),
        (
            "ticket".to_owned(),
            RestrictedExpression::new_string(String::new()),
        ),
        (
            "authentication".to_owned(),
            RestrictedExpression::new_string(String::new()),
        ),
        (
            "service".to_owned(),
            RestrictedExpression::new_entity_uid(service),
        ),
        ("request_time".to_owned(), RestrictedExpression::new_long(0)),
    ])
    .map_err(|error| error.to_string())?;
    for action in declared.iter().copied() {
        // Keys and subjects are administered by people: those actions need only
        // apply to employees.
        let kind = action.resource_kind();
        let resource_type = kind.type_name();
        let principal_types: &[&str] = if kind.is_jurisdictional() {
            &["Employee"]
        } else {
            &["Employee", "Service"]
        };
        for principal_type in principal_types {
            let request = Request::new(
                uid(principal_type, "probe").map_err(|e| e.to_string())?,
                uid("Action", action.as_str()).map_err(|e| e.to_string())?,
                uid(resource_type, "probe").map_err(|e| e.to_string())?,
                context.clone(),
                Some(schema),
            );
            if let Err(error) = request {
                return Err(format!(
                    "the schema must let action `{}` apply to principal `{principal_type}` and resource `{resource_type}` with context {{purpose: String, ticket: String, authentication: String, service: Service, request_time: Long}}: {error}",
                    action.as_str()
                ));
            }
        }
    }
    Ok(())
}

/// What the schema's JSON form says that the prover must know, after refusing names
/// with control characters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SchemaShape {
    /// Whether `Jurisdiction` entities may have parents (then "a field is in
    /// jurisdiction J only if J is its `jurisdiction`" is not a fact).
    pub jurisdictions_nest: bool,
}

/// Refuses control characters in any name of the schema (attribute names may be
/// quoted strings; Cedar's symbolic compiler writes them into SMT comments, where a
/// carriage return would end the comment and smuggle solver commands in), and reads
/// the [`SchemaShape`].
pub(super) fn schema_shape(text: &str) -> Result<SchemaShape, String> {
    let (fragment, _) = cedar_policy::SchemaFragment::from_cedarschema_str(text)
        .map_err(|error| error.to_string())?;
    let json = fragment
        .to_json_value()
        .map_err(|error| error.to_string())?;
    fn walk(value: &serde_json::Value, path: &str) -> Result<(), String> {
        let bad = |text: &str| text.chars().any(char::is_control);
        match value {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    if bad(key) {
                        return Err(format!(
                            "the name `{}` (in {path}) contains a control character",
                            crate::record::shown(key)
                        ));
                    }
                    // Annotations are documentation, never compiled.
                    if key != "annotations" {
                        walk(inner, &format!("{path}/{key}"))?;
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, path)?;
                }
            }
            serde_json::Value::String(text) if bad(text) => {
                return Err(format!(
                    "`{}` (in {path}) contains a control character",
                    crate::record::shown(text)
                ));
            }
            _ => {}
        }
        Ok(())
    }
    walk(&json, "schema")?;
    let jurisdictions_nest = json
        .as_object()
        .into_iter()
        .flat_map(|namespaces| namespaces.values())
        .filter_map(|namespace| namespace.get("entityTypes")?.get("Jurisdiction"))
        .any(|jurisdiction| {
            jurisdiction
                .get("memberOfTypes")
                .and_then(serde_json::Value::as_array)
                .is_some_and(|parents| !parents.is_empty())
        });
    Ok(SchemaShape { jurisdictions_nest })
}
