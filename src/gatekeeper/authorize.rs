//! Authorizing: decide `decrypt` per field without decrypting, logged like any
//! decision.

use super::context::{Context, Subject, check_field_names, denial, field_entry, record_entry};
use super::types::{AuthorizeRequest, Authorized};
use super::{Error, Gatekeeper};
use crate::identity::Caller;
use crate::policy::{self, Action};
use crate::record::FieldName;

impl Gatekeeper {
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
