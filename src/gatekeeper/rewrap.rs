//! Rewrapping a record: the fields read for `rewrap` ([`super::decrypt`]) sealed again
//! under the jurisdiction's current key version in envelope format 2, inside the
//! service. No plaintext leaves; may not decide or log by itself.

use super::decrypt::{Read, ReadRecord};
use super::encrypt::seal_fields;
use super::types::{RewrapOutcome, RewrapRequest, Rewrapped};
use super::{Error, Gatekeeper};
use crate::crypto;
use crate::identity::Caller;
use crate::policy::Action;
use crate::record::FieldName;
use crate::subjects::Lookup;

impl Gatekeeper {
    /// Decides `rewrap` for every field of a record, logs, and re-encrypts the
    /// permitted fields under the jurisdiction's current key version in envelope
    /// format 2, inside the service: no plaintext leaves. Fields already current come
    /// back unchanged, as do denied and failing ones (with their outcome).
    pub async fn rewrap_record(
        &self,
        caller: &Caller,
        request: RewrapRequest,
    ) -> Result<Rewrapped, Error> {
        let record = &request.record.record;
        let read = self
            .read(
                caller,
                &request.record,
                &[],
                &request.stated,
                Action::Rewrap,
            )
            .await?;
        let current = read.keyring.current_for_encryption(&record.jurisdiction)?;
        let ReadRecord {
            context_request_id,
            policy_set,
            logged,
            keyring,
            subject,
            fields,
            envelopes,
        } = read;
        let plain: Vec<(&FieldName, &[u8])> = fields
            .iter()
            .filter_map(|(name, read)| match read {
                Read::Plain(plaintext) => Some((name, plaintext.as_slice())),
                _ => None,
            })
            .collect();
        let mut sealed = match (&subject.id, &subject.secret) {
            (Some(id), Lookup::Live(secret)) if !plain.is_empty() => {
                seal_fields(&keyring, record, current, id, secret, plain.into_iter())?
            }
            _ => Vec::new(),
        }
        .into_iter();
        let mut out = request.record.clone();
        out.subject = subject.id.clone();
        let mut outcomes = Vec::with_capacity(fields.len());
        for ((name, read), (format, version)) in fields.into_iter().zip(envelopes) {
            let outcome = match read {
                Read::Plain(_) => {
                    let Some((_, envelope)) = sealed.next() else {
                        return Err(crypto::Error::Malformed("rewrap lost a field").into());
                    };
                    if let Some(slot) = out.fields.iter_mut().find(|(field, _)| *field == name) {
                        slot.1 = envelope;
                    }
                    RewrapOutcome::Rewrapped {
                        from_version: version,
                        to_version: current,
                        from_format: format,
                    }
                }
                Read::Kept => RewrapOutcome::Unchanged,
                Read::Denied(denial) => RewrapOutcome::Denied(denial),
                Read::Failed(failure) => RewrapOutcome::Failed(failure),
            };
            outcomes.push((name, outcome));
        }
        Ok(Rewrapped {
            policy_set,
            request_id: context_request_id,
            record: out,
            fields: outcomes,
            logged,
        })
    }
}
