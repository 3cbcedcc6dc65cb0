//! The suite file format: YAML or JSON cases with defaults and matrices, parsed
//! strictly (unknown keys are errors) and expanded into [`Case`]s. May not decide.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::*;

/// A value or a list of values; a list makes the case a matrix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn values(&self) -> Vec<String> {
        match self {
            OneOrMany::One(value) => vec![value.clone()],
            OneOrMany::Many(values) => values.clone(),
        }
    }
}

/// The decision a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Expected {
    Allow,
    Deny,
}

/// An action as suites write it: its Cedar id.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ActionSpec {
    Encrypt,
    Decrypt,
    RotateKey,
    RetireKey,
    UnretireKey,
    DestroyKey,
    ViewKeys,
    Rewrap,
    Shred,
}

/// One action or a list of them, all of one resource kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Actions {
    One(ActionSpec),
    Many(Vec<ActionSpec>),
}

impl ActionSpec {
    fn action(self) -> Action {
        match self {
            ActionSpec::Encrypt => Action::Encrypt,
            ActionSpec::Decrypt => Action::Decrypt,
            ActionSpec::RotateKey => Action::RotateKey,
            ActionSpec::RetireKey => Action::RetireKey,
            ActionSpec::UnretireKey => Action::UnretireKey,
            ActionSpec::DestroyKey => Action::DestroyKey,
            ActionSpec::ViewKeys => Action::ViewKeys,
            ActionSpec::Rewrap => Action::Rewrap,
            ActionSpec::Shred => Action::Shred,
        }
    }
}

/// Declares a struct with the request dimensions that both `defaults` and cases may set,
/// plus its own fields. (serde's `flatten` cannot be combined with `deny_unknown_fields`.)
macro_rules! with_request_dimensions {
    ($(#[$meta:meta])* struct $name:ident { $($(#[$field_meta:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $($(#[$field_meta])* $field: $ty,)*
            /// Employee id(s) on whose behalf the request is made.
            #[serde(default)]
            employee: Option<OneOrMany>,
            /// Every employee `in` this group, e.g. `Organization::"parentco"`.
            #[serde(default)]
            employees_in: Option<String>,
            /// Calling service id(s); the principal when no employee is named.
            #[serde(default)]
            service: Option<OneOrMany>,
            /// Action(s); a list makes the case a matrix.
            #[serde(default)]
            action: Option<Actions>,
            #[serde(default)]
            record_type: Option<String>,
            #[serde(default)]
            jurisdiction: Option<OneOrMany>,
            #[serde(default)]
            field: Option<OneOrMany>,
            #[serde(default)]
            classification: Option<OneOrMany>,
            #[serde(default)]
            purpose: Option<OneOrMany>,
            #[serde(default)]
            ticket: Option<OneOrMany>,
            /// How the caller is authenticated (`context.authentication`); default:
            /// `mtls+token` for an employee, `mtls` for a service alone.
            #[serde(default)]
            authentication: Option<OneOrMany>,
            /// Request time (RFC 3339); default: when the suite runs.
            #[serde(default)]
            at: Option<String>,
        }
    };
}

with_request_dimensions! {
    /// Values every case of a suite starts from.
    struct Defaults {}
}

with_request_dimensions! {
    /// One case as written.
    struct CaseSpec {
        name: String,
        #[serde(default)]
        description: Option<String>,
        expect: Expected,
        /// Exactly the policies expected to determine each decision (`[]`: default deny).
        #[serde(default)]
        determined_by: Option<Vec<String>>,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    #[serde(default)]
    description: Option<String>,
    /// Extra entities (Cedar entities JSON written as YAML) for this suite only.
    #[serde(default)]
    fixtures: Vec<Value>,
    #[serde(default)]
    defaults: Option<Defaults>,
    cases: Vec<CaseSpec>,
}

/// Who a case is about.
#[derive(Debug, Clone)]
pub(super) enum Principals {
    Employees(Vec<String>),
    EmployeesIn(String),
    /// The service acts alone.
    Services,
}

/// What fields a case covers.
#[derive(Debug, Clone)]
pub(super) enum Fields {
    Named(Vec<FieldName>),
    Classified(Vec<String>),
    All,
}

/// One case, with defaults applied and every value checked for form.
#[derive(Debug, Clone)]
pub struct Case {
    /// Name, unique within its suite.
    pub name: String,
    /// What the case is about, if the author said.
    pub description: Option<String>,
    pub(super) principals: Principals,
    pub(super) services: Vec<String>,
    pub(super) actions: Vec<Action>,
    /// `None` for key administration actions, whose resource is the jurisdiction's
    /// `KeyRing`.
    pub(super) record_type: Option<RecordType>,
    pub(super) jurisdictions: Vec<Jurisdiction>,
    pub(super) fields: Fields,
    pub(super) purposes: Vec<String>,
    pub(super) tickets: Vec<String>,
    /// Authentication methods to decide with; empty: as a deployed server
    /// authenticates the principal.
    pub(super) authentications: Vec<String>,
    pub(super) at: Option<i64>,
    pub(super) expect: Expected,
    pub(super) determined_by: Option<BTreeSet<String>>,
}

/// One suite file.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The file name without extension.
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// What the suite is about, if the author said.
    pub description: Option<String>,
    pub(super) fixtures: Vec<Value>,
    /// The cases, in file order.
    pub cases: Vec<Case>,
}

/// Suite files that could not be read or parsed: one diagnostic per problem, each
/// naming the file and, where known, line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteError {
    /// Rendered diagnostics.
    pub diagnostics: Vec<String>,
}

impl std::fmt::Display for SuiteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid test suites:")?;
        for diagnostic in &self.diagnostics {
            write!(f, "\n{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SuiteError {}

pub(super) fn list<T>(
    values: Option<&OneOrMany>,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let Some(values) = values else {
        return Ok(Vec::new());
    };
    let values = values.values();
    if values.is_empty() {
        return Err(format!("`{what}` is an empty list"));
    }
    values.iter().map(|value| parse(value)).collect()
}

pub(super) fn any_text(value: &str) -> Result<String, String> {
    Ok(value.to_owned())
}

impl Case {
    fn resolve(spec: CaseSpec, defaults: Option<&Defaults>) -> Result<Case, String> {
        macro_rules! pick {
            ($field:ident) => {
                spec.$field
                    .clone()
                    .or_else(|| defaults.and_then(|d| d.$field.clone()))
            };
        }
        if spec.name.trim().is_empty() {
            return Err("a case has an empty `name`".to_owned());
        }
        // Who asks: the case's own choice wins over the defaults as a whole.
        let (employee, employees_in) = if spec.employee.is_some() || spec.employees_in.is_some() {
            (spec.employee.clone(), spec.employees_in.clone())
        } else {
            defaults
                .map(|d| (d.employee.clone(), d.employees_in.clone()))
                .unwrap_or_default()
        };
        let principals = match (employee, employees_in) {
            (Some(_), Some(_)) => {
                return Err("set `employee` or `employees_in`, not both".to_owned());
            }
            (Some(employees), None) => {
                Principals::Employees(list(Some(&employees), "employee", any_text)?)
            }
            (None, Some(group)) => Principals::EmployeesIn(group),
            (None, None) => Principals::Services,
        };
        let services = list(pick!(service).as_ref(), "service", any_text)?;
        if services.is_empty() {
            return Err("`service` is missing (the calling service, or the principal when no employee is named)".to_owned());
        }
        let actions: Vec<Action> = match pick!(action) {
            Some(Actions::One(spec)) => vec![spec.action()],
            Some(Actions::Many(specs)) => specs.into_iter().map(ActionSpec::action).collect(),
            None => Vec::new(),
        };
        let Some(action) = actions.first().copied() else {
            return Err(
                "`action` is missing (encrypt, decrypt, or a key action such as rotate_key)"
                    .to_owned(),
            );
        };
        if actions
            .iter()
            .any(|other| other.resource_kind() != action.resource_kind())
        {
            return Err(
                "`action` mixes actions on different resources (fields: encrypt, decrypt, rewrap; `KeyRing`: the key actions; `DataSubjects`: shred): write them as separate cases"
                    .to_owned(),
            );
        }
        let record_type = match action.resource_kind() {
            ResourceKind::Field => Some(
                pick!(record_type)
                    .ok_or_else(|| "`record_type` is missing".to_owned())
                    .and_then(|text| RecordType::new(&text).map_err(|error| error.to_string()))?,
            ),
            ResourceKind::KeyRing | ResourceKind::DataSubjects => {
                // Only the case's own keys count: defaults may serve field cases too.
                if spec.record_type.is_some()
                    || spec.field.is_some()
                    || spec.classification.is_some()
                {
                    return Err(format!(
                        "`{}` acts on a jurisdiction's `{}`: `record_type`, `field` and `classification` do not apply",
                        action.as_str(),
                        action.resource_kind().type_name()
                    ));
                }
                None
            }
        };
        let jurisdictions = list(pick!(jurisdiction).as_ref(), "jurisdiction", |text| {
            Jurisdiction::new(text).map_err(|error| error.to_string())
        })?;
        if jurisdictions.is_empty() {
            return Err("`jurisdiction` is missing".to_owned());
        }
        let fields = match (
            pick!(field).filter(|_| record_type.is_some()),
            pick!(classification).filter(|_| record_type.is_some()),
        ) {
            (Some(_), Some(_)) => {
                return Err("set `field` or `classification`, not both".to_owned());
            }
            (Some(fields), None) => Fields::Named(list(Some(&fields), "field", |text| {
                FieldName::new(text).map_err(|error| error.to_string())
            })?),
            (None, Some(classes)) => {
                Fields::Classified(list(Some(&classes), "classification", any_text)?)
            }
            (None, None) => Fields::All,
        };
        let mut purposes = list(pick!(purpose).as_ref(), "purpose", any_text)?;
        if purposes.is_empty() {
            purposes.push(String::new());
        }
        let mut tickets = list(pick!(ticket).as_ref(), "ticket", any_text)?;
        if tickets.is_empty() {
            tickets.push(String::new());
        }
        for purpose in &purposes {
            for ticket in &tickets {
                StatedPurpose::new(purpose, ticket).map_err(|error| error.to_string())?;
            }
        }
        let authentications = list(pick!(authentication).as_ref(), "authentication", |text| {
            if crate::identity::METHODS.contains(&text) {
                Ok(text.to_owned())
            } else {
                Err(format!(
                    "`{}` is not an authentication method ringfence sets: one of {}",
                    crate::record::shown(text),
                    crate::identity::METHODS.join(", ")
                ))
            }
        })?;
        let at = pick!(at)
            .map(|text| {
                time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                    .map(time::OffsetDateTime::unix_timestamp)
                    .map_err(|error| format!("`at` {text:?} is not an RFC 3339 time: {error}"))
            })
            .transpose()?;
        Ok(Case {
            name: spec.name,
            description: spec.description,
            principals,
            services,
            actions,
            record_type,
            jurisdictions,
            fields,
            purposes,
            tickets,
            authentications,
            at,
            expect: spec.expect,
            determined_by: spec
                .determined_by
                .map(|ids| ids.into_iter().collect::<BTreeSet<_>>()),
        })
    }
}

impl Suite {
    /// Parses one suite file's text. `name` identifies the suite in reports.
    pub fn parse(name: &str, path: &Path, text: &str) -> Result<Suite, String> {
        let at = path.display();
        let file: SuiteFile =
            serde_norway::from_str(text).map_err(|error| match error.location() {
                Some(location) => {
                    format!("{at}:{}:{}: {error}", location.line(), location.column())
                }
                None => format!("{at}: {error}"),
            })?;
        if file.cases.is_empty() {
            return Err(format!("{at}: the suite has no cases"));
        }
        let mut names = BTreeSet::new();
        let mut cases = Vec::with_capacity(file.cases.len());
        let mut problems = Vec::new();
        for spec in file.cases {
            let name = spec.name.clone();
            if !names.insert(name.clone()) {
                problems.push(format!("{at}: case {name:?}: duplicate case name"));
                continue;
            }
            match Case::resolve(spec, file.defaults.as_ref()) {
                Ok(case) => cases.push(case),
                Err(problem) => problems.push(format!("{at}: case {name:?}: {problem}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Suite {
            name: name.to_owned(),
            path: path.to_owned(),
            description: file.description,
            fixtures: file.fixtures,
            cases,
        })
    }

    /// Reads every `*.yaml`, `*.yml` and `*.json` suite in `policies_dir/tests`, sorted
    /// by file name. Every problem in every file is reported, not only the first.
    pub fn load_all(policies_dir: &Path) -> Result<Vec<Suite>, SuiteError> {
        let dir = policies_dir.join(TESTS_DIR);
        let entries = std::fs::read_dir(&dir).map_err(|error| SuiteError {
            diagnostics: vec![format!(
                "{}: cannot read the test suite directory: {error}",
                dir.display()
            )],
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json")
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(SuiteError {
                diagnostics: vec![format!(
                    "{}: no test suites (*.yaml, *.yml, *.json)",
                    dir.display()
                )],
            });
        }
        let mut suites = Vec::new();
        let mut diagnostics = Vec::new();
        let mut names = BTreeMap::new();
        for path in paths {
            let name = path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(first) = names.insert(name.clone(), path.clone()) {
                diagnostics.push(format!(
                    "{}: suite name `{name}` is also used by {}",
                    path.display(),
                    first.display()
                ));
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|error| format!("{}: cannot read: {error}", path.display()))
                .and_then(|text| Suite::parse(&name, &path, &text));
            match parsed {
                Ok(suite) => suites.push(suite),
                Err(problem) => diagnostics.push(problem),
            }
        }
        if diagnostics.is_empty() {
            Ok(suites)
        } else {
            Err(SuiteError { diagnostics })
        }
    }
}
