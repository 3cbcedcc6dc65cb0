//! Proofs of the policy set's invariants: Cedar's symbolic compiler
//! (`cedar-policy-symcc`) turns the policies, the guards of `policies/invariants/` and
//! the facts ringfence guarantees into SMT queries for the cvc5 solver, one per
//! invariant and request environment (principal, action and resource type). A
//! violation comes with a counterexample written as a policy test case and replayed
//! through the normal authorizer. Owns every `cedar_policy_symcc` type; may not load
//! files (the snapshot holds the invariants) or swap policy sets (see `store`).

mod counterexample;
pub mod diff;
mod errors;
mod facts;
pub mod invariants;
mod report;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cedar_policy::{PolicySet, RequestEnv};
use cedar_policy_symcc::solver::LocalSolver;
use cedar_policy_symcc::{CedarSymCompiler, CompiledPolicy, CompiledPolicySet, Env};

pub use counterexample::Counterexample;
pub use facts::Fact;
pub use invariants::{Acknowledgement, Claim, Invariant, Invariants, PrincipalKind};

use super::{Action, PolicySnapshot};

/// Environment variable naming the solver binary (as `cedar-policy-symcc` reads it).
pub const SOLVER_ENV: &str = "CVC5";

/// How to run the solver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProveOptions {
    /// The cvc5 binary: a path, or a name looked up on `PATH`.
    pub solver: PathBuf,
    /// Longest time one query may take; the solver then answers `unknown`.
    pub query_timeout: Duration,
    /// Longest time a whole proof (or diff) may take; then it is unproven.
    pub total_timeout: Duration,
}

impl Default for ProveOptions {
    fn default() -> Self {
        Self {
            solver: std::env::var_os(SOLVER_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("cvc5")),
            query_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(600),
        }
    }
}

/// What became of one invariant.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It holds for every schema-valid request that satisfies the facts.
    Proved,
    /// A request breaks it.
    Violated(Box<Counterexample>),
    /// No answer: the solver is missing, failed, timed out or answered `unknown`, or
    /// the facts are unsatisfiable (they would "prove" anything).
    Unproven(String),
}

/// One invariant's proof.
#[derive(Debug, Clone)]
pub struct InvariantProof {
    /// The invariant's id.
    pub id: String,
    /// What it promises.
    pub description: String,
    /// Its hash (see [`Invariant::hash`]).
    pub hash: String,
    /// The outcome.
    pub outcome: Outcome,
    /// Request environments checked.
    pub environments: usize,
    /// Wall time taken.
    pub took: Duration,
}

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every invariant proved (or there are none).
    Proved,
    /// At least one invariant is violated.
    Violated,
    /// None violated, but at least one could not be proved.
    Unproven,
}

impl Verdict {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Proved => "proved",
            Verdict::Violated => "violated",
            Verdict::Unproven => "unproven",
        }
    }
}

/// The proof of a policy set's invariants.
#[derive(Debug, Clone)]
pub struct ProofReport {
    /// Hash of the policy set proved.
    pub policy_set: String,
    /// When the proof finished (RFC 3339).
    pub at: String,
    /// Per invariant, in file order.
    pub invariants: Vec<InvariantProof>,
    /// The facts assumed, per request environment checked (`Employee decrypt Field`).
    pub facts: Vec<(String, Vec<Fact>)>,
    /// Wall time of the whole proof.
    pub took: Duration,
}

impl ProofReport {
    /// Proved, violated or unproven.
    pub fn verdict(&self) -> Verdict {
        if self
            .invariants
            .iter()
            .any(|p| matches!(p.outcome, Outcome::Violated(_)))
        {
            Verdict::Violated
        } else if self
            .invariants
            .iter()
            .any(|p| matches!(p.outcome, Outcome::Unproven(_)))
        {
            Verdict::Unproven
        } else {
            Verdict::Proved
        }
    }

    /// The invariants not proved, with why: one line each.
    pub fn problems(&self) -> Vec<String> {
        self.invariants
            .iter()
            .filter_map(|proof| match &proof.outcome {
                Outcome::Proved => None,
                Outcome::Violated(counterexample) => Some(format!(
                    "invariant `{}` is violated: {}",
                    proof.id, counterexample.summary
                )),
                Outcome::Unproven(why) => {
                    Some(format!("invariant `{}` is not proved: {why}", proof.id))
                }
            })
            .collect()
    }
}

/// Proves `snapshot`'s invariants, blocking the calling thread (which may be inside
/// or outside an async runtime): the solver runs on a thread of its own.
pub fn prove_blocking(snapshot: &PolicySnapshot, options: &ProveOptions) -> ProofReport {
    let total = options.total_timeout;
    on_prover_thread(
        async {
            match tokio::time::timeout(total, prove(snapshot, options)).await {
                Ok(report) => report,
                Err(_) => unproven_all(
                    snapshot,
                    &format!("the proof took longer than {} s", total.as_secs()),
                ),
            }
        },
        |why| unproven_all(snapshot, why),
    )
}

/// Stack of the prover's thread: symbolic compilation recurses over terms.
const PROVER_STACK: usize = 256 * 1024 * 1024;

/// Runs `work` on a thread of its own with a large stack and a runtime of its own;
/// `failed` answers when that cannot be done or the thread fails.
pub(crate) fn on_prover_thread<T: Send>(
    work: impl std::future::Future<Output = T> + Send,
    failed: impl FnOnce(&str) -> T,
) -> T {
    std::thread::scope(|scope| {
        let started = std::thread::Builder::new()
            .name("ringfence-prover".to_owned())
            .stack_size(PROVER_STACK)
            .spawn_scoped(scope, || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| runtime.block_on(work))
                    .map_err(|error| error.to_string())
            });
        match started.map(|thread| thread.join()) {
            Ok(Ok(Ok(value))) => value,
            Ok(Ok(Err(error))) => failed(&format!("cannot start the prover: {error}")),
            Ok(Err(_)) => failed("the prover failed unexpectedly"),
            Err(error) => failed(&format!("cannot start the prover: {error}")),
        }
    })
}

fn unproven_all(snapshot: &PolicySnapshot, why: &str) -> ProofReport {
    ProofReport {
        policy_set: snapshot.hash().to_owned(),
        at: crate::record::rfc3339_now(),
        invariants: snapshot
            .invariants
            .list
            .iter()
            .map(|invariant| InvariantProof {
                id: invariant.id.clone(),
                description: invariant.description.clone(),
                hash: invariant.hash.clone(),
                outcome: Outcome::Unproven(why.to_owned()),
                environments: 0,
                took: Duration::ZERO,
            })
            .collect(),
        facts: Vec::new(),
        took: Duration::ZERO,
    }
}

/// One solver process, started when first needed and restarted after a failure (a
/// failed query can leave it in any state).
struct Session<'a> {
    options: &'a ProveOptions,
    compiler: Option<CedarSymCompiler<LocalSolver>>,
}

impl Session<'_> {
    fn compiler(&mut self) -> Result<&mut CedarSymCompiler<LocalSolver>, String> {
        if self.compiler.is_none() {
            let mut command = tokio::process::Command::new(&self.options.solver);
            // The solver sees nothing of this process's environment (which may hold
            // the master key, `RINGFENCE_MASTER_KEY`) but the search path.
            command.env_clear();
            if let Some(path) = std::env::var_os("PATH") {
                command.env("PATH", path);
            }
            command
                .args(["--lang", "smt"])
                .arg(format!(
                    "--tlimit-per={}",
                    self.options.query_timeout.as_millis().max(1)
                ))
                .kill_on_drop(true);
            let solver = LocalSolver::from_command(&mut command).map_err(|error| {
                format!(
                    "solver unavailable: cannot run `{}`: {error} (install Debian's `cvc5`, or name the binary with ${SOLVER_ENV}, `policy prove --solver` or `serve --prove-solver`)",
                    self.options.solver.display()
                )
            })?;
            let compiler = CedarSymCompiler::new(solver)
                .map_err(|error| format!("solver unavailable: {error}"))?;
            self.compiler = Some(compiler);
        }
        self.compiler
            .as_mut()
            .ok_or_else(|| "solver unavailable".to_owned())
    }

    /// Runs one query; any failure restarts the solver for the next one.
    async fn run<T, F>(&mut self, query: F) -> Result<T, String>
    where
        F: AsyncFnOnce(
            &mut CedarSymCompiler<LocalSolver>,
        ) -> Result<T, cedar_policy_symcc::err::Error>,
    {
        // The solver's own limit answers `unknown`; this one catches a solver that
        // stops answering at all.
        let backstop = self.options.query_timeout + Duration::from_secs(5);
        let compiler = self.compiler()?;
        let answer = tokio::time::timeout(backstop, query(compiler)).await;
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.compiler = None;
                Err(solver_problem(&error, self.options))
            }
            Err(_) => {
                self.compiler = None;
                Err(format!(
                    "the solver did not answer within {} s",
                    backstop.as_secs()
                ))
            }
        }
    }
}

fn solver_problem(error: &cedar_policy_symcc::err::Error, options: &ProveOptions) -> String {
    use cedar_policy_symcc::err::Error;
    match error {
        Error::SolverUnknown => format!(
            "the solver answered `unknown` (it may have hit the limit of {} ms per query)",
            options.query_timeout.as_millis()
        ),
        other => format!("solver failed: {other}"),
    }
}

/// Request environments by (principal type, action, resource type).
type EnvKey = (String, String, String);

fn env_key(env: &RequestEnv) -> EnvKey {
    (
        env.principal().to_string(),
        env.action().id().unescaped().to_owned(),
        env.resource().to_string(),
    )
}

fn env_name(env: &RequestEnv) -> String {
    let (principal, action, resource) = env_key(env);
    format!("{principal} {action} {resource}")
}

/// The policies checked in one request environment: the set's policies for the
/// action and the facts, compiled once; or why they cannot be.
struct Prepared {
    checked: Result<CompiledPolicySet, String>,
}

/// Proves `snapshot`'s invariants with the solver `options` names.
pub async fn prove(snapshot: &PolicySnapshot, options: &ProveOptions) -> ProofReport {
    let started = Instant::now();
    let invariants = &snapshot.invariants;
    let mut session = Session {
        options,
        compiler: None,
    };
    let envs: Vec<RequestEnv> = snapshot.schema.request_envs().collect();
    let mut prepared: HashMap<EnvKey, Prepared> = HashMap::new();
    let mut facts_shown = Vec::new();
    let mut proofs = Vec::new();
    for invariant in &invariants.list {
        let began = Instant::now();
        let mut checked = 0;
        let mut outcome = Outcome::Proved;
        // For `never_allows`: environments where the guard matches some request.
        let mut guard_matches = 0;
        let relevant = envs.iter().filter(|env| {
            let (principal, action, _) = env_key(env);
            Action::from_id(&action).is_some_and(|a| invariant.actions.contains(&a))
                && invariant.principal.is_none_or(|kind| {
                    principal
                        == match kind {
                            PrincipalKind::Employee => "Employee",
                            PrincipalKind::Service => "Service",
                        }
                })
        });
        for env in relevant {
            checked += 1;
            let key = env_key(env);
            if !facts_shown.iter().any(|(name, _)| *name == env_name(env)) {
                facts_shown.push((env_name(env), facts::facts_for(snapshot, env)));
            }
            let result = match &invariant.claim {
                Claim::NeverErrors => errors::never_errors(snapshot, env, &mut session).await,
                claim => {
                    if !prepared.contains_key(&key) {
                        let entry = prepare(snapshot, env, &mut session).await;
                        prepared.insert(key.clone(), entry);
                    }
                    match prepared.get(&key).map(|p| &p.checked) {
                        Some(Ok(policies)) => {
                            let found = check_claim(snapshot, claim, policies, env, &mut session)
                                .await
                                .map(|found| found.map(|env| (env, None)));
                            if let (Claim::NeverAllows(guard), Ok(None)) = (claim, &found) {
                                match guard_matches_some(snapshot, guard, env, &mut session).await {
                                    Ok(true) => guard_matches += 1,
                                    Ok(false) => {}
                                    Err(why) => {
                                        outcome =
                                            Outcome::Unproven(format!("{}: {why}", env_name(env)));
                                        break;
                                    }
                                }
                            }
                            found
                        }
                        Some(Err(why)) => Err(why.clone()),
                        None => Err("internal: environment not prepared".to_owned()),
                    }
                }
            };
            match result {
                Ok(None) => {}
                Ok(Some((found, erring))) => {
                    let mut counterexample =
                        Counterexample::render(snapshot, invariant, env, &found, erring);
                    if counterexample.replay.is_err()
                        && !matches!(invariant.claim, Claim::NeverErrors)
                    {
                        counterexample =
                            in_todays_directory(snapshot, invariant, env, &mut session)
                                .await
                                .unwrap_or(counterexample);
                    }
                    outcome = Outcome::Violated(Box::new(counterexample));
                    break;
                }
                Err(why) => {
                    outcome = Outcome::Unproven(format!("{}: {why}", env_name(env)));
                    break;
                }
            }
        }
        if matches!(invariant.claim, Claim::NeverAllows(_))
            && matches!(outcome, Outcome::Proved)
            && checked > 0
            && guard_matches == 0
        {
            outcome = Outcome::Unproven(
                "its guard matches no request ringfence builds, so the invariant holds vacuously: check the guard's scope and conditions against the facts".to_owned(),
            );
        }
        proofs.push(InvariantProof {
            id: invariant.id.clone(),
            description: invariant.description.clone(),
            hash: invariant.hash.clone(),
            outcome,
            environments: checked,
            took: began.elapsed(),
        });
    }
    ProofReport {
        policy_set: snapshot.hash().to_owned(),
        at: crate::record::rfc3339_now(),
        invariants: proofs,
        facts: facts_shown,
        took: started.elapsed(),
    }
}

/// Whether guard `id` matches some request of `env` that satisfies the facts.
async fn guard_matches_some(
    snapshot: &PolicySnapshot,
    id: &str,
    env: &RequestEnv,
    session: &mut Session<'_>,
) -> Result<bool, String> {
    let policy = snapshot
        .invariants
        .guards
        .get(id)
        .ok_or_else(|| format!("guard `{id}` is missing"))?;
    let mut set = PolicySet::new();
    set.add(policy.clone())
        .map_err(|error| format!("guard `{id}`: {error}"))?;
    set.add(facts::facts_policy(
        &facts::facts_for(snapshot, env),
        false,
    )?)
    .map_err(|error| format!("cannot add the facts: {error}"))?;
    let compiled = CompiledPolicySet::compile(&set, env, &snapshot.schema)
        .map_err(|error| format!("cannot compile guard `{id}`: {error}"))?;
    let never = session
        .run(async |c| c.check_always_denies_opt(&compiled).await)
        .await?;
    Ok(!never)
}

/// Looks for a counterexample that today's directory replays as it is (the first one
/// may rely on, say, a listed service run by someone else): `None` when there is none,
/// or the search fails.
async fn in_todays_directory(
    snapshot: &PolicySnapshot,
    invariant: &Invariant,
    env: &RequestEnv,
    session: &mut Session<'_>,
) -> Option<Counterexample> {
    let mut facts = facts::facts_for(snapshot, env);
    facts.extend(facts::directory_facts_for(snapshot, env));
    let policies = checked_policies(snapshot, env, &facts).ok()?;
    let found = check_claim(snapshot, &invariant.claim, &policies, env, session)
        .await
        .ok()??;
    Some(Counterexample::render(
        snapshot, invariant, env, &found, None,
    ))
}

/// The set's policies for `env`'s action with `facts` as a forbid, compiled.
fn checked_policies(
    snapshot: &PolicySnapshot,
    env: &RequestEnv,
    facts: &[Fact],
) -> Result<CompiledPolicySet, String> {
    let action = Action::from_id(&env_key(env).1);
    let mut set = action
        .and_then(|action| snapshot.by_action.get(&action).cloned())
        .unwrap_or_else(|| snapshot.all_policies.clone());
    set.add(facts::facts_policy(facts, false)?)
        .map_err(|error| format!("cannot add the facts: {error}"))?;
    CompiledPolicySet::compile(&set, env, &snapshot.schema)
        .map_err(|error| format!("cannot compile the policies: {error}"))
}

/// Compiles the set's policies for `env`'s action with the facts, after checking that
/// some request satisfies the facts (else every claim would hold vacuously).
async fn prepare(
    snapshot: &PolicySnapshot,
    env: &RequestEnv,
    session: &mut Session<'_>,
) -> Prepared {
    let facts = facts::facts_for(snapshot, env);
    let checked = async {
        let schema = &snapshot.schema;
        let assumed = facts::facts_policy(&facts, true)?;
        let assumed = CompiledPolicy::compile(&assumed, env, schema)
            .map_err(|error| format!("cannot compile the facts: {error}"))?
            .into_compiled_policyset();
        let vacuous = session
            .run(async |c| c.check_always_denies_opt(&assumed).await)
            .await?;
        if vacuous {
            return Err(format!(
                "no request satisfies the facts assumed for {} (an empty directory or field catalog?), so nothing can be proved about it",
                env_name(env)
            ));
        }
        checked_policies(snapshot, env, &facts)
    }
    .await;
    Prepared { checked }
}

async fn check_claim(
    snapshot: &PolicySnapshot,
    claim: &Claim,
    policies: &CompiledPolicySet,
    env: &RequestEnv,
    session: &mut Session<'_>,
) -> Result<Option<Env>, String> {
    let guard = |id: &str| -> Result<CompiledPolicySet, String> {
        let policy = snapshot
            .invariants
            .guards
            .get(id)
            .ok_or_else(|| format!("guard `{id}` is missing"))?;
        let mut set = PolicySet::new();
        set.add(policy.clone())
            .map_err(|error| format!("guard `{id}`: {error}"))?;
        CompiledPolicySet::compile(&set, env, &snapshot.schema)
            .map_err(|error| format!("cannot compile guard `{id}`: {error}"))
    };
    match claim {
        Claim::NeverAllows(id) => {
            let guard = guard(id)?;
            session
                .run(async |c| {
                    c.check_disjoint_with_counterexample_opt(policies, &guard)
                        .await
                })
                .await
        }
        Claim::Implies(id) => {
            let guard = guard(id)?;
            session
                .run(async |c| {
                    c.check_implies_with_counterexample_opt(policies, &guard)
                        .await
                })
                .await
        }
        Claim::AlwaysDenies => {
            session
                .run(async |c| {
                    c.check_always_denies_with_counterexample_opt(policies)
                        .await
                })
                .await
        }
        Claim::NeverErrors => Err("internal: never_errors is checked per policy".to_owned()),
    }
}
