//! Reading a record, for `decrypt` (plaintext to the caller) and `rewrap` (sealed again
//! under the current key version and format inside the service, [`super::rewrap`]), in the order
//! guarantees 1 and 2 rest on (see the module documentation of [`super`]): select and
//! validate -> parse envelope headers -> decide -> find the subject's secret -> plan
//! and log, durably -> open only the permitted fields -> answer. Each step is one
//! function below.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::context::{Context, Subject, check_field_names, denial, field_entry};
use super::types::{
    DecryptRequest, Decrypted, Denial, FieldFailure, Outcome, Receipt, RecordRef, SealedRecord,
};
use super::{Error, Gatekeeper, InvalidRequest, follow_up_field};
use crate::audit::RecordEntry;
use crate::crypto::{self, ENVELOPE_VERSION, Envelope, RecordScope, SubjectScope, SubjectSecret};
use crate::identity::Caller;
use crate::keys::{self, Keyring};
use crate::policy::{Action, PolicySnapshot, Verdict};
use crate::record::{FieldName, KeyVersion, StatedPurpose, SubjectId};
use crate::subjects::{self, Lookup};

/// What will happen to one field, settled before anything is decrypted.
enum Plan {
    Open(KeyVersion),
    /// Rewrap only: the field is already under the current version and format.
    Keep,
    Deny(Denial),
    Fail(FieldFailure),
}

impl Plan {
    /// The field's `outcome` in the decision log.
    fn logged_as(&self, action: Action) -> &'static str {
        match self {
            Plan::Open(_) if action == Action::Rewrap => "rewrap",
            Plan::Open(_) => "decrypt",
            Plan::Keep => "unchanged",
            Plan::Deny(_) => "denied",
            Plan::Fail(failure) => failure.logged_as(),
        }
    }
}

impl FieldFailure {
    /// The field's `outcome` in the decision log.
    fn logged_as(self) -> &'static str {
        match self {
            FieldFailure::Integrity => "integrity_failure",
            FieldFailure::UnknownKeyVersion => "unknown_key_version",
            FieldFailure::RetiredKeyVersion(_) => "retired_key_version",
            FieldFailure::DestroyedKeyVersion(_) => "destroyed_key_version",
            FieldFailure::Shredded => "shredded",
            FieldFailure::UnknownSubject => "unknown_subject",
        }
    }
}

/// A field after the log: its plaintext (zeroized on drop), kept as it was, or not read.
pub(super) enum Read {
    Plain(Zeroizing<Vec<u8>>),
    Kept,
    Denied(Denial),
    Failed(FieldFailure),
}

/// The record's data subject and where its secret stands.
pub(super) struct SubjectState {
    /// The subject, when the record names one (format-2 envelopes, or the caller).
    pub(super) id: Option<SubjectId>,
    pub(super) secret: Lookup,
}

/// A record read for `action`: its fields after the decisions were logged.
pub(super) struct ReadRecord {
    pub(super) context_request_id: String,
    pub(super) policy_set: String,
    pub(super) logged: RecordEntry,
    pub(super) keyring: Arc<Keyring>,
    pub(super) subject: SubjectState,
    pub(super) fields: Vec<(FieldName, Read)>,
    /// Per field read: format and key version of its envelope.
    pub(super) envelopes: Vec<(u8, KeyVersion)>,
}

/// Record keys of one record, derived when first needed (a record's fields may be
/// sealed under several key versions and both formats).
struct RecordKeys<'g> {
    keyring: &'g Keyring,
    subject: Option<(&'g SubjectId, &'g SubjectSecret)>,
    keys: std::collections::BTreeMap<(KeyVersion, u8), crypto::RecordKey>,
}

impl RecordKeys<'_> {
    fn get(&mut self, scope: &RecordScope<'_>, format: u8) -> Result<&crypto::RecordKey, Error> {
        use std::collections::btree_map::Entry;
        let slot = match self.keys.entry((scope.key_version, format)) {
            Entry::Occupied(known) => return Ok(known.into_mut()),
            Entry::Vacant(slot) => slot,
        };
        let root = self
            .keyring
            .derivation_key(scope.jurisdiction, scope.key_version)?;
        let key = match (format, self.subject) {
            (ENVELOPE_VERSION, Some((subject, secret))) => {
                let key_id = self
                    .keyring
                    .key_id(scope.jurisdiction, scope.key_version)
                    .ok_or_else(|| {
                        keys::Error::UnknownKeyVersion(
                            scope.jurisdiction.clone(),
                            scope.key_version,
                        )
                    })?;
                root.subject_record_key(
                    scope,
                    &SubjectScope {
                        subject,
                        secret,
                        key_id,
                    },
                )?
            }
            (ENVELOPE_VERSION, None) => {
                return Err(crypto::Error::Malformed("no subject secret").into());
            }
            _ => root.record_key(scope)?,
        };
        Ok(slot.insert(key))
    }
}

impl Gatekeeper {
    /// Decides, logs and decrypts the wanted fields of a record.
    pub async fn decrypt_record(
        &self,
        caller: &Caller,
        request: DecryptRequest,
    ) -> Result<Decrypted, Error> {
        let record = &request.record.record;
        let read = self
            .read(
                caller,
                &request.record,
                &request.wanted,
                &request.stated,
                Action::Decrypt,
            )
            .await?;
        let fields = read
            .fields
            .into_iter()
            .map(|(name, read)| {
                let outcome = match read {
                    Read::Plain(plaintext) => Outcome::Plaintext(plaintext),
                    Read::Denied(denial) => Outcome::Denied(denial),
                    Read::Failed(failure) => Outcome::Failed(failure),
                    // Never planned for a decrypt.
                    Read::Kept => Outcome::Failed(FieldFailure::Integrity),
                };
                (name, outcome)
            })
            .collect();
        Ok(Decrypted {
            logged: read.logged,
            policy_set: read.policy_set,
            record_id: record.record_id.clone(),
            request_id: read.context_request_id,
            fields,
        })
    }

    /// Reads the wanted fields of `sealed` for `action`: decides, logs durably, then
    /// opens the permitted ones.
    pub(super) async fn read(
        &self,
        caller: &Caller,
        sealed: &SealedRecord,
        wanted: &[FieldName],
        stated: &StatedPurpose,
        action: Action,
    ) -> Result<ReadRecord, Error> {
        let record = &sealed.record;
        let selected = self.select(sealed, wanted)?;
        let names: Vec<FieldName> = selected.iter().map(|(name, _)| (*name).clone()).collect();
        let context = Context::new(caller, stated)?;
        let snapshot = self.policies.current();
        let mut logged = record.entry();
        let (envelopes, subject_id) = self
            .parse_envelopes(&selected, sealed, &context, &snapshot, &logged, action)
            .await?;
        // What the log records as fact: the subject the envelopes name (bound by their
        // AAD), or for a rewrap the one the new envelopes will name. A subject the
        // caller names for format-1 fields it only reads is a claim, not recorded.
        let sealed_for = envelopes.iter().any(|e| e.format == ENVELOPE_VERSION);
        logged.subject = match action {
            Action::Rewrap => Some(
                subject_id
                    .as_ref()
                    .map_or(record.record_id.as_str(), SubjectId::as_str)
                    .to_owned(),
            ),
            _ if sealed_for => subject_id.as_ref().map(|id| id.as_str().to_owned()),
            _ => None,
        };
        let subject = Subject {
            jurisdiction: &record.jurisdiction,
            record_type: &record.record_type,
            record_id: Some(&record.record_id),
        };
        let decisions = self
            .decide(&snapshot, &context, action, subject, &names)
            .await?;
        // One keyring for the whole request: a live key change is seen whole or not at all.
        let keyring = self.keyring.load();
        // Checked before a rewrap makes any secret: the jurisdiction takes encryptions.
        let current = match action {
            Action::Rewrap => Some(keyring.current_for_encryption(&record.jurisdiction)?),
            _ => None,
        };
        let subject = self
            .subject_state(&keyring, sealed, subject_id, &decisions, &envelopes, action)
            .await?;
        let plans = plan(&keyring, record, &decisions, &envelopes, &subject, current);
        // Guarantee 2: the decisions are durable before any field is decrypted.
        let mut entry = context.entry(
            action.as_str(),
            Some(action),
            Some(logged.clone()),
            Some(snapshot.hash()),
        );
        for (((name, decision), envelope), plan) in
            names.iter().zip(&decisions).zip(&envelopes).zip(&plans)
        {
            let logged_as = plan.logged_as(action);
            let mut field = field_entry(decision, name, decision.classification, logged_as);
            field.key_version = Some(envelope.key_version.get());
            entry.fields.push(field);
        }
        entry.outcome = "decided".to_owned();
        self.log.append(entry).await?;

        // From here on the log says these fields were read: if the answer cannot be
        // made after all, an `undelivered` entry says they were not.
        let opened = names
            .iter()
            .zip(&plans)
            .filter(|(_, plan)| matches!(plan, Plan::Open(_)) && action == Action::Decrypt)
            .map(|(name, _)| name.as_str().to_owned())
            .collect();
        let receipt = Receipt::new(
            action,
            &context.request_id,
            &logged,
            snapshot.hash(),
            opened,
        );
        let formats: Vec<(u8, KeyVersion)> = envelopes
            .iter()
            .map(|envelope| (envelope.format, envelope.key_version))
            .collect();
        let answer = self
            .open(
                &keyring, record, &subject, names, plans, &envelopes, &context, &snapshot, &logged,
                action,
            )
            .await;
        let fields = match answer {
            Ok(fields) => fields,
            Err(error) => {
                let reason = format!("the answer could not be made: {error}");
                if let Err(log_error) = self.record_undelivered(caller, &receipt, &reason).await {
                    tracing::error!(%log_error, request_id = context.request_id, "undelivered answer not logged");
                }
                return Err(error);
            }
        };
        Ok(ReadRecord {
            context_request_id: context.request_id,
            policy_set: snapshot.hash().to_owned(),
            logged,
            keyring,
            subject,
            fields,
            envelopes: formats,
        })
    }

    /// The fields asked for (all when none are named), in answer order, after the
    /// field lists are checked.
    fn select<'r>(
        &self,
        sealed: &'r SealedRecord,
        wanted: &[FieldName],
    ) -> Result<Vec<(&'r FieldName, &'r [u8])>, Error> {
        let fields = &sealed.fields;
        if fields.is_empty() {
            return Err(InvalidRequest("record has no fields".to_owned()).into());
        }
        check_field_names(
            fields.iter().map(|(name, _)| name),
            &self.limits,
            "the record",
        )?;
        check_field_names(wanted, &self.limits, "`fields`")?;
        if wanted.is_empty() {
            return Ok(fields
                .iter()
                .map(|(name, bytes)| (name, bytes.as_slice()))
                .collect());
        }
        Ok(wanted
            .iter()
            .map(|wanted| {
                fields
                    .iter()
                    .find(|(name, _)| name == wanted)
                    .map(|(name, bytes)| (name, bytes.as_slice()))
                    .ok_or_else(|| InvalidRequest(format!("field `{wanted}` is not in the record")))
            })
            .collect::<Result<_, _>>()?)
    }

    /// The envelope headers of the selected fields and the record's data subject
    /// (named by its format-2 envelopes, which must agree with each other and with the
    /// subject the caller names). A mangled envelope may be a tampering attempt: it is
    /// logged as `rejected` before the request is refused.
    async fn parse_envelopes<'r>(
        &self,
        selected: &[(&FieldName, &'r [u8])],
        sealed: &SealedRecord,
        context: &Context<'_>,
        snapshot: &PolicySnapshot,
        logged: &RecordEntry,
        action: Action,
    ) -> Result<(Vec<Envelope<'r>>, Option<SubjectId>), Error> {
        let parsed = selected
            .iter()
            .map(|(name, bytes)| {
                Envelope::parse(bytes)
                    .map_err(|error| InvalidRequest(format!("field `{name}`: {error}")))
            })
            .collect::<Result<Vec<Envelope<'r>>, InvalidRequest>>()
            .and_then(|envelopes| {
                let subject = record_subject(&envelopes, selected, sealed.subject.as_ref())?;
                Ok((envelopes, subject))
            });
        match parsed {
            Ok(parsed) => Ok(parsed),
            Err(invalid) => {
                let mut entry = context.entry(
                    "rejected",
                    Some(action),
                    Some(logged.clone()),
                    Some(snapshot.hash()),
                );
                entry.outcome = invalid.to_string();
                self.log.append(entry).await?;
                Err(invalid.into())
            }
        }
    }

    /// Where the subject's secret stands, looked up only when a permitted field
    /// needs it: to open a format-2 field, or (rewrap) to seal any field anew. A
    /// rewrap makes the secret of a subject that has none yet only for a record of
    /// format-1 fields alone: a format-2 record whose subject has no secret here (a
    /// store restored from an older backup) must not get a new one, which would make
    /// the lost secret impossible to restore.
    async fn subject_state(
        &self,
        keyring: &Keyring,
        sealed: &SealedRecord,
        named: Option<SubjectId>,
        decisions: &[Verdict<'_>],
        envelopes: &[Envelope<'_>],
        action: Action,
    ) -> Result<SubjectState, Error> {
        let record = &sealed.record;
        let needed = decisions.iter().zip(envelopes).any(|(decision, envelope)| {
            decision.allowed && (action == Action::Rewrap || envelope.format == ENVELOPE_VERSION)
        });
        let id = match action {
            // Format-1 fields are rewrapped for the record's default subject.
            Action::Rewrap => Some(named.unwrap_or_else(|| SubjectId::from(&record.record_id))),
            _ => named,
        };
        let format_2 = envelopes.iter().any(|e| e.format == ENVELOPE_VERSION);
        let secret = match (&id, needed) {
            (Some(id), true) if action == Action::Rewrap && !format_2 => {
                match self
                    .subjects
                    .for_encryption(keyring, &record.jurisdiction, id)
                    .await
                {
                    Ok(secret) => Lookup::Live(secret),
                    Err(subjects::Error::Shredded { at, .. }) => Lookup::Shredded(at),
                    Err(error) => return Err(error.into()),
                }
            }
            (Some(id), true) => {
                self.subjects
                    .lookup(keyring, &record.jurisdiction, id)
                    .await?
            }
            _ => Lookup::Unknown,
        };
        Ok(SubjectState { id, secret })
    }

    /// Opens the fields planned to be opened. A field that fails authentication is an
    /// integrity failure, itself logged (guarantee 4) before the answer goes out.
    #[allow(clippy::too_many_arguments)]
    async fn open(
        &self,
        keyring: &Keyring,
        record: &RecordRef,
        subject: &SubjectState,
        names: Vec<FieldName>,
        plans: Vec<Plan>,
        envelopes: &[Envelope<'_>],
        context: &Context<'_>,
        snapshot: &PolicySnapshot,
        logged: &RecordEntry,
        action: Action,
    ) -> Result<Vec<(FieldName, Read)>, Error> {
        let mut keys = RecordKeys {
            keyring,
            subject: match (&subject.id, &subject.secret) {
                (Some(id), Lookup::Live(secret)) => Some((id, secret.as_ref())),
                _ => None,
            },
            keys: std::collections::BTreeMap::new(),
        };
        let mut outcomes = Vec::with_capacity(names.len());
        let mut integrity_failures = Vec::new();
        for ((name, plan), envelope) in names.into_iter().zip(plans).zip(envelopes) {
            let outcome = match plan {
                Plan::Deny(denial) => Read::Denied(denial),
                Plan::Fail(failure) => Read::Failed(failure),
                Plan::Keep => Read::Kept,
                Plan::Open(key_version) => {
                    let scope = RecordScope {
                        jurisdiction: &record.jurisdiction,
                        key_version,
                        record_type: &record.record_type,
                        record_id: &record.record_id,
                    };
                    match keys
                        .get(&scope, envelope.format)?
                        .open(&scope, &name, envelope)
                    {
                        Ok(plaintext) => Read::Plain(plaintext),
                        Err(_) => {
                            integrity_failures.push(name.clone());
                            Read::Failed(FieldFailure::Integrity)
                        }
                    }
                }
            };
            outcomes.push((name, outcome));
        }
        if !integrity_failures.is_empty() {
            let mut follow_up = context.entry(
                "integrity_failure",
                Some(action),
                Some(logged.clone()),
                Some(snapshot.hash()),
            );
            follow_up.fields = integrity_failures
                .iter()
                .map(|name| {
                    follow_up_field(
                        snapshot,
                        Some(&record.record_type),
                        name.as_str(),
                        "integrity_failure",
                    )
                })
                .collect();
            follow_up.outcome = "integrity_failure".to_owned();
            self.log.append(follow_up).await?;
        }
        Ok(outcomes)
    }
}

/// The record's subject: the one its format-2 envelopes name (all the same), else the
/// one the caller names. A caller naming another subject than the envelopes is refused.
fn record_subject(
    envelopes: &[Envelope<'_>],
    selected: &[(&FieldName, &[u8])],
    named: Option<&SubjectId>,
) -> Result<Option<SubjectId>, InvalidRequest> {
    let mut found: Option<&str> = None;
    for (envelope, (name, _)) in envelopes.iter().zip(selected) {
        let Some(subject) = envelope.subject else {
            continue;
        };
        if let Some(other) = found.or(named.map(SubjectId::as_str))
            && other != subject
        {
            return Err(InvalidRequest(format!(
                "field `{name}` is sealed for data subject `{}`, not `{}`: a record has one subject",
                crate::record::shown(subject),
                crate::record::shown(other)
            )));
        }
        found = Some(subject);
    }
    match found {
        // Checked by the parser.
        Some(subject) => SubjectId::new(subject)
            .map(Some)
            .map_err(|error| InvalidRequest(error.to_string())),
        None => Ok(named.cloned()),
    }
}

/// Each field's fate: denied by policy, failing (moved from another jurisdiction,
/// sealed under a key version this server does not hold, retired or destroyed, or for
/// a shredded or unknown subject), kept (rewrap: already current), or to be opened.
fn plan(
    keyring: &Keyring,
    record: &RecordRef,
    decisions: &[Verdict<'_>],
    envelopes: &[Envelope<'_>],
    subject: &SubjectState,
    current: Option<KeyVersion>,
) -> Vec<Plan> {
    decisions
        .iter()
        .zip(envelopes)
        .map(|(decision, envelope)| {
            if !decision.allowed {
                return Plan::Deny(denial(decision));
            }
            if envelope.jurisdiction != record.jurisdiction {
                // Moved from another jurisdiction: its key and AAD could never match.
                return Plan::Fail(FieldFailure::Integrity);
            }
            let version = envelope.key_version;
            match keyring.derivation_key(&record.jurisdiction, version) {
                Ok(_) => {}
                Err(keys::Error::RetiredKeyVersion(..)) => {
                    return Plan::Fail(FieldFailure::RetiredKeyVersion(version));
                }
                Err(keys::Error::DestroyedKeyVersion(..)) => {
                    return Plan::Fail(FieldFailure::DestroyedKeyVersion(version));
                }
                Err(_) => return Plan::Fail(FieldFailure::UnknownKeyVersion),
            }
            let format_2 = envelope.format == ENVELOPE_VERSION;
            if format_2 && envelope.key_id.as_ref() != keyring.key_id(&record.jurisdiction, version)
            {
                // Same version number, another key (a keyring made anew).
                return Plan::Fail(FieldFailure::UnknownKeyVersion);
            }
            if format_2 || current.is_some() {
                match subject.secret {
                    Lookup::Live(_) => {}
                    Lookup::Shredded(_) => return Plan::Fail(FieldFailure::Shredded),
                    Lookup::Unknown => return Plan::Fail(FieldFailure::UnknownSubject),
                }
            }
            if format_2 && current == Some(version) {
                return Plan::Keep;
            }
            Plan::Open(version)
        })
        .collect()
}
