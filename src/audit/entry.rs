//! The line format of the decision log: entries and how each is chained to the one
//! before (`docs/decision-log.md`). Pure data and hashing; may not touch files.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::*;

/// What one log entry records of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    /// Record type.
    pub record_type: String,
    /// Record id (never a field value).
    pub record_id: String,
    /// Jurisdiction.
    pub jurisdiction: String,
    /// The data subject, when known (format-2 envelopes and encryptions name it;
    /// absent in entries written before, and for format-1 records not named one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The decision and outcome for one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldEntry {
    /// Field name.
    pub field: String,
    /// Classification from the field catalog.
    pub classification: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Determining policy ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Policy evaluation errors (any error denies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Key version named by the field's envelope, or used to encrypt it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// What happened: `decrypt`, `encrypt`, `denied`, `integrity_failure`, ...
    pub outcome: String,
}

/// A change to the keyring (`kind: "key_event"`); never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEventEntry {
    /// `init`, `rotate`, `retire`, `unretire`, `destroy`, `reseal`, `migrate`,
    /// `unlogged`.
    pub operation: String,
    /// The jurisdiction changed.
    pub jurisdiction: String,
    /// The key version created, changed or carried over (for `reseal`: the current).
    pub version: u32,
    /// Its key id.
    pub key_id: String,
    /// The jurisdiction's keyring generation after the change.
    pub generation: u64,
}

/// A key administration request (`kind: "key_admin"`): what was asked and each key
/// ring's decision. The changes it made follow as `key_event` entries with the same
/// request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAdminEntry {
    /// `rotate`, `retire`, `unretire`, `destroy` or `list`.
    pub operation: String,
    /// `retire`, `destroy`: versions below this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<u32>,
    /// `unretire`: this version and the ones after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// The decision for each key ring concerned, e.g. `KeyRing::"US"` (for `shred`,
    /// each jurisdiction's `DataSubjects`).
    pub key_rings: Vec<KeyRingDecision>,
    /// `shred`: the data subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The decision on one jurisdiction's key ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRingDecision {
    /// The jurisdiction.
    pub jurisdiction: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Determining policy ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Policy evaluation errors (any error denies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Entries the writer found unsigned for longer than the verifier's slack and would
/// not vouch for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsignedTailEntry {
    /// First entry after the last checkpoint.
    pub from_seq: u64,
    /// Last entry of the log when the writer started.
    pub to_seq: u64,
    /// When the first of them was written.
    pub first_time: String,
}

/// One request's entry, before the writer chains it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339 time the service decided.
    pub time: String,
    /// Unix seconds the policies saw as `context.request_time`.
    pub request_time: i64,
    /// Unique id of the request, returned to the caller.
    pub request_id: String,
    /// `encrypt`, `decrypt`, `authorize`, `integrity_failure` or `unauthenticated`.
    pub kind: String,
    /// Calling service, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Cedar principal, e.g. `Employee::"alice"`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// How the caller was authenticated.
    pub authentication: String,
    /// Cedar action, when a decision was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Stated purpose.
    pub purpose: String,
    /// Stated ticket.
    pub ticket: String,
    /// The record concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordEntry>,
    /// SHA-256 of the policy set that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_set: Option<String>,
    /// Per-field decisions and outcomes. Written as `field_groups` (format 3: fields
    /// grouped by outcome and determining policies, see [`expand_fields`]); read from
    /// `field_groups` or from the per-field `fields` list of formats 1 and 2.
    ///
    /// [`expand_fields`]: super::expand_fields
    #[serde(
        rename = "field_groups",
        alias = "fields",
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "super::groups::serialize",
        deserialize_with = "super::groups::deserialize"
    )]
    pub fields: Vec<FieldEntry>,
    /// Request-level outcome: `decided`, `encrypted`, `denied`, `integrity_failure`, or the
    /// error text of a `rejected` or `unauthenticated` entry.
    pub outcome: String,
    /// For `kind: "checkpoint"`: the signature over the chain head before this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// For `kind: "key_event"`: what changed in the keyring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_event: Option<KeyEventEntry>,
    /// For `kind: "key_admin"`: the key administration request and its decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_admin: Option<KeyAdminEntry>,
    /// For `kind: "unsigned_tail"`: the inherited entries no checkpoint vouched for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsigned_tail: Option<UnsignedTailEntry>,
}

impl Entry {
    /// An entry about no record and no decision: only when, what and the outcome.
    pub fn bare(
        time: String,
        request_time: i64,
        request_id: String,
        kind: &str,
        outcome: String,
    ) -> Self {
        Self {
            time,
            request_time,
            request_id,
            kind: kind.to_owned(),
            service: None,
            principal: None,
            authentication: String::new(),
            action: None,
            purpose: String::new(),
            ticket: String::new(),
            record: None,
            policy_set: None,
            fields: Vec::new(),
            outcome,
            checkpoint: None,
            key_event: None,
            unsigned_tail: None,
            key_admin: None,
        }
    }

    /// A checkpoint entry carrying `checkpoint`.
    pub fn checkpoint(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint: Some(checkpoint.clone()),
            ..Self::bare(
                checkpoint.signed_at,
                0,
                String::new(),
                CHECKPOINT_KIND,
                "signed".to_owned(),
            )
        }
    }
}

#[derive(Serialize)]
pub(super) struct Chained<'a> {
    pub(super) seq: u64,
    pub(super) format: u32,
    pub(super) prev_hash: &'a str,
    #[serde(flatten)]
    pub(super) entry: &'a Entry,
}

/// Formats one chained line (without its newline) and returns it with its hash.
/// The hash is SHA-256 over the line with its trailing `,"hash":"..."` member removed.
pub fn chain_line(seq: u64, prev_hash: &str, entry: &Entry) -> Result<(String, String), Error> {
    let mut body = serde_json::to_string(&Chained {
        seq,
        format: ENTRY_FORMAT,
        prev_hash,
        entry,
    })
    .map_err(|error| Error::Unavailable(format!("cannot encode entry: {error}")))?;
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    body.pop(); // the closing brace
    body.push_str(",\"hash\":\"");
    body.push_str(&hash);
    body.push_str("\"}");
    Ok((body, hash))
}

/// Splits a line into (hashed body, claimed hash), reversing [`chain_line`].
pub fn split_line(line: &str) -> Option<(String, &str)> {
    let split = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (head, suffix) = (line.get(..split)?, line.get(split..)?);
    let hash = suffix.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{head}}}"), hash))
}

/// Fields every chained line carries.
#[derive(Debug, Deserialize)]
pub struct ChainFields {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Entry format version (absent: 1; present, it must be a number).
    #[serde(default, deserialize_with = "format_number")]
    pub format: Option<u32>,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// When.
    #[serde(default)]
    pub time: String,
    /// Entry kind.
    #[serde(default)]
    pub kind: String,
    /// The signature of a checkpoint entry.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// The fields listed one by one (formats 1 and 2), read strictly: each object has
    /// exactly the members those formats wrote.
    #[serde(default, deserialize_with = "super::groups::strict_fields")]
    pub fields: Option<usize>,
    /// The field groups (format 3), read strictly (see `docs/decision-log.md`).
    #[serde(default, deserialize_with = "super::groups::strict_groups")]
    pub field_groups: Option<usize>,
}

/// `format`, when present, is a number: `null` or text is refused, not read as absent.
fn format_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    u32::deserialize(deserializer).map(Some)
}

/// How an entry lays out its members, as `query` checks it on a parsed entry.
#[derive(Debug, Deserialize)]
pub struct Layout {
    #[serde(default, deserialize_with = "format_number")]
    format: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    fields: Option<()>,
    #[serde(default, deserialize_with = "present")]
    field_groups: Option<()>,
}

/// A member that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<()>, D::Error> {
    serde::de::IgnoredAny::deserialize(deserializer).map(|_| Some(()))
}

impl Layout {
    /// Why this entry's members do not fit its format, if they do not.
    pub fn problem(&self) -> Option<String> {
        format_problem(
            self.format,
            self.fields.is_some(),
            self.field_groups.is_some(),
        )
    }
}

impl ChainFields {
    /// Why this entry's members do not fit its format, if they do not (see
    /// [`format_problem`]).
    pub fn format_problem(&self) -> Option<String> {
        format_problem(
            self.format,
            self.fields.is_some(),
            self.field_groups.is_some(),
        )
    }
}

/// Why an entry's members do not fit its `format`, if they do not: formats 1 (no
/// `format` member) and 2 list fields one by one (`fields`), format 3 groups them
/// (`field_groups`); a format this version does not know is named, not guessed at.
pub fn format_problem(format: Option<u32>, fields: bool, field_groups: bool) -> Option<String> {
    let number = format.unwrap_or(1);
    if format == Some(1) {
        return Some(
            "a format-1 entry carries no `format` member: `\"format\":1` is not written by any version"
                .to_owned(),
        );
    }
    if !(1..=ENTRY_FORMAT).contains(&number) {
        return Some(format!(
            "entry format {number} is unknown to this version (it reads formats 1 to {ENTRY_FORMAT})"
        ));
    }
    match (number >= 3, fields, field_groups) {
        (true, true, _) => Some(format!(
            "a format-{number} entry lists `fields` one by one, which format 3 groups as `field_groups`"
        )),
        (false, _, true) => Some(format!(
            "a format-{number} entry has `field_groups`, which only format 3 writes"
        )),
        _ => None,
    }
}
