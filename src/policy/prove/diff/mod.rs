//! `policy diff`: what a change to a policy directory widens and narrows. Two views:
//! symbolic (SymCC, per request environment, under the facts of either set: does the
//! new set allow a request the old one denies, or the reverse, for any directory) and
//! concrete (both sets decided by the normal authorizer over the people and services
//! of both directories, every jurisdiction and catalog field, and the literal classes
//! of each context attribute), which sees what the symbolic view cannot: changes to
//! the field catalog, the directory and the schema. May not load files or swap sets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cedar_policy::{PolicySet, RequestEnv};
use cedar_policy_symcc::CompiledPolicySet;

mod cells;
mod report;

use super::counterexample::{CaseText, render_case};
use super::facts::{self, Fact};
use super::invariants::PrincipalKind;
use super::{ProveOptions, Session, env_key, env_name};
use crate::policy::suite::{self, Suite};
use crate::policy::{Action, PolicySnapshot};

/// A request that one set allows and the other denies, as a policy test case that
/// passes on the new set.
#[derive(Debug, Clone)]
pub struct Example {
    /// The request in one line.
    pub summary: String,
    /// A suite file of one case (`expect: allow` for a widening, `deny` for a
    /// narrowing), to paste under the new set's `tests/`.
    pub suite: String,
    /// `Ok` when the normal authorizer confirms it: the case passes on the new set
    /// and fails on the old one.
    pub replay: Result<(), String>,
}

/// What changed in one request environment, symbolically.
#[derive(Debug, Clone)]
pub struct EnvChange {
    /// `Employee decrypt Field`.
    pub environment: String,
    /// The action.
    pub action: String,
    /// The principal type.
    pub principal: String,
    /// A request the new set allows and the old denies; `Err` when not answered.
    pub widening: Result<Option<Example>, String>,
    /// A request the old set allows and the new denies; `Err` when not answered.
    pub narrowing: Result<Option<Example>, String>,
}

/// A group of concrete cells whose decision changed the same way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CellChange {
    /// The action.
    pub action: String,
    /// `Employee::"alice"` or `Service::"us-signup"`.
    pub principal: String,
    /// The calling service.
    pub service: String,
    /// The jurisdiction.
    pub jurisdiction: String,
    /// The record type, or the resource type for administration actions.
    pub resource: String,
    /// The (stated purpose, ticket, authentication) combinations in which exactly
    /// these fields changed this way.
    pub contexts: Vec<(String, String, String)>,
    /// The old decision: `allow`, `deny` or why it could not be made.
    pub old: String,
    /// The new decision.
    pub new: String,
    /// The fields (empty for administration actions).
    pub fields: Vec<String>,
}

impl CellChange {
    /// Allowed now, not before.
    pub fn widens(&self) -> bool {
        self.new == "allow" && self.old != "allow"
    }

    /// Allowed before, not now.
    pub fn narrows(&self) -> bool {
        self.old == "allow" && self.new != "allow"
    }
}

/// How a change moves one (action, principal type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    /// Nothing allowed changed.
    Neither,
    /// Only more is allowed.
    Widens,
    /// Only less is allowed.
    Narrows,
    /// Some more, some less.
    Both,
    /// Nothing found, but the symbolic view did not answer: not known.
    Unknown,
}

impl Movement {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Movement::Neither => "neither",
            Movement::Widens => "widens",
            Movement::Narrows => "narrows",
            Movement::Both => "widens and narrows",
            Movement::Unknown => "unknown",
        }
    }
}

/// The difference between two policy sets.
#[derive(Debug, Clone)]
pub struct PolicyDiff {
    /// Hash of the old set.
    pub old_set: String,
    /// Hash of the new set.
    pub new_set: String,
    /// Files added, removed or changed (`+ name`, `- name`, `~ name`).
    pub files: Vec<String>,
    /// Per request environment.
    pub symbolic: Vec<EnvChange>,
    /// Concrete cells decided per set.
    pub cells_checked: usize,
    /// The cells whose decision changed.
    pub cells: Vec<CellChange>,
    /// Why the concrete view may have missed a change (sampled context values or
    /// times, the deadline, too many changes to list), if it may have.
    pub incomplete: Vec<String>,
    /// Wall time.
    pub took: Duration,
}

/// An (action, principal type) pair and how it moved, with whether the symbolic view
/// answered.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The action.
    pub action: String,
    /// The principal type.
    pub principal: String,
    /// How it moved (symbolic and concrete together).
    pub movement: Movement,
    /// Why the symbolic view did not answer, if it did not.
    pub unproven: Option<String>,
}

impl PolicyDiff {
    /// Per (action, principal type): widens, narrows, both or neither.
    pub fn summary(&self) -> Vec<Summary> {
        let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
        for env in &self.symbolic {
            keys.insert((env.action.clone(), env.principal.clone()));
        }
        for cell in &self.cells {
            keys.insert((cell.action.clone(), principal_type(&cell.principal)));
        }
        keys.into_iter()
            .map(|(action, principal)| {
                let envs: Vec<&EnvChange> = self
                    .symbolic
                    .iter()
                    .filter(|e| e.action == action && e.principal == principal)
                    .collect();
                let cells: Vec<&CellChange> = self
                    .cells
                    .iter()
                    .filter(|c| c.action == action && principal_type(&c.principal) == principal)
                    .collect();
                let wider = envs.iter().any(|e| matches!(e.widening, Ok(Some(_))))
                    || cells.iter().any(|c| c.widens());
                let narrower = envs.iter().any(|e| matches!(e.narrowing, Ok(Some(_))))
                    || cells.iter().any(|c| c.narrows());
                let unproven = envs
                    .iter()
                    .find_map(|e| e.widening.as_ref().err().or(e.narrowing.as_ref().err()))
                    .cloned();
                let movement = match (wider, narrower) {
                    (false, false) if unproven.is_some() => Movement::Unknown,
                    (false, false) => Movement::Neither,
                    (true, false) => Movement::Widens,
                    (false, true) => Movement::Narrows,
                    (true, true) => Movement::Both,
                };
                Summary {
                    action,
                    principal,
                    movement,
                    unproven,
                }
            })
            .collect()
    }

    /// The widenings that the new set's `CHANGES.yaml` does not acknowledge for these
    /// two set hashes, as (action, principal type).
    pub fn unacknowledged_widenings(&self, new: &PolicySnapshot) -> Vec<(String, String)> {
        self.summary()
            .into_iter()
            .filter(|s| matches!(s.movement, Movement::Widens | Movement::Both))
            .filter(|s| {
                !new.invariants().widenings.iter().any(|ack| {
                    ack.action.as_str() == s.action
                        && principal_name(ack.principal) == s.principal
                        && ack.old_set == self.old_set
                        && ack.new_set == self.new_set
                })
            })
            .map(|s| (s.action, s.principal))
            .collect()
    }

    /// Whether the symbolic view failed to answer somewhere.
    pub fn unproven(&self) -> bool {
        self.symbolic
            .iter()
            .any(|e| e.widening.is_err() || e.narrowing.is_err())
    }
}

fn principal_type(principal: &str) -> String {
    principal.split("::").next().unwrap_or(principal).to_owned()
}

fn principal_name(kind: PrincipalKind) -> &'static str {
    match kind {
        PrincipalKind::Employee => "Employee",
        PrincipalKind::Service => "Service",
    }
}

/// Compares `old` with `new`.
pub async fn diff(
    old: &PolicySnapshot,
    new: &PolicySnapshot,
    options: &ProveOptions,
) -> PolicyDiff {
    let started = Instant::now();
    let mut session = Session {
        options,
        compiler: None,
    };
    let mut symbolic = Vec::new();
    for env in new.schema.request_envs().filter(built_by_ringfence) {
        symbolic.push(compare_env(old, new, &env, &mut session).await);
    }
    let concrete = cells::cells(old, new, started + options.total_timeout);
    PolicyDiff {
        old_set: old.hash().to_owned(),
        new_set: new.hash().to_owned(),
        files: changed_files(old, new),
        symbolic,
        cells_checked: concrete.checked,
        cells: concrete.cells,
        incomplete: concrete.incomplete,
        took: started.elapsed(),
    }
}

/// [`diff`] from a thread of its own (see [`super::prove_blocking`]).
pub fn diff_blocking(
    old: &PolicySnapshot,
    new: &PolicySnapshot,
    options: &ProveOptions,
) -> PolicyDiff {
    let total = options.total_timeout;
    super::on_prover_thread(
        async {
            match tokio::time::timeout(total, diff(old, new, options)).await {
                Ok(diff) => diff,
                Err(_) => failed(
                    old,
                    new,
                    &format!("the comparison took longer than {} s", total.as_secs()),
                ),
            }
        },
        |why| failed(old, new, why),
    )
}

/// Request environments ringfence asks Cedar about: employees on every action, a
/// service alone on field actions (administration by a service alone is refused
/// before Cedar).
fn built_by_ringfence(env: &RequestEnv) -> bool {
    let (principal, action, _) = env_key(env);
    match principal.as_str() {
        "Employee" => true,
        "Service" => {
            Action::from_id(&action).is_none_or(|a| !a.resource_kind().is_jurisdictional())
        }
        _ => false,
    }
}

fn failed(old: &PolicySnapshot, new: &PolicySnapshot, why: &str) -> PolicyDiff {
    // Bounded like a full comparison.
    let concrete = cells::cells(old, new, Instant::now() + Duration::from_secs(600));
    PolicyDiff {
        old_set: old.hash().to_owned(),
        new_set: new.hash().to_owned(),
        files: changed_files(old, new),
        symbolic: new
            .schema
            .request_envs()
            .filter(built_by_ringfence)
            .map(|env| {
                let (principal, action, _) = env_key(&env);
                EnvChange {
                    environment: env_name(&env),
                    action,
                    principal,
                    widening: Err(why.to_owned()),
                    narrowing: Err(why.to_owned()),
                }
            })
            .collect(),
        cells_checked: concrete.checked,
        cells: concrete.cells,
        incomplete: concrete.incomplete,
        took: Duration::ZERO,
    }
}

fn changed_files(old: &PolicySnapshot, new: &PolicySnapshot) -> Vec<String> {
    let old_files: BTreeMap<&str, &str> = old
        .sources
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let new_files: BTreeMap<&str, &str> = new
        .sources
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut files = Vec::new();
    for (name, text) in &new_files {
        match old_files.get(name) {
            None => files.push(format!("+ {name}")),
            Some(before) if before != text => files.push(format!("~ {name}")),
            Some(_) => {}
        }
    }
    for name in old_files
        .keys()
        .filter(|name| !new_files.contains_key(*name))
    {
        files.push(format!("- {name}"));
    }
    files
}

/// The facts of either set: a request ringfence could build under the old set or the
/// new one.
fn either_facts(old: &PolicySnapshot, new: &PolicySnapshot, env: &RequestEnv) -> Vec<Fact> {
    let both = |facts: Vec<Fact>| {
        if facts.is_empty() {
            "true".to_owned()
        } else {
            facts
                .iter()
                .map(|f| format!("({})", f.cedar))
                .collect::<Vec<_>>()
                .join(" && ")
        }
    };
    vec![Fact {
        says: "the request is one ringfence builds under the old set or the new one".to_owned(),
        cedar: format!(
            "({}) || ({})",
            both(facts::facts_for(old, env)),
            both(facts::facts_for(new, env))
        ),
    }]
}

async fn compare_env(
    old: &PolicySnapshot,
    new: &PolicySnapshot,
    env: &RequestEnv,
    session: &mut Session<'_>,
) -> EnvChange {
    let (principal, action, _) = env_key(env);
    let mut change = EnvChange {
        environment: env_name(env),
        action: action.clone(),
        principal,
        widening: Ok(None),
        narrowing: Ok(None),
    };
    let facts = either_facts(old, new, env);
    // Today's directory, for an example both sets can replay as they are.
    let mut in_directory = facts.clone();
    in_directory.extend(facts::directory_facts_for(new, env));
    let compiled = |snapshot: &PolicySnapshot,
                    which: &str,
                    facts: &[Fact]|
     -> Result<CompiledPolicySet, String> {
        let mut set = Action::from_id(&action)
            .and_then(|a| snapshot.by_action.get(&a).cloned())
            .unwrap_or_else(|| snapshot.all_policies.clone());
        if !snapshot.declared.iter().any(|a| a.as_str() == action) {
            // The action is new: nothing was allowed before.
            set = PolicySet::new();
        }
        set.add(facts::facts_policy(facts, false)?)
            .map_err(|error| format!("cannot add the facts: {error}"))?;
        CompiledPolicySet::compile(&set, env, &new.schema).map_err(|error| {
            format!(
                "the {which} policies do not compile against the new schema for {}: {error}",
                env_name(env)
            )
        })
    };
    let (old_set, new_set) = match (compiled(old, "old", &facts), compiled(new, "new", &facts)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(why), _) | (_, Err(why)) => {
            change.widening = Err(why.clone());
            change.narrowing = Err(why);
            return change;
        }
    };
    for widening in [true, false] {
        let (more, less) = if widening {
            (&new_set, &old_set)
        } else {
            (&old_set, &new_set)
        };
        let found = session
            .run(async |c| c.check_implies_with_counterexample_opt(more, less).await)
            .await;
        let mut found =
            found.map(|found| found.map(|found| example(old, new, env, &found, widening)));
        // An example that needs another directory: look for one in today's.
        if let Ok(Some(first)) = &found
            && first.replay.is_err()
            && let (Ok(old_here), Ok(new_here)) = (
                compiled(old, "old", &in_directory),
                compiled(new, "new", &in_directory),
            )
        {
            let (more, less) = if widening {
                (&new_here, &old_here)
            } else {
                (&old_here, &new_here)
            };
            if let Ok(Some(again)) = session
                .run(async |c| c.check_implies_with_counterexample_opt(more, less).await)
                .await
            {
                found = Ok(Some(example(old, new, env, &again, widening)));
            }
        }
        if widening {
            change.widening = found;
        } else {
            change.narrowing = found;
        }
    }
    change
}

fn example(
    old: &PolicySnapshot,
    new: &PolicySnapshot,
    env: &RequestEnv,
    found: &cedar_policy_symcc::Env,
    widening: bool,
) -> Example {
    let (what, expect) = if widening {
        (
            "the new set allows this request; the old one denied it",
            "allow",
        )
    } else {
        (
            "the new set denies this request; the old one allowed it",
            "deny",
        )
    };
    let (_, action, _) = env_key(env);
    let wording = CaseText {
        name: format!(
            "{} of {action} ({})",
            if widening { "widening" } else { "narrowing" },
            env_name(env)
        ),
        description: format!("Found by `ringfence policy diff`: {what}"),
        header: format!(
            "# Found by `ringfence policy diff` between policy sets {} and {}.\n# Paste under the new set's tests/: the case passes on the new set and fails on the old.\n",
            old.hash(),
            new.hash()
        ),
        expect,
    };
    let rendered = render_case(new, env, found, None, &wording);
    let replay = replay(old, new, &rendered.suite);
    Example {
        summary: rendered.summary,
        suite: rendered.suite,
        replay,
    }
}

fn replay(old: &PolicySnapshot, new: &PolicySnapshot, text: &str) -> Result<(), String> {
    let parse = || {
        Suite::parse("diff", std::path::Path::new("diff.yaml"), text)
            .map_err(|problem| format!("the rendered suite does not parse: {problem}"))
    };
    let on_new = suite::run(new, &[parse()?], None);
    if on_new.failed() > 0 {
        return Err(format!(
            "on the new set the case fails: {}",
            on_new.human().trim()
        ));
    }
    let on_old = suite::run(old, &[parse()?], None);
    if on_old.failed() == 0 {
        return Err("on the old set the case passes too: the difference needs a directory unlike the old one".to_owned());
    }
    Ok(())
}
