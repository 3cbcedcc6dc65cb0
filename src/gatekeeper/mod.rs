//! The gatekeeper: decide, log, then encrypt or decrypt. The one place where identity,
//! policy, keys and the decision log meet; transport-agnostic (no tonic, no Cedar).
//!
//! Order of work for a decrypt, which is what guarantees 1 and 2 rest on:
//! validate the request -> parse envelope headers -> decide every requested field ->
//! append the decisions to the log and wait until they are durable -> derive record keys
//! and decrypt only the permitted fields -> answer. A denied field is never decrypted,
//! and nothing is decrypted when the log append fails.

mod admin;
mod authorize;
mod context;
mod decrypt;
mod encrypt;
mod rewrap;
mod types;

use std::sync::Arc;

pub use admin::{KeyChange, KeyChanged, KeyListing, SubjectShredded};
pub use types::{
    AuthorizeRequest, Authorized, DecryptRequest, Decrypted, Denial, Encrypted, FieldFailure,
    Outcome, PlainRecord, Receipt, RecordRef, RewrapOutcome, RewrapRequest, Rewrapped,
    SealedRecord,
};

use crate::audit::{self, DecisionLog, Entry, FieldEntry};
use crate::crypto;
use crate::identity::Caller;
use crate::keyadmin::{self, LiveKeyring};
use crate::keys::{self, Keyring};
use crate::policy::{self, Action, PolicySnapshot, PolicyStore, Verdict};
use crate::record::{FieldName, RecordType};
use context::{Context, Subject, new_request_id, record_entry, unix_now};

/// Size limits on requests; everything larger is refused before any work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most fields in one record.
    pub max_fields: usize,
    /// Largest plaintext of one field, in bytes.
    pub max_field_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_fields: 256,
            max_field_bytes: 1024 * 1024,
        }
    }
}

/// A request that is malformed; the message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// Errors of the gatekeeper; `service` maps each to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// Policy could not decide (unknown principal, record type, field, ...).
    #[error(transparent)]
    Policy(#[from] policy::Error),
    /// The keyring could not serve (unknown jurisdiction, ...).
    #[error(transparent)]
    Keys(#[from] keys::Error),
    /// The decision log could not record the decision; nothing was done.
    #[error(transparent)]
    Log(#[from] audit::Error),
    /// Policy denied a key administration request; nothing was changed.
    #[error("key administration denied: `{action}` on {resource}")]
    AdminDenied {
        /// The Cedar action.
        action: &'static str,
        /// The resource, e.g. `KeyRing::"US"`.
        resource: String,
        /// Determining policy ids the caller may see.
        policy_ids: Vec<String>,
    },
    /// A permitted key change that the keyring's rules refuse (retiring the current
    /// version, destroying one not retired, ...); nothing was changed.
    #[error(transparent)]
    KeyChangeRefused(keys::Error),
    /// A key change failed while being saved or logged, or its locks were busy.
    #[error(transparent)]
    KeyAdmin(#[from] keyadmin::Error),
    /// The caller's credentials expired or were revoked since the call was admitted.
    #[error(transparent)]
    Credentials(#[from] crate::identity::Error),
    /// Policy denied encrypting some fields; nothing was encrypted.
    #[error("encryption denied for field(s) {}", .fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "))]
    EncryptDenied {
        /// The denied fields.
        fields: Vec<FieldName>,
        /// Determining policy ids the caller may see.
        policy_ids: Vec<String>,
    },
    /// A cryptographic operation failed (e.g. the OS RNG).
    #[error(transparent)]
    Crypto(#[from] crypto::Error),
    /// The subject store failed, or the subject was shredded.
    #[error(transparent)]
    Subjects(#[from] crate::subjects::Error),
}

/// The data flow of the service, independent of the transport.
#[derive(Debug)]
pub struct Gatekeeper {
    keyring: LiveKeyring,
    subjects: Arc<crate::subjects::Subjects>,
    policies: Arc<PolicyStore>,
    log: DecisionLog,
    limits: Limits,
    failures: crate::failures::FailureLimiter,
}

impl Gatekeeper {
    /// Assembles a gatekeeper from its parts.
    pub fn new(
        keyring: Keyring,
        subjects: Arc<crate::subjects::Subjects>,
        policies: Arc<PolicyStore>,
        log: DecisionLog,
        limits: Limits,
    ) -> Self {
        Self {
            keyring: LiveKeyring::new(keyring),
            subjects,
            policies,
            log,
            limits,
            failures: crate::failures::FailureLimiter::default(),
        }
    }

    /// The policy store (for reloads and health).
    pub fn policies(&self) -> &Arc<PolicyStore> {
        &self.policies
    }

    /// The decision log handle.
    pub fn log(&self) -> &DecisionLog {
        &self.log
    }

    /// The keyring being served (for status and metrics).
    pub fn keyring(&self) -> &LiveKeyring {
        &self.keyring
    }

    /// The metrics of this server (the decision log's).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        self.log.metrics()
    }

    /// Whether an authentication failure of `source` is written to the decision log
    /// now (see [`crate::failures`]); if so, how many were held back since, to be
    /// passed to [`Gatekeeper::log_authentication_failure`]. Synchronous, so that a
    /// flood is refused before any work is queued for it.
    pub fn admit_authentication_failure(&self, source: &crate::failures::Source) -> Option<u64> {
        self.failures.admit(source)
    }

    /// Writes a request or connection whose caller could not be authenticated (no or
    /// a bad client certificate, a refused token, identity headers where identity is
    /// proven, a principal or service not in the directory), admitted by
    /// [`Gatekeeper::admit_authentication_failure`]. `reason` names the failed check
    /// and never holds secrets. `source` names the service (proven by its certificate
    /// or, in the development mode, claimed) and the employee, when they are known.
    pub async fn log_authentication_failure(
        &self,
        reason: &str,
        remote: Option<std::net::SocketAddr>,
        source: &crate::failures::Source,
        held_back: u64,
    ) -> Result<(), Error> {
        let mut outcome = match remote {
            Some(remote) => format!("{reason} (from {remote})"),
            None => reason.to_owned(),
        };
        if held_back > 0 {
            outcome.push_str(&format!(
                "; {held_back} more authentication failures not logged individually"
            ));
        }
        let mut entry = Entry::bare(
            crate::record::rfc3339_now(),
            unix_now(),
            new_request_id()?,
            "unauthenticated",
            outcome,
        );
        if let crate::failures::Source::Caller { service, employee } = source {
            entry.service = Some(service.clone());
            entry.principal = employee
                .as_ref()
                .map(|employee| policy::Principal::Employee(employee.clone()).to_string());
        }
        self.log.append(entry).await?;
        Ok(())
    }

    /// Decides with the current snapshot; an unknown principal or service is recorded
    /// in the log as an authentication failure before the error is returned.
    async fn decide<'s>(
        &self,
        snapshot: &'s PolicySnapshot,
        context: &Context<'_>,
        action: Action,
        subject: Subject<'_>,
        fields: &[FieldName],
    ) -> Result<Vec<Verdict<'s>>, Error> {
        let (jurisdiction, record_type) = (subject.jurisdiction, subject.record_type);
        match snapshot.decide(action, &context.facts(), jurisdiction, record_type, fields) {
            Ok(decisions) => Ok(decisions),
            Err(
                error @ (policy::Error::UnknownPrincipal(_) | policy::Error::UnknownService(_)),
            ) => {
                let record = record_entry(record_type, subject.record_id, jurisdiction);
                self.log_unknown_caller(snapshot, context, action, Some(record), &error)
                    .await?;
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Logs a request whose principal or service is not in the directory (admission
    /// checks the directory first, so this is a reload in between) as an
    /// authentication failure, within the failure limiter's budget.
    async fn log_unknown_caller(
        &self,
        snapshot: &PolicySnapshot,
        context: &Context<'_>,
        action: Action,
        record: Option<audit::RecordEntry>,
        error: &policy::Error,
    ) -> Result<(), Error> {
        let source = crate::failures::Source::Caller {
            service: context.caller.service.clone(),
            employee: context.caller.employee.clone(),
        };
        self.metrics().authentication_failed("unknown_principal");
        let Some(held_back) = self.failures.admit(&source) else {
            return Ok(());
        };
        let mut entry = context.entry(
            "unauthenticated",
            Some(action),
            record,
            Some(snapshot.hash()),
        );
        entry.outcome = error.to_string();
        if held_back > 0 {
            entry.outcome.push_str(&format!(
                "; {held_back} more authentication failures not logged individually"
            ));
        }
        self.log.append(entry).await?;
        Ok(())
    }

    /// Records that an answer whose decisions are in the log never reached the caller
    /// (stream closed, call cancelled, answer over the size limit): an `undelivered`
    /// entry with the same request id, naming the fields that would have been read.
    pub async fn record_undelivered(
        &self,
        caller: &Caller,
        receipt: &Receipt,
        reason: &str,
    ) -> Result<(), Error> {
        let time = crate::record::rfc3339_now();
        let mut entry = Entry::bare(
            time,
            unix_now(),
            receipt.request_id.clone(),
            "undelivered",
            format!("undelivered: {reason}"),
        );
        entry.service = Some(caller.service.clone());
        entry.principal = Some(caller.principal().to_string());
        entry.authentication = caller.method.to_owned();
        entry.action = Some(receipt.action.as_str().to_owned());
        entry.record = Some(receipt.record.clone());
        entry.policy_set = Some(receipt.policy_set.clone());
        let snapshot = self.policies.current();
        let record_type = RecordType::new(&receipt.record.record_type).ok();
        entry.fields = receipt
            .plaintext_fields
            .iter()
            .map(|field| follow_up_field(&snapshot, record_type.as_ref(), field, "undelivered"))
            .collect();
        self.log.append(entry).await?;
        Ok(())
    }
}

/// A field of a follow-up entry (`integrity_failure`, `undelivered`): a field the
/// request's decision allowed, with its catalog classification.
fn follow_up_field(
    snapshot: &PolicySnapshot,
    record_type: Option<&RecordType>,
    field: &str,
    outcome: &str,
) -> FieldEntry {
    let classification = record_type
        .zip(FieldName::new(field).ok())
        .and_then(|(record_type, name)| snapshot.catalog().classification(record_type, &name))
        .unwrap_or_default();
    FieldEntry {
        field: field.to_owned(),
        classification: classification.to_owned(),
        decision: "allow".to_owned(),
        policies: Vec::new(),
        errors: Vec::new(),
        key_version: None,
        outcome: outcome.to_owned(),
    }
}
