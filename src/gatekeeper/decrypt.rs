//! Decrypting a record, in the order guarantees 1 and 2 rest on (see the module
//! documentation of [`super`]): select and validate -> parse envelope headers ->
//! decide -> plan and log, durably -> open only the permitted fields -> answer. Each
//! step is one function below.

use super::context::{Context, Subject, check_field_names, denial, field_entry};
use super::types::{DecryptRequest, Decrypted, Denial, FieldFailure, Outcome, Receipt, RecordRef};
use super::{Error, Gatekeeper, InvalidRequest, follow_up_field};
use crate::audit::RecordEntry;
use crate::crypto::{self, Envelope, RecordScope};
use crate::identity::Caller;
use crate::keys::{self, Keyring};
use crate::policy::{Action, PolicySnapshot, Verdict};
use crate::record::{FieldName, KeyVersion};

/// What will happen to one field, settled before anything is decrypted.
enum Plan {
    Open(KeyVersion),
    Deny(Denial),
    Fail(FieldFailure),
}

impl Plan {
    /// The field's `outcome` in the decision log.
    fn logged_as(&self) -> &'static str {
        match self {
            Plan::Open(_) => "decrypt",
            Plan::Deny(_) => "denied",
            Plan::Fail(FieldFailure::Integrity) => "integrity_failure",
            Plan::Fail(FieldFailure::UnknownKeyVersion) => "unknown_key_version",
            Plan::Fail(FieldFailure::RetiredKeyVersion(_)) => "retired_key_version",
            Plan::Fail(FieldFailure::DestroyedKeyVersion(_)) => "destroyed_key_version",
        }
    }
}

/// Record keys of one record, derived when first needed (a record's fields may be
/// sealed under several key versions).
struct RecordKeys<'g> {
    keyring: &'g Keyring,
    keys: std::collections::BTreeMap<KeyVersion, crypto::RecordKey>,
}

impl RecordKeys<'_> {
    fn get(&mut self, scope: &RecordScope<'_>) -> Result<&crypto::RecordKey, Error> {
        use std::collections::btree_map::Entry;
        Ok(match self.keys.entry(scope.key_version) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => slot.insert(
                self.keyring
                    .derivation_key(scope.jurisdiction, scope.key_version)?
                    .record_key(scope)?,
            ),
        })
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
        let selected = self.select(&request)?;
        let names: Vec<FieldName> = selected.iter().map(|(name, _)| (*name).clone()).collect();
        let context = Context::new(caller, &request.stated)?;
        let snapshot = self.policies.current();
        let logged = record.entry();
        let envelopes = self
            .parse_envelopes(&selected, &context, &snapshot, &logged)
            .await?;
        let subject = Subject {
            jurisdiction: &record.jurisdiction,
            record_type: &record.record_type,
            record_id: Some(&record.record_id),
        };
        let decisions = self
            .decide(&snapshot, &context, Action::Decrypt, subject, &names)
            .await?;
        // One keyring for the whole request: a live key change is seen whole or not at all.
        let keyring = self.keyring.load();
        let plans = plan(&keyring, record, &decisions, &envelopes);
        // Guarantee 2: the decisions are durable before any field is decrypted.
        let mut entry = context.entry(
            "decrypt",
            Some(Action::Decrypt),
            Some(logged.clone()),
            Some(snapshot.hash()),
        );
        for (((name, decision), envelope), plan) in
            names.iter().zip(&decisions).zip(&envelopes).zip(&plans)
        {
            let mut field = field_entry(decision, name, decision.classification, plan.logged_as());
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
            .filter(|(_, plan)| matches!(plan, Plan::Open(_)))
            .map(|(name, _)| name.as_str().to_owned())
            .collect();
        let receipt = Receipt::new(
            Action::Decrypt,
            &context.request_id,
            &logged,
            snapshot.hash(),
            opened,
        );
        let answer = self
            .open(
                &keyring, record, names, plans, &envelopes, &context, &snapshot, &logged,
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
        Ok(Decrypted {
            logged,
            policy_set: snapshot.hash().to_owned(),
            record_id: record.record_id.clone(),
            request_id: context.request_id,
            fields,
        })
    }

    /// The fields asked for (all when none are named), in answer order, after the
    /// field lists are checked.
    fn select<'r>(
        &self,
        request: &'r DecryptRequest,
    ) -> Result<Vec<(&'r FieldName, &'r [u8])>, Error> {
        let fields = &request.record.fields;
        if fields.is_empty() {
            return Err(InvalidRequest("record has no fields".to_owned()).into());
        }
        check_field_names(
            fields.iter().map(|(name, _)| name),
            &self.limits,
            "the record",
        )?;
        check_field_names(&request.wanted, &self.limits, "`fields`")?;
        if request.wanted.is_empty() {
            return Ok(fields
                .iter()
                .map(|(name, bytes)| (name, bytes.as_slice()))
                .collect());
        }
        Ok(request
            .wanted
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

    /// The envelope headers of the selected fields. A mangled envelope may be a
    /// tampering attempt: it is logged as `rejected` before the request is refused.
    async fn parse_envelopes<'r>(
        &self,
        selected: &[(&FieldName, &'r [u8])],
        context: &Context<'_>,
        snapshot: &PolicySnapshot,
        logged: &RecordEntry,
    ) -> Result<Vec<Envelope<'r>>, Error> {
        let parsed: Result<Vec<Envelope<'r>>, InvalidRequest> = selected
            .iter()
            .map(|(name, bytes)| {
                Envelope::parse(bytes)
                    .map_err(|error| InvalidRequest(format!("field `{name}`: {error}")))
            })
            .collect();
        match parsed {
            Ok(envelopes) => Ok(envelopes),
            Err(invalid) => {
                let mut entry = context.entry(
                    "rejected",
                    Some(Action::Decrypt),
                    Some(logged.clone()),
                    Some(snapshot.hash()),
                );
                entry.outcome = invalid.to_string();
                self.log.append(entry).await?;
                Err(invalid.into())
            }
        }
    }

    /// Opens the fields planned to be opened. A field that fails authentication is an
    /// integrity failure, itself logged (guarantee 4) before the answer goes out.
    #[allow(clippy::too_many_arguments)]
    async fn open(
        &self,
        keyring: &Keyring,
        record: &RecordRef,
        names: Vec<FieldName>,
        plans: Vec<Plan>,
        envelopes: &[Envelope<'_>],
        context: &Context<'_>,
        snapshot: &PolicySnapshot,
        logged: &RecordEntry,
    ) -> Result<Vec<(FieldName, Outcome)>, Error> {
        let mut keys = RecordKeys {
            keyring,
            keys: std::collections::BTreeMap::new(),
        };
        let mut outcomes = Vec::with_capacity(names.len());
        let mut integrity_failures = Vec::new();
        for ((name, plan), envelope) in names.into_iter().zip(plans).zip(envelopes) {
            let outcome = match plan {
                Plan::Deny(denial) => Outcome::Denied(denial),
                Plan::Fail(failure) => Outcome::Failed(failure),
                Plan::Open(key_version) => {
                    let scope = RecordScope {
                        jurisdiction: &record.jurisdiction,
                        key_version,
                        record_type: &record.record_type,
                        record_id: &record.record_id,
                    };
                    match keys.get(&scope)?.open(&scope, &name, envelope) {
                        Ok(plaintext) => Outcome::Plaintext(plaintext),
                        Err(_) => {
                            integrity_failures.push(name.clone());
                            Outcome::Failed(FieldFailure::Integrity)
                        }
                    }
                }
            };
            outcomes.push((name, outcome));
        }
        if !integrity_failures.is_empty() {
            let mut follow_up = context.entry(
                "integrity_failure",
                Some(Action::Decrypt),
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

/// Each field's fate: denied by policy, failing (moved from another jurisdiction, or
/// sealed under a key version this server does not hold, retired or destroyed), or to
/// be opened.
fn plan(
    keyring: &Keyring,
    record: &RecordRef,
    decisions: &[Verdict<'_>],
    envelopes: &[Envelope<'_>],
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
                Ok(_) => Plan::Open(version),
                Err(keys::Error::RetiredKeyVersion(..)) => {
                    Plan::Fail(FieldFailure::RetiredKeyVersion(version))
                }
                Err(keys::Error::DestroyedKeyVersion(..)) => {
                    Plan::Fail(FieldFailure::DestroyedKeyVersion(version))
                }
                Err(_) => Plan::Fail(FieldFailure::UnknownKeyVersion),
            }
        })
        .collect()
}
