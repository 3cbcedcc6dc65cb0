//! The gatekeeper: decide, log, then encrypt or decrypt. The one place where identity,
//! policy, keys and the decision log meet; transport-agnostic (no tonic, no Cedar).
//!
//! Order of work for a decrypt, which is what guarantees 1 and 2 rest on:
//! validate the request -> parse envelope headers -> decide every requested field ->
//! append the decisions to the log and wait until they are durable -> derive record keys
//! and decrypt only the permitted fields -> answer. A denied field is never decrypted,
//! and nothing is decrypted when the log append fails.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::TryRng as _;
use zeroize::Zeroizing;

use crate::audit::{self, DecisionLog, Entry, FieldEntry, RecordEntry};
use crate::crypto::{self, Envelope, RecordScope};
use crate::identity::Caller;
use crate::keys::{self, Keyring};
use crate::policy::{
    self, Action, FieldDecision, PolicySnapshot, PolicyStore, RequestFacts, Verdict,
};
use crate::record::{FieldName, Jurisdiction, KeyVersion, RecordId, RecordType, StatedPurpose};

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

/// Which record a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef {
    /// Record type from the field catalog.
    pub record_type: RecordType,
    /// The caller's record id.
    pub record_id: RecordId,
    /// The record's jurisdiction.
    pub jurisdiction: Jurisdiction,
}

/// A record to encrypt. Field values are zeroized when dropped and never printed.
pub struct PlainRecord {
    /// The record.
    pub record: RecordRef,
    /// Field names and plaintext values.
    pub fields: Vec<(FieldName, Zeroizing<Vec<u8>>)>,
}

/// An encrypted record: one envelope per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// The record.
    pub record: RecordRef,
    /// Field names and envelopes.
    pub fields: Vec<(FieldName, Vec<u8>)>,
}

/// A request to decrypt fields of a record.
#[derive(Debug, Clone)]
pub struct DecryptRequest {
    /// The encrypted record.
    pub record: SealedRecord,
    /// Fields wanted, in answer order; empty means all fields of the record.
    pub wanted: Vec<FieldName>,
    /// Purpose and ticket.
    pub stated: StatedPurpose,
}

/// A request to learn, per field, whether decryption would be permitted.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    /// Record type.
    pub record_type: RecordType,
    /// Record id, if the caller names one (recorded only).
    pub record_id: Option<RecordId>,
    /// Jurisdiction.
    pub jurisdiction: Jurisdiction,
    /// Fields asked about; empty means every catalog field of the record type.
    pub fields: Vec<FieldName>,
    /// Purpose and ticket.
    pub stated: StatedPurpose,
}

/// Why a field was denied, as far as the caller may know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Determining policy ids the caller may see.
    pub policy_ids: Vec<String>,
    /// A generic reason.
    pub reason: &'static str,
}

/// A per-field failure that is not a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldFailure {
    /// The ciphertext failed authentication. Deliberately says nothing more.
    Integrity,
    /// The envelope names a key version this server does not hold.
    UnknownKeyVersion,
}

/// What happened to one requested field. Debug output never shows plaintext.
pub enum Outcome {
    /// Permitted and decrypted.
    Plaintext(Zeroizing<Vec<u8>>),
    /// Not permitted; not decrypted.
    Denied(Denial),
    /// Permitted but not decryptable.
    Failed(FieldFailure),
}

/// The answer to a decrypt request.
#[derive(Debug)]
pub struct Decrypted {
    /// The record as its decision log entry names it.
    pub logged: RecordEntry,
    /// Hash of the policy set that decided the request.
    pub policy_set: String,
    /// The record's id, echoed back.
    pub record_id: RecordId,
    /// Id of the request's decision log entry.
    pub request_id: String,
    /// One outcome per requested field, in request order.
    pub fields: Vec<(FieldName, Outcome)>,
}

/// What the decision log needs to say that an answer was never delivered: no
/// plaintext, only which request and which fields it would have carried.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The action the request's entry decided.
    pub action: Action,
    /// The request's id (its `decrypt` entry's).
    pub request_id: String,
    /// The record.
    pub record: RecordEntry,
    /// The policy set that decided.
    pub policy_set: String,
    /// Fields the answer carried in plaintext.
    pub plaintext_fields: Vec<String>,
}

impl Decrypted {
    /// The receipt of this answer, taken before its plaintext moves to the transport.
    pub fn receipt(&self) -> Receipt {
        Receipt {
            action: Action::Decrypt,
            request_id: self.request_id.clone(),
            record: self.logged.clone(),
            policy_set: self.policy_set.clone(),
            plaintext_fields: self
                .fields
                .iter()
                .filter(|(_, outcome)| matches!(outcome, Outcome::Plaintext(_)))
                .map(|(name, _)| name.as_str().to_owned())
                .collect(),
        }
    }
}

/// The answer to an encrypt request.
#[derive(Debug)]
pub struct Encrypted {
    /// Hash of the policy set that decided the request.
    pub policy_set: String,
    /// Id of the request's decision log entry.
    pub request_id: String,
    /// The encrypted record.
    pub record: SealedRecord,
}

impl Encrypted {
    /// The receipt of this answer: no field was read, the ciphertexts were made.
    pub fn receipt(&self) -> Receipt {
        Receipt {
            action: Action::Encrypt,
            request_id: self.request_id.clone(),
            record: record_entry(
                &self.record.record.record_type,
                Some(&self.record.record.record_id),
                &self.record.record.jurisdiction,
            ),
            policy_set: self.policy_set.clone(),
            plaintext_fields: Vec::new(),
        }
    }
}

/// The answer to an authorize request.
#[derive(Debug)]
pub struct Authorized {
    /// Hash of the policy set that decided the request.
    pub policy_set: String,
    /// Id of the request's decision log entry.
    pub request_id: String,
    /// Per field: `None` when allowed, the denial otherwise.
    pub fields: Vec<(FieldName, Option<Denial>)>,
    /// The record as the decision log names it.
    pub logged: RecordEntry,
}

impl Authorized {
    /// The receipt of this answer: decisions only, no field was read.
    pub fn receipt(&self) -> Receipt {
        Receipt {
            action: Action::Decrypt,
            request_id: self.request_id.clone(),
            record: self.logged.clone(),
            policy_set: self.policy_set.clone(),
            plaintext_fields: Vec::new(),
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
}

impl std::fmt::Debug for PlainRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainRecord")
            .field("record", &self.record)
            .field(
                "fields",
                &self
                    .fields
                    .iter()
                    .map(|(name, value)| format!("{name}: <{} bytes redacted>", value.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Plaintext(bytes) => write!(f, "Plaintext(<{} bytes redacted>)", bytes.len()),
            Outcome::Denied(denial) => f.debug_tuple("Denied").field(denial).finish(),
            Outcome::Failed(failure) => f.debug_tuple("Failed").field(failure).finish(),
        }
    }
}

/// Reasons a denied caller may read.
const REASON_FORBIDDEN: &str = "denied by policy";
const REASON_NOT_PERMITTED: &str = "no policy permits this access";
const REASON_ERROR: &str = "policy evaluation failed; denied";

fn denial(decision: &FieldDecision) -> Denial {
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

fn field_entry(
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
fn check_field_names<'a>(
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

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn new_request_id() -> Result<String, crypto::Error> {
    let mut id = [0u8; 16];
    // The OS RNG, fallibly: `rand::rng()` would panic if seeding failed.
    rand::rngs::SysRng
        .try_fill_bytes(&mut id)
        .map_err(|_| crypto::Error::Random)?;
    Ok(hex::encode(id))
}

/// The data flow of the service, independent of the transport.
#[derive(Debug)]
pub struct Gatekeeper {
    keyring: Keyring,
    policies: Arc<PolicyStore>,
    log: DecisionLog,
    limits: Limits,
    failures: crate::failures::FailureLimiter,
}

/// What is common to all entries of one request.
struct Context<'a> {
    caller: &'a Caller,
    principal: policy::Principal,
    stated: &'a StatedPurpose,
    request_id: String,
    request_time: i64,
}

impl<'a> Context<'a> {
    fn new(caller: &'a Caller, stated: &'a StatedPurpose) -> Result<Self, Error> {
        Ok(Self {
            caller,
            principal: caller.principal(),
            stated,
            request_id: new_request_id()?,
            request_time: unix_now(),
        })
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            principal: &self.principal,
            service: &self.caller.service,
            authentication: self.caller.method,
            stated: self.stated,
            request_time: self.request_time,
        }
    }

    fn entry(
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
        }
    }
}

/// The record a decision is about.
#[derive(Clone, Copy)]
struct Subject<'a> {
    jurisdiction: &'a Jurisdiction,
    record_type: &'a RecordType,
    record_id: Option<&'a RecordId>,
}

fn record_entry(
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
    }
}

impl Gatekeeper {
    /// Assembles a gatekeeper from its parts.
    pub fn new(
        keyring: Keyring,
        policies: Arc<PolicyStore>,
        log: DecisionLog,
        limits: Limits,
    ) -> Self {
        Self {
            keyring,
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
                // Admission checks the directory first; this is a reload in between.
                let source = crate::failures::Source::Caller {
                    service: context.caller.service.clone(),
                    employee: context.caller.employee.clone(),
                };
                let Some(held_back) = self.failures.admit(&source) else {
                    return Err(error.into());
                };
                let record = record_entry(record_type, subject.record_id, jurisdiction);
                let mut entry = context.entry(
                    "unauthenticated",
                    Some(action),
                    Some(record),
                    Some(snapshot.hash()),
                );
                entry.outcome = error.to_string();
                if held_back > 0 {
                    entry.outcome.push_str(&format!(
                        "; {held_back} more authentication failures not logged individually"
                    ));
                }
                self.log.append(entry).await?;
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Encrypts every field of a record, if policy permits `encrypt` on all of them.
    pub async fn encrypt_record(
        &self,
        caller: &Caller,
        request: PlainRecord,
    ) -> Result<Encrypted, Error> {
        let record = &request.record;
        if request.fields.is_empty() {
            return Err(InvalidRequest("record has no fields".to_owned()).into());
        }
        check_field_names(
            request.fields.iter().map(|(name, _)| name),
            &self.limits,
            "the record",
        )?;
        for (name, value) in &request.fields {
            if value.len() > self.limits.max_field_bytes {
                return Err(InvalidRequest(format!(
                    "field `{name}` is {} bytes; the limit is {} bytes",
                    value.len(),
                    self.limits.max_field_bytes
                ))
                .into());
            }
        }
        let key_version = self.keyring.current_for_encryption(&record.jurisdiction)?;
        let stated = StatedPurpose::default();
        let context = Context::new(caller, &stated)?;
        let snapshot = self.policies.current();
        let names: Vec<FieldName> = request
            .fields
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        let record_log = record_entry(
            &record.record_type,
            Some(&record.record_id),
            &record.jurisdiction,
        );
        let decisions = self
            .decide(
                &snapshot,
                &context,
                Action::Encrypt,
                Subject {
                    jurisdiction: &record.jurisdiction,
                    record_type: &record.record_type,
                    record_id: Some(&record.record_id),
                },
                &names,
            )
            .await?;

        let mut entry = context.entry(
            "encrypt",
            Some(Action::Encrypt),
            Some(record_log),
            Some(snapshot.hash()),
        );
        let mut denied = Vec::new();
        let mut visible = Vec::new();
        for (name, decision) in names.iter().zip(&decisions) {
            let classification = decision.classification;
            let outcome = if decision.allowed {
                "encrypt"
            } else {
                "denied"
            };
            let mut field = field_entry(decision, name, classification, outcome);
            if decision.allowed {
                field.key_version = Some(key_version.get());
            } else {
                denied.push(name.clone());
                visible.extend(decision.visible_policies.iter().cloned());
            }
            entry.fields.push(field);
        }
        entry.outcome = if denied.is_empty() {
            "encrypted"
        } else {
            "denied"
        }
        .to_owned();
        self.log.append(entry).await?;
        if !denied.is_empty() {
            visible.sort_unstable();
            visible.dedup();
            return Err(Error::EncryptDenied {
                fields: denied,
                policy_ids: visible,
            });
        }

        let scope = RecordScope {
            jurisdiction: &record.jurisdiction,
            key_version,
            record_type: &record.record_type,
            record_id: &record.record_id,
        };
        let key = self
            .keyring
            .derivation_key(&record.jurisdiction, key_version)?
            .record_key(&scope)?;
        let nonces = crypto::fresh_nonces(request.fields.len())?;
        let mut sealed = Vec::with_capacity(request.fields.len());
        for ((name, value), nonce) in request.fields.iter().zip(&nonces) {
            sealed.push((name.clone(), key.seal(&scope, name, nonce, value)?));
        }
        Ok(Encrypted {
            policy_set: snapshot.hash().to_owned(),
            request_id: context.request_id,
            record: SealedRecord {
                record: request.record.clone(),
                fields: sealed,
            },
        })
    }

    /// Decides, logs and decrypts the wanted fields of a record.
    pub async fn decrypt_record(
        &self,
        caller: &Caller,
        request: DecryptRequest,
    ) -> Result<Decrypted, Error> {
        let record = &request.record.record;
        if request.record.fields.is_empty() {
            return Err(InvalidRequest("record has no fields".to_owned()).into());
        }
        check_field_names(
            request.record.fields.iter().map(|(name, _)| name),
            &self.limits,
            "the record",
        )?;
        check_field_names(&request.wanted, &self.limits, "`fields`")?;
        let selected: Vec<(&FieldName, &[u8])> = if request.wanted.is_empty() {
            request
                .record
                .fields
                .iter()
                .map(|(name, bytes)| (name, bytes.as_slice()))
                .collect()
        } else {
            request
                .wanted
                .iter()
                .map(|wanted| {
                    request
                        .record
                        .fields
                        .iter()
                        .find(|(name, _)| name == wanted)
                        .map(|(name, bytes)| (name, bytes.as_slice()))
                        .ok_or_else(|| {
                            InvalidRequest(format!("field `{wanted}` is not in the record"))
                        })
                })
                .collect::<Result<_, _>>()?
        };
        let parsed: Result<Vec<Envelope<'_>>, _> = selected
            .iter()
            .map(|(name, bytes)| {
                Envelope::parse(bytes)
                    .map_err(|error| InvalidRequest(format!("field `{name}`: {error}")))
            })
            .collect();
        let names: Vec<FieldName> = selected.iter().map(|(name, _)| (*name).clone()).collect();

        let context = Context::new(caller, &request.stated)?;
        let snapshot = self.policies.current();
        let envelopes = match parsed {
            Ok(envelopes) => envelopes,
            Err(invalid) => {
                // A mangled envelope may be a tampering attempt: auditors see it too.
                let record_log = record_entry(
                    &record.record_type,
                    Some(&record.record_id),
                    &record.jurisdiction,
                );
                let mut entry = context.entry(
                    "rejected",
                    Some(Action::Decrypt),
                    Some(record_log),
                    Some(snapshot.hash()),
                );
                entry.outcome = invalid.to_string();
                self.log.append(entry).await?;
                return Err(invalid.into());
            }
        };
        let record_log = record_entry(
            &record.record_type,
            Some(&record.record_id),
            &record.jurisdiction,
        );
        let decisions = self
            .decide(
                &snapshot,
                &context,
                Action::Decrypt,
                Subject {
                    jurisdiction: &record.jurisdiction,
                    record_type: &record.record_type,
                    record_id: Some(&record.record_id),
                },
                &names,
            )
            .await?;

        // Decide each field's fate before anything is decrypted.
        enum Plan {
            Open(KeyVersion),
            Deny(Denial),
            Fail(FieldFailure),
        }
        let mut entry = context.entry(
            "decrypt",
            Some(Action::Decrypt),
            Some(record_log.clone()),
            Some(snapshot.hash()),
        );
        let mut plans = Vec::with_capacity(names.len());
        for ((name, decision), envelope) in names.iter().zip(&decisions).zip(&envelopes) {
            let classification = decision.classification;
            let plan = if !decision.allowed {
                Plan::Deny(denial(decision))
            } else if envelope.jurisdiction != record.jurisdiction {
                // Moved from another jurisdiction: its key and AAD could never match.
                Plan::Fail(FieldFailure::Integrity)
            } else if self
                .keyring
                .derivation_key(&record.jurisdiction, envelope.key_version)
                .is_err()
            {
                Plan::Fail(FieldFailure::UnknownKeyVersion)
            } else {
                Plan::Open(envelope.key_version)
            };
            let outcome = match &plan {
                Plan::Open(_) => "decrypt",
                Plan::Deny(_) => "denied",
                Plan::Fail(FieldFailure::Integrity) => "integrity_failure",
                Plan::Fail(FieldFailure::UnknownKeyVersion) => "unknown_key_version",
            };
            let mut field = field_entry(decision, name, classification, outcome);
            field.key_version = Some(envelope.key_version.get());
            entry.fields.push(field);
            plans.push(plan);
        }
        entry.outcome = "decided".to_owned();
        // Guarantee 2: the decisions are durable before any field is decrypted.
        self.log.append(entry).await?;
        // From here on the log says these fields were read: if the answer cannot be
        // made after all, an `undelivered` entry says they were not.
        let opened: Vec<String> = names
            .iter()
            .zip(&plans)
            .filter(|(_, plan)| matches!(plan, Plan::Open(_)))
            .map(|(name, _)| name.as_str().to_owned())
            .collect();
        let receipt = |record: RecordEntry| Receipt {
            action: Action::Decrypt,
            request_id: context.request_id.clone(),
            record,
            policy_set: snapshot.hash().to_owned(),
            plaintext_fields: opened.clone(),
        };
        let answer = async {
            let mut keys: Vec<(KeyVersion, crypto::RecordKey)> = Vec::new();
            let mut outcomes = Vec::with_capacity(names.len());
            let mut integrity_failures = Vec::new();
            for ((name, plan), envelope) in names.into_iter().zip(plans).zip(&envelopes) {
                let outcome = match plan {
                    Plan::Deny(denial) => Outcome::Denied(denial),
                    Plan::Fail(failure) => Outcome::Failed(failure),
                    Plan::Open(version) => {
                        let scope = RecordScope {
                            jurisdiction: &record.jurisdiction,
                            key_version: version,
                            record_type: &record.record_type,
                            record_id: &record.record_id,
                        };
                        let key = match keys.iter().position(|(v, _)| *v == version) {
                            Some(index) => keys.get(index).map(|(_, key)| key),
                            None => {
                                let key = self
                                    .keyring
                                    .derivation_key(&record.jurisdiction, version)?
                                    .record_key(&scope)?;
                                keys.push((version, key));
                                keys.last().map(|(_, key)| key)
                            }
                        };
                        match key.map(|key| key.open(&scope, &name, envelope)) {
                            Some(Ok(plaintext)) => Outcome::Plaintext(plaintext),
                            _ => {
                                integrity_failures.push(name.clone());
                                Outcome::Failed(FieldFailure::Integrity)
                            }
                        }
                    }
                };
                outcomes.push((name, outcome));
            }

            if !integrity_failures.is_empty() {
                // Guarantee 4: a tampered or moved ciphertext is itself logged.
                let mut follow_up = context.entry(
                    "integrity_failure",
                    Some(Action::Decrypt),
                    Some(record_log),
                    Some(snapshot.hash()),
                );
                for name in &integrity_failures {
                    let classification = snapshot
                        .catalog()
                        .classification(&record.record_type, name)
                        .unwrap_or_default();
                    follow_up.fields.push(FieldEntry {
                        field: name.as_str().to_owned(),
                        classification: classification.to_owned(),
                        decision: "allow".to_owned(),
                        policies: Vec::new(),
                        errors: Vec::new(),
                        key_version: None,
                        outcome: "integrity_failure".to_owned(),
                    });
                }
                follow_up.outcome = "integrity_failure".to_owned();
                self.log.append(follow_up).await?;
            }
            Ok::<_, Error>(outcomes)
        }
        .await;
        let logged = record_entry(
            &record.record_type,
            Some(&record.record_id),
            &record.jurisdiction,
        );
        let outcomes = match answer {
            Ok(outcomes) => outcomes,
            Err(error) => {
                let reason = format!("the answer could not be made: {error}");
                if let Err(log_error) = self
                    .record_undelivered(caller, &receipt(logged), &reason)
                    .await
                {
                    tracing::error!(%log_error, request_id = context.request_id, "undelivered answer not logged");
                }
                return Err(error);
            }
        };
        Ok(Decrypted {
            logged,
            policy_set: snapshot.hash().to_owned(),
            record_id: record.record_id.clone(),
            request_id: context.request_id,
            fields: outcomes,
        })
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
            .map(|field| FieldEntry {
                field: field.clone(),
                classification: record_type
                    .as_ref()
                    .zip(FieldName::new(field).ok())
                    .and_then(|(record_type, name)| {
                        snapshot.catalog().classification(record_type, &name)
                    })
                    .unwrap_or_default()
                    .to_owned(),
                decision: "allow".to_owned(),
                policies: Vec::new(),
                errors: Vec::new(),
                key_version: None,
                outcome: "undelivered".to_owned(),
            })
            .collect();
        self.log.append(entry).await?;
        Ok(())
    }

    /// Decides `decrypt` per field without decrypting; logged like any decision.
    pub async fn authorize(
        &self,
        caller: &Caller,
        request: AuthorizeRequest,
    ) -> Result<Authorized, Error> {
        let snapshot = self.policies.current();
        let fields: Vec<FieldName> = if request.fields.is_empty() {
            let listed = snapshot
                .catalog()
                .fields(&request.record_type)
                .map(|f| f.cloned().collect());
            match listed {
                Some(fields) => fields,
                None => return Err(policy::Error::UnknownRecordType(request.record_type).into()),
            }
        } else {
            check_field_names(&request.fields, &self.limits, "`fields`")?;
            request.fields
        };
        let context = Context::new(caller, &request.stated)?;
        let record_log = record_entry(
            &request.record_type,
            request.record_id.as_ref(),
            &request.jurisdiction,
        );
        let decisions = self
            .decide(
                &snapshot,
                &context,
                Action::Decrypt,
                Subject {
                    jurisdiction: &request.jurisdiction,
                    record_type: &request.record_type,
                    record_id: request.record_id.as_ref(),
                },
                &fields,
            )
            .await?;
        let mut entry = context.entry(
            "authorize",
            Some(Action::Decrypt),
            Some(record_log.clone()),
            Some(snapshot.hash()),
        );
        let mut answers = Vec::with_capacity(fields.len());
        for (name, decision) in fields.into_iter().zip(&decisions) {
            let classification = decision.classification;
            let outcome = if decision.allowed {
                "allowed"
            } else {
                "denied"
            };
            entry
                .fields
                .push(field_entry(decision, &name, classification, outcome));
            answers.push((name, (!decision.allowed).then(|| denial(decision))));
        }
        entry.outcome = "decided".to_owned();
        self.log.append(entry).await?;
        Ok(Authorized {
            policy_set: snapshot.hash().to_owned(),
            request_id: context.request_id,
            fields: answers,
            logged: record_log,
        })
    }
}
