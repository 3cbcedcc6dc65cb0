//! Deciding: a request's facts and a field become a Cedar request, evaluated once per
//! class of fields the policies cannot tell apart and remembered in a bounded cache.
//! Fails closed. May not load or reload policies.

use std::sync::Arc;

use cedar_policy::{Context, Decision, EntityUid, Request, RestrictedExpression};

use super::analysis::{self, Observed};
use super::names::field_entity_id;
use super::{Action, Error, PolicySnapshot, Principal};
use crate::record::{FieldName, Jurisdiction, RecordType, StatedPurpose};

/// Most decisions remembered per snapshot before the cache starts afresh.
const CACHE_CAPACITY: usize = 65_536;

/// Facts of a request that are the same for all its fields.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    /// The principal being decided about.
    pub principal: &'a Principal,
    /// Directory id of the calling service (for employees, the service they act through).
    pub service: &'a str,
    /// How the caller was authenticated, e.g. `danger-trust-identity-headers`.
    pub authentication: &'a str,
    /// Purpose and ticket stated by the caller.
    pub stated: &'a StatedPurpose,
    /// Request time, Unix seconds.
    pub request_time: i64,
}

/// The decision for one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDecision {
    /// Whether the action is permitted. False whenever evaluation erred.
    pub allowed: bool,
    /// Ids of the determining policies (permits when allowed, forbids when denied).
    pub policies: Vec<String>,
    /// The subset of `policies` that callers may be told about.
    pub visible_policies: Vec<String>,
    /// Evaluation errors; any error denies the field.
    pub errors: Vec<String>,
}

impl FieldDecision {
    /// A denial no policy determined: what a request Cedar is never asked about gets
    /// (a service acting alone on a key ring).
    pub fn refused() -> Self {
        Self {
            allowed: false,
            policies: Vec::new(),
            visible_policies: Vec::new(),
            errors: Vec::new(),
        }
    }
}

/// One field's decision with the field's classification from the catalog.
#[derive(Debug, Clone)]
pub struct Verdict<'s> {
    /// The field's classification.
    pub classification: &'s str,
    /// The decision, shared by all fields of its class.
    pub decision: Arc<FieldDecision>,
}

impl std::ops::Deref for Verdict<'_> {
    type Target = FieldDecision;

    fn deref(&self) -> &FieldDecision {
        &self.decision
    }
}

/// What the policies can observe of one field: fields of a request with equal keys
/// get the same decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FieldKey<'a> {
    record_type: Option<&'a RecordType>,
    field: Option<&'a FieldName>,
    classification: Option<&'a str>,
}

/// A context value as the policies can tell it apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Projected {
    /// Not observed by any policy.
    Unused,
    /// Index of the literal it equals, or `None` for "equals none of them".
    Class(Option<usize>),
    /// Observed as is.
    Raw(String),
}

fn project(observed: &Observed, name: &str, value: &str) -> Projected {
    match observed.context_use(name) {
        analysis::ContextUse::Unused => Projected::Unused,
        analysis::ContextUse::Literals(literals) => {
            Projected::Class(literals.iter().position(|literal| literal == value))
        }
        analysis::ContextUse::Raw => Projected::Raw(value.to_owned()),
    }
}

/// Everything that can influence a decision, as the policies can observe it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct DecisionKey {
    action: Action,
    principal: Principal,
    jurisdiction: Jurisdiction,
    record_type: Option<RecordType>,
    field: Option<FieldName>,
    classification: Option<String>,
    context: [Projected; 5],
}

impl PolicySnapshot {
    /// Whether the directory holds `principal` and the calling `service`.
    pub fn check_caller(&self, principal: &Principal, service: &str) -> Result<(), Error> {
        self.caller_uids(principal, service).map(|_| ())
    }

    fn caller_uids(
        &self,
        principal: &Principal,
        service: &str,
    ) -> Result<(EntityUid, EntityUid), Error> {
        let principal_uid = self.names.principal(principal);
        if self.entities.get(&principal_uid).is_none() {
            return Err(Error::UnknownPrincipal(principal.to_string()));
        }
        let service_uid = self.names.service(service);
        if self.entities.get(&service_uid).is_none() {
            return Err(Error::UnknownService(service.to_owned()));
        }
        Ok((principal_uid, service_uid))
    }

    fn check_request(
        &self,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        fields: &[FieldName],
    ) -> Result<(EntityUid, EntityUid, Vec<&str>), Error> {
        let (principal, service) = self.caller_uids(facts.principal, facts.service)?;
        if !self.jurisdictions.contains(jurisdiction) {
            return Err(Error::UnknownJurisdiction(jurisdiction.clone()));
        }
        if self.catalog.fields(record_type).is_none() {
            return Err(Error::UnknownRecordType(record_type.clone()));
        }
        let classifications = fields
            .iter()
            .map(|field| {
                self.catalog
                    .classification(record_type, field)
                    .ok_or_else(|| Error::UnknownField {
                        record_type: record_type.clone(),
                        field: field.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok((principal, service, classifications))
    }

    fn context(&self, facts: &RequestFacts<'_>, service: EntityUid) -> Result<Context, Error> {
        Context::from_pairs([
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(facts.stated.purpose.clone()),
            ),
            (
                "ticket".to_owned(),
                RestrictedExpression::new_string(facts.stated.ticket.clone()),
            ),
            (
                "authentication".to_owned(),
                RestrictedExpression::new_string(facts.authentication.to_owned()),
            ),
            (
                "service".to_owned(),
                RestrictedExpression::new_entity_uid(service),
            ),
            (
                "request_time".to_owned(),
                RestrictedExpression::new_long(facts.request_time),
            ),
        ])
        .map_err(|error| Error::Internal(error.to_string()))
    }

    fn field_key<'a>(
        &self,
        record_type: &'a RecordType,
        field: &'a FieldName,
        classification: &'a str,
    ) -> FieldKey<'a> {
        let observed = &self.observed;
        FieldKey {
            record_type: observed
                .resource_attribute("record_type")
                .then_some(record_type),
            field: observed.resource_attribute("field").then_some(field),
            classification: observed
                .resource_attribute("classification")
                .then_some(classification),
        }
    }

    fn context_key(&self, facts: &RequestFacts<'_>) -> [Projected; 5] {
        let observed = &self.observed;
        let time = facts.request_time.to_string();
        [
            project(observed, "purpose", &facts.stated.purpose),
            project(observed, "ticket", &facts.stated.ticket),
            project(observed, "authentication", facts.authentication),
            project(observed, "service", facts.service),
            project(observed, "request_time", &time),
        ]
    }

    fn field_uid(
        &self,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        field: &FieldName,
    ) -> EntityUid {
        self.names
            .field(&field_entity_id(jurisdiction, record_type, field))
    }

    /// Decides an administration `action` on `jurisdiction`'s `KeyRing` (key actions)
    /// or `DataSubjects` (`shred`). Only employees administer keys and subjects: a
    /// service acting alone is refused before Cedar with [`Error::NotAnEmployee`]
    /// (callers that only need the decision treat it as [`FieldDecision::refused`]).
    /// Not cached (administration is rare).
    pub fn decide_key(
        &self,
        action: Action,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
    ) -> Result<FieldDecision, Error> {
        if !action.resource_kind().is_jurisdictional() {
            return Err(Error::Internal(format!(
                "`{}` is not an administration action",
                action.as_str()
            )));
        }
        if !self.declared.contains(&action) {
            return Err(Error::Undeclared(action));
        }
        if !matches!(facts.principal, Principal::Employee(_)) {
            return Err(Error::NotAnEmployee(facts.principal.to_string()));
        }
        let (principal, service) = self.caller_uids(facts.principal, facts.service)?;
        if !self.jurisdictions.contains(jurisdiction) {
            return Err(Error::UnknownJurisdiction(jurisdiction.clone()));
        }
        let context = self.context(facts, service)?;
        self.evaluate(
            action,
            &principal,
            &context,
            self.names
                .jurisdictional(action.resource_kind(), jurisdiction)
                .ok_or_else(|| Error::Internal("not a jurisdictional resource".to_owned()))?,
        )
    }

    fn evaluate(
        &self,
        action: Action,
        principal: &EntityUid,
        context: &Context,
        resource: EntityUid,
    ) -> Result<FieldDecision, Error> {
        // No per-request schema check: principal, action and resource types are fixed
        // by this code and the context is built with typed values, and `probe_schema`
        // proved at load that the schema accepts exactly this shape.
        let request = Request::new(
            principal.clone(),
            self.names.action(action).clone(),
            resource,
            context.clone(),
            None,
        )
        .map_err(|error| Error::Internal(error.to_string()))?;
        let policies = self
            .by_action
            .get(&action)
            .ok_or_else(|| Error::Internal(format!("no policy set for `{}`", action.as_str())))?;
        let response = self
            .authorizer
            .is_authorized(&request, policies, &self.entities);
        // Cedar reports reasons as a set; sorted, equal decisions compare equal.
        let sorted = |items: &mut dyn Iterator<Item = String>| {
            let mut items: Vec<String> = items.collect();
            items.sort_unstable();
            items
        };
        let errors = sorted(&mut response.diagnostics().errors().map(|e| e.to_string()));
        let policies = sorted(&mut response.diagnostics().reason().map(ToString::to_string));
        // Cedar skips a policy whose evaluation errs, forbids included, so an erring
        // forbid could let a permit through: any error denies.
        let allowed = response.decision() == Decision::Allow && errors.is_empty();
        let policies = if allowed || errors.is_empty() {
            policies
        } else {
            Vec::new()
        };
        let visible_policies = policies
            .iter()
            .filter(|id| !self.hidden_ids.contains(*id))
            .cloned()
            .collect();
        Ok(FieldDecision {
            allowed,
            policies,
            visible_policies,
            errors,
        })
    }

    /// Decides `action` for each field of one record, in order. Fields that the policy
    /// set cannot tell apart share one evaluation; decisions are cached per snapshot.
    pub fn decide(
        &self,
        action: Action,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        fields: &[FieldName],
    ) -> Result<Vec<Verdict<'_>>, Error> {
        if action.resource_kind().is_jurisdictional() {
            return Err(Error::Internal(format!(
                "`{}` is not an action on fields",
                action.as_str()
            )));
        }
        if !self.declared.contains(&action) {
            return Err(Error::Undeclared(action));
        }
        let (principal, service, classifications) =
            self.check_request(facts, jurisdiction, record_type, fields)?;
        let mut context = None;
        let mut context_key = None;
        let mut local: Vec<(FieldKey<'_>, Arc<FieldDecision>)> = Vec::new();
        let mut decisions = Vec::with_capacity(fields.len());
        for (field, classification) in fields.iter().zip(classifications) {
            let field_key = self.field_key(record_type, field, classification);
            if let Some((_, decision)) = local.iter().find(|(seen, _)| *seen == field_key) {
                decisions.push(Verdict {
                    classification,
                    decision: Arc::clone(decision),
                });
                continue;
            }
            let key = DecisionKey {
                action,
                principal: facts.principal.clone(),
                jurisdiction: jurisdiction.clone(),
                record_type: field_key.record_type.cloned(),
                field: field_key.field.cloned(),
                classification: field_key.classification.map(str::to_owned),
                context: context_key
                    .get_or_insert_with(|| self.context_key(facts))
                    .clone(),
            };
            let cached = self
                .cache
                .read()
                .ok()
                .and_then(|cache| cache.get(&key).cloned());
            let decision = match cached {
                Some(decision) => decision,
                None => {
                    let context = match &context {
                        Some(context) => context,
                        None => context.insert(self.context(facts, service.clone())?),
                    };
                    let decision = Arc::new(self.evaluate(
                        action,
                        &principal,
                        context,
                        self.field_uid(jurisdiction, record_type, field),
                    )?);
                    // An erring decision carries Cedar's error text, which can name
                    // this field's entity: it is neither cached nor shared.
                    if decision.errors.is_empty()
                        && let Ok(mut cache) = self.cache.write()
                    {
                        if cache.len() >= CACHE_CAPACITY {
                            cache.clear();
                        }
                        cache.insert(key, Arc::clone(&decision));
                    }
                    decision
                }
            };
            if decision.errors.is_empty() {
                local.push((field_key, Arc::clone(&decision)));
            }
            decisions.push(Verdict {
                classification,
                decision,
            });
        }
        Ok(decisions)
    }

    /// Decides every field with its own Cedar evaluation, bypassing classes and cache.
    /// The reference that [`PolicySnapshot::decide`] is tested and benchmarked against.
    pub fn decide_each(
        &self,
        action: Action,
        facts: &RequestFacts<'_>,
        jurisdiction: &Jurisdiction,
        record_type: &RecordType,
        fields: &[FieldName],
    ) -> Result<Vec<FieldDecision>, Error> {
        if !self.declared.contains(&action) {
            return Err(Error::Undeclared(action));
        }
        let (principal, service, _) =
            self.check_request(facts, jurisdiction, record_type, fields)?;
        let context = self.context(facts, service)?;
        fields
            .iter()
            .map(|field| {
                self.evaluate(
                    action,
                    &principal,
                    &context,
                    self.field_uid(jurisdiction, record_type, field),
                )
            })
            .collect()
    }
}
