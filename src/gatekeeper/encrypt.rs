//! Encrypting a record: decide `encrypt` for every field, log, then seal each field
//! under the record key. Nothing is sealed when one field is denied or the log fails.

use super::context::{Context, Subject, check_field_names, field_entry};
use super::types::{Encrypted, PlainRecord, SealedRecord};
use super::{Error, Gatekeeper, InvalidRequest};
use crate::crypto::{self, RecordScope, SubjectScope, SubjectSecret};
use crate::identity::Caller;
use crate::keys::Keyring;
use crate::policy::Action;
use crate::record::{FieldName, KeyVersion, StatedPurpose, SubjectId};

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
        let subject = request
            .subject
            .clone()
            .unwrap_or_else(|| SubjectId::from(&record.record_id));
        let mut record_log = record.entry();
        record_log.subject = Some(subject.as_str().to_owned());
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
        if !denied.is_empty() {
            entry.outcome = "denied".to_owned();
            self.log.append(entry).await?;
            visible.sort_unstable();
            visible.dedup();
            return Err(Error::EncryptDenied {
                fields: denied,
                policy_ids: visible,
            });
        }
        // The subject's secret (made now for a new subject), before the log says the
        // record was encrypted: a shredded subject gets nothing encrypted again.
        let secret = match self
            .subjects
            .for_encryption(&keyring, &record.jurisdiction, &subject)
            .await
        {
            Ok(secret) => secret,
            Err(error @ crate::subjects::Error::Shredded { .. }) => {
                entry.outcome = format!("refused: {error}");
                self.log.append(entry).await?;
                return Err(error.into());
            }
            Err(error) => return Err(error.into()),
        };
        entry.outcome = "encrypted".to_owned();
        self.log.append(entry).await?;

        let sealed = seal(&keyring, &request, key_version, &subject, &secret)?;
        Ok(Encrypted {
            policy_set: snapshot.hash().to_owned(),
            request_id: context.request_id,
            record: SealedRecord {
                record: request.record.clone(),
                subject: Some(subject),
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

/// Seals every field in envelope format 2 under the record key of `key_version` and
/// the subject's secret, each with a fresh nonce.
fn seal(
    keyring: &Keyring,
    request: &PlainRecord,
    key_version: KeyVersion,
    subject: &SubjectId,
    secret: &SubjectSecret,
) -> Result<Vec<(FieldName, Vec<u8>)>, Error> {
    let fields = request
        .fields
        .iter()
        .map(|(name, value)| (name, value.as_slice()));
    seal_fields(
        keyring,
        &request.record,
        key_version,
        subject,
        secret,
        fields,
    )
}

/// Seals fields of `record` in envelope format 2 (encryption and rewrap).
pub(super) fn seal_fields<'v>(
    keyring: &Keyring,
    record: &super::RecordRef,
    key_version: KeyVersion,
    subject: &SubjectId,
    secret: &SubjectSecret,
    fields: impl ExactSizeIterator<Item = (&'v FieldName, &'v [u8])>,
) -> Result<Vec<(FieldName, Vec<u8>)>, Error> {
    let scope = RecordScope {
        jurisdiction: &record.jurisdiction,
        key_version,
        record_type: &record.record_type,
        record_id: &record.record_id,
    };
    let key_id = keyring
        .key_id(&record.jurisdiction, key_version)
        .ok_or_else(|| {
            crate::keys::Error::UnknownKeyVersion(record.jurisdiction.clone(), key_version)
        })?;
    let key = keyring
        .derivation_key(&record.jurisdiction, key_version)?
        .subject_record_key(
            &scope,
            &SubjectScope {
                subject,
                secret,
                key_id,
            },
        )?;
    let nonces = crypto::fresh_nonces(fields.len())?;
    let mut sealed = Vec::with_capacity(fields.len());
    for ((name, value), nonce) in fields.zip(&nonces) {
        sealed.push((name.clone(), key.seal(&scope, name, nonce, value)?));
    }
    Ok(sealed)
}
