//! Conversions between `ringfence.v1` messages and domain types. Every check of the
//! wire form happens here, with messages that name the offending field.

use tonic::Status;
use zeroize::Zeroizing;

use crate::gatekeeper::{
    AuthorizeRequest, Authorized, DecryptRequest, Decrypted, Denial, Encrypted, FieldFailure,
    Outcome, PlainRecord, RecordRef, RewrapOutcome, RewrapRequest, Rewrapped, SealedRecord,
};
use crate::pb;
use crate::record::{
    FieldName, InvalidName, Jurisdiction, RecordId, RecordType, StatedPurpose, SubjectId,
};

fn invalid(error: InvalidName) -> Status {
    Status::invalid_argument(error.to_string())
}

fn field_name(name: &str) -> Result<FieldName, Status> {
    FieldName::new(name).map_err(invalid)
}

/// An optional subject id: empty means none.
fn subject(subject_id: &str) -> Result<Option<SubjectId>, Status> {
    if subject_id.is_empty() {
        return Ok(None);
    }
    SubjectId::new(subject_id).map(Some).map_err(invalid)
}

fn record_ref(record_type: &str, record_id: &str, jurisdiction: &str) -> Result<RecordRef, Status> {
    Ok(RecordRef {
        record_type: RecordType::new(record_type).map_err(invalid)?,
        record_id: RecordId::new(record_id).map_err(invalid)?,
        jurisdiction: Jurisdiction::new(jurisdiction).map_err(invalid)?,
    })
}

impl TryFrom<pb::EncryptRecordRequest> for PlainRecord {
    type Error = Status;

    fn try_from(message: pb::EncryptRecordRequest) -> Result<Self, Status> {
        let record = record_ref(
            &message.record_type,
            &message.record_id,
            &message.jurisdiction,
        )?;
        let fields = message
            .fields
            .into_iter()
            .map(|field| Ok((field_name(&field.name)?, Zeroizing::new(field.value))))
            .collect::<Result<_, Status>>()?;
        Ok(Self {
            record,
            subject: subject(&message.subject_id)?,
            fields,
        })
    }
}

impl TryFrom<pb::EncryptedRecord> for SealedRecord {
    type Error = Status;

    fn try_from(message: pb::EncryptedRecord) -> Result<Self, Status> {
        let record = record_ref(
            &message.record_type,
            &message.record_id,
            &message.jurisdiction,
        )?;
        let fields = message
            .fields
            .into_iter()
            .map(|field| Ok((field_name(&field.name)?, field.ciphertext)))
            .collect::<Result<_, Status>>()?;
        Ok(Self {
            record,
            subject: subject(&message.subject_id)?,
            fields,
        })
    }
}

impl From<SealedRecord> for pb::EncryptedRecord {
    fn from(record: SealedRecord) -> Self {
        Self {
            record_type: record.record.record_type.as_str().to_owned(),
            record_id: record.record.record_id.as_str().to_owned(),
            jurisdiction: record.record.jurisdiction.as_str().to_owned(),
            subject_id: record
                .subject
                .map(|subject| subject.as_str().to_owned())
                .unwrap_or_default(),
            fields: record
                .fields
                .into_iter()
                .map(|(name, ciphertext)| pb::EncryptedField {
                    name: name.as_str().to_owned(),
                    ciphertext,
                })
                .collect(),
        }
    }
}

impl From<Encrypted> for pb::EncryptRecordResponse {
    fn from(encrypted: Encrypted) -> Self {
        Self {
            record: Some(encrypted.record.into()),
            request_id: encrypted.request_id,
            policy_set: encrypted.policy_set,
        }
    }
}

impl TryFrom<pb::DecryptRecordRequest> for DecryptRequest {
    type Error = Status;

    fn try_from(message: pb::DecryptRecordRequest) -> Result<Self, Status> {
        let record = message
            .record
            .ok_or_else(|| Status::invalid_argument("`record` is required"))?;
        Ok(Self {
            record: record.try_into()?,
            wanted: message
                .fields
                .iter()
                .map(|name| field_name(name))
                .collect::<Result<_, _>>()?,
            stated: StatedPurpose::new(&message.purpose, &message.ticket).map_err(invalid)?,
        })
    }
}

/// What a caller is told about a field that could not be decrypted.
fn field_error(failure: FieldFailure) -> pb::FieldError {
    let (kind, message) = match failure {
        FieldFailure::Integrity => (
            pb::field_error::Kind::Integrity,
            "integrity check failed: the ciphertext was altered, truncated or does not belong to this field, record or jurisdiction".to_owned(),
        ),
        FieldFailure::UnknownKeyVersion => (
            pb::field_error::Kind::UnknownKeyVersion,
            "the ciphertext names a key version this server does not hold".to_owned(),
        ),
        FieldFailure::RetiredKeyVersion(version) => (
            pb::field_error::Kind::RetiredKeyVersion,
            format!("the ciphertext is sealed under key version {version}, which is retired: it decrypts again only if a key administrator unretires it"),
        ),
        FieldFailure::DestroyedKeyVersion(version) => (
            pb::field_error::Kind::DestroyedKeyVersion,
            format!("the ciphertext is sealed under key version {version}, which was destroyed: it can never be decrypted"),
        ),
        FieldFailure::Shredded => (
            pb::field_error::Kind::Shredded,
            "the record's data subject was shredded: the field can never be decrypted".to_owned(),
        ),
        FieldFailure::UnknownSubject => (
            pb::field_error::Kind::UnknownKeyVersion,
            "the ciphertext names a data subject whose secret this server does not hold".to_owned(),
        ),
    };
    pb::FieldError {
        kind: kind.into(),
        message,
    }
}

fn denied(denial: Denial) -> pb::Denied {
    pb::Denied {
        policy_ids: denial.policy_ids,
        reason: denial.reason.to_owned(),
    }
}

impl From<Decrypted> for pb::DecryptRecordResponse {
    fn from(decrypted: Decrypted) -> Self {
        // Plaintext is moved out of its zeroizing buffer into the response: from here on
        // it belongs to the transport.
        let fields = decrypted
            .fields
            .into_iter()
            .map(|(name, outcome)| {
                let outcome = match outcome {
                    Outcome::Plaintext(mut plaintext) => {
                        // Moved, not copied: no second plaintext buffer is left behind.
                        pb::field_outcome::Outcome::Plaintext(std::mem::take(&mut *plaintext))
                    }
                    Outcome::Denied(denial) => pb::field_outcome::Outcome::Denied(denied(denial)),
                    Outcome::Failed(failure) => {
                        pb::field_outcome::Outcome::Error(field_error(failure))
                    }
                };
                pb::FieldOutcome {
                    name: name.as_str().to_owned(),
                    outcome: Some(outcome),
                }
            })
            .collect();
        Self {
            record_id: decrypted.record_id.as_str().to_owned(),
            fields,
            request_id: decrypted.request_id,
            policy_set: decrypted.policy_set,
            status: None,
            index: 0,
        }
    }
}

impl TryFrom<pb::AuthorizeRequest> for AuthorizeRequest {
    type Error = Status;

    fn try_from(message: pb::AuthorizeRequest) -> Result<Self, Status> {
        Ok(Self {
            record_type: RecordType::new(&message.record_type).map_err(invalid)?,
            record_id: if message.record_id.is_empty() {
                None
            } else {
                Some(RecordId::new(&message.record_id).map_err(invalid)?)
            },
            jurisdiction: Jurisdiction::new(&message.jurisdiction).map_err(invalid)?,
            fields: message
                .fields
                .iter()
                .map(|name| field_name(name))
                .collect::<Result<_, _>>()?,
            stated: StatedPurpose::new(&message.purpose, &message.ticket).map_err(invalid)?,
        })
    }
}

impl From<Authorized> for pb::AuthorizeResponse {
    fn from(authorized: Authorized) -> Self {
        Self {
            fields: authorized
                .fields
                .into_iter()
                .map(|(name, denial)| pb::FieldAuthorization {
                    name: name.as_str().to_owned(),
                    allowed: denial.is_none(),
                    denied: denial.map(denied),
                })
                .collect(),
            request_id: authorized.request_id,
            policy_set: authorized.policy_set,
        }
    }
}

impl TryFrom<pb::RewrapRecordRequest> for RewrapRequest {
    type Error = Status;

    fn try_from(message: pb::RewrapRecordRequest) -> Result<Self, Status> {
        let record = message
            .record
            .ok_or_else(|| Status::invalid_argument("`record` is required"))?;
        Ok(Self {
            record: record.try_into()?,
            stated: StatedPurpose::new(&message.purpose, &message.ticket).map_err(invalid)?,
        })
    }
}

impl From<Rewrapped> for pb::RewrapRecordResponse {
    fn from(rewrapped: Rewrapped) -> Self {
        use pb::field_rewrap::Outcome as Wire;
        let fields = rewrapped
            .fields
            .into_iter()
            .map(|(name, outcome)| pb::FieldRewrap {
                name: name.as_str().to_owned(),
                outcome: Some(match outcome {
                    RewrapOutcome::Rewrapped {
                        from_version,
                        to_version,
                        from_format,
                    } => Wire::Rewrapped(pb::Rewrapped {
                        from_version: from_version.get(),
                        to_version: to_version.get(),
                        from_format: u32::from(from_format),
                    }),
                    RewrapOutcome::Unchanged => Wire::Unchanged(pb::Unchanged {}),
                    RewrapOutcome::Denied(denial) => Wire::Denied(denied(denial)),
                    RewrapOutcome::Failed(failure) => Wire::Error(field_error(failure)),
                }),
            })
            .collect();
        Self {
            record: Some(rewrapped.record.into()),
            fields,
            request_id: rewrapped.request_id,
            policy_set: rewrapped.policy_set,
            status: None,
            index: 0,
        }
    }
}
