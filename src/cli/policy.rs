//! `ringfence policy ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use ringfence::config::DEFAULT_POLICIES;
use ringfence::policy::prove::diff::diff_blocking;
use ringfence::policy::prove::{ProveOptions, Verdict, invariants, prove_blocking};
use ringfence::policy::suite::{self, Suite};
use ringfence::policy::{
    Action, FieldDecision, PolicySnapshot, Principal, RequestFacts, ResourceKind,
};
use ringfence::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

use super::{
    EXIT_COVERAGE_LOW, EXIT_FAILURE, EXIT_INVALID_POLICIES, EXIT_INVALID_SUITE, EXIT_TESTS_FAILED,
    EXIT_UNPROVEN, EXIT_USAGE, EXIT_VIOLATED, EXIT_WIDENING, fail,
};

/// Output format of `policy test`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Every case, failures in full, summary and coverage.
    Human,
    /// One JSON document.
    Json,
    /// JUnit XML for CI systems.
    Junit,
}

/// Output format of `policy diff`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DiffFormat {
    /// A summary per action and principal type, each widening and narrowing as a
    /// test case, and the concrete cells that changed.
    Human,
    /// One JSON document with every changed cell.
    Json,
}

/// Output format of `policy prove`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProveFormat {
    /// One line per invariant, counterexamples in full (as policy test cases).
    Human,
    /// One JSON document, with the facts assumed per request environment.
    Json,
    /// JUnit XML for CI systems: one test case per invariant.
    Junit,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ActionArg {
    Encrypt,
    Decrypt,
    #[value(name = "rotate_key")]
    RotateKey,
    #[value(name = "retire_key")]
    RetireKey,
    #[value(name = "unretire_key")]
    UnretireKey,
    #[value(name = "destroy_key")]
    DestroyKey,
    #[value(name = "view_keys")]
    ViewKeys,
    Rewrap,
    Shred,
}

impl ActionArg {
    fn action(self) -> Action {
        match self {
            ActionArg::Encrypt => Action::Encrypt,
            ActionArg::Decrypt => Action::Decrypt,
            ActionArg::RotateKey => Action::RotateKey,
            ActionArg::RetireKey => Action::RetireKey,
            ActionArg::UnretireKey => Action::UnretireKey,
            ActionArg::DestroyKey => Action::DestroyKey,
            ActionArg::ViewKeys => Action::ViewKeys,
            ActionArg::Rewrap => Action::Rewrap,
            ActionArg::Shred => Action::Shred,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Parse and strictly validate the schema, policies, directory and field catalog.
    Validate {
        /// Policy directory.
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
    },
    /// Run the test suites under `<policies>/tests/` and report policy coverage.
    ///
    /// Exit codes: 0 all passed (and coverage met), 3 invalid policies, 5 a case failed,
    /// 6 coverage below --min-coverage, 7 an invalid suite file.
    Test {
        /// Policy directory.
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        format: Format,
        /// Run only cases whose `suite/case name` (or case name) matches this glob.
        #[arg(long)]
        filter: Option<String>,
        /// Fail unless at least this percentage of policies determined a decision.
        #[arg(long, value_parser = parse_percent)]
        min_coverage: Option<f64>,
    },
    /// Prove the invariants of `<policies>/invariants/` with the cvc5 solver: for every
    /// request the schema allows (under the facts ringfence guarantees), each invariant
    /// is proved, or violated with a counterexample written as a policy test case.
    ///
    /// Exit codes: 0 all proved, 3 invalid policies, 9 an invariant is violated, 10 not
    /// proved (the solver is missing, failed, timed out or answered `unknown`).
    Prove {
        /// Policy directory.
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        format: ProveFormat,
        /// The cvc5 binary (default: $CVC5, else `cvc5` on PATH).
        #[arg(long)]
        solver: Option<PathBuf>,
        /// Longest time one solver query may take, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        query_timeout: u64,
    },
    /// Compare two policy directories: per action and principal type, whether the
    /// change widens or narrows who may do what (symbolically, with the cvc5 solver,
    /// for every request and directory; and concretely, deciding both sets over the
    /// people and services of both directories, every jurisdiction and catalog field
    /// and the literal classes of the context), with each widening and narrowing as a
    /// policy test case.
    ///
    /// Exit codes: 0 compared (and, with --fail-on-widening, no unacknowledged
    /// widening), 3 invalid policies, 10 the solver did not answer (with
    /// --fail-on-widening), 11 an unacknowledged widening (with --fail-on-widening).
    Diff {
        /// The policy directory before the change.
        old: PathBuf,
        /// The policy directory after it.
        new: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        format: DiffFormat,
        /// Fail on any widening that NEW/CHANGES.yaml does not acknowledge for these
        /// two set hashes (`widenings:` entries naming action, principal, old_set and
        /// new_set), and when the solver does not answer.
        #[arg(long)]
        fail_on_widening: bool,
        /// The cvc5 binary (default: $CVC5, else `cvc5` on PATH).
        #[arg(long)]
        solver: Option<PathBuf>,
        /// Longest time one solver query may take, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        query_timeout: u64,
    },
    /// Decide one request and say why: the decision per field and the policies that
    /// determined it. Evaluates each field on its own, without the decision cache.
    Explain {
        /// Policy directory.
        #[arg(long, default_value = DEFAULT_POLICIES)]
        policies: PathBuf,
        /// Employee on whose behalf the request is made (omit for a service acting alone).
        #[arg(long)]
        employee: Option<String>,
        /// Calling service.
        #[arg(long)]
        service: String,
        /// Action to decide.
        #[arg(long, value_enum, default_value = "decrypt")]
        action: ActionArg,
        /// Record type, e.g. user_profile (not for key actions, which act on the
        /// jurisdiction's `KeyRing`).
        #[arg(long)]
        record_type: Option<RecordType>,
        /// Jurisdiction of the record, e.g. US.
        #[arg(long)]
        jurisdiction: Jurisdiction,
        /// Field to decide; repeat for several; none means every field of the record type.
        #[arg(long = "field")]
        fields: Vec<FieldName>,
        /// Stated purpose.
        #[arg(long, default_value = "")]
        purpose: String,
        /// Stated ticket.
        #[arg(long, default_value = "")]
        ticket: String,
    },
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(value) if (0.0..=100.0).contains(&value) => Ok(value),
        _ => Err(format!("`{text}` is not a percentage from 0 to 100")),
    }
}

fn test(policies: PathBuf, format: Format, filter: Option<String>, min: Option<f64>) -> ExitCode {
    let snapshot = match PolicySnapshot::load(&policies) {
        Ok(snapshot) => snapshot,
        Err(error) => return fail(EXIT_INVALID_POLICIES, error),
    };
    let suites = match Suite::load_all(&policies) {
        Ok(suites) => suites,
        Err(error) => return fail(EXIT_INVALID_SUITE, error),
    };
    let matcher = match filter.as_deref().map(globset::Glob::new).transpose() {
        Ok(glob) => glob.map(|glob| glob.compile_matcher()),
        Err(error) => return fail(EXIT_USAGE, format!("--filter: {error}")),
    };
    let select = |suite_name: &str, case: &str| {
        matcher.as_ref().is_none_or(|matcher| {
            matcher.is_match(case) || matcher.is_match(format!("{suite_name}/{case}"))
        })
    };
    let report = suite::run(&snapshot, &suites, Some(&select));
    if report.suites.is_empty() {
        return fail(
            EXIT_USAGE,
            format!("--filter {:?} matches no case", filter.unwrap_or_default()),
        );
    }
    match format {
        Format::Human => print!("{}", report.human()),
        Format::Json => match serde_json::to_string_pretty(&report.json()) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(EXIT_FAILURE, error),
        },
        Format::Junit => print!("{}", report.junit(min)),
    }
    if report.failed() > 0 {
        if matches!(format, Format::Human) {
            return ExitCode::from(EXIT_TESTS_FAILED);
        }
        return fail(EXIT_TESTS_FAILED, report.summary());
    }
    if let Some(min) = min
        && report.coverage.percent() < min
    {
        return fail(
            EXIT_COVERAGE_LOW,
            format!(
                "policy coverage {:.1}% is below --min-coverage {min}%; never determined a decision: {}",
                report.coverage.percent(),
                report.coverage.uncovered.join(", ")
            ),
        );
    }
    ExitCode::SUCCESS
}

fn prove(
    policies: PathBuf,
    format: ProveFormat,
    solver: Option<PathBuf>,
    timeout: u64,
) -> ExitCode {
    let snapshot = match PolicySnapshot::load(&policies) {
        Ok(snapshot) => snapshot,
        Err(error) => return fail(EXIT_INVALID_POLICIES, error),
    };
    let mut options = ProveOptions::default();
    if let Some(solver) = solver {
        options.solver = solver;
    }
    options.query_timeout = std::time::Duration::from_secs(timeout.max(1));
    if snapshot.invariants().list.is_empty() {
        eprintln!(
            "warning: {} states no invariants ({}/{}): nothing to prove",
            policies.display(),
            invariants::INVARIANTS_DIR,
            invariants::STATEMENTS_FILE
        );
    }
    let report = prove_blocking(&snapshot, &options);
    match format {
        ProveFormat::Human => print!("{}", report.human()),
        ProveFormat::Json => match serde_json::to_string_pretty(&report.json()) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(EXIT_FAILURE, error),
        },
        ProveFormat::Junit => print!("{}", report.junit()),
    }
    match report.verdict() {
        Verdict::Proved => ExitCode::SUCCESS,
        Verdict::Violated => ExitCode::from(EXIT_VIOLATED),
        Verdict::Unproven => ExitCode::from(EXIT_UNPROVEN),
    }
}

fn diff(
    old: PathBuf,
    new: PathBuf,
    format: DiffFormat,
    fail_on_widening: bool,
    solver: Option<PathBuf>,
    timeout: u64,
) -> ExitCode {
    let load = |dir: &PathBuf| {
        PolicySnapshot::load(dir).map_err(|error| format!("{}: {error}", dir.display()))
    };
    let (old_set, new_set) = match (load(&old), load(&new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(error), _) | (_, Err(error)) => return fail(EXIT_INVALID_POLICIES, error),
    };
    let mut options = ProveOptions::default();
    if let Some(solver) = solver {
        options.solver = solver;
    }
    options.query_timeout = std::time::Duration::from_secs(timeout);
    let compared = diff_blocking(&old_set, &new_set, &options);
    match format {
        DiffFormat::Human => print!("{}", compared.human()),
        DiffFormat::Json => match serde_json::to_string_pretty(&compared.json()) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(EXIT_FAILURE, error),
        },
    }
    if !fail_on_widening {
        return ExitCode::SUCCESS;
    }
    let widenings = compared.unacknowledged_widenings(&new_set);
    if !widenings.is_empty() {
        let list: Vec<String> = widenings
            .iter()
            .map(|(action, principal)| format!("{action} by {principal}"))
            .collect();
        let entries: Vec<String> = widenings
            .iter()
            .map(|(action, principal)| {
                format!(
                    "    - action: {action}\n      principal: {principal}\n      old_set: {}\n      new_set: {}\n      reason: <why, and who approved it>",
                    compared.old_set, compared.new_set
                )
            })
            .collect();
        return fail(
            EXIT_WIDENING,
            format!(
                "unacknowledged widening: {}. If intended, add to {}:\n  widenings:\n{}",
                list.join(", "),
                new.join(invariants::CHANGES_FILE).display(),
                entries.join("\n")
            ),
        );
    }
    if compared.unproven() {
        return fail(
            EXIT_UNPROVEN,
            "the solver did not answer for every request environment (see above): widenings cannot be ruled out",
        );
    }
    ExitCode::SUCCESS
}

pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Diff {
            old,
            new,
            format,
            fail_on_widening,
            solver,
            query_timeout,
        } => diff(old, new, format, fail_on_widening, solver, query_timeout),
        Command::Prove {
            policies,
            format,
            solver,
            query_timeout,
        } => prove(policies, format, solver, query_timeout),
        Command::Test {
            policies,
            format,
            filter,
            min_coverage,
        } => test(policies, format, filter, min_coverage),
        Command::Validate { policies } => match PolicySnapshot::load(&policies) {
            Ok(snapshot) => {
                println!(
                    "{}: valid: {} policies, {} jurisdictions, policy set hash {}",
                    policies.display(),
                    snapshot.len(),
                    snapshot.jurisdictions().len(),
                    snapshot.hash()
                );
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_INVALID_POLICIES, error),
        },
        Command::Explain {
            policies,
            employee,
            service,
            action,
            record_type,
            jurisdiction,
            fields,
            purpose,
            ticket,
        } => {
            let snapshot = match PolicySnapshot::load(&policies) {
                Ok(snapshot) => snapshot,
                Err(error) => return fail(EXIT_INVALID_POLICIES, error),
            };
            let stated = match StatedPurpose::new(&purpose, &ticket) {
                Ok(stated) => stated,
                Err(error) => return fail(EXIT_FAILURE, error),
            };
            let action = action.action();
            let principal = match employee {
                Some(id) => Principal::Employee(id),
                None => Principal::Service(service.clone()),
            };
            // As a deployed server authenticates them (and as suites decide): an
            // employee with a certificate and a bound token, a service with its
            // certificate alone.
            let authentication = match principal {
                Principal::Employee(_) => ringfence::identity::METHOD_MTLS_TOKEN,
                Principal::Service(_) => ringfence::identity::METHOD_MTLS,
            };
            let record_type = match (action.resource_kind(), record_type) {
                (ResourceKind::KeyRing | ResourceKind::DataSubjects, None) => {
                    let facts = RequestFacts {
                        principal: &principal,
                        service: &service,
                        authentication,
                        stated: &stated,
                        request_time: time::OffsetDateTime::now_utc().unix_timestamp(),
                    };
                    return match snapshot.decide_key(action, &facts, &jurisdiction) {
                        Ok(decision) => {
                            println!(
                                "{} {}::\"{jurisdiction}\" by {principal} via Service::{service:?} (purpose {purpose:?}, ticket {ticket:?}), policy set {}",
                                action.as_str(),
                                action.resource_kind().type_name(),
                                snapshot.hash()
                            );
                            println!("  {}", explained(&snapshot, &decision));
                            ExitCode::SUCCESS
                        }
                        Err(error) => fail(EXIT_FAILURE, error),
                    };
                }
                (ResourceKind::KeyRing | ResourceKind::DataSubjects, Some(_)) => {
                    return fail(
                        EXIT_FAILURE,
                        format!(
                            "`{}` acts on the jurisdiction's `{}`: --record-type and --field do not apply",
                            action.as_str(),
                            action.resource_kind().type_name()
                        ),
                    );
                }
                (ResourceKind::Field, Some(record_type)) => record_type,
                (ResourceKind::Field, None) => {
                    return fail(
                        EXIT_FAILURE,
                        format!("`{}` needs --record-type", action.as_str()),
                    );
                }
            };
            let fields = if fields.is_empty() {
                match snapshot.catalog().fields(&record_type) {
                    Some(all) => all.cloned().collect(),
                    None => {
                        return fail(
                            EXIT_FAILURE,
                            format!(
                                "unknown record type `{record_type}`: not in the field catalog"
                            ),
                        );
                    }
                }
            } else {
                fields
            };
            let facts = RequestFacts {
                principal: &principal,
                service: &service,
                authentication,
                stated: &stated,
                request_time: time::OffsetDateTime::now_utc().unix_timestamp(),
            };
            let decisions =
                match snapshot.decide_each(action, &facts, &jurisdiction, &record_type, &fields) {
                    Ok(decisions) => decisions,
                    Err(error) => return fail(EXIT_FAILURE, error),
                };
            println!(
                "{} {record_type} in {jurisdiction} by {principal} via Service::{service:?} (purpose {purpose:?}, ticket {ticket:?}), policy set {}",
                action.as_str(),
                snapshot.hash()
            );
            for (field, decision) in fields.iter().zip(decisions) {
                let classification = snapshot
                    .catalog()
                    .classification(&record_type, field)
                    .unwrap_or_default();
                println!(
                    "  {field:<20} {classification:<11} {}",
                    explained(&snapshot, &decision)
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// `ALLOW` or `DENY`, and why: the determining policies with their files, default
/// deny, or the evaluation error that failed closed.
fn explained(snapshot: &PolicySnapshot, decision: &FieldDecision) -> String {
    let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
    let why = if !decision.errors.is_empty() {
        format!(
            "evaluation error (fails closed): {}",
            decision.errors.join("; ")
        )
    } else if decision.policies.is_empty() {
        "no policy permits this (default deny)".to_owned()
    } else {
        let named: Vec<String> = decision
            .policies
            .iter()
            .map(|id| match snapshot.policy_files().get(id) {
                Some(file) => format!("{id} ({})", file.display()),
                None => id.clone(),
            })
            .collect();
        format!("determined by {}", named.join(", "))
    };
    format!("{verdict:<5} {why}")
}
