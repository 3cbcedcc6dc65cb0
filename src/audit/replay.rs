//! Replay: re-decide logged requests against the policy set that decided them (kept by
//! hash in the data directory's `policy-sets/`) and report every entry whose recorded
//! decision differs. A difference means the log, the archive or the decision engine
//! is not what it claims to be.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr as _;

use serde_json::Value;

use super::{Entry, Filter, for_each_entry};
use crate::policy::{Action, PolicySnapshot, Principal, RequestFacts};
use crate::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

/// One field whose replayed decision differs from the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// Sequence number of the entry.
    pub seq: u64,
    /// Request id of the entry.
    pub request_id: String,
    /// The field, or `*` when the whole entry could not be replayed.
    pub field: String,
    /// What the log says.
    pub recorded: String,
    /// What the policy set decides now.
    pub replayed: String,
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    /// Entries re-decided.
    pub replayed: u64,
    /// Decisions compared (one per field, or per key ring of a `key_admin` entry).
    pub decisions: u64,
    /// Entries with nothing to re-decide (checkpoints, rejected or unauthenticated
    /// requests, integrity follow-ups).
    pub skipped: u64,
    /// Policy sets used, with the number of entries each decided.
    pub policy_sets: BTreeMap<String, u64>,
    /// Policy sets cited by entries but not available, with why and how many entries.
    pub unavailable: BTreeMap<String, (String, u64)>,
    /// Every difference.
    pub mismatches: Vec<Mismatch>,
}

fn describe(allowed: bool, policies: &[String]) -> String {
    let verdict = if allowed { "allow" } else { "deny" };
    if policies.is_empty() {
        verdict.to_owned()
    } else {
        format!("{verdict} by {}", policies.join(", "))
    }
}

/// Replays every entry of the log in `log_dir` that matches `filter`, loading policy
/// sets from `archive`.
pub fn replay(log_dir: &Path, archive: &Path, filter: &Filter) -> std::io::Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let mut sets: HashMap<String, Result<PolicySnapshot, String>> = HashMap::new();
    for_each_entry(log_dir, filter, |_, value| {
        replay_entry(value, archive, &mut sets, &mut report);
        Ok(())
    })?;
    Ok(report)
}

fn replay_entry(
    value: &Value,
    archive: &Path,
    sets: &mut HashMap<String, Result<PolicySnapshot, String>>,
    report: &mut ReplayReport,
) {
    let seq = value.get("seq").and_then(Value::as_u64).unwrap_or_default();
    let entry = match serde_json::from_value::<Entry>(value.clone()) {
        Ok(entry) => entry,
        // Field decisions that cannot be read cannot be re-decided: a difference.
        Err(error) if value.get("field_groups").is_some() || value.get("fields").is_some() => {
            report.mismatches.push(Mismatch {
                seq,
                request_id: value
                    .get("request_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                field: "*".to_owned(),
                recorded: "field decisions that cannot be read".to_owned(),
                replayed: error.to_string(),
            });
            return;
        }
        Err(_) => {
            report.skipped += 1;
            return;
        }
    };
    let action = match entry.kind.as_str() {
        "encrypt" => Some(Action::Encrypt),
        "decrypt" | "authorize" => Some(Action::Decrypt),
        "rewrap" => Some(Action::Rewrap),
        super::KEY_ADMIN_KIND => entry.action.as_deref().and_then(Action::from_id),
        _ => None,
    };
    // Something was decided: fields of a record, or key rings.
    let decided = match &entry.key_admin {
        Some(admin) => !admin.key_rings.is_empty(),
        None => entry.record.is_some() && !entry.fields.is_empty(),
    };
    let (Some(action), Some(hash), true) = (action, &entry.policy_set, decided) else {
        report.skipped += 1;
        return;
    };
    let mismatch = |field: &str, recorded: String, replayed: String| Mismatch {
        seq,
        request_id: entry.request_id.clone(),
        field: field.to_owned(),
        recorded,
        replayed,
    };
    let snapshot = sets
        .entry(hash.clone())
        .or_insert_with(|| PolicySnapshot::load_archived(archive, hash));
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(problem) => {
            let slot = report
                .unavailable
                .entry(hash.clone())
                .or_insert_with(|| (problem.clone(), 0));
            slot.1 += 1;
            return;
        }
    };
    if let Some(admin) = &entry.key_admin {
        replay_key_admin(&entry, admin, action, snapshot, hash, report, mismatch);
        return;
    }
    let Some(record) = &entry.record else {
        report.skipped += 1;
        return;
    };
    // The facts as the gatekeeper saw them; any that no longer parse is itself a finding.
    let parsed = (|| -> Result<_, String> {
        let (principal, service, stated) = caller_of(&entry)?;
        let jurisdiction = Jurisdiction::new(&record.jurisdiction).map_err(|e| e.to_string())?;
        let record_type = RecordType::new(&record.record_type).map_err(|e| e.to_string())?;
        let fields = entry
            .fields
            .iter()
            .map(|field| FieldName::new(&field.field).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            principal,
            service,
            stated,
            jurisdiction,
            record_type,
            fields,
        ))
    })();
    let (principal, service, stated, jurisdiction, record_type, fields) = match parsed {
        Ok(parsed) => parsed,
        Err(problem) => {
            report.mismatches.push(mismatch(
                "*",
                "a decided request".to_owned(),
                format!("cannot replay: {problem}"),
            ));
            return;
        }
    };
    let facts = RequestFacts {
        principal: &principal,
        service: &service,
        authentication: &entry.authentication,
        stated: &stated,
        request_time: entry.request_time,
    };
    report.replayed += 1;
    *report.policy_sets.entry(hash.clone()).or_default() += 1;
    match snapshot.decide_each(action, &facts, &jurisdiction, &record_type, &fields) {
        Ok(decisions) => {
            for (recorded, decision) in entry.fields.iter().zip(decisions) {
                report.decisions += 1;
                let recorded_allowed = recorded.decision == "allow";
                let mut recorded_policies = recorded.policies.clone();
                recorded_policies.sort_unstable();
                if recorded_allowed != decision.allowed || recorded_policies != decision.policies {
                    report.mismatches.push(mismatch(
                        &recorded.field,
                        describe(recorded_allowed, &recorded_policies),
                        describe(decision.allowed, &decision.policies),
                    ));
                }
            }
        }
        Err(error) => report.mismatches.push(mismatch(
            "*",
            "a decided request".to_owned(),
            format!("cannot replay: {error}"),
        )),
    }
}

/// Re-decides each key ring of a `key_admin` entry.
fn replay_key_admin(
    entry: &Entry,
    admin: &super::KeyAdminEntry,
    action: Action,
    snapshot: &PolicySnapshot,
    hash: &str,
    report: &mut ReplayReport,
    mismatch: impl Fn(&str, String, String) -> Mismatch,
) {
    let (principal, service, stated) = match caller_of(entry) {
        Ok(parsed) => parsed,
        Err(problem) => {
            report.mismatches.push(mismatch(
                "*",
                "a decided request".to_owned(),
                format!("cannot replay: {problem}"),
            ));
            return;
        }
    };
    let facts = RequestFacts {
        principal: &principal,
        service: &service,
        authentication: &entry.authentication,
        stated: &stated,
        request_time: entry.request_time,
    };
    report.replayed += 1;
    *report.policy_sets.entry(hash.to_owned()).or_default() += 1;
    for ring in &admin.key_rings {
        let resource = format!(
            "{}::\"{}\"",
            action.resource_kind().type_name(),
            ring.jurisdiction
        );
        let decision = Jurisdiction::new(&ring.jurisdiction)
            .map_err(|e| e.to_string())
            .and_then(
                |jurisdiction| match snapshot.decide_key(action, &facts, &jurisdiction) {
                    Err(crate::policy::Error::NotAnEmployee(_)) => {
                        Ok(crate::policy::FieldDecision::refused())
                    }
                    decided => decided.map_err(|e| e.to_string()),
                },
            );
        report.decisions += 1;
        let recorded_allowed = ring.decision == "allow";
        let mut recorded_policies = ring.policies.clone();
        recorded_policies.sort_unstable();
        match decision {
            Ok(decision)
                if decision.allowed == recorded_allowed
                    && decision.policies == recorded_policies => {}
            Ok(decision) => report.mismatches.push(mismatch(
                &resource,
                describe(recorded_allowed, &recorded_policies),
                describe(decision.allowed, &decision.policies),
            )),
            Err(problem) => report.mismatches.push(mismatch(
                &resource,
                describe(recorded_allowed, &recorded_policies),
                format!("cannot replay: {problem}"),
            )),
        }
    }
}

/// Who asked, as the entry recorded it: principal, calling service, purpose and ticket.
fn caller_of(entry: &Entry) -> Result<(Principal, String, StatedPurpose), String> {
    let principal = Principal::from_str(entry.principal.as_deref().unwrap_or_default())?;
    let service = entry.service.clone().ok_or("no calling service recorded")?;
    let stated = StatedPurpose::new(&entry.purpose, &entry.ticket).map_err(|e| e.to_string())?;
    Ok((principal, service, stated))
}
