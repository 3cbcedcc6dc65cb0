//! Key administration: decide a key action on a jurisdiction's `KeyRing` for an
//! employee, log the decision durably, then change the live keyring through
//! [`crate::keyadmin`]. Never handles master-key material and returns no key bytes.

use super::context::Context;
use super::{Error, Gatekeeper};
use crate::audit::{KEY_ADMIN_KIND, KeyAdminEntry, KeyRingDecision};
use crate::identity::Caller;
use crate::keyadmin::Actor;
use crate::keys::{KeyEvent, KeyInfo, Keyring};
use crate::policy::{self, Action, FieldDecision, PolicySnapshot};
use crate::record::SubjectId;
use crate::record::{Jurisdiction, KeyVersion, StatedPurpose};
use crate::subjects::ShredOutcome;

/// A change to one jurisdiction's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// A new version becomes current.
    Rotate,
    /// Versions below `below` stop decrypting.
    Retire {
        /// The lowest version that keeps decrypting.
        below: KeyVersion,
    },
    /// Retired versions from `from` on decrypt again.
    Unretire {
        /// The lowest version to let decrypt again.
        from: KeyVersion,
    },
    /// Retired versions below `below` are destroyed for good.
    Destroy {
        /// Versions below this one are destroyed.
        below: KeyVersion,
    },
}

impl KeyChange {
    /// The Cedar action that decides it.
    pub fn action(self) -> Action {
        match self {
            KeyChange::Rotate => Action::RotateKey,
            KeyChange::Retire { .. } => Action::RetireKey,
            KeyChange::Unretire { .. } => Action::UnretireKey,
            KeyChange::Destroy { .. } => Action::DestroyKey,
        }
    }

    fn entry(self, key_rings: Vec<KeyRingDecision>) -> KeyAdminEntry {
        let (operation, below, from) = match self {
            KeyChange::Rotate => ("rotate", None, None),
            KeyChange::Retire { below } => ("retire", Some(below.get()), None),
            KeyChange::Unretire { from } => ("unretire", None, Some(from.get())),
            KeyChange::Destroy { below } => ("destroy", Some(below.get()), None),
        };
        KeyAdminEntry {
            operation: operation.to_owned(),
            below,
            from,
            key_rings,
            subject: None,
        }
    }

    fn apply(
        self,
        keyring: &mut Keyring,
        jurisdiction: &Jurisdiction,
    ) -> Result<Vec<KeyEvent>, crate::keys::Error> {
        match self {
            KeyChange::Rotate => keyring.rotate(jurisdiction).map(|event| vec![event]),
            KeyChange::Retire { below } => keyring.retire(jurisdiction, below),
            KeyChange::Unretire { from } => keyring.unretire(jurisdiction, from),
            KeyChange::Destroy { below } => keyring.destroy(jurisdiction, below),
        }
    }
}

/// A key change made (or found to change nothing).
#[derive(Debug, Clone)]
pub struct KeyChanged {
    /// The request's id in the decision log.
    pub request_id: String,
    /// The policy set that decided.
    pub policy_set: String,
    /// What changed; empty when nothing needed to.
    pub events: Vec<KeyEvent>,
    /// The jurisdiction's keys after the change.
    pub key_ring: Option<KeyInfo>,
}

/// Most jurisdictions one shred may name.
const MAX_SHRED_JURISDICTIONS: usize = 64;

/// A data subject shredded.
#[derive(Debug, Clone)]
pub struct SubjectShredded {
    /// The request's id in the decision log.
    pub request_id: String,
    /// The policy set that decided.
    pub policy_set: String,
    /// What happened in each jurisdiction.
    pub outcomes: Vec<ShredOutcome>,
}

/// Key versions the caller may see.
#[derive(Debug, Clone)]
pub struct KeyListing {
    /// The request's id in the decision log.
    pub request_id: String,
    /// The policy set that decided.
    pub policy_set: String,
    /// One entry per jurisdiction the caller may view.
    pub key_rings: Vec<KeyInfo>,
}

fn ring_decision(jurisdiction: &Jurisdiction, decision: &FieldDecision) -> KeyRingDecision {
    KeyRingDecision {
        jurisdiction: jurisdiction.as_str().to_owned(),
        decision: if decision.allowed { "allow" } else { "deny" }.to_owned(),
        policies: decision.policies.clone(),
        errors: decision.errors.clone(),
    }
}

fn denied(action: Action, jurisdictions: &[&Jurisdiction], decisions: &[FieldDecision]) -> Error {
    let resource_type = action.resource_kind().type_name();
    let mut policy_ids: Vec<String> = decisions
        .iter()
        .flat_map(|decision| decision.visible_policies.iter().cloned())
        .collect();
    policy_ids.sort_unstable();
    policy_ids.dedup();
    Error::AdminDenied {
        action: action.as_str(),
        resource: jurisdictions
            .iter()
            .map(|j| format!("{resource_type}::\"{j}\""))
            .collect::<Vec<_>>()
            .join(", "),
        policy_ids,
    }
}

impl Gatekeeper {
    /// Decides `action` on each of `candidates`' jurisdictional resources (their
    /// `KeyRing` or `DataSubjects`) and makes the request's `key_admin` entry naming
    /// every decision; the caller sets its outcome and logs it.
    async fn decide_rings(
        &self,
        snapshot: &PolicySnapshot,
        context: &Context<'_>,
        action: Action,
        candidates: &[Jurisdiction],
        admin: impl Fn(Vec<KeyRingDecision>) -> KeyAdminEntry + Copy,
    ) -> Result<(Vec<FieldDecision>, crate::audit::Entry), Error> {
        let mut decisions = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            decisions.push(
                self.decide_key(snapshot, context, action, candidate, admin)
                    .await?,
            );
        }
        let mut entry = context.entry(KEY_ADMIN_KIND, Some(action), None, Some(snapshot.hash()));
        entry.key_admin = Some(admin(
            candidates
                .iter()
                .zip(&decisions)
                .map(|(j, decision)| ring_decision(j, decision))
                .collect(),
        ));
        Ok((decisions, entry))
    }

    /// Decides a key action on `jurisdiction`'s key ring. An unknown caller is logged
    /// as an authentication failure; a caller who is not an employee gets its own
    /// `key_admin` entry before the refusal.
    async fn decide_key(
        &self,
        snapshot: &PolicySnapshot,
        context: &Context<'_>,
        action: Action,
        jurisdiction: &Jurisdiction,
        admin: impl Fn(Vec<KeyRingDecision>) -> KeyAdminEntry,
    ) -> Result<FieldDecision, Error> {
        match snapshot.decide_key(action, &context.facts(), jurisdiction) {
            Ok(decision) => Ok(decision),
            Err(
                error @ (policy::Error::UnknownPrincipal(_) | policy::Error::UnknownService(_)),
            ) => {
                self.log_unknown_caller(snapshot, context, action, None, &error)
                    .await?;
                Err(error.into())
            }
            Err(error @ policy::Error::NotAnEmployee(_)) => {
                let mut entry =
                    context.entry(KEY_ADMIN_KIND, Some(action), None, Some(snapshot.hash()));
                // Recorded as a denial of that key ring, so that queries by
                // jurisdiction find it and replay re-decides it.
                entry.key_admin = Some(admin(vec![ring_decision(
                    jurisdiction,
                    &FieldDecision::refused(),
                )]));
                entry.outcome = error.to_string();
                self.log.append(entry).await?;
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Decides `change` on `jurisdiction`'s keys for the caller and logs the decision
    /// (and, when permitted, whether the keyring's rules allow it) durably; then saves
    /// the change, logs its `key_event` entries under the same request id with a
    /// checkpoint, and serves it to every request that starts after this returns.
    /// Denials are decided and logged without the locks, so that refused callers
    /// cannot hold up key administrators; a permitted change takes the locks, then has
    /// its credentials checked again and is decided again by the policy set in force,
    /// if it changed meanwhile.
    pub async fn change_keys(
        &self,
        caller: &Caller,
        stated: &StatedPurpose,
        jurisdiction: &Jurisdiction,
        change: KeyChange,
    ) -> Result<KeyChanged, Error> {
        let context = Context::new(caller, stated)?;
        let action = change.action();
        let holder = crate::fsutil::describe_process(&format!(
            "a `{}` request of {} (request {})",
            action.as_str(),
            context.principal,
            context.request_id
        ));
        let mut snapshot = self.policies.current();
        let mut decision = self
            .decide_key(&snapshot, &context, action, jurisdiction, |rings| {
                change.entry(rings)
            })
            .await?;
        let mut prepared = None;
        if decision.allowed {
            prepared = Some(self.keyring.lock(&holder).await?);
            caller.check_credentials()?;
            let now = self.policies.current();
            if now.hash() != snapshot.hash() {
                snapshot = now;
                decision = self
                    .decide_key(&snapshot, &context, action, jurisdiction, |rings| {
                        change.entry(rings)
                    })
                    .await?;
            }
        }
        let mut entry = context.entry(KEY_ADMIN_KIND, Some(action), None, Some(snapshot.hash()));
        entry.key_admin = Some(change.entry(vec![ring_decision(jurisdiction, &decision)]));
        let Some(mut prepared) = prepared.filter(|_| decision.allowed) else {
            entry.outcome = "denied".to_owned();
            self.log.append(entry).await?;
            return Err(denied(action, &[jurisdiction], &[decision]));
        };
        let unchanged = match prepared.apply(|keyring| change.apply(keyring, jurisdiction)) {
            Ok(events) => events.is_empty(),
            Err(error) => {
                entry.outcome = format!("refused: {error}");
                self.log.append(entry).await?;
                return Err(Error::KeyChangeRefused(error));
            }
        };
        entry.outcome = if unchanged { "unchanged" } else { "allowed" }.to_owned();
        // The decision is durable before anything changes.
        self.log.append(entry.clone()).await?;
        let key_ring = prepared.summary(jurisdiction.as_str());
        let actor = Actor {
            principal: context.principal.to_string(),
            service: Some(caller.service.clone()),
            authentication: caller.method.to_owned(),
            request_id: context.request_id.clone(),
            stated: stated.clone(),
        };
        let events = match prepared.commit(&self.log, &actor).await {
            Ok(events) => events,
            Err(error) => {
                // The log says it was allowed; this entry says it did not complete.
                // Whether the file (and so the server) holds it: the `key_event`
                // entries, or the `unlogged` ones of the next start, say.
                // `PreparedChange::commit` has the rules.
                entry.time = crate::record::rfc3339_now();
                entry.outcome = format!("failed: {error}");
                if let Err(log_error) = self.log.append(entry).await {
                    tracing::error!(%log_error, request_id = context.request_id, "failed key change not logged");
                }
                return Err(error.into());
            }
        };
        Ok(KeyChanged {
            request_id: context.request_id,
            policy_set: snapshot.hash().to_owned(),
            events,
            key_ring,
        })
    }

    /// The key versions of `jurisdiction` (or of every jurisdiction the keyring holds,
    /// when `None`) that the caller may view (`view_keys`), decided and logged. Refused
    /// when the caller may view none of them.
    pub async fn list_keys(
        &self,
        caller: &Caller,
        stated: &StatedPurpose,
        jurisdiction: Option<&Jurisdiction>,
    ) -> Result<KeyListing, Error> {
        let context = Context::new(caller, stated)?;
        let snapshot = self.policies.current();
        let keyring = self.keyring.load();
        let summary = keyring.summary();
        let candidates: Vec<Jurisdiction> = match jurisdiction {
            Some(jurisdiction) => vec![jurisdiction.clone()],
            None => summary
                .iter()
                .filter_map(|info| Jurisdiction::new(&info.jurisdiction).ok())
                // Jurisdictions the policies do not know cannot be decided: not shown.
                .filter(|j| snapshot.jurisdictions().contains(j))
                .collect(),
        };
        let admin = |key_rings| KeyAdminEntry {
            operation: "list".to_owned(),
            below: None,
            from: None,
            key_rings,
            subject: None,
        };
        let (decisions, mut entry) = self
            .decide_rings(&snapshot, &context, Action::ViewKeys, &candidates, admin)
            .await?;
        let allowed: Vec<&Jurisdiction> = candidates
            .iter()
            .zip(&decisions)
            .filter(|(_, decision)| decision.allowed)
            .map(|(j, _)| j)
            .collect();
        entry.outcome = if allowed.is_empty() {
            "denied"
        } else {
            "listed"
        }
        .to_owned();
        self.log.append(entry).await?;
        if allowed.is_empty() {
            let all: Vec<&Jurisdiction> = candidates.iter().collect();
            return Err(denied(Action::ViewKeys, &all, &decisions));
        }
        Ok(KeyListing {
            request_id: context.request_id,
            policy_set: snapshot.hash().to_owned(),
            key_rings: summary
                .into_iter()
                .filter(|info| allowed.iter().any(|j| j.as_str() == info.jurisdiction))
                .collect(),
        })
    }
}

impl Gatekeeper {
    /// Shreds `subject` in `jurisdictions` (every jurisdiction the keyring holds, when
    /// `None`; at most 64; one the policies do not know is refused): decides `shred` on each jurisdiction's
    /// `DataSubjects` for the caller, all of which must be permitted, logs the decision
    /// durably, destroys the subject's secrets (durably, caches forgotten) and logs
    /// what was destroyed. Every request that starts after this returns finds the
    /// subject shredded.
    pub async fn shred_subject(
        &self,
        caller: &Caller,
        stated: &StatedPurpose,
        subject: &SubjectId,
        jurisdictions: Option<Vec<Jurisdiction>>,
    ) -> Result<SubjectShredded, Error> {
        let context = Context::new(caller, stated)?;
        let snapshot = self.policies.current();
        // Every jurisdiction the keyring holds unless named; each decided (one the
        // policies do not know is refused as unknown, never silently skipped).
        let mut candidates =
            jurisdictions.unwrap_or_else(|| self.keyring.load().jurisdictions().cloned().collect());
        candidates.sort_unstable();
        candidates.dedup();
        if candidates.is_empty() || candidates.len() > MAX_SHRED_JURISDICTIONS {
            return Err(super::InvalidRequest(format!(
                "name 1 to {MAX_SHRED_JURISDICTIONS} jurisdictions to shred in (none: every jurisdiction the keyring holds)"
            ))
            .into());
        }
        let admin = |key_rings| KeyAdminEntry {
            operation: "shred".to_owned(),
            below: None,
            from: None,
            key_rings,
            subject: Some(subject.as_str().to_owned()),
        };
        let (decisions, mut entry) = self
            .decide_rings(&snapshot, &context, Action::Shred, &candidates, admin)
            .await?;
        if decisions.iter().any(|decision| !decision.allowed) {
            entry.outcome = "denied".to_owned();
            self.log.append(entry).await?;
            let all: Vec<&Jurisdiction> = candidates.iter().collect();
            return Err(denied(Action::Shred, &all, &decisions));
        }
        caller.check_credentials()?;
        for jurisdiction in &candidates {
            if !self.keyring.load().holds(jurisdiction) {
                return Err(crate::keys::Error::UnknownJurisdiction(jurisdiction.clone()).into());
            }
        }
        entry.outcome = "allowed".to_owned();
        // The decision is durable before anything is destroyed.
        self.log.append(entry.clone()).await?;
        let outcomes = match self.subjects.shred(subject, &candidates).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                entry.time = crate::record::rfc3339_now();
                entry.outcome = format!("failed: {error}");
                if let Err(log_error) = self.log.append(entry).await {
                    tracing::error!(%log_error, request_id = context.request_id, "failed shred not logged");
                }
                return Err(error.into());
            }
        };
        entry.time = crate::record::rfc3339_now();
        entry.outcome = crate::keyadmin::shred_outcome(&outcomes);
        self.log.append(entry).await?;
        Ok(SubjectShredded {
            request_id: context.request_id,
            policy_set: snapshot.hash().to_owned(),
            outcomes,
        })
    }
}
