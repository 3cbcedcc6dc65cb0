//! Loading a policy directory: schema, policies, directory and field catalog, strictly
//! validated into a [`PolicySnapshot`]; archiving a set by hash and loading it back.
//! May not decide.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::RwLock;

use cedar_policy::{Authorizer, Entities, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::analysis;
use super::checks::{
    SchemaShape, declared_actions, grants_key_actions_unnamed, probe_schema, schema_shape,
};
use super::diagnostics::{
    Collected, LoadError, name_snippets, policy_locations, render, render_in_file,
};
use super::names::{DATA_SUBJECTS_TYPE, KEY_RING_TYPE, Names, ResourceKind, field_entity_id};
use super::{
    Action, CALLER_VISIBLE_ANNOTATION, CATALOG_FILE, DIRECTORY_FILE, FieldCatalog, ID_ANNOTATION,
    Observed, PolicySnapshot, SCHEMA_FILE, prove,
};
use crate::record::Jurisdiction;

impl PolicySnapshot {
    /// Loads and strictly validates a policy directory. Every problem found is reported,
    /// not only the first.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let mut collected = Collected {
            diagnostics: Vec::new(),
        };
        let mut hasher = Sha256::new();
        let mut sources: Vec<(String, String)> = Vec::new();
        // Every file read is archived; all but `CHANGES.yaml` are hashed (its
        // acknowledgements name set hashes, so it cannot be part of one).
        let mut hash_file = |name: &str, text: &str, hashed: bool| {
            sources.push((name.to_owned(), text.to_owned()));
            if hashed {
                hasher.update((name.len() as u64).to_be_bytes());
                hasher.update(name.as_bytes());
                hasher.update((text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
        };

        let schema_path = dir.join(SCHEMA_FILE);
        let mut shape = SchemaShape::default();
        let schema = collected.read(&schema_path).and_then(|text| {
            hash_file(SCHEMA_FILE, &text, true);
            match schema_shape(&text) {
                Ok(found) => shape = found,
                Err(problem) => {
                    collected
                        .diagnostics
                        .push(format!("{}: {problem}", schema_path.display()));
                    return None;
                }
            }
            match Schema::from_cedarschema_str(&text) {
                Ok((schema, _warnings)) => Some(schema),
                Err(error) => {
                    collected
                        .diagnostics
                        .push(render_in_file(error, &schema_path, &text));
                    None
                }
            }
        });

        let mut policy_paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "cedar"))
                .collect(),
            Err(error) => {
                return Err(LoadError {
                    diagnostics: vec![format!(
                        "{}: cannot read policy directory: {error}",
                        dir.display()
                    )],
                });
            }
        };
        policy_paths.sort();
        if policy_paths.is_empty() {
            collected
                .diagnostics
                .push(format!("{}: no `.cedar` policy files", dir.display()));
        }

        // Key administration, shredding and rewrapping exist only in a schema that
        // declares them: a policy set written before them (or archived before them)
        // loads and decides records as it did.
        let declared = schema.as_ref().map(declared_actions).unwrap_or_default();
        let key_admin = declared.contains(&Action::RotateKey) || declared.contains(&Action::Shred);
        let mut policies = Policies {
            key_admin,
            ..Policies::default()
        };
        for path in &policy_paths {
            let Some(text) = collected.read(path) else {
                continue;
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            hash_file(&name, &text, true);
            policies.add_file(path, &text, &mut collected.diagnostics);
        }
        let Policies {
            all_policies,
            policy_files,
            observed,
            action_scopes,
            hidden_ids,
            ..
        } = policies;

        let invariants = prove::Invariants::load(
            dir,
            schema.as_ref(),
            &declared,
            &mut hash_file,
            &mut collected.diagnostics,
        );

        let catalog_path = dir.join(CATALOG_FILE);
        let catalog = collected.read(&catalog_path).and_then(|text| {
            hash_file(CATALOG_FILE, &text, true);
            match FieldCatalog::parse(&text) {
                Ok(catalog) => Some(catalog),
                Err(error) => {
                    collected
                        .diagnostics
                        .push(format!("{}: {error}", catalog_path.display()));
                    None
                }
            }
        });

        let directory_path = dir.join(DIRECTORY_FILE);
        let directory_text = collected.read(&directory_path);
        if let Some(text) = &directory_text {
            hash_file(DIRECTORY_FILE, text, true);
        }

        let Some(schema) = schema else {
            return Err(LoadError {
                diagnostics: collected.diagnostics,
            });
        };

        let validation =
            Validator::new(schema.clone()).validate(&all_policies, ValidationMode::Strict);
        for error in validation.validation_errors() {
            let file = policy_files
                .get(&error.policy_id().to_string())
                .map(|path| path.display().to_string())
                .unwrap_or_default();
            collected
                .diagnostics
                .push(format!("{file}:\n{}", name_snippets(&render(error), &file)));
        }

        let mut jurisdictions = BTreeSet::new();
        let entities = match (&directory_text, &catalog) {
            (Some(text), Some(catalog)) => {
                match directory_entities(
                    text,
                    &directory_path,
                    catalog,
                    &schema,
                    &declared,
                    &mut jurisdictions,
                ) {
                    Ok(entities) => Some(entities),
                    Err(diagnostic) => {
                        collected.diagnostics.push(diagnostic);
                        None
                    }
                }
            }
            _ => None,
        };

        if let Err(diagnostic) = probe_schema(&schema, &declared) {
            collected
                .diagnostics
                .push(format!("{}: {diagnostic}", schema_path.display()));
        }

        let (Some(entities), Some(catalog), true) =
            (entities, catalog, collected.diagnostics.is_empty())
        else {
            return Err(LoadError {
                diagnostics: collected.diagnostics,
            });
        };

        let by_action = by_action(&action_scopes)?;

        let names = Names::new().map_err(|error| LoadError {
            diagnostics: vec![error.to_string()],
        })?;
        Ok(Self {
            names,
            hash: hex::encode(hasher.finalize()),
            sources,
            schema,
            all_policies,
            by_action,
            entities,
            catalog,
            jurisdictions,
            observed,
            hidden_ids,
            policy_files,
            declared,
            invariants: std::sync::Arc::new(invariants),
            shape,
            authorizer: Authorizer::new(),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Keeps the exact files this set was loaded from in `root/<hash>/`, so decisions
    /// citing the hash can be replayed later. Written to a temporary directory and
    /// renamed into place; an existing archive of the same hash is kept as is.
    pub fn archive(&self, root: &Path) -> Result<PathBuf, String> {
        let target = root.join(&self.hash);
        if target.is_dir() {
            return Ok(target);
        }
        let fail = |path: &Path, error: std::io::Error| format!("{}: {error}", path.display());
        std::fs::create_dir_all(root).map_err(|error| fail(root, error))?;
        let temporary = root.join(format!(".{}.{}.tmp", self.hash, std::process::id()));
        if temporary.exists() {
            std::fs::remove_dir_all(&temporary).map_err(|error| fail(&temporary, error))?;
        }
        std::fs::create_dir(&temporary).map_err(|error| fail(&temporary, error))?;
        for (name, text) in &self.sources {
            let path = temporary.join(name);
            if let Some(parent) = path.parent().filter(|parent| *parent != temporary) {
                std::fs::create_dir_all(parent).map_err(|error| fail(parent, error))?;
            }
            let mut file = std::fs::File::create(&path).map_err(|error| fail(&path, error))?;
            std::io::Write::write_all(&mut file, text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|error| fail(&path, error))?;
        }
        // The names inside must be durable before the directory becomes visible.
        std::fs::File::open(&temporary)
            .and_then(|dir| dir.sync_all())
            .map_err(|error| fail(&temporary, error))?;
        match std::fs::rename(&temporary, &target) {
            Ok(()) => {}
            // Another process archived the same set first.
            Err(_) if target.is_dir() => {
                let _ = std::fs::remove_dir_all(&temporary);
            }
            Err(error) => return Err(fail(&target, error)),
        }
        std::fs::File::open(root)
            .and_then(|dir| dir.sync_all())
            .map_err(|error| fail(root, error))?;
        Ok(target)
    }

    /// Loads an archived set from `root/<hash>/` and checks that it still hashes to
    /// `hash`.
    pub fn load_archived(root: &Path, hash: &str) -> Result<PolicySnapshot, String> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "`{}` is not a policy set hash",
                crate::record::shown(hash)
            ));
        }
        let dir = root.join(hash);
        if !dir.is_dir() {
            return Err(format!(
                "policy set {hash} is not archived in {}",
                root.display()
            ));
        }
        let snapshot = PolicySnapshot::load(&dir).map_err(|error| error.to_string())?;
        if snapshot.hash() != hash {
            return Err(format!(
                "the archive {} hashes to {}, not {hash}: it was altered",
                dir.display(),
                snapshot.hash()
            ));
        }
        Ok(snapshot)
    }

    /// A copy of this snapshot whose directory also holds `fixtures` (Cedar entities
    /// JSON, validated against the schema), for test suites that try out people or
    /// services that are not in the production directory. `Field` and `Jurisdiction`
    /// entities come from the catalog and the directory and cannot be added.
    pub fn with_fixtures(&self, fixtures: Vec<Value>) -> Result<PolicySnapshot, String> {
        for fixture in &fixtures {
            let uid = fixture.get("uid");
            let uid = uid.and_then(|u| u.get("__entity")).or(uid);
            let entity_type = uid.and_then(|u| u.get("type")).and_then(Value::as_str);
            if let Some(
                kind @ ("Field" | KEY_RING_TYPE | DATA_SUBJECTS_TYPE | analysis::JURISDICTION_TYPE),
            ) = entity_type
            {
                return Err(format!(
                    "`{kind}` entities cannot be fixtures: fields come from {CATALOG_FILE}, jurisdictions (and their key rings) from {DIRECTORY_FILE}"
                ));
            }
        }
        let entities = self
            .entities
            .clone()
            .add_entities_from_json_value(Value::Array(fixtures), Some(&self.schema))
            .map_err(|error| render(&error))?;
        Ok(PolicySnapshot {
            names: Names::new().map_err(|error| error.to_string())?,
            hash: self.hash.clone(),
            sources: self.sources.clone(),
            schema: self.schema.clone(),
            all_policies: self.all_policies.clone(),
            by_action: self.by_action.clone(),
            entities,
            catalog: self.catalog.clone(),
            jurisdictions: self.jurisdictions.clone(),
            observed: self.observed.clone(),
            hidden_ids: self.hidden_ids.clone(),
            policy_files: self.policy_files.clone(),
            declared: self.declared.clone(),
            invariants: std::sync::Arc::clone(&self.invariants),
            shape: self.shape,
            authorizer: Authorizer::new(),
            cache: RwLock::new(HashMap::new()),
        })
    }
}

/// The policies of a directory's `.cedar` files, as they are added.
#[derive(Default)]
struct Policies {
    all_policies: PolicySet,
    /// Which file each policy id comes from.
    policy_files: BTreeMap<String, PathBuf>,
    observed: Observed,
    /// Each policy with the actions its scope admits (`None`: any).
    action_scopes: Vec<(cedar_policy::Policy, Option<BTreeSet<Action>>)>,
    hidden_ids: HashSet<String>,
    /// Whether the schema declares key administration or shredding (see
    /// [`declared_actions`]): permits of every action are then checked.
    key_admin: bool,
}

impl Policies {
    /// Parses one file and adds its policies under their `@id`s; every problem goes to
    /// `diagnostics`, named by file, line and column.
    fn add_file(&mut self, path: &Path, text: &str, diagnostics: &mut Vec<String>) {
        for (location, policy) in policies_in_file(path, text, "policy", diagnostics) {
            let Some(id) = policy.annotation(ID_ANNOTATION) else {
                diagnostics.push(format!(
                    "{location}: policy has no `@id(\"...\")` annotation; every policy needs a unique id"
                ));
                continue;
            };
            if id.trim().is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                diagnostics.push(format!(
                    "{location}: policy id `{}` must be 1 to 128 printable characters",
                    crate::record::shown(id)
                ));
                continue;
            }
            if let Some(first) = self.policy_files.get(id) {
                diagnostics.push(format!(
                    "{location}: duplicate policy id `{id}`, already used in {}",
                    first.display()
                ));
                continue;
            }
            match policy.annotation(CALLER_VISIBLE_ANNOTATION) {
                None | Some("true") => {}
                Some("false") => {
                    self.hidden_ids.insert(id.to_owned());
                }
                // A typo (`"no"`, `"False"`) must not leave a policy visible that
                // its author meant to hide.
                Some(other) => {
                    diagnostics.push(format!(
                        "{location}: `@{CALLER_VISIBLE_ANNOTATION}(\"{}\")` must be \"true\" or \"false\"",
                        crate::record::shown(other)
                    ));
                    continue;
                }
            }
            let renamed = policy.new_id(PolicyId::new(id));
            match renamed.to_json() {
                Ok(est) => {
                    if let Some(problem) =
                        grants_key_actions_unnamed(&est).filter(|_| self.key_admin)
                    {
                        diagnostics.push(format!("{location}: policy `{id}` {problem}"));
                        continue;
                    }
                    self.observed.add_policy(&est);
                    self.action_scopes
                        .push((renamed.clone(), actions_in_scope(&est)));
                }
                Err(error) => {
                    diagnostics.push(format!("{location}: cannot analyse policy `{id}`: {error}"))
                }
            }
            self.policy_files.insert(id.to_owned(), path.to_owned());
            if let Err(error) = self.all_policies.add(renamed) {
                diagnostics.push(format!("{location}: {error}"));
            }
        }
    }
}

/// The policies of one file in file order, each with its `file:line:column`; a parse
/// error or a template goes to `diagnostics` (and yields none). `what` names them in
/// messages ("policy", "guard").
pub(super) fn policies_in_file(
    path: &Path,
    text: &str,
    what: &str,
    diagnostics: &mut Vec<String>,
) -> Vec<(String, cedar_policy::Policy)> {
    let parsed = match PolicySet::from_str(text) {
        Ok(parsed) => parsed,
        Err(error) => {
            diagnostics.push(render_in_file(error, path, text));
            return Vec::new();
        }
    };
    if parsed.templates().next().is_some() {
        diagnostics.push(format!(
            "{}: {what} templates (with `?principal` or `?resource` slots) are not supported",
            path.display()
        ));
        return Vec::new();
    }
    let mut policies: Vec<_> = parsed.policies().cloned().collect();
    // `from_str` numbers policies `policy0`, `policy1`... in file order.
    policies.sort_by_key(|policy| {
        policy
            .id()
            .to_string()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
    });
    let locations = policy_locations(text);
    policies
        .into_iter()
        .enumerate()
        .map(|(ordinal, policy)| {
            let location = match locations.get(ordinal).copied().flatten() {
                Some((line, column)) => format!("{}:{line}:{column}", path.display()),
                None => format!("{} ({what} {})", path.display(), ordinal + 1),
            };
            (location, policy)
        })
        .collect()
}

/// One policy set per action, without the policies whose scope excludes it: they can
/// neither apply nor err for it (scopes are checked before conditions).
fn by_action(
    action_scopes: &[(cedar_policy::Policy, Option<BTreeSet<Action>>)],
) -> Result<BTreeMap<Action, PolicySet>, LoadError> {
    let mut by_action = BTreeMap::new();
    for action in Action::ALL {
        let mut set = PolicySet::new();
        for (policy, scope) in action_scopes {
            if scope
                .as_ref()
                .is_none_or(|actions| actions.contains(&action))
            {
                set.add(policy.clone()).map_err(|error| LoadError {
                    diagnostics: vec![error.to_string()],
                })?;
            }
        }
        by_action.insert(action, set);
    }
    Ok(by_action)
}

/// The actions a policy's action scope admits; `None` when it may admit any.
pub(super) fn actions_in_scope(est: &Value) -> Option<BTreeSet<Action>> {
    let scope = est.get("action")?;
    let named = |entity: &Value| -> Option<Action> {
        let entity = entity.get("__entity").unwrap_or(entity);
        if entity.get("type").and_then(Value::as_str) != Some("Action") {
            return None;
        }
        let id = entity.get("id").and_then(Value::as_str)?;
        Action::from_id(id)
    };
    match scope.get("op").and_then(Value::as_str) {
        Some("==") => {
            // An action this service never asks about: the policy never applies.
            Some(named(scope.get("entity")?).into_iter().collect())
        }
        // A list of actions this service asks about; any other member may be a group
        // whose members are not analysed, so the policy is kept for every action.
        Some("in") => match scope.get("entities") {
            Some(Value::Array(entities)) => entities.iter().map(named).collect(),
            _ => None,
        },
        _ => None,
    }
}

/// Parses the directory, adds a `Field` entity for every (jurisdiction, catalog field)
/// and a `KeyRing` and `DataSubjects` entity for every jurisdiction (when the schema
/// declares them), and validates all entities against
/// the schema.
fn directory_entities(
    text: &str,
    path: &Path,
    catalog: &FieldCatalog,
    schema: &Schema,
    declared: &BTreeSet<Action>,
    jurisdictions: &mut BTreeSet<Jurisdiction>,
) -> Result<Entities, String> {
    let at = path.display();
    let mut entities: Vec<Value> = serde_json::from_str(text)
        .map_err(|error| format!("{at}:{}:{}: {error}", error.line(), error.column()))?;
    for entity in &entities {
        let uid = entity.get("uid");
        let uid = uid.and_then(|u| u.get("__entity")).or(uid);
        let entity_type = uid.and_then(|u| u.get("type")).and_then(Value::as_str);
        let id = uid.and_then(|u| u.get("id")).and_then(Value::as_str);
        match (entity_type, id) {
            (Some("Field"), _) => {
                return Err(format!(
                    "{at}: `Field` entities are generated from {CATALOG_FILE} and must not appear in the directory"
                ));
            }
            (Some(generated @ (KEY_RING_TYPE | DATA_SUBJECTS_TYPE)), _) => {
                return Err(format!(
                    "{at}: `{generated}` entities are generated for every `Jurisdiction` and must not appear in the directory"
                ));
            }
            (Some(analysis::JURISDICTION_TYPE), Some(code)) => {
                let jurisdiction =
                    Jurisdiction::new(code).map_err(|error| format!("{at}: {error}"))?;
                jurisdictions.insert(jurisdiction);
            }
            _ => {}
        }
    }
    for jurisdiction in jurisdictions.iter() {
        let kinds = [ResourceKind::KeyRing, ResourceKind::DataSubjects];
        for kind in kinds
            .into_iter()
            .filter(|kind| declared.iter().any(|a| a.resource_kind() == *kind))
        {
            entities.push(json!({
            "uid": {"type": kind.type_name(), "id": jurisdiction.as_str()},
            "attrs": {
                "jurisdiction": {"__entity": {"type": "Jurisdiction", "id": jurisdiction.as_str()}},
            },
            "parents": [{"type": "Jurisdiction", "id": jurisdiction.as_str()}],
            }));
        }
        for (record_type, field, classification) in catalog.entries() {
            entities.push(json!({
                "uid": {"type": "Field", "id": field_entity_id(jurisdiction, record_type, field)},
                "attrs": {
                    "jurisdiction": {"__entity": {"type": "Jurisdiction", "id": jurisdiction.as_str()}},
                    "record_type": record_type.as_str(),
                    "field": field.as_str(),
                    "classification": classification,
                },
                "parents": [{"type": "Jurisdiction", "id": jurisdiction.as_str()}],
            }));
        }
    }
    Entities::from_json_value(Value::Array(entities), Some(schema))
        .map_err(|error| format!("{at}:\n{}", render(&error)))
}
