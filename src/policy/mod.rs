//! Cedar policies: load `policies/`, validate strictly, and decide per field.
//!
//! Owns every `cedar_policy` type; nothing outside this module sees one. A
//! [`PolicySnapshot`] is an immutable, fully validated set (schema, policies, directory,
//! field catalog) with the hash that decision log entries cite; [`PolicyStore`] swaps
//! snapshots atomically. Decisions fail closed: any evaluation error denies the field.
//!
//! Speed: a Cedar evaluation costs about a microsecond per policy, so [`PolicySnapshot::decide`]
//! evaluates once per class of fields that the policies cannot tell apart (see
//! [`analysis`]) and remembers decisions per snapshot in a bounded cache.

pub mod analysis;
pub mod catalog;
pub mod suite;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use analysis::Observed;
pub use catalog::FieldCatalog;

use crate::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

/// Schema file in the policy directory (Cedar human-readable schema format).
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// Directory of principals, teams, organizations and jurisdictions (Cedar entities JSON).
pub const DIRECTORY_FILE: &str = "directory.json";
/// Field catalog file.
pub const CATALOG_FILE: &str = "fields.toml";
/// Annotation that names a policy; required and unique across files.
pub const ID_ANNOTATION: &str = "id";
/// Annotation that, set to `"false"`, hides a policy's id from denied callers.
pub const CALLER_VISIBLE_ANNOTATION: &str = "caller_visible";
/// Most decisions remembered per snapshot before the cache starts afresh.
const CACHE_CAPACITY: usize = 65_536;

/// An action that policies decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Encrypting a field of a record.
    Encrypt,
    /// Decrypting (or asking whether one may decrypt) a field.
    Decrypt,
}

impl Action {
    /// Every action, in a fixed order.
    pub const ALL: [Action; 2] = [Action::Encrypt, Action::Decrypt];

    /// The Cedar action id.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Encrypt => "encrypt",
            Action::Decrypt => "decrypt",
        }
    }
}

/// Who a decision is about: an employee, or a service acting without a human.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// An `Employee` of the directory, by id.
    Employee(String),
    /// A `Service` of the directory, by id.
    Service(String),
}

impl Principal {
    fn type_name(&self) -> &'static str {
        match self {
            Principal::Employee(_) => "Employee",
            Principal::Service(_) => "Service",
        }
    }

    /// The directory id.
    pub fn id(&self) -> &str {
        match self {
            Principal::Employee(id) | Principal::Service(id) => id,
        }
    }
}

impl FromStr for Principal {
    type Err = String;

    /// Parses what `Display` writes: `Employee::"alice"` or `Service::"us-signup"`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{}` is not `Employee::\"id\"` or `Service::\"id\"`",
                crate::record::shown(text)
            )
        };
        let (kind, quoted) = text.split_once("::").ok_or_else(bad)?;
        let id = unquote(quoted).ok_or_else(bad)?;
        match kind {
            "Employee" => Ok(Principal::Employee(id)),
            "Service" => Ok(Principal::Service(id)),
            _ => Err(bad()),
        }
    }
}

/// Reverses Rust's `{:?}` quoting of a string.
fn unquote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '"' => out.push('"'),
            '\'' => out.push('\''),
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '0' => out.push('\0'),
            'u' => {
                let rest: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let hex = rest.strip_prefix('{')?;
                out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}::{:?}", self.type_name(), self.id())
    }
}

/// Facts of a request that are the same for all its fields.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    /// The principal being decided about.
    pub principal: &'a Principal,
    /// Directory id of the calling service (for employees, the service they act through).
    pub service: &'a str,
    /// How the caller was authenticated, e.g. `danger-trust-identity-headers`.
    pub authentication: &'a str,
    /// Purpose and ticket stated by the caller.
    pub stated: &'a StatedPurpose,
    /// Request time, Unix seconds.
    pub request_time: i64,
}

/// The decision for one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDecision {
    /// Whether the action is permitted. False whenever evaluation erred.
    pub allowed: bool,
    /// Ids of the determining policies (permits when allowed, forbids when denied).
    pub policies: Vec<String>,
    /// The subset of `policies` that callers may be told about.
    pub visible_policies: Vec<String>,
    /// Evaluation errors; any error denies the field.
    pub errors: Vec<String>,
}

/// One field's decision with the field's classification from the catalog.
#[derive(Debug, Clone)]
pub struct Verdict<'s> {
    /// The field's classification.
    pub classification: &'s str,
    /// The decision, shared by all fields of its class.
    pub decision: Arc<FieldDecision>,
}

impl std::ops::Deref for Verdict<'_> {
    type Target = FieldDecision;

    fn deref(&self) -> &FieldDecision {
        &self.decision
    }
}

/// Errors of loading policies or deciding a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy directory does not load; each diagnostic names its file.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The principal is not in the directory.
    #[error("unknown principal `{0}`: not in the directory")]
    UnknownPrincipal(String),
    /// The calling service is not in the directory.
    #[error("unknown service `{0}`: not in the directory")]
    UnknownService(String),
    /// The record type is not in the field catalog.
    #[error("unknown record type `{0}`: not in the field catalog")]
    UnknownRecordType(RecordType),
    /// The field is not in the catalog for its record type.
    #[error("unknown field `{field}` for record type `{record_type}`")]
    UnknownField {
        /// The record type.
        record_type: RecordType,
        /// The field.
        field: FieldName,
    },
    /// No `Jurisdiction` entity of that code is in the directory.
    #[error("unknown jurisdiction `{0}`: not in the policy directory")]
    UnknownJurisdiction(Jurisdiction),
    /// A request could not be built; a defect, not a caller mistake.
    #[error("internal policy error: {0}")]
    Internal(String),
}

/// Why a policy directory failed to load: one rendered diagnostic per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// Rendered diagnostics, each naming file and, where known, line and column.
    pub diagnostics: Vec<String>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy set is invalid ({} problem",
            self.diagnostics.len()
        )?;
        if self.diagnostics.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("):")?;
        for diagnostic in &self.diagnostics {
            write!(f, "\n{}", diagnostic.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

fn render(diagnostic: &dyn miette::Diagnostic) -> String {
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .with_width(100);
    let mut out = String::new();
    if handler.render_report(&mut out, diagnostic).is_err() {
        out = diagnostic.to_string();
    }
    out
}

fn render_in_file<E>(error: E, file: &Path, text: &str) -> String
where
    E: miette::Diagnostic + Send + Sync + 'static,
{
    let name = file.display().to_string();
    let report = miette::Report::new(error)
        .with_source_code(miette::NamedSource::new(name.clone(), text.to_owned()));
    name_snippets(&render(report.as_ref()), &name)
}

/// Cedar attaches its own unnamed source to many diagnostics, so snippet headers read
/// `[3:35]`; this makes them `[policies/x.cedar:3:35]`.
fn name_snippets(rendered: &str, name: &str) -> String {
    const HEADER: &str = "╭─[";
    let named = format!("{HEADER}{name}:");
    if rendered.contains(&named) {
        rendered.to_owned()
    } else {
        rendered.replace(HEADER, &named)
    }
}

/// 1-based line of the `ordinal`-th (0-based) policy in a Cedar file, found by the
/// position of its `permit` or `forbid` keyword outside comments and strings.
fn policy_line(text: &str, ordinal: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut index = 0;
    let mut line = 1;
    let mut seen = 0;
    let mut depth = 0usize;
    while let Some(&byte) = bytes.get(index) {
        match byte {
            b'\n' => line += 1,
            b'/' if bytes.get(index + 1) == Some(&b'/') => {
                while bytes.get(index).is_some_and(|b| *b != b'\n') {
                    index += 1;
                }
                continue;
            }
            b'"' => {
                index += 1;
                while let Some(&inner) = bytes.get(index) {
                    match inner {
                        b'\\' => index += 1,
                        b'"' => break,
                        b'\n' => line += 1,
                        _ => {}
                    }
                    index += 1;
                }
            }
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth = depth.saturating_sub(1),
            b'p' | b'f' if depth == 0 => {
                let rest = bytes.get(index..).unwrap_or_default();
                let keyword = rest.starts_with(b"permit") || rest.starts_with(b"forbid");
                let before_ok = index == 0
                    || bytes
                        .get(index - 1)
                        .is_some_and(|b| !b.is_ascii_alphanumeric() && *b != b'_');
                let after_ok = rest
                    .get(6)
                    .is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'_');
                if keyword && before_ok && after_ok {
                    if seen == ordinal {
                        return Some(line);
                    }
                    seen += 1;
                    index += 6;
                    continue;
                }
            }
            _ => {}
        }
        index += 1;
    }
    None
}

/// What the policies can observe of one field: fields of a request with equal keys
/// get the same decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FieldKey<'a> {
    record_type: Option<&'a RecordType>,
    field: Option<&'a FieldName>,
    classification: Option<&'a str>,
}

/// A context value as the policies can tell it apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Projected {
    /// Not observed by any policy.
    Unused,
    /// Index of the literal it equals, or `None` for "equals none of them".
    Class(Option<usize>),
    /// Observed as is.
    Raw(String),
}

fn project(observed: &Observed, name: &str, value: &str) -> Projected {
    match observed.context_use(name) {
        analysis::ContextUse::Unused => Projected::Unused,
        analysis::ContextUse::Literals(literals) => {
            Projected::Class(literals.iter().position(|literal| literal == value))
        }
        analysis::ContextUse::Raw => Projected::Raw(value.to_owned()),
    }
}

/// Everything that can influence a decision, as the policies can observe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    action: Action,
    principal: Principal,
    jurisdiction: Jurisdiction,
    record_type: Option<RecordType>,
    field: Option<FieldName>,
    classification: Option<String>,
    context: [Projected; 5],
}

/// Entity type names and action ids, parsed once per snapshot instead of per request.
struct Names {
    employee: EntityTypeName,
    service: EntityTypeName,
    field: EntityTypeName,
    encrypt: EntityUid,
    decrypt: EntityUid,
}

impl Names {
    fn new() -> Result<Self, Error> {
        Ok(Self {
            employee: type_name("Employee")?,
            service: type_name("Service")?,
            field: type_name("Field")?,
            encrypt: uid("Action", Action::Encrypt.as_str())?,
            decrypt: uid("Action", Action::Decrypt.as_str())?,
        })
    }

    fn principal(&self, principal: &Principal) -> EntityUid {
        let type_name = match principal {
            Principal::Employee(_) => &self.employee,
            Principal::Service(_) => &self.service,
        };
        EntityUid::from_type_name_and_id(type_name.clone(), EntityId::new(principal.id()))
    }

    fn service(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.service.clone(), EntityId::new(id))
    }

    fn field(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.field.clone(), EntityId::new(id))
    }

    fn action(&self, action: Action) -> &EntityUid {
        match action {
            Action::Encrypt => &self.encrypt,
            Action::Decrypt => &self.decrypt,
        }
    }
}

/// An immutable, validated policy set with everything needed to decide.
pub struct PolicySnapshot {
    names: Names,
    hash: String,
    /// The files hashed, by name, exactly as read: what [`PolicySnapshot::archive`] keeps.
    sources: Vec<(String, String)>,
    schema: Schema,
    all_policies: PolicySet,
    by_action: BTreeMap<Action, PolicySet>,
    entities: Entities,
    catalog: FieldCatalog,
    jurisdictions: BTreeSet<Jurisdiction>,
    observed: Observed,
    hidden_ids: HashSet<String>,
    policy_files: BTreeMap<String, PathBuf>,
    authorizer: Authorizer,
    cache: RwLock<HashMap<DecisionKey, Arc<FieldDecision>>>,
}

impl fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySnapshot")
            .field("hash", &self.hash)
            .field("policies", &self.policy_files.len())
            .finish_non_exhaustive()
    }
}

fn type_name(name: &str) -> Result<EntityTypeName, Error> {
    EntityTypeName::from_str(name).map_err(|error| Error::Internal(error.to_string()))
}

fn uid(type_name_text: &str, id: &str) -> Result<EntityUid, Error> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(type_name_text)?,
        EntityId::new(id),
    ))
}

/// Id of the `Field` entity of a (jurisdiction, record type, field).
pub fn field_entity_id(
    jurisdiction: &Jurisdiction,
    record_type: &RecordType,
    field: &FieldName,
) -> String {
    format!("{jurisdiction}/{record_type}/{field}")
}

struct Collected {
    diagnostics: Vec<String>,
}

impl Collected {
    fn read(&mut self, path: &Path) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(error) => {
                self.diagnostics
                    .push(format!("{}: cannot read: {error}", path.display()));
                None
            }
        }
    }
}

impl PolicySnapshot {
    /// Loads and strictly validates a policy directory. Every problem found is reported,
    /// not only the first.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let mut collected = Collected {
            diagnostics: Vec::new(),
        };
        let mut hasher = Sha256::new();
        let mut sources: Vec<(String, String)> = Vec::new();
        let mut hash_file = |name: &str, text: &str| {
            sources.push((name.to_owned(), text.to_owned()));
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
        };

        let schema_path = dir.join(SCHEMA_FILE);
        let schema = collected.read(&schema_path).and_then(|text| {
            hash_file(SCHEMA_FILE, &text);
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

        let mut all_policies = PolicySet::new();
        let mut policy_files: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut observed = Observed::default();
        let mut action_scopes: Vec<(cedar_policy::Policy, Option<BTreeSet<Action>>)> = Vec::new();
        let mut hidden_ids = HashSet::new();
        for path in &policy_paths {
            let Some(text) = collected.read(path) else {
                continue;
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            hash_file(&name, &text);
            let parsed = match PolicySet::from_str(&text) {
                Ok(parsed) => parsed,
                Err(error) => {
                    collected
                        .diagnostics
                        .push(render_in_file(error, path, &text));
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                collected.diagnostics.push(format!(
                    "{}: policy templates (with `?principal` or `?resource` slots) are not supported",
                    path.display()
                ));
                continue;
            }
            let mut policies: Vec<_> = parsed.policies().collect();
            // `from_str` numbers policies `policy0`, `policy1`... in file order.
            policies.sort_by_key(|policy| {
                policy
                    .id()
                    .to_string()
                    .strip_prefix("policy")
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(usize::MAX)
            });
            for (ordinal, policy) in policies.into_iter().enumerate() {
                let location = match policy_line(&text, ordinal) {
                    Some(line) => format!("{}:{line}", path.display()),
                    None => format!("{} (policy {})", path.display(), ordinal + 1),
                };
                let Some(id) = policy.annotation(ID_ANNOTATION) else {
                    collected.diagnostics.push(format!(
                        "{location}: policy has no `@id(\"...\")` annotation; every policy needs a unique id"
                    ));
                    continue;
                };
                if id.trim().is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                    collected.diagnostics.push(format!(
                        "{location}: policy id `{}` must be 1 to 128 printable characters",
                        crate::record::shown(id)
                    ));
                    continue;
                }
                if let Some(first) = policy_files.get(id) {
                    collected.diagnostics.push(format!(
                        "{location}: duplicate policy id `{id}`, already used in {}",
                        first.display()
                    ));
                    continue;
                }
                match policy.annotation(CALLER_VISIBLE_ANNOTATION) {
                    None | Some("true") => {}
                    Some("false") => {
                        hidden_ids.insert(id.to_owned());
                    }
                    // A typo (`"no"`, `"False"`) must not leave a policy visible that
                    // its author meant to hide.
                    Some(other) => {
                        collected.diagnostics.push(format!(
                            "{location}: `@{CALLER_VISIBLE_ANNOTATION}(\"{}\")` must be \"true\" or \"false\"",
                            crate::record::shown(other)
                        ));
                        continue;
                    }
                }
                let renamed = policy.new_id(PolicyId::new(id));
                match renamed.to_json() {
                    Ok(est) => {
                        observed.add_policy(&est);
                        action_scopes.push((renamed.clone(), actions_in_scope(&est)));
                    }
                    Err(error) => collected
                        .diagnostics
                        .push(format!("{location}: cannot analyse policy `{id}`: {error}")),
                }
                policy_files.insert(id.to_owned(), path.clone());
                if let Err(error) = all_policies.add(renamed) {
                    collected.diagnostics.push(format!("{location}: {error}"));
                }
            }
        }

        let catalog_path = dir.join(CATALOG_FILE);
        let catalog = collected.read(&catalog_path).and_then(|text| {
            hash_file(CATALOG_FILE, &text);
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
            hash_file(DIRECTORY_FILE, text);
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

        if let Err(diagnostic) = probe_schema(&schema) {
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

        let mut by_action = BTreeMap::new();
        for action in Action::ALL {
            let mut set = PolicySet::new();
            for (policy, scope) in &action_scopes {
                // A policy whose action scope excludes `action` can neither apply nor err
                // for it (scopes are checked before conditions), so it is left out.
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
            authorizer: Authorizer::new(),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// SHA-256 (hex) over the schema, policy files, directory and catalog.
    pub fn hash(&self) -> &str {
        &self.hash
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

    /// The field catalog.
    pub fn catalog(&self) -> &FieldCatalog {
        &self.catalog
    }

    /// Jurisdictions that the directory defines.
    pub fn jurisdictions(&self) -> &BTreeSet<Jurisdiction> {
        &self.jurisdictions
    }

    /// Policy ids and the file each came from.
    pub fn policy_files(&self) -> &BTreeMap<String, PathBuf> {
        &self.policy_files
    }

    /// What the policy set can observe of resources and contexts.
    pub fn observed(&self) -> &Observed {
        &self.observed
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
            if let Some(kind @ ("Field" | analysis::JURISDICTION_TYPE)) = entity_type {
                return Err(format!(
                    "`{kind}` entities cannot be fixtures: fields come from {CATALOG_FILE}, jurisdictions from {DIRECTORY_FILE}"
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
            authorizer: Authorizer::new(),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Ids of the directory's employees that are members of `group` (as Cedar's
    /// `principal in group`, transitively), sorted. `group` is a Cedar entity
    /// reference such as `Organization::"parentco"`; it must exist.
    pub fn employees_in(&self, group: &str) -> Result<Vec<String>, String> {
        let group_uid = EntityUid::from_str(group).map_err(|_| {
            format!("`{group}` is not an entity reference like `Team::\"usds-legal\"`")
        })?;
        if self.entities.get(&group_uid).is_none() {
            return Err(format!("`{group}` is not in the directory"));
        }
        let mut members: Vec<String> = self
            .entities
            .iter()
            .map(cedar_policy::Entity::uid)
            .filter(|uid| {
                uid.type_name() == &self.names.employee
                    && uid != &group_uid
                    && self.entities.is_ancestor_of(&group_uid, uid)
            })
            .map(|uid| uid.id().unescaped().to_owned())
            .collect();
        members.sort_unstable();
        Ok(members)
    }

    /// Ids of the directory's `Service` entities, sorted.
    pub fn service_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .entities
            .iter()
            .map(cedar_policy::Entity::uid)
            .filter(|uid| uid.type_name() == &self.names.service)
            .map(|uid| uid.id().unescaped().to_owned())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.all_policies.policies().count()
    }

    /// Whether the set has no policies (never true for a loaded snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the directory holds `principal` and the calling `service`.
    pub fn check_caller(&self, principal: &Principal, service: &str) -> Result<(), Error> {
        self.caller_uids(principal, service).map(|_| ())
    }

    fn caller_uids(
        &self,
        principal: &Principal,
        service: &str,
    ) -> Result<(EntityUid, EntityUid), Error> {
        let principal_uid = self.names.principal(principal);
        if self.entities.get(&principal_uid).is_none() {
            return Err(Error::UnknownPrincipal(principal.to_string()));
        }
        let service_uid = self.names.service(service);
        if self.entities.get(&service_uid).is_none() {
            return Err(Error::UnknownService(service.to_owned()));
        }
        Ok((principal_uid, service_uid))
    }

    fn check_request(
        &self,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        fields: &[FieldName],
    ) -> Result<(EntityUid, EntityUid, Vec<&str>), Error> {
        let (principal, service) = self.caller_uids(facts.principal, facts.service)?;
        if !self.jurisdictions.contains(jurisdiction) {
            return Err(Error::UnknownJurisdiction(jurisdiction.clone()));
        }
        if self.catalog.fields(record_type).is_none() {
            return Err(Error::UnknownRecordType(record_type.clone()));
        }
        let classifications = fields
            .iter()
            .map(|field| {
                self.catalog
                    .classification(record_type, field)
                    .ok_or_else(|| Error::UnknownField {
                        record_type: record_type.clone(),
                        field: field.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok((principal, service, classifications))
    }

    fn context(&self, facts: &RequestFacts<'_>, service: EntityUid) -> Result<Context, Error> {
        Context::from_pairs([
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(facts.stated.purpose.clone()),
            ),
            (
                "ticket".to_owned(),
                RestrictedExpression::new_string(facts.stated.ticket.clone()),
            ),
            (
                "authentication".to_owned(),
                RestrictedExpression::new_string(facts.authentication.to_owned()),
            ),
            (
                "service".to_owned(),
                RestrictedExpression::new_entity_uid(service),
            ),
            (
                "request_time".to_owned(),
                RestrictedExpression::new_long(facts.request_time),
            ),
        ])
        .map_err(|error| Error::Internal(error.to_string()))
    }

    fn field_key<'a>(
        &self,
        record_type: &'a RecordType,
        field: &'a FieldName,
        classification: &'a str,
    ) -> FieldKey<'a> {
        let observed = &self.observed;
        FieldKey {
            record_type: observed
                .resource_attribute("record_type")
                .then_some(record_type),
            field: observed.resource_attribute("field").then_some(field),
            classification: observed
                .resource_attribute("classification")
                .then_some(classification),
        }
    }

    fn context_key(&self, facts: &RequestFacts<'_>) -> [Projected; 5] {
        let observed = &self.observed;
        let time = facts.request_time.to_string();
        [
            project(observed, "purpose", &facts.stated.purpose),
            project(observed, "ticket", &facts.stated.ticket),
            project(observed, "authentication", facts.authentication),
            project(observed, "service", facts.service),
            project(observed, "request_time", &time),
        ]
    }

    fn evaluate(
        &self,
        action: Action,
        principal: &EntityUid,
        context: &Context,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        field: &FieldName,
    ) -> Result<FieldDecision, Error> {
        let resource = self
            .names
            .field(&field_entity_id(jurisdiction, record_type, field));
        // No per-request schema check: principal, action and resource types are fixed
        // by this code and the context is built with typed values, and `probe_schema`
        // proved at load that the schema accepts exactly this shape.
        let request = Request::new(
            principal.clone(),
            self.names.action(action).clone(),
            resource,
            context.clone(),
            None,
        )
        .map_err(|error| Error::Internal(error.to_string()))?;
        let policies = self
            .by_action
            .get(&action)
            .ok_or_else(|| Error::Internal(format!("no policy set for `{}`", action.as_str())))?;
        let response = self
            .authorizer
            .is_authorized(&request, policies, &self.entities);
        let mut errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect();
        errors.sort_unstable();
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        // Cedar reports reasons as a set; sorted, equal decisions compare equal.
        policies.sort_unstable();
        // Cedar skips a policy whose evaluation errs, forbids included, so an erring
        // forbid could let a permit through: any error denies.
        let allowed = response.decision() == Decision::Allow && errors.is_empty();
        let policies = if allowed || errors.is_empty() {
            policies
        } else {
            Vec::new()
        };
        let visible_policies = policies
            .iter()
            .filter(|id| !self.hidden_ids.contains(*id))
            .cloned()
            .collect();
        Ok(FieldDecision {
            allowed,
            policies,
            visible_policies,
            errors,
        })
    }

    /// Decides `action` for each field of one record, in order. Fields that the policy
    /// set cannot tell apart share one evaluation; decisions are cached per snapshot.
    pub fn decide(
        &self,
        action: Action,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        fields: &[FieldName],
    ) -> Result<Vec<Verdict<'_>>, Error> {
        let (principal, service, classifications) =
            self.check_request(facts, jurisdiction, record_type, fields)?;
        let mut context = None;
        let mut context_key = None;
        let mut local: Vec<(FieldKey<'_>, Arc<FieldDecision>)> = Vec::new();
        let mut decisions = Vec::with_capacity(fields.len());
        for (field, classification) in fields.iter().zip(classifications) {
            let field_key = self.field_key(record_type, field, classification);
            if let Some((_, decision)) = local.iter().find(|(seen, _)| *seen == field_key) {
                decisions.push(Verdict {
                    classification,
                    decision: Arc::clone(decision),
                });
                continue;
            }
            let key = DecisionKey {
                action,
                principal: facts.principal.clone(),
                jurisdiction: jurisdiction.clone(),
                record_type: field_key.record_type.cloned(),
                field: field_key.field.cloned(),
                classification: field_key.classification.map(str::to_owned),
                context: context_key
                    .get_or_insert_with(|| self.context_key(facts))
                    .clone(),
            };
            let cached = self
                .cache
                .read()
                .ok()
                .and_then(|cache| cache.get(&key).cloned());
            let decision = match cached {
                Some(decision) => decision,
                None => {
                    let context = match &context {
                        Some(context) => context,
                        None => context.insert(self.context(facts, service.clone())?),
                    };
                    let decision = Arc::new(self.evaluate(
                        action,
                        &principal,
                        context,
                        jurisdiction,
                        record_type,
                        field,
                    )?);
                    // An erring decision carries Cedar's error text, which can name
                    // this field's entity: it is neither cached nor shared.
                    if decision.errors.is_empty()
                        && let Ok(mut cache) = self.cache.write()
                    {
                        if cache.len() >= CACHE_CAPACITY {
                            cache.clear();
                        }
                        cache.insert(key, Arc::clone(&decision));
                    }
                    decision
                }
            };
            if decision.errors.is_empty() {
                local.push((field_key, Arc::clone(&decision)));
            }
            decisions.push(Verdict {
                classification,
                decision,
            });
        }
        Ok(decisions)
    }

    /// Decides every field with its own Cedar evaluation, bypassing classes and cache.
    /// The reference that [`PolicySnapshot::decide`] is tested and benchmarked against.
    pub fn decide_each(
        &self,
        action: Action,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        fields: &[FieldName],
    ) -> Result<Vec<FieldDecision>, Error> {
        let (principal, service, _) =
            self.check_request(facts, jurisdiction, record_type, fields)?;
        let context = self.context(facts, service)?;
        fields
            .iter()
            .map(|field| {
                self.evaluate(
                    action,
                    &principal,
                    &context,
                    jurisdiction,
                    record_type,
                    field,
                )
            })
            .collect()
    }
}

/// The actions a policy's action scope admits; `None` when it may admit any.
fn actions_in_scope(est: &Value) -> Option<BTreeSet<Action>> {
    let scope = est.get("action")?;
    let named = |entity: &Value| -> Option<Action> {
        let entity = entity.get("__entity").unwrap_or(entity);
        if entity.get("type").and_then(Value::as_str) != Some("Action") {
            return None;
        }
        let id = entity.get("id").and_then(Value::as_str)?;
        Action::ALL.into_iter().find(|action| action.as_str() == id)
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

/// Parses the directory, adds a `Field` entity for every (jurisdiction, catalog field),
/// and validates all entities against the schema.
fn directory_entities(
    text: &str,
    path: &Path,
    catalog: &FieldCatalog,
    schema: &Schema,
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
            (Some(analysis::JURISDICTION_TYPE), Some(code)) => {
                let jurisdiction =
                    Jurisdiction::new(code).map_err(|error| format!("{at}: {error}"))?;
                jurisdictions.insert(jurisdiction);
            }
            _ => {}
        }
    }
    for jurisdiction in jurisdictions.iter() {
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

/// Checks that the schema accepts the requests this service builds, so a schema edit
/// that breaks them fails at load, not on a request path.
fn probe_schema(schema: &Schema) -> Result<(), String> {
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
        for principal_type in ["Employee", "Service"] {
            let request = Request::new(
                uid(principal_type, "probe").map_err(|e| e.to_string())?,
                uid("Action", action.as_str()).map_err(|e| e.to_string())?,
                uid("Field", "probe").map_err(|e| e.to_string())?,
                context.clone(),
                Some(schema),
            );
            if let Err(error) = request {
                return Err(format!(
                    "the schema must let action `{}` apply to principal `{principal_type}` and resource `Field` with context {{purpose: String, ticket: String, authentication: String, service: Service, request_time: Long}}: {error}",
                    action.as_str()
                ));
            }
        }
    }
    Ok(())
}

/// What started a policy load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The server started.
    Startup,
    /// A file in the policy directory changed.
    FileChange,
    /// The process received SIGHUP.
    Hangup,
}

impl Trigger {
    /// The name shown in status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::FileChange => "file-change",
            Trigger::Hangup => "SIGHUP",
        }
    }
}

/// One attempt to load the policy directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadAttempt {
    /// When it finished (RFC 3339).
    pub at: String,
    /// What started it.
    pub trigger: Trigger,
    /// The hash of the loaded set, or every problem found.
    pub result: Result<String, Vec<String>>,
}

/// How the policy set got to be what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// Hash of the running set.
    pub policy_set: String,
    /// When the running set was loaded (RFC 3339).
    pub loaded_at: String,
    /// Reloads that swapped in a set (or found the same one).
    pub reloads_succeeded: u64,
    /// Reloads refused because the directory did not validate.
    pub reloads_failed: u64,
    /// The latest attempt.
    pub last: LoadAttempt,
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The current policy snapshot, swappable atomically while requests run.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<PolicySnapshot>,
    /// Records reload outcomes; held only briefly.
    status: std::sync::Mutex<StoreStatus>,
    /// Serializes reloads (held across loading and archiving, never by readers).
    reloading: std::sync::Mutex<()>,
    /// Where every set that decides is archived by hash, once configured.
    archive: std::sync::OnceLock<PathBuf>,
}

impl PolicyStore {
    /// Loads the policy directory; fails on any diagnostic.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let snapshot = PolicySnapshot::load(dir)?;
        let at = rfc3339_now();
        let status = StoreStatus {
            policy_set: snapshot.hash().to_owned(),
            loaded_at: at.clone(),
            reloads_succeeded: 0,
            reloads_failed: 0,
            last: LoadAttempt {
                at,
                trigger: Trigger::Startup,
                result: Ok(snapshot.hash().to_owned()),
            },
        };
        Ok(Self {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(snapshot),
            status: std::sync::Mutex::new(status),
            reloading: std::sync::Mutex::new(()),
            archive: std::sync::OnceLock::new(),
        })
    }

    /// Archives the running set under `root` (see [`PolicySnapshot::archive`]) and
    /// every set a reload swaps in from now on, before it decides anything.
    pub fn archive_to(&self, root: &Path) -> Result<PathBuf, String> {
        let archived = self.current().archive(root)?;
        let _ = self.archive.set(root.to_owned());
        Ok(archived)
    }

    /// The snapshot to decide a whole request with.
    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// The directory policies are loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The running set and the outcome of reloads.
    pub fn status(&self) -> StoreStatus {
        match self.status.lock() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the directory again and swaps the new snapshot in only if the whole set
    /// validates; requests in flight finish with the snapshot they started with. On
    /// error the running snapshot stays in place. A set with the running set's hash is
    /// not swapped (its decision cache stays warm). Reloads run one at a time.
    pub fn reload(&self, trigger: Trigger) -> Result<Arc<PolicySnapshot>, LoadError> {
        let _one_at_a_time = match self.reloading.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let running = self.current();
        let loaded = PolicySnapshot::load(&self.dir).and_then(|snapshot| {
            // A set is archived before it decides anything, so every decision it makes
            // can be replayed.
            if let Some(root) = self.archive.get() {
                snapshot.archive(root).map_err(|problem| LoadError {
                    diagnostics: vec![format!("cannot archive the policy set: {problem}")],
                })?;
            }
            Ok(snapshot)
        });
        let at = rfc3339_now();
        let swapped = matches!(&loaded, Ok(snapshot) if snapshot.hash() != running.hash());
        let result = loaded.map(|snapshot| {
            if swapped {
                let snapshot = Arc::new(snapshot);
                self.current.store(Arc::clone(&snapshot));
                snapshot
            } else {
                running
            }
        });
        let mut status = match self.status.lock() {
            Ok(status) => status,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &result {
            Ok(snapshot) => {
                if swapped {
                    status.policy_set = snapshot.hash().to_owned();
                    status.loaded_at = at.clone();
                }
                status.reloads_succeeded += 1;
                status.last = LoadAttempt {
                    at,
                    trigger,
                    result: Ok(snapshot.hash().to_owned()),
                };
            }
            Err(error) => {
                status.reloads_failed += 1;
                status.last = LoadAttempt {
                    at,
                    trigger,
                    result: Err(error.diagnostics.clone()),
                };
            }
        }
        result
    }
}

/// Files whose change can change the policy set (test suites cannot). Names starting
/// with `..` are the symlinks Kubernetes swaps when a mounted ConfigMap changes.
pub fn affects_policy_set(file_name: &str) -> bool {
    file_name.starts_with("..")
        || file_name == SCHEMA_FILE
        || file_name == DIRECTORY_FILE
        || file_name == CATALOG_FILE
        || file_name.ends_with(".cedar")
}

#[cfg(test)]
mod tests;
