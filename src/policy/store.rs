//! The reloadable policy store: the running snapshot, swapped atomically, how it got
//! there (status of every load), and the proof guard that admits a set only when its
//! invariants prove and none was weakened without an acknowledgement. May not decide.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::diagnostics::PROOF_REFUSAL;
use super::prove::{self, Invariants, ProofReport, ProveOptions, Verdict};
use super::{CATALOG_FILE, DIRECTORY_FILE, LoadError, PolicySnapshot, SCHEMA_FILE};

/// What the server does with a policy set whose invariants do not prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofMode {
    /// Refuse it (at start and on reload), also when the solver is missing, times
    /// out or answers `unknown`; refuse a weakened or deleted invariant that
    /// `CHANGES.yaml` does not acknowledge.
    Enforce,
    /// Prove and log what fails, but serve the set.
    Warn,
    /// Do not prove.
    Off,
}

impl ProofMode {
    /// The name in flags and status.
    pub fn as_str(self) -> &'static str {
        match self {
            ProofMode::Enforce => "enforce",
            ProofMode::Warn => "warn",
            ProofMode::Off => "off",
        }
    }
}

/// The proof guard's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofGuard {
    /// What to do with a set that does not prove.
    pub mode: ProofMode,
    /// How to run the solver.
    pub options: ProveOptions,
}

impl ProofGuard {
    /// No proofs.
    pub fn off() -> Self {
        Self {
            mode: ProofMode::Off,
            options: ProveOptions::default(),
        }
    }
}

/// The latest proof the guard ran (or took from its cache).
#[derive(Debug, Clone, PartialEq)]
pub struct ProofStatus {
    /// The guard's mode.
    pub mode: ProofMode,
    /// The set proved.
    pub policy_set: String,
    /// `proved`, `violated` or `unproven`.
    pub verdict: &'static str,
    /// Invariants stated.
    pub invariants: usize,
    /// Invariants proved.
    pub proved: usize,
    /// Violations, unproven invariants and unacknowledged weakenings, one line each.
    pub problems: Vec<String>,
    /// Milliseconds the proof took (when it ran).
    pub took_ms: f64,
    /// When it finished (RFC 3339).
    pub at: String,
    /// Whether the proof came from the cache (same set hash proved before).
    pub cached: bool,
    /// Whether the set was refused because of it.
    pub refused: bool,
}

/// Proofs kept by set hash.
const PROOF_CACHE: usize = 16;

/// The file in the archive directory naming the set that served last: the baseline
/// for weakened invariants across restarts.
pub const SERVING_FILE: &str = "SERVING";

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
    /// Reloads refused by the proof guard (counted in `reloads_failed` too).
    pub reloads_refused_by_proof: u64,
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
    guard: ProofGuard,
    /// Proof reports by set hash, most recent last.
    proofs: std::sync::Mutex<Vec<Arc<ProofReport>>>,
    last_proof: std::sync::Mutex<Option<ProofStatus>>,
}

impl PolicyStore {
    /// Loads the policy directory without proofs; fails on any diagnostic.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::load_unguarded(dir, ProofGuard::off())
    }

    /// Loads the policy directory, proves it under `guard`, archives it under
    /// `archive` and records it as the set that serves. Under
    /// [`ProofMode::Enforce`] a set that does not prove, or that weakens an invariant
    /// of the set that served last (named in `archive/SERVING`) without an
    /// acknowledgement, is refused.
    pub fn load_guarded(dir: &Path, guard: ProofGuard, archive: &Path) -> Result<Self, LoadError> {
        let store = Self::load_unguarded(dir, guard)?;
        let _ = store.archive.set(archive.to_owned());
        let snapshot = store.current();
        let baseline = store.serving_baseline(&snapshot);
        let proved = store.admit(&snapshot, baseline)?;
        let fail = |problem: String| LoadError {
            diagnostics: vec![format!("cannot archive the policy set: {problem}")],
        };
        store.archive_to(archive).map_err(fail)?;
        if proved {
            write_serving(archive, snapshot.hash()).map_err(fail)?;
        }
        Ok(store)
    }

    /// As [`PolicyStore::load_guarded`], but writes nothing: the set is loaded and
    /// proved under `guard` against the baseline `archive/SERVING` names, and neither
    /// archived nor recorded as serving (`ringfence config check`).
    pub fn check_guarded(dir: &Path, guard: ProofGuard, archive: &Path) -> Result<Self, LoadError> {
        let store = Self::load_unguarded(dir, guard)?;
        let _ = store.archive.set(archive.to_owned());
        let snapshot = store.current();
        let baseline = store.serving_baseline(&snapshot);
        store.admit(&snapshot, baseline)?;
        Ok(store)
    }

    fn load_unguarded(dir: &Path, guard: ProofGuard) -> Result<Self, LoadError> {
        let snapshot = PolicySnapshot::load(dir)?;
        let at = crate::record::rfc3339_now();
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
            reloads_refused_by_proof: 0,
        };
        Ok(Self {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(snapshot),
            status: std::sync::Mutex::new(status),
            reloading: std::sync::Mutex::new(()),
            archive: std::sync::OnceLock::new(),
            guard,
            proofs: std::sync::Mutex::new(Vec::new()),
            last_proof: std::sync::Mutex::new(None),
        })
    }

    /// Archives the running set under `root` (see [`PolicySnapshot::archive`]) and
    /// every set a reload swaps in from now on, before it decides anything.
    pub fn archive_to(&self, root: &Path) -> Result<PathBuf, String> {
        let archived = self.current().archive(root)?;
        let _ = self.archive.set(root.to_owned());
        Ok(archived)
    }

    /// The latest proof, if the guard ran one.
    pub fn last_proof(&self) -> Option<ProofStatus> {
        lock(&self.last_proof).clone()
    }

    /// The guard's configuration.
    pub fn guard(&self) -> &ProofGuard {
        &self.guard
    }

    /// The set that served last before this process, from `archive/SERVING`: `None`
    /// when there is none (a first start) or it is `snapshot` itself; an error when it
    /// is named but cannot be read (under `enforce` that refuses: fail closed).
    fn serving_baseline(
        &self,
        snapshot: &PolicySnapshot,
    ) -> Result<Option<Arc<PolicySnapshot>>, String> {
        let Some(root) = self.archive.get() else {
            return Ok(None);
        };
        let path = root.join(SERVING_FILE);
        let hash = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().to_owned(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        if hash == snapshot.hash() {
            return Ok(None);
        }
        PolicySnapshot::load_archived(root, &hash)
            .map(|baseline| Some(Arc::new(baseline)))
            .map_err(|problem| {
                format!(
                    "cannot read the set that served last ({}), the baseline for weakened invariants: {problem}",
                    path.display()
                )
            })
    }

    /// Proves `snapshot` (or takes the proof from the cache) and checks its invariants
    /// against `baseline`'s; records the outcome. `Err` only when the guard refuses;
    /// `Ok(true)` when every invariant proved and none was weakened unacknowledged:
    /// only such a set becomes the baseline of later starts (`SERVING`), so serving a
    /// set under `warn` or `off` does not move it.
    fn admit(
        &self,
        snapshot: &PolicySnapshot,
        baseline: Result<Option<Arc<PolicySnapshot>>, String>,
    ) -> Result<bool, LoadError> {
        let mode = self.guard.mode;
        if mode == ProofMode::Off {
            return Ok(false);
        }
        let cached = lock(&self.proofs)
            .iter()
            .find(|report| report.policy_set == snapshot.hash())
            .cloned();
        let (report, was_cached) = match cached {
            Some(report) => (report, true),
            None => {
                let report = Arc::new(prove::prove_blocking(snapshot, &self.guard.options));
                // A proof that could not run is not cached: the solver may be back.
                if report.verdict() != Verdict::Unproven {
                    let mut proofs = lock(&self.proofs);
                    proofs.push(Arc::clone(&report));
                    if proofs.len() > PROOF_CACHE {
                        proofs.remove(0);
                    }
                }
                (report, false)
            }
        };
        let mut problems = report.problems();
        match baseline {
            Ok(Some(baseline)) => {
                problems.extend(weakened(baseline.invariants(), snapshot.invariants()))
            }
            Ok(None) => {}
            Err(problem) => problems.push(problem),
        }
        let refused = mode == ProofMode::Enforce && !problems.is_empty();
        let status = ProofStatus {
            mode,
            policy_set: snapshot.hash().to_owned(),
            verdict: report.verdict().as_str(),
            invariants: report.invariants.len(),
            proved: report
                .invariants
                .iter()
                .filter(|p| matches!(p.outcome, prove::Outcome::Proved))
                .count(),
            problems: problems.clone(),
            took_ms: report.took.as_secs_f64() * 1000.0,
            at: report.at.clone(),
            cached: was_cached,
            refused,
        };
        *lock(&self.last_proof) = Some(status);
        if problems.is_empty() {
            if report.invariants.is_empty() {
                tracing::warn!(
                    hash = snapshot.hash(),
                    "the policy set states no invariants: nothing proved"
                );
            } else {
                tracing::info!(
                    hash = snapshot.hash(),
                    invariants = report.invariants.len(),
                    took_ms = report.took.as_millis() as u64,
                    cached = was_cached,
                    "policy invariants proved"
                );
            }
            return Ok(true);
        }
        if refused {
            let mut diagnostics = vec![format!(
                "{PROOF_REFUSAL} (--prove enforce): {} problem{} with the invariants of policy set {}:",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                snapshot.hash()
            )];
            diagnostics.extend(problems);
            if report.verdict() == Verdict::Violated {
                diagnostics.push(
                    "run `ringfence policy prove` for the counterexamples, as policy test cases"
                        .to_owned(),
                );
            }
            return Err(LoadError { diagnostics });
        }
        // Without a solver (the quick start), one line says so.
        let unavailable: Vec<&prove::InvariantProof> = report
            .invariants
            .iter()
            .filter(|p| matches!(&p.outcome, prove::Outcome::Unproven(why) if why.contains("solver unavailable")))
            .collect();
        if !unavailable.is_empty() && unavailable.len() == problems.len() {
            if let Some(prove::Outcome::Unproven(why)) = unavailable.first().map(|p| &p.outcome) {
                tracing::warn!(
                    hash = snapshot.hash(),
                    "policy set served with its {} invariants unproven (--prove warn): {why}",
                    unavailable.len()
                );
            }
            return Ok(false);
        }
        for problem in &problems {
            tracing::warn!(
                hash = snapshot.hash(),
                "policy set served although (--prove warn): {problem}"
            );
        }
        Ok(false)
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
        let mut refused_by_proof = false;
        let mut proved = false;
        let loaded = PolicySnapshot::load(&self.dir).and_then(|snapshot| {
            if snapshot.hash() != running.hash() {
                // The running set served last: it is the baseline.
                proved = self
                    .admit(&snapshot, Ok(Some(Arc::clone(&running))))
                    .inspect_err(|_| refused_by_proof = true)?;
            }
            // A set is archived before it decides anything, so every decision it makes
            // can be replayed.
            if let Some(root) = self.archive.get() {
                snapshot.archive(root).map_err(|problem| LoadError {
                    diagnostics: vec![format!("cannot archive the policy set: {problem}")],
                })?;
            }
            Ok(snapshot)
        });
        let at = crate::record::rfc3339_now();
        let swapped = matches!(&loaded, Ok(snapshot) if snapshot.hash() != running.hash());
        let result = loaded.map(|snapshot| {
            if swapped {
                let snapshot = Arc::new(snapshot);
                self.current.store(Arc::clone(&snapshot));
                if let Some(root) = self.archive.get().filter(|_| proved)
                    && let Err(problem) = write_serving(root, snapshot.hash())
                {
                    tracing::error!(%problem, "cannot record the serving policy set: a restart compares invariants with an older set");
                }
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
                if refused_by_proof {
                    status.reloads_refused_by_proof += 1;
                }
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

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Records `hash` in `root/SERVING`, durably (written aside, synced, renamed).
fn write_serving(root: &Path, hash: &str) -> Result<(), String> {
    let path = root.join(SERVING_FILE);
    let temporary = root.join(format!(".{SERVING_FILE}.{}.tmp", std::process::id()));
    let fail = |error: std::io::Error| format!("{}: {error}", path.display());
    {
        let mut file = std::fs::File::create(&temporary).map_err(fail)?;
        std::io::Write::write_all(&mut file, format!("{hash}\n").as_bytes()).map_err(fail)?;
        file.sync_all().map_err(fail)?;
    }
    std::fs::rename(&temporary, &path).map_err(fail)?;
    std::fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .map_err(fail)
}

/// The invariants of `baseline` that `new` deletes or changes without an
/// acknowledgement in `new`'s `CHANGES.yaml` naming the old and new hash; each with
/// the acknowledgement that would accept it.
pub fn weakened(baseline: &Invariants, new: &Invariants) -> Vec<String> {
    let mut problems = Vec::new();
    for old in &baseline.list {
        let now = new.get(&old.id);
        let new_hash = now.map(|n| n.hash.clone());
        if new_hash.as_deref() == Some(old.hash.as_str()) {
            continue;
        }
        let acknowledged = new
            .acknowledgements
            .iter()
            .any(|ack| ack.invariant == old.id && ack.old == old.hash && ack.new == new_hash);
        if acknowledged {
            continue;
        }
        let (what, new_text) = match &new_hash {
            None => ("deleted", "deleted".to_owned()),
            Some(hash) => ("changed", hash.clone()),
        };
        problems.push(format!(
            "invariant `{}` was {what} since the set that served last ({}), without an acknowledgement; if that is intended, add to {}:\n  invariants:\n    - invariant: {}\n      old: {}\n      new: {new_text}\n      reason: <why, and who approved it>",
            old.id,
            baseline_hash_hint(old),
            prove::invariants::CHANGES_FILE,
            old.id,
            old.hash,
        ));
    }
    problems
}

fn baseline_hash_hint(invariant: &prove::Invariant) -> String {
    format!("invariant hash {}", invariant.hash)
}

/// Files whose change can change the policy set (test suites cannot), in the policy
/// directory or its `invariants/`. Names starting with `..` are the symlinks Kubernetes
/// swaps when a mounted ConfigMap changes.
pub fn affects_policy_set(file_name: &str) -> bool {
    file_name.starts_with("..")
        || file_name == super::prove::invariants::CHANGES_FILE
        || file_name == super::prove::invariants::INVARIANTS_DIR
        || file_name == super::prove::invariants::STATEMENTS_FILE
        || file_name == SCHEMA_FILE
        || file_name == DIRECTORY_FILE
        || file_name == CATALOG_FILE
        || file_name.ends_with(".cedar")
}
