//! Load-time checks of a policy set against what this service builds: whether the
//! schema declares key administration, that it accepts every request shape the
//! service makes, and that no permit grants key administration without naming it.
//! Pure functions of the schema and policy text; may not load files or decide.

use cedar_policy::{Context, Request, RestrictedExpression, Schema};
use serde_json::Value;

use super::Action;
use super::names::{KEY_RING_TYPE, ResourceKind, uid};

/// Whether `schema` declares key administration: the `KeyRing` entity type (and then,
/// as [`probe_schema`] checks, every key action on it). Without it, no `KeyRing`
/// entities are made and every key action is refused.
pub(super) fn declares_key_administration(schema: &Schema) -> bool {
    schema
        .entity_types()
        .any(|entity_type| entity_type.to_string() == KEY_RING_TYPE)
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
    if pinned.is_some_and(|t| t != KEY_RING_TYPE) {
        return None;
    }
    Some(format!(
        "permits every action on a resource that may be a `{KEY_RING_TYPE}`, so it would grant key administration (`destroy_key` included): name its actions (`action in [Action::\"decrypt\", ...]`) or scope it to fields (`resource is Field`)"
    ))
}

/// Checks that the schema accepts the requests this service builds, so a schema edit
/// that breaks them fails at load, not on a request path.
pub(super) fn probe_schema(schema: &Schema, key_admin: bool) -> Result<(), String> {
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
    for action in Action::ALL {
        // Keys are administered by people: key actions need only apply to employees.
        let (resource_type, principal_types): (&str, &[&str]) = match action.resource_kind() {
            ResourceKind::Field => ("Field", &["Employee", "Service"]),
            ResourceKind::KeyRing if key_admin => (KEY_RING_TYPE, &["Employee"]),
            ResourceKind::KeyRing => continue,
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
