//! What the gatekeeper is asked and what it answers: records, requests, per-field
//! outcomes and receipts. Plain data; plaintext is zeroized on drop and never printed.

use zeroize::Zeroizing;

use crate::audit::RecordEntry;
use crate::policy::Action;
use crate::record::{
    FieldName, Jurisdiction, KeyVersion, RecordId, RecordType, StatedPurpose, SubjectId,
};

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

impl RecordRef {
    /// The record as decision log entries name it.
    pub fn entry(&self) -> RecordEntry {
        super::context::record_entry(&self.record_type, Some(&self.record_id), &self.jurisdiction)
    }
}

/// A record to encrypt. Field values are zeroized when dropped and never printed.
pub struct PlainRecord {
    /// The record.
    pub record: RecordRef,
    /// The data subject; `None` means the record id.
    pub subject: Option<SubjectId>,
    /// Field names and plaintext values.
    pub fields: Vec<(FieldName, Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for PlainRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainRecord")
            .field("record", &self.record)
            .field("subject", &self.subject)
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

/// An encrypted record: one envelope per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// The record.
    pub record: RecordRef,
    /// The data subject the caller names, if any (format-2 envelopes name their own).
    pub subject: Option<SubjectId>,
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
    /// The envelope's key version is retired (until `unretire`).
    RetiredKeyVersion(KeyVersion),
    /// The envelope's key version was destroyed: the field is lost for good.
    DestroyedKeyVersion(KeyVersion),
    /// The record's data subject was shredded: the field is lost for good.
    Shredded,
    /// The envelope names a data subject whose secret this server does not hold (a
    /// subject store restored from an older backup, or a forged envelope).
    UnknownSubject,
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

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Plaintext(bytes) => write!(f, "Plaintext(<{} bytes redacted>)", bytes.len()),
            Outcome::Denied(denial) => f.debug_tuple("Denied").field(denial).finish(),
            Outcome::Failed(failure) => f.debug_tuple("Failed").field(failure).finish(),
        }
    }
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

impl Receipt {
    /// The receipt of the request `request_id`, whose answer carries
    /// `plaintext_fields` in plaintext.
    pub fn new(
        action: Action,
        request_id: &str,
        record: &RecordEntry,
        policy_set: &str,
        plaintext_fields: Vec<String>,
    ) -> Self {
        Self {
            action,
            request_id: request_id.to_owned(),
            record: record.clone(),
            policy_set: policy_set.to_owned(),
            plaintext_fields,
        }
    }
}

impl Decrypted {
    /// The receipt of this answer, taken before its plaintext moves to the transport.
    pub fn receipt(&self) -> Receipt {
        let plaintext = self
            .fields
            .iter()
            .filter(|(_, outcome)| matches!(outcome, Outcome::Plaintext(_)))
            .map(|(name, _)| name.as_str().to_owned())
            .collect();
        Receipt::new(
            Action::Decrypt,
            &self.request_id,
            &self.logged,
            &self.policy_set,
            plaintext,
        )
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
        let record = self.record.record.entry();
        Receipt::new(
            Action::Encrypt,
            &self.request_id,
            &record,
            &self.policy_set,
            Vec::new(),
        )
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
        Receipt::new(
            Action::Decrypt,
            &self.request_id,
            &self.logged,
            &self.policy_set,
            Vec::new(),
        )
    }
}

/// A request to re-encrypt a record under the current key version and format.
#[derive(Debug, Clone)]
pub struct RewrapRequest {
    /// The encrypted record.
    pub record: SealedRecord,
    /// Purpose and ticket.
    pub stated: StatedPurpose,
}

/// What happened to one field of a rewrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewrapOutcome {
    /// Re-encrypted.
    Rewrapped {
        /// Key version before.
        from_version: KeyVersion,
        /// Key version now (the current one).
        to_version: KeyVersion,
        /// Envelope format before.
        from_format: u8,
    },
    /// Already current; unchanged.
    Unchanged,
    /// Not permitted; unchanged.
    Denied(Denial),
    /// Not decryptable; unchanged.
    Failed(FieldFailure),
}

/// The answer to a rewrap request: no plaintext, only envelopes.
#[derive(Debug)]
pub struct Rewrapped {
    /// Hash of the policy set that decided the request.
    pub policy_set: String,
    /// Id of the request's decision log entry.
    pub request_id: String,
    /// The record with rewrapped fields replaced, the others as sent.
    pub record: SealedRecord,
    /// One outcome per field, in record order.
    pub fields: Vec<(FieldName, RewrapOutcome)>,
    /// The record as its decision log entry names it.
    pub logged: RecordEntry,
}

impl Rewrapped {
    /// The receipt of this answer: no field leaves in plaintext.
    pub fn receipt(&self) -> Receipt {
        Receipt::new(
            Action::Rewrap,
            &self.request_id,
            &self.logged,
            &self.policy_set,
            Vec::new(),
        )
    }
}
