//! The `never_errors` claim: whether a policy errs on a request ringfence builds,
//! checked per policy as an implication under the facts. May not render or replay.

use cedar_policy::RequestEnv;
use cedar_policy_symcc::{CompiledPolicy, CompiledPolicySet, Env};

use super::{Action, PolicySnapshot, Session, env_key, env_name, facts};

/// Whether a policy that may apply to `env`'s action errs on a request that satisfies
/// the facts. SymCC's own never-errors check ranges over requests ringfence never
/// builds (a request time past the year 9999), so each policy `P` is checked as an
/// implication instead: every request that satisfies the facts is allowed by
/// `permit when { E || !E }`, where `E` is `P`'s scope and condition; that permit fails
/// exactly when evaluating `E` errs (scopes cannot err, and `&&` stops at a scope that
/// does not match). The facts are compiled once per environment.
pub(super) async fn never_errors(
    snapshot: &PolicySnapshot,
    env: &RequestEnv,
    session: &mut Session<'_>,
) -> Result<Option<(Env, Option<String>)>, String> {
    use serde_json::{Value, json};
    let action = Action::from_id(&env_key(env).1);
    let set = action
        .and_then(|action| snapshot.by_action.get(&action))
        .unwrap_or(&snapshot.all_policies);
    let facts = facts::facts_for(snapshot, env);
    let facts_est = facts::facts_policy(&facts, true)?
        .to_json()
        .map_err(|error| format!("cannot read the facts: {error}"))?;
    let unscoped = |body: Value| {
        json!({
            "effect": "permit",
            "principal": {"op": "All"},
            "action": {"op": "All"},
            "resource": {"op": "All"},
            "conditions": [{"kind": "when", "body": body}],
            "annotations": {},
        })
    };
    let compile = |est: Value, id: &str| -> Result<CompiledPolicySet, String> {
        let policy = cedar_policy::Policy::from_json(Some(cedar_policy::PolicyId::new(id)), est)
            .map_err(|error| format!("cannot restate policy `{id}`: {error}"))?;
        Ok(CompiledPolicy::compile(&policy, env, &snapshot.schema)
            .map_err(|error| format!("cannot compile policy `{id}`: {error}"))?
            .into_compiled_policyset())
    };
    let assumed = compile(
        json!({
            "effect": "permit",
            "principal": {"op": "All"},
            "action": {"op": "All"},
            "resource": {"op": "All"},
            "conditions": facts_est.get("conditions").cloned().unwrap_or(json!([])),
            "annotations": {},
        }),
        facts::FACTS_ID,
    )?;
    let vacuous = session
        .run(async |c| c.check_always_denies_opt(&assumed).await)
        .await?;
    if vacuous {
        return Err(format!(
            "no request satisfies the facts assumed for {} (an empty directory or field catalog?), so nothing can be proved about it",
            env_name(env)
        ));
    }
    let mut each = Vec::new();
    for policy in set.policies() {
        let est = policy
            .to_json()
            .map_err(|error| format!("cannot read policy `{}`: {error}", policy.id()))?;
        let Some(evaluated) = evaluated_expression(&est) else {
            // Without a condition only the scope is evaluated, and scopes cannot err.
            continue;
        };
        let total = json!({"||": {"left": evaluated.clone(), "right": {"!": {"arg": evaluated}}}});
        each.push((policy.id().to_string(), total));
    }
    for (id, total) in each {
        let total = compile(unscoped(total), &id)?;
        if let Some(found) = session
            .run(async |c| {
                c.check_implies_with_counterexample_opt(&assumed, &total)
                    .await
            })
            .await?
        {
            return Ok(Some((found, Some(id))));
        }
    }
    Ok(None)
}

/// A policy's scope and condition as one expression (`scope && when && !unless`), or
/// `None` when it has no condition. Unknown scope shapes are an error of the caller's
/// making: they are kept as `true`, which can only add requests to check.
fn evaluated_expression(est: &serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::{Value, json};
    let conditions: Vec<Value> = est
        .get("conditions")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(|clause| {
            let body = clause.get("body")?.clone();
            Some(match clause.get("kind").and_then(Value::as_str) {
                Some("unless") => json!({"!": {"arg": body}}),
                _ => body,
            })
        })
        .collect();
    if conditions.is_empty() {
        return None;
    }
    let entity = |value: &Value| json!({"Value": {"__entity": value}});
    let scope = |var: &str| -> Option<Value> {
        let constraint = est.get(var)?;
        let left = json!({"Var": var});
        match constraint.get("op").and_then(Value::as_str)? {
            "==" => Some(json!({"==": {"left": left, "right": entity(constraint.get("entity")?)}})),
            "in" => match (constraint.get("entity"), constraint.get("entities")) {
                (Some(one), _) => Some(json!({"in": {"left": left, "right": entity(one)}})),
                (None, Some(Value::Array(many))) => Some(
                    json!({"in": {"left": left, "right": {"Set": many.iter().map(entity).collect::<Vec<_>>()}}}),
                ),
                _ => None,
            },
            "is" => {
                let mut is = json!({"left": left, "entity_type": constraint.get("entity_type")?});
                if let Some(within) = constraint.get("in")
                    && let Some(object) = is.as_object_mut()
                {
                    object.insert("in".to_owned(), entity(within.get("entity")?));
                }
                Some(json!({"is": is}))
            }
            _ => None,
        }
    };
    ["principal", "action", "resource"]
        .into_iter()
        .filter_map(scope)
        .chain(conditions)
        .reduce(|left, right| json!({"&&": {"left": left, "right": right}}))
}
