//! Policy test suites: YAML files under `policies/tests/` that pin what a policy set
//! allows and forbids, in the terms compliance staff use (people, services, fields,
//! purposes). `ringfence policy test` and the project's own `cargo test` run them with
//! this one runner.
//!
//! A case names who asks (an employee, every employee of a team or organization, or a
//! service acting alone), through which service, the action, the record type,
//! jurisdiction(s), field(s) or classification(s), purpose and ticket, and the expected
//! decision. Any of these may be a list: the case then checks every combination (a
//! matrix). Unknown keys are errors, so a typo cannot make a case silently pass.
//! The format is documented in `policies/README.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Action, FieldDecision, PolicySnapshot, Principal, RequestFacts};
use crate::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

/// Directory of test suites inside the policy directory.
pub const TESTS_DIR: &str = "tests";
/// Failures listed per case before the rest are counted only.
const FAILURES_SHOWN: usize = 20;
/// `authentication` in the context of test requests, as a deployed server sets it:
/// an employee with a token, or a service with its certificate alone.
fn authentication_of(principal: &Principal) -> &'static str {
    match principal {
        Principal::Employee(_) => crate::identity::METHOD_MTLS_TOKEN,
        Principal::Service(_) => crate::identity::METHOD_MTLS,
    }
}

/// A value or a list of values; a list makes the case a matrix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> Vec<String> {
        match self {
            OneOrMany::One(value) => vec![value.clone()],
            OneOrMany::Many(values) => values.clone(),
        }
    }
}

/// The decision a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expected {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ActionSpec {
    Encrypt,
    Decrypt,
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
            #[serde(default)]
            action: Option<ActionSpec>,
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
enum Principals {
    Employees(Vec<String>),
    EmployeesIn(String),
    /// The service acts alone.
    Services,
}

/// What fields a case covers.
#[derive(Debug, Clone)]
enum Fields {
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
    principals: Principals,
    services: Vec<String>,
    action: Action,
    record_type: RecordType,
    jurisdictions: Vec<Jurisdiction>,
    fields: Fields,
    purposes: Vec<String>,
    tickets: Vec<String>,
    at: Option<i64>,
    expect: Expected,
    determined_by: Option<BTreeSet<String>>,
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
    fixtures: Vec<Value>,
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

fn list<T>(
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

fn any_text(value: &str) -> Result<String, String> {
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
        let action = match pick!(action) {
            Some(ActionSpec::Encrypt) => Action::Encrypt,
            Some(ActionSpec::Decrypt) => Action::Decrypt,
            None => return Err("`action` is missing (encrypt or decrypt)".to_owned()),
        };
        let record_type = pick!(record_type)
            .ok_or_else(|| "`record_type` is missing".to_owned())
            .and_then(|text| RecordType::new(&text).map_err(|error| error.to_string()))?;
        let jurisdictions = list(pick!(jurisdiction).as_ref(), "jurisdiction", |text| {
            Jurisdiction::new(text).map_err(|error| error.to_string())
        })?;
        if jurisdictions.is_empty() {
            return Err("`jurisdiction` is missing".to_owned());
        }
        let fields = match (pick!(field), pick!(classification)) {
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
            action,
            record_type,
            jurisdictions,
            fields,
            purposes,
            tickets,
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

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// Decisions checked (one per combination of the matrix and field).
    pub checks: usize,
    /// Why the case failed; empty when it passed.
    pub failures: Vec<String>,
    /// Failures beyond those listed.
    pub more_failures: usize,
}

impl CaseReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, failure: String) {
        if self.failures.len() < FAILURES_SHOWN {
            self.failures.push(failure);
        } else {
            self.more_failures += 1;
        }
    }
}

/// The outcome of one suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteReport {
    /// The suite's name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Cases that ran (those the filter selected), in file order.
    pub cases: Vec<CaseReport>,
}

/// Which policies determined at least one decision of the suites that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// Policy id → number of decisions it determined.
    pub covered: BTreeMap<String, usize>,
    /// Policies that determined no decision: nothing tests them.
    pub uncovered: Vec<String>,
}

impl Coverage {
    /// Share of policies covered, in percent (100 for an empty set).
    pub fn percent(&self) -> f64 {
        let total = self.covered.len() + self.uncovered.len();
        if total == 0 {
            100.0
        } else {
            self.covered.len() as f64 * 100.0 / total as f64
        }
    }
}

/// Everything a run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Hash of the policy set the suites ran against.
    pub policy_set: String,
    /// Per suite, in name order.
    pub suites: Vec<SuiteReport>,
    /// Policy coverage.
    pub coverage: Coverage,
}

impl Report {
    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.cases().filter(|case| case.passed()).count()
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.cases().filter(|case| !case.passed()).count()
    }

    /// Decisions checked.
    pub fn checks(&self) -> usize {
        self.cases().map(|case| case.checks).sum()
    }

    fn cases(&self) -> impl Iterator<Item = &CaseReport> {
        self.suites.iter().flat_map(|suite| suite.cases.iter())
    }

    /// The summary line: `N passed, N failed`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed ({} decisions checked)",
            self.passed(),
            self.failed(),
            self.checks()
        )
    }

    /// Human-readable output: every case, the failures in full, the summary and coverage.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for suite in &self.suites {
            let _ = writeln!(out, "{} ({})", suite.name, suite.path.display());
            for case in &suite.cases {
                let mark = if case.passed() { "PASS" } else { "FAIL" };
                let _ = writeln!(
                    out,
                    "  {mark} {} [{} check{}]",
                    case.name,
                    case.checks,
                    if case.checks == 1 { "" } else { "s" }
                );
                for failure in &case.failures {
                    let _ = writeln!(out, "       - {failure}");
                }
                if case.more_failures > 0 {
                    let _ = writeln!(out, "       - ... and {} more", case.more_failures);
                }
            }
        }
        let _ = writeln!(out, "\n{}", self.summary());
        let total = self.coverage.covered.len() + self.coverage.uncovered.len();
        let _ = writeln!(
            out,
            "policy coverage: {:.1}% ({} of {total} policies determined at least one decision)",
            self.coverage.percent(),
            self.coverage.covered.len()
        );
        for id in &self.coverage.uncovered {
            let _ = writeln!(out, "  never determined a decision: {id}");
        }
        out
    }

    /// Machine-readable output.
    pub fn json(&self) -> Value {
        json!({
            "policy_set": self.policy_set,
            "passed": self.passed(),
            "failed": self.failed(),
            "checks": self.checks(),
            "suites": self.suites.iter().map(|suite| json!({
                "name": suite.name,
                "path": suite.path.display().to_string(),
                "cases": suite.cases.iter().map(|case| json!({
                    "name": case.name,
                    "passed": case.passed(),
                    "checks": case.checks,
                    "failures": case.failures,
                    "more_failures": case.more_failures,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "coverage": {
                "percent": self.coverage.percent(),
                "covered": self.coverage.covered,
                "uncovered": self.coverage.uncovered,
            },
        })
    }

    /// JUnit XML, as CI systems read it: one `testsuite` per suite file, one `testcase`
    /// per case; coverage as properties, and as a failing `coverage` case when below
    /// `min_coverage`.
    pub fn junit(&self, min_coverage: Option<f64>) -> String {
        let coverage_failed = min_coverage.is_some_and(|min| self.coverage.percent() < min);
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"ringfence policy tests\" tests=\"{}\" failures=\"{}\">",
            self.passed() + self.failed() + usize::from(min_coverage.is_some()),
            self.failed() + usize::from(coverage_failed)
        );
        for suite in &self.suites {
            let failures = suite.cases.iter().filter(|case| !case.passed()).count();
            let _ = writeln!(
                out,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" file=\"{}\">",
                xml(&suite.name),
                suite.cases.len(),
                xml(&suite.path.display().to_string())
            );
            for case in &suite.cases {
                let _ = write!(
                    out,
                    "    <testcase name=\"{}\" classname=\"{}\" assertions=\"{}\"",
                    xml(&case.name),
                    xml(&suite.name),
                    case.checks
                );
                if case.passed() {
                    out.push_str("/>\n");
                } else {
                    let mut text = case.failures.join("\n");
                    if case.more_failures > 0 {
                        let _ = write!(text, "\n... and {} more", case.more_failures);
                    }
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml(case
                            .failures
                            .first()
                            .map(String::as_str)
                            .unwrap_or_default()),
                        xml(&text)
                    );
                }
            }
            out.push_str("  </testsuite>\n");
        }
        let _ = writeln!(
            out,
            "  <testsuite name=\"policy-coverage\" tests=\"{}\" failures=\"{}\">",
            usize::from(min_coverage.is_some()),
            usize::from(coverage_failed)
        );
        out.push_str("    <properties>\n");
        let _ = writeln!(
            out,
            "      <property name=\"policy_set\" value=\"{}\"/>",
            xml(&self.policy_set)
        );
        let _ = writeln!(
            out,
            "      <property name=\"coverage_percent\" value=\"{:.1}\"/>",
            self.coverage.percent()
        );
        for id in &self.coverage.uncovered {
            let _ = writeln!(
                out,
                "      <property name=\"uncovered_policy\" value=\"{}\"/>",
                xml(id)
            );
        }
        out.push_str("    </properties>\n");
        if let Some(min) = min_coverage {
            let _ = write!(
                out,
                "    <testcase name=\"coverage at least {min}%\" classname=\"policy-coverage\""
            );
            if coverage_failed {
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"coverage {:.1}% is below {min}%\">never determined a decision: {}</failure>\n    </testcase>",
                    self.coverage.percent(),
                    xml(&self.coverage.uncovered.join(", "))
                );
            } else {
                out.push_str("/>\n");
            }
        }
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

/// Escapes text for XML attributes and content; drops characters XML 1.0 forbids.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

fn describe(decision: &FieldDecision) -> String {
    let verdict = if decision.allowed { "allow" } else { "deny" };
    if !decision.errors.is_empty() {
        format!(
            "{verdict} (evaluation error: {})",
            decision.errors.join("; ")
        )
    } else if decision.policies.is_empty() {
        format!("{verdict} (no policy applies: default deny)")
    } else {
        format!("{verdict} (determined by {})", decision.policies.join(", "))
    }
}

/// Chooses cases by suite name and case name.
pub type Selector<'a> = &'a dyn Fn(&str, &str) -> bool;

/// Runs `suites` against `snapshot`. `selected` chooses cases by suite and case name
/// (all when `None`). Coverage counts the cases that ran.
pub fn run(snapshot: &PolicySnapshot, suites: &[Suite], selected: Option<Selector<'_>>) -> Report {
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    let mut reports = Vec::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for suite in suites {
        let chosen: Vec<&Case> = suite
            .cases
            .iter()
            .filter(|case| selected.is_none_or(|select| select(&suite.name, &case.name)))
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let fixtures;
        let snapshot_for_suite = if suite.fixtures.is_empty() {
            Ok(snapshot)
        } else {
            match snapshot.with_fixtures(suite.fixtures.clone()) {
                Ok(with) => {
                    fixtures = with;
                    Ok(&fixtures)
                }
                Err(error) => Err(format!("the suite's fixtures are invalid: {error}")),
            }
        };
        let cases = chosen
            .into_iter()
            .map(|case| match &snapshot_for_suite {
                Ok(snapshot) => run_case(snapshot, case, now, &mut covered),
                Err(error) => CaseReport {
                    name: case.name.clone(),
                    checks: 0,
                    failures: vec![error.clone()],
                    more_failures: 0,
                },
            })
            .collect();
        reports.push(SuiteReport {
            name: suite.name.clone(),
            path: suite.path.clone(),
            cases,
        });
    }
    let uncovered = snapshot
        .policy_files()
        .keys()
        .filter(|id| !covered.contains_key(*id))
        .cloned()
        .collect();
    Report {
        policy_set: snapshot.hash().to_owned(),
        suites: reports,
        coverage: Coverage { covered, uncovered },
    }
}

fn run_case(
    snapshot: &PolicySnapshot,
    case: &Case,
    now: i64,
    covered: &mut BTreeMap<String, usize>,
) -> CaseReport {
    let mut report = CaseReport {
        name: case.name.clone(),
        checks: 0,
        failures: Vec::new(),
        more_failures: 0,
    };
    if let Some(expected) = &case.determined_by {
        for id in expected {
            if !snapshot.policy_files().contains_key(id) {
                report.fail(format!(
                    "`determined_by` names `{id}`, which is not a policy of this set"
                ));
            }
        }
        if !report.failures.is_empty() {
            return report;
        }
    }
    let principals: Vec<Option<Principal>> = match &case.principals {
        Principals::Employees(ids) => ids
            .iter()
            .map(|id| Some(Principal::Employee(id.clone())))
            .collect(),
        Principals::EmployeesIn(group) => match snapshot.employees_in(group) {
            Ok(ids) if ids.is_empty() => {
                report.fail(format!(
                    "`employees_in: {group}` matches no employee, so the case checks nothing"
                ));
                return report;
            }
            Ok(ids) => ids
                .into_iter()
                .map(|id| Some(Principal::Employee(id)))
                .collect(),
            Err(error) => {
                report.fail(format!("`employees_in`: {error}"));
                return report;
            }
        },
        Principals::Services => vec![None],
    };
    let fields: Vec<FieldName> = match snapshot.catalog().fields(&case.record_type) {
        None => {
            report.fail(format!(
                "unknown record type `{}`: not in the field catalog",
                case.record_type
            ));
            return report;
        }
        Some(all) => match &case.fields {
            Fields::Named(names) => names.clone(),
            Fields::All => all.cloned().collect(),
            Fields::Classified(classes) => {
                if let Some(unknown) = classes
                    .iter()
                    .find(|class| !snapshot.catalog().classifications().contains(class))
                {
                    report.fail(format!(
                        "unknown classification `{unknown}`: the catalog has {}",
                        snapshot.catalog().classifications().join(", ")
                    ));
                    return report;
                }
                let matching: Vec<FieldName> = all
                    .filter(|field| {
                        snapshot
                            .catalog()
                            .classification(&case.record_type, field)
                            .is_some_and(|class| classes.iter().any(|c| c == class))
                    })
                    .cloned()
                    .collect();
                if matching.is_empty() {
                    report.fail(format!(
                        "no field of `{}` is classified {}, so the case checks nothing",
                        case.record_type,
                        classes.join(" or ")
                    ));
                    return report;
                }
                matching
            }
        },
    };
    for principal in &principals {
        for service in &case.services {
            let principal = principal
                .clone()
                .unwrap_or_else(|| Principal::Service(service.clone()));
            for jurisdiction in &case.jurisdictions {
                for purpose in &case.purposes {
                    for ticket in &case.tickets {
                        let Ok(stated) = StatedPurpose::new(purpose, ticket) else {
                            // Checked when the suite was parsed.
                            continue;
                        };
                        let facts = RequestFacts {
                            principal: &principal,
                            service,
                            authentication: authentication_of(&principal),
                            stated: &stated,
                            request_time: case.at.unwrap_or(now),
                        };
                        let situation = format!(
                            "{principal} via Service::{service:?}, {} {jurisdiction}/{}, purpose {purpose:?}, ticket {ticket:?}",
                            case.action.as_str(),
                            case.record_type
                        );
                        let decisions = match snapshot.decide_each(
                            case.action,
                            &facts,
                            jurisdiction,
                            &case.record_type,
                            &fields,
                        ) {
                            Ok(decisions) => decisions,
                            Err(error) => {
                                report.fail(format!("{situation}: {error}"));
                                continue;
                            }
                        };
                        for (field, decision) in fields.iter().zip(&decisions) {
                            report.checks += 1;
                            for id in &decision.policies {
                                *covered.entry(id.clone()).or_default() += 1;
                            }
                            check(case, decision, &mut report, || {
                                format!("{situation}, field {field}")
                            });
                        }
                    }
                }
            }
        }
    }
    report
}

fn check(
    case: &Case,
    decision: &FieldDecision,
    report: &mut CaseReport,
    situation: impl Fn() -> String,
) {
    let expected_allow = case.expect == Expected::Allow;
    // A deny caused by an evaluation error is fail-closed, not what any case means.
    if decision.allowed != expected_allow || !decision.errors.is_empty() {
        let expected = if expected_allow { "allow" } else { "deny" };
        report.fail(format!(
            "{}: expected {expected}, got {}",
            situation(),
            describe(decision)
        ));
        return;
    }
    if let Some(expected) = &case.determined_by {
        let actual: BTreeSet<String> = decision.policies.iter().cloned().collect();
        if &actual != expected {
            let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
            report.fail(format!(
                "{}: expected determined by [{}], got {}",
                situation(),
                expected.join(", "),
                describe(decision)
            ));
        }
    }
}

#[cfg(test)]
mod tests;
