//! The invariants files (`policies/invariants/`): statements in `invariants.yaml`, the
//! guard policies they name in `*.cedar`, and the acknowledgements of weakened or
//! deleted invariants in `policies/CHANGES.yaml`; parsed strictly and hashed. May not
//! run the solver.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use cedar_policy::{Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::super::diagnostics::render;
use super::super::{Action, ID_ANNOTATION};

/// Directory of the invariants inside the policy directory.
pub const INVARIANTS_DIR: &str = "invariants";
/// The statements file inside [`INVARIANTS_DIR`].
pub const STATEMENTS_FILE: &str = "invariants.yaml";
/// Acknowledgements of policy changes, in the policy directory itself.
pub const CHANGES_FILE: &str = "CHANGES.yaml";

/// What an invariant says about the requests of its actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No request the policies allow is one the guard policy matches.
    NeverAllows(String),
    /// Every request the policies allow is one the guard policy matches.
    Implies(String),
    /// The policies allow no request at all.
    AlwaysDenies,
    /// No policy errors on any schema-valid request (then `actions` is every action).
    NeverErrors,
}

/// Which principals an invariant ranges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PrincipalKind {
    /// Only `Employee` principals.
    Employee,
    /// Only `Service` principals (a service acting alone).
    Service,
}

/// One invariant.
#[derive(Debug, Clone)]
pub struct Invariant {
    /// Its id, unique in the file.
    pub id: String,
    /// What it promises, in words.
    pub description: String,
    /// The actions it is about (every declared action for `never_errors`).
    pub actions: Vec<Action>,
    /// The principal type it is restricted to, if any.
    pub principal: Option<PrincipalKind>,
    /// What it claims.
    pub claim: Claim,
    /// SHA-256 (hex) of what it means: actions, principal, claim and the guard's
    /// policy text (without annotations). Wording changes keep it.
    pub hash: String,
}

/// An acknowledgement that an invariant was weakened or deleted on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    /// The invariant's id.
    pub invariant: String,
    /// Its hash before the change.
    pub old: String,
    /// Its hash after the change; `None` when it was deleted.
    pub new: Option<String>,
    /// Why, as the author wrote it.
    pub reason: String,
}

/// An acknowledgement that a change widens who may do what, on purpose (`policy diff
/// --fail-on-widening`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WideningAck {
    /// The action widened.
    pub action: Action,
    /// The principal type widened (`Employee` or `Service`).
    pub principal: PrincipalKind,
    /// Hash of the set before the change.
    pub old_set: String,
    /// Hash of the set after it (`CHANGES.yaml` is not part of a set's hash).
    pub new_set: String,
    /// Why, as the author wrote it.
    pub reason: String,
}

/// A policy directory's invariants, guards and acknowledgements.
#[derive(Debug, Clone, Default)]
pub struct Invariants {
    /// The invariants in file order.
    pub list: Vec<Invariant>,
    /// Guard policies by id.
    pub guards: BTreeMap<String, Policy>,
    /// Acknowledgements of changed invariants from `CHANGES.yaml`.
    pub acknowledgements: Vec<Acknowledgement>,
    /// Acknowledgements of widenings from `CHANGES.yaml`.
    pub widenings: Vec<WideningAck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementsFile {
    invariants: Vec<Statement>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ActionList {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    id: String,
    description: String,
    #[serde(default)]
    actions: Option<ActionList>,
    #[serde(default)]
    principal: Option<PrincipalKind>,
    #[serde(default)]
    never_allows: Option<String>,
    #[serde(default)]
    implies: Option<String>,
    #[serde(default)]
    always_denies: Option<bool>,
    #[serde(default)]
    never_errors: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesFile {
    #[serde(default)]
    invariants: Vec<AckSpec>,
    #[serde(default)]
    widenings: Vec<WideningSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WideningSpec {
    action: String,
    principal: PrincipalKind,
    old_set: String,
    new_set: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckSpec {
    invariant: String,
    old: String,
    /// `deleted` or the new hash.
    new: String,
    reason: String,
}

/// The files read, by name relative to the policy directory, for hashing and the
/// archive.
pub type Sources = Vec<(String, String)>;

impl Invariants {
    /// Reads `dir/invariants/` (absent: no invariants) and `dir/CHANGES.yaml`
    /// (absent: no acknowledgements). Every file read is passed to `hash_file`;
    /// every problem goes to `diagnostics`.
    pub fn load(
        dir: &Path,
        schema: Option<&Schema>,
        declared: &BTreeSet<Action>,
        hash_file: &mut dyn FnMut(&str, &str, bool),
        diagnostics: &mut Vec<String>,
    ) -> Invariants {
        let mut invariants = Invariants::default();
        let changes_path = dir.join(CHANGES_FILE);
        if let Some(text) = read_optional(&changes_path, diagnostics) {
            hash_file(CHANGES_FILE, &text, false);
            match parse_changes(&text) {
                Ok((acks, widenings)) => {
                    invariants.acknowledgements = acks;
                    invariants.widenings = widenings;
                }
                Err(problem) => diagnostics.push(format!("{}: {problem}", changes_path.display())),
            }
        }

        let inv_dir = dir.join(INVARIANTS_DIR);
        if !inv_dir.is_dir() {
            return invariants;
        }
        let mut guard_paths: Vec<_> = match std::fs::read_dir(&inv_dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "cedar"))
                .collect(),
            Err(error) => {
                diagnostics.push(format!("{}: {error}", inv_dir.display()));
                return invariants;
            }
        };
        guard_paths.sort();
        let mut guard_set = PolicySet::new();
        let mut guard_files = BTreeMap::new();
        for path in &guard_paths {
            let Some(text) = read_optional(path, diagnostics) else {
                continue;
            };
            let name = format!(
                "{INVARIANTS_DIR}/{}",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
            hash_file(&name, &text, true);
            add_guards(path, &text, &mut guard_set, &mut guard_files, diagnostics);
        }
        if let Some(schema) = schema {
            let validation =
                Validator::new(schema.clone()).validate(&guard_set, ValidationMode::Strict);
            for error in validation.validation_errors() {
                let file = guard_files
                    .get(&error.policy_id().to_string())
                    .map(|path: &std::path::PathBuf| path.display().to_string())
                    .unwrap_or_default();
                diagnostics.push(format!("{file}: guard {}", render(error)));
            }
        }
        invariants.guards = guard_set
            .policies()
            .map(|policy| (policy.id().to_string(), policy.clone()))
            .collect();

        let statements_path = inv_dir.join(STATEMENTS_FILE);
        let Some(text) = read_optional(&statements_path, diagnostics) else {
            if !invariants.guards.is_empty() {
                diagnostics.push(format!(
                    "{}: missing: the guard policies in {} are used only by the invariants it states",
                    statements_path.display(),
                    inv_dir.display()
                ));
            }
            return invariants;
        };
        hash_file(&format!("{INVARIANTS_DIR}/{STATEMENTS_FILE}"), &text, true);
        let at = statements_path.display();
        let file: StatementsFile = match serde_norway::from_str(&text) {
            Ok(file) => file,
            Err(error) => {
                diagnostics.push(format!("{at}: {error}"));
                return invariants;
            }
        };
        let mut used = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for statement in file.invariants {
            let id = statement.id.clone();
            match invariants.statement(statement, declared, &mut used) {
                Ok(invariant) => {
                    if !ids.insert(id.clone()) {
                        diagnostics.push(format!("{at}: duplicate invariant id `{id}`"));
                    }
                    invariants.list.push(invariant);
                }
                Err(problem) => diagnostics.push(format!("{at}: invariant `{id}`: {problem}")),
            }
        }
        for unused in invariants.guards.keys().filter(|id| !used.contains(*id)) {
            let file = guard_files
                .get(unused)
                .map(|path| path.display().to_string())
                .unwrap_or_default();
            diagnostics.push(format!(
                "{file}: guard `{unused}` is named by no invariant in {at} (a typo in `never_allows` or `implies`?)"
            ));
        }
        invariants
    }

    fn statement(
        &self,
        statement: Statement,
        declared: &BTreeSet<Action>,
        used: &mut BTreeSet<String>,
    ) -> Result<Invariant, String> {
        if statement.id.trim().is_empty()
            || statement.id.len() > 128
            || statement.id.chars().any(char::is_control)
        {
            return Err("the id must be 1 to 128 printable characters".to_owned());
        }
        if statement.description.chars().any(char::is_control) || statement.description.len() > 1024
        {
            return Err(
                "the description must be at most 1024 printable characters on one line".to_owned(),
            );
        }
        let claims = [
            statement.never_allows.clone().map(Claim::NeverAllows),
            statement.implies.clone().map(Claim::Implies),
            statement
                .always_denies
                .filter(|yes| *yes)
                .map(|_| Claim::AlwaysDenies),
            statement
                .never_errors
                .filter(|yes| *yes)
                .map(|_| Claim::NeverErrors),
        ];
        let mut claims = claims.into_iter().flatten();
        let (Some(claim), None) = (claims.next(), claims.next()) else {
            return Err(
                "state exactly one of `never_allows: GUARD`, `implies: GUARD`, `always_denies: true` or `never_errors: true`"
                    .to_owned(),
            );
        };
        let names: Vec<String> = match &statement.actions {
            None => Vec::new(),
            Some(ActionList::One(one)) => vec![one.clone()],
            Some(ActionList::Many(many)) => many.clone(),
        };
        let mut actions = Vec::new();
        for name in &names {
            let action = Action::from_id(name).ok_or_else(|| {
                format!(
                    "unknown action `{}`; one of {}",
                    crate::record::shown(name),
                    Action::ALL.map(Action::as_str).join(", ")
                )
            })?;
            if !declared.contains(&action) {
                return Err(format!("action `{name}` is not declared by the schema"));
            }
            if !actions.contains(&action) {
                actions.push(action);
            }
        }
        let guard_text = match &claim {
            Claim::NeverAllows(guard) | Claim::Implies(guard) => {
                let policy = self.guards.get(guard).ok_or_else(|| {
                    format!(
                        "names guard `{}`, which no `.cedar` file in {INVARIANTS_DIR}/ defines",
                        crate::record::shown(guard)
                    )
                })?;
                used.insert(guard.clone());
                if policy.effect() != cedar_policy::Effect::Permit {
                    return Err(format!(
                        "guard `{guard}` must be a `permit`: it describes the requests the invariant is about"
                    ));
                }
                // A guard that never applies to one of the actions would make the
                // invariant hold for that action whatever the policies say.
                if let Ok(est) = policy.to_json()
                    && let Some(scope) = super::super::load::actions_in_scope(&est)
                {
                    for action in &actions_named(&statement) {
                        if !scope.contains(action) {
                            return Err(format!(
                                "guard `{guard}` does not apply to action `{}`: name only actions its scope admits",
                                action.as_str()
                            ));
                        }
                    }
                }
                Some(meaning(policy))
            }
            Claim::AlwaysDenies | Claim::NeverErrors => None,
        };
        match &claim {
            Claim::NeverErrors => {
                if !actions.is_empty() {
                    return Err(
                        "`never_errors` is about every policy and action: leave out `actions`"
                            .to_owned(),
                    );
                }
                actions = declared.iter().copied().collect();
            }
            _ if actions.is_empty() => {
                return Err("`actions` must name at least one action".to_owned());
            }
            _ => {}
        }
        let mut hasher = Sha256::new();
        let kind = match &claim {
            Claim::NeverAllows(_) => "never_allows",
            Claim::Implies(_) => "implies",
            Claim::AlwaysDenies => "always_denies",
            Claim::NeverErrors => "never_errors",
        };
        let mut action_names: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
        action_names.sort_unstable();
        let canonical = serde_json::json!({
            "claim": kind,
            "actions": if matches!(claim, Claim::NeverErrors) { Vec::new() } else { action_names },
            "principal": statement.principal.map(|p| format!("{p:?}")),
            "guard": guard_text,
        });
        hasher.update(canonical.to_string().as_bytes());
        Ok(Invariant {
            id: statement.id,
            description: statement.description,
            actions,
            principal: statement.principal,
            claim,
            hash: hex::encode(hasher.finalize()),
        })
    }

    /// The invariant of that id.
    pub fn get(&self, id: &str) -> Option<&Invariant> {
        self.list.iter().find(|invariant| invariant.id == id)
    }
}

/// The actions a statement names that are known (unknown ones are reported apart).
fn actions_named(statement: &Statement) -> Vec<Action> {
    match &statement.actions {
        None => Vec::new(),
        Some(ActionList::One(one)) => Action::from_id(one).into_iter().collect(),
        Some(ActionList::Many(many)) => many.iter().filter_map(|a| Action::from_id(a)).collect(),
    }
}

/// A guard's meaning: its policy as JSON without annotations (ids and descriptions
/// may change freely).
fn meaning(policy: &Policy) -> serde_json::Value {
    match policy.to_json() {
        Ok(mut est) => {
            if let Some(object) = est.as_object_mut() {
                object.remove("annotations");
            }
            est
        }
        Err(_) => serde_json::Value::String(policy.to_string()),
    }
}

fn read_optional(path: &Path, diagnostics: &mut Vec<String>) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            diagnostics.push(format!("{}: {error}", path.display()));
            None
        }
    }
}

fn add_guards(
    path: &Path,
    text: &str,
    set: &mut PolicySet,
    files: &mut BTreeMap<String, std::path::PathBuf>,
    diagnostics: &mut Vec<String>,
) {
    for (location, policy) in super::super::load::policies_in_file(path, text, "guard", diagnostics)
    {
        let Some(id) = policy.annotation(ID_ANNOTATION) else {
            diagnostics.push(format!(
                "{location}: guard has no `@id(\"...\")` annotation; invariants name guards by id"
            ));
            continue;
        };
        if let Some(first) = files.get(id) {
            diagnostics.push(format!(
                "{location}: duplicate guard id `{id}`, already used in {}",
                first.display()
            ));
            continue;
        }
        files.insert(id.to_owned(), path.to_owned());
        if let Err(error) = set.add(policy.new_id(PolicyId::new(id))) {
            diagnostics.push(format!("{location}: {error}"));
        }
    }
}

type Changes = (Vec<Acknowledgement>, Vec<WideningAck>);

fn parse_changes(text: &str) -> Result<Changes, String> {
    let file: ChangesFile = serde_norway::from_str(text).map_err(|error| error.to_string())?;
    let hash = |what: &str, value: &str| -> Result<String, String> {
        if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(value.to_ascii_lowercase())
        } else {
            Err(format!(
                "`{what}: {}` is not a hash (64 hex digits)",
                crate::record::shown(value)
            ))
        }
    };
    let widenings = file
        .widenings
        .into_iter()
        .map(|ack| {
            if ack.reason.trim().is_empty() {
                return Err(format!(
                    "the acknowledgement of the `{}` widening needs a `reason`",
                    ack.action
                ));
            }
            Ok(WideningAck {
                action: Action::from_id(&ack.action).ok_or_else(|| {
                    format!(
                        "widening: unknown action `{}`",
                        crate::record::shown(&ack.action)
                    )
                })?,
                principal: ack.principal,
                old_set: hash("old_set", &ack.old_set)?,
                new_set: hash("new_set", &ack.new_set)?,
                reason: ack.reason,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let acknowledgements = file
        .invariants
        .into_iter()
        .map(|ack| {
            if ack.reason.trim().is_empty() {
                return Err(format!(
                    "the acknowledgement of `{}` needs a `reason`",
                    ack.invariant
                ));
            }
            Ok(Acknowledgement {
                old: hash("old", &ack.old)?,
                new: if ack.new == "deleted" {
                    None
                } else {
                    Some(hash("new", &ack.new)?)
                },
                invariant: ack.invariant,
                reason: ack.reason,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((acknowledgements, widenings))
}
