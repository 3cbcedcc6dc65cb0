//! What every request of the gatekeeper shares: its context (caller, request id and
//! time) and the log entry pieces built from decisions. May not decide or decrypt.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::TryRng as _;

use super::types::Denial;
use super::{Error, InvalidRequest, Limits};
use crate::audit::{Entry, FieldEntry, RecordEntry};
use crate::crypto;
use crate::identity::Caller;
use crate::policy::{self, Action, FieldDecision, RequestFacts};
use crate::record::{FieldName, Jurisdiction, RecordId, RecordType, StatedPurpose};

/// What is common to all entries of one request.
pub(super) struct Context<'a> {
    pub(super) caller: &'a Caller,
    pub(super) principal: policy::Principal,
    pub(super) stated: &'a StatedPurpose,
    pub(super) request_id: String,
    pub(super) request_time: i64,
}

impl<'a> Context<'a> {
    pub(super) fn new(caller: &'a Caller, stated: &'a StatedPurpose) -> Result<Self, Error> {
        Ok(Self {
            caller,
            principal: caller.principal(),
            stated,
            request_id: new_request_id()?,
            request_time: unix_now(),
        })
    }

    pub(super) fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            principal: &self.principal,
            service: &self.caller.service,
            authentication: self.caller.method,
            stated: self.stated,
            request_time: self.request_time,
        }
    }

    pub(super) fn entry(
        &self,
        kind: &str,
        action: Option<Action>,
        record: Option<RecordEntry>,
        policy_set: Option<&str>,
    ) -> Entry {
        Entry {
            time: crate::record::rfc3339_now(),
            request_time: self.request_time,
            request_id: self.request_id.clone(),
            kind: kind.to_owned(),
            service: Some(self.caller.service.clone()),
            principal: Some(self.principal.to_string()),
            authentication: self.caller.method.to_owned(),
            action: action.map(|a| a.as_str().to_owned()),
            purpose: self.stated.purpose.clone(),
            ticket: self.stated.ticket.clone(),
            record,
            policy_set: policy_set.map(str::to_owned),
            fields: Vec::new(),
            outcome: String::new(),
            checkpoint: None,
            key_event: None,
            unsigned_tail: None,
            key_admin: None,
        }
    }
}

/// The record a decision is about.
#[derive(Clone, Copy)]
pub(super) struct Subject<'a> {
    pub(super) jurisdiction: &'a Jurisdiction,
    pub(super) record_type: &'a RecordType,
    pub(super) record_id: Option<&'a RecordId>,
}

pub(super) fn record_entry(
    record_type: &RecordType,
    record_id: Option<&RecordId>,
    jurisdiction: &Jurisdiction,
) -> RecordEntry {
    RecordEntry {
        record_type: record_type.as_str().to_owned(),
        record_id: record_id
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        jurisdiction: jurisdiction.as_str().to_owned(),
        subject: None,
    }
}

/// Reasons a denied caller may read.
const REASON_FORBIDDEN: &str = "denied by policy";
const REASON_NOT_PERMITTED: &str = "no policy permits this access";
const REASON_ERROR: &str = "policy evaluation failed; denied";

pub(super) fn denial(decision: &FieldDecision) -> Denial {
    let reason = if !decision.errors.is_empty() {
        REASON_ERROR
    } else if decision.policies.is_empty() {
        REASON_NOT_PERMITTED
    } else {
        REASON_FORBIDDEN
    };
    Denial {
        policy_ids: decision.visible_policies.clone(),
        reason,
    }
}

pub(super) fn field_entry(
    decision: &FieldDecision,
    field: &FieldName,
    classification: &str,
    outcome: &str,
) -> FieldEntry {
    FieldEntry {
        field: field.as_str().to_owned(),
        classification: classification.to_owned(),
        decision: if decision.allowed { "allow" } else { "deny" }.to_owned(),
        policies: decision.policies.clone(),
        errors: decision.errors.clone(),
        key_version: None,
        outcome: outcome.to_owned(),
    }
}

/// Checks a list of field names: non-empty where required, bounded, no duplicates.
pub(super) fn check_field_names<'a>(
    names: impl IntoIterator<Item = &'a FieldName>,
    limits: &Limits,
    what: &str,
) -> Result<usize, InvalidRequest> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(InvalidRequest(format!(
                "field `{name}` appears more than once in {what}"
            )));
        }
        if seen.len() > limits.max_fields {
            return Err(InvalidRequest(format!(
                "{what} has more than {} fields",
                limits.max_fields
            )));
        }
    }
    Ok(seen.len())
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn new_request_id() -> Result<String, crypto::Error> {
    let mut id = [0u8; 16];
    // The OS RNG, fallibly: `rand::rng()` would panic if seeding failed.
    rand::rngs::SysRng
        .try_fill_bytes(&mut id)
        .map_err(|_| crypto::Error::Random)?;
    let id = hex::encode(id);
    // The request's span (when tracing records one) carries the decision log's id.
    tracing::Span::current().record("request_id", id.as_str());
    Ok(id)
}
