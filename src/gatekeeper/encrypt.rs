//! Encrypting a record: decide `encrypt` for every field, log, then seal each field
//! under the record key. Nothing is sealed when one field is denied or the log fails.

use super::context::{Context, Subject, check_field_names, field_entry};
use super::types::{Encrypted, PlainRecord, SealedRecord};
use super::{Error, Gatekeeper, InvalidRequest};
use crate::crypto::{self, RecordScope};
use crate::identity::Caller;
use crate::keys::Keyring;
use crate::policy::Action;
use crate::record::{FieldName, KeyVersion, StatedPurpose};

impl Gatekeeper {
    /// Encrypts every field of a record, if policy permits `encrypt` on all of them.
    pub async fn encrypt_record(
        &self,
        caller: &Caller,
        request: PlainRecord,
    ) -> Result<Encrypted, Error> {
        let record = &request.record;
        self.check_plain(&request)?;
        // One keyring for the whole request: a live rotation is seen whole or not at all.
        let keyring = self.keyring.load();
        let key_version = keyring.current_for_encryption(&record.jurisdiction)?;
        let stated = StatedPurpose::default();
        let context = Context::new(caller, &stated)?;
        let snapshot = self.policies.current();
        let names: Vec<FieldName> = request
            .fields
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        let record_log = record.entry();
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

        let sealed = seal(&keyring, &request, key_version)?;
        Ok(Encrypted {
            policy_set: snapshot.hash().to_owned(),
            request_id: context.request_id,
            record: SealedRecord {
                record: request.record.clone(),
                fields: sealed,
            },
        })
    }

    /// Checks a record to encrypt: some fields, each named once, none too large.
    fn check_plain(&self, request: &PlainRecord) -> Result<(), InvalidRequest> {
        if request.fields.is_empty() {
            return Err(InvalidRequest("record has no fields".to_owned()));
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
                )));
            }
        }
        Ok(())
    }
}

/// Seals every field under the record key of `key_version`, each with a fresh nonce.
fn seal(
    keyring: &Keyring,
    request: &PlainRecord,
    key_version: KeyVersion,
) -> Result<Vec<(FieldName, Vec<u8>)>, Error> {
    let record = &request.record;
    let scope = RecordScope {
        jurisdiction: &record.jurisdiction,
        key_version,
        record_type: &record.record_type,
        record_id: &record.record_id,
    };
    let key = keyring
        .derivation_key(&record.jurisdiction, key_version)?
        .record_key(&scope)?;
    let nonces = crypto::fresh_nonces(request.fields.len())?;
    let mut sealed = Vec::with_capacity(request.fields.len());
    for ((name, value), nonce) in request.fields.iter().zip(&nonces) {
        sealed.push((name.clone(), key.seal(&scope, name, nonce, value)?));
    }
    Ok(sealed)
}
