//! gRPC handlers of `ringfence.v1.KeyAdmin`: proto -> domain, call the [`Gatekeeper`]'s
//! key administration, map back. Holds no logic of its own; never sees key bytes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::FollowUps;
use super::admission::caller;
use crate::gatekeeper::{Gatekeeper, KeyChange, KeyChanged, KeyListing, SubjectShredded};
use crate::keys::{KeyEvent, KeyInfo, VersionState};
use crate::pb;
use crate::record::{Jurisdiction, KeyVersion, StatedPurpose, SubjectId};

/// The `ringfence.v1.KeyAdmin` service.
#[derive(Debug, Clone)]
pub struct KeyAdminService {
    gate: Arc<Gatekeeper>,
    /// Calls in progress, cancelled ones included.
    unary: Arc<tokio::sync::Semaphore>,
    follow_ups: FollowUps,
}

impl KeyAdminService {
    /// Administers `gate`'s keyring; at most `unary`'s permits of calls run at once,
    /// each tracked by `follow_ups`, so that shutdown waits for a change in progress.
    pub(super) fn new(
        gate: Arc<Gatekeeper>,
        unary: Arc<tokio::sync::Semaphore>,
        follow_ups: FollowUps,
    ) -> Self {
        Self {
            gate,
            unary,
            follow_ups,
        }
    }

    /// Runs `work` in a task of its own, so that a cancelled call cannot stop it
    /// between its decision entry, the saved keyring and its `key_event` entries; at
    /// most [`super::KEY_ADMIN_IN_PROGRESS`] run at once.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
    ) -> Result<T, Status> {
        let permit = Arc::clone(&self.unary).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the server is busy ({} key administration calls in progress); retry with backoff",
                super::KEY_ADMIN_IN_PROGRESS
            ))
        })?;
        let task = self
            .follow_ups
            .spawn(async move {
                let _permit = permit;
                work.await
            })
            .ok_or_else(|| Status::unavailable("the server is shutting down"))?;
        task.await.map_err(|error| {
            tracing::error!(%error, "key administration task failed");
            Status::internal("internal error; the server log has details")
        })?
    }

    async fn change<T>(
        &self,
        request: Request<T>,
        parse: impl FnOnce(&T) -> Result<(Jurisdiction, KeyChange, StatedPurpose), Status>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let caller = caller(&request)?;
        let (jurisdiction, change, stated) = parse(request.get_ref())?;
        let gate = Arc::clone(&self.gate);
        let changed = self
            .run(async move {
                Ok(gate
                    .change_keys(&caller, &stated, &jurisdiction, change)
                    .await?)
            })
            .await?;
        Ok(Response::new(changed.into()))
    }
}

fn jurisdiction(code: &str) -> Result<Jurisdiction, Status> {
    Jurisdiction::new(code).map_err(|error| Status::invalid_argument(error.to_string()))
}

fn stated(purpose: &str, ticket: &str) -> Result<StatedPurpose, Status> {
    StatedPurpose::new(purpose, ticket).map_err(|error| Status::invalid_argument(error.to_string()))
}

fn version(value: u32, name: &str) -> Result<KeyVersion, Status> {
    KeyVersion::new(value).ok_or_else(|| {
        Status::invalid_argument(format!("`{name}` must be a key version (1 or more)"))
    })
}

#[tonic::async_trait]
impl pb::key_admin_server::KeyAdmin for KeyAdminService {
    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        self.change(request, |m| {
            Ok((
                jurisdiction(&m.jurisdiction)?,
                KeyChange::Rotate,
                stated(&m.purpose, &m.ticket)?,
            ))
        })
        .await
    }

    async fn retire_keys(
        &self,
        request: Request<pb::RetireKeysRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        self.change(request, |m| {
            Ok((
                jurisdiction(&m.jurisdiction)?,
                KeyChange::Retire {
                    below: version(m.below, "below")?,
                },
                stated(&m.purpose, &m.ticket)?,
            ))
        })
        .await
    }

    async fn unretire_keys(
        &self,
        request: Request<pb::UnretireKeysRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        self.change(request, |m| {
            Ok((
                jurisdiction(&m.jurisdiction)?,
                KeyChange::Unretire {
                    from: version(m.from, "from")?,
                },
                stated(&m.purpose, &m.ticket)?,
            ))
        })
        .await
    }

    async fn destroy_keys(
        &self,
        request: Request<pb::DestroyKeysRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        self.change(request, |m| {
            Ok((
                jurisdiction(&m.jurisdiction)?,
                KeyChange::Destroy {
                    below: version(m.below, "below")?,
                },
                stated(&m.purpose, &m.ticket)?,
            ))
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.into_inner();
        let wanted = if message.jurisdiction.is_empty() {
            None
        } else {
            Some(jurisdiction(&message.jurisdiction)?)
        };
        let stated = stated(&message.purpose, &message.ticket)?;
        let gate = Arc::clone(&self.gate);
        let listing = self
            .run(async move { Ok(gate.list_keys(&caller, &stated, wanted.as_ref()).await?) })
            .await?;
        Ok(Response::new(listing.into()))
    }

    async fn shred_subject(
        &self,
        request: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::ShredSubjectResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.into_inner();
        let subject = SubjectId::new(&message.subject_id)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let wanted = if message.jurisdictions.is_empty() {
            None
        } else {
            Some(
                message
                    .jurisdictions
                    .iter()
                    .map(|code| jurisdiction(code))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let stated = stated(&message.purpose, &message.ticket)?;
        let gate = Arc::clone(&self.gate);
        let shredded = self
            .run(async move {
                Ok(gate
                    .shred_subject(&caller, &stated, &subject, wanted)
                    .await?)
            })
            .await?;
        Ok(Response::new(shredded.into()))
    }
}

impl From<SubjectShredded> for pb::ShredSubjectResponse {
    fn from(shredded: SubjectShredded) -> Self {
        Self {
            jurisdictions: shredded
                .outcomes
                .iter()
                .map(|outcome| pb::SubjectShred {
                    jurisdiction: outcome.jurisdiction().as_str().to_owned(),
                    outcome: outcome.as_str().to_owned(),
                })
                .collect(),
            request_id: shredded.request_id,
            policy_set: shredded.policy_set,
        }
    }
}

impl From<&KeyEvent> for pb::KeyEvent {
    fn from(event: &KeyEvent) -> Self {
        Self {
            operation: event.operation.to_owned(),
            jurisdiction: event.jurisdiction.as_str().to_owned(),
            version: event.version.get(),
            key_id: event.key_id.to_string(),
            generation: event.generation,
        }
    }
}

impl From<KeyInfo> for pb::KeyRing {
    fn from(info: KeyInfo) -> Self {
        Self {
            jurisdiction: info.jurisdiction,
            generation: info.generation,
            current: info.current,
            min_decryption_version: info.min_decryption_version,
            versions: info
                .versions
                .into_iter()
                .map(|version| pb::KeyVersion {
                    version: version.version,
                    key_id: version.key_id,
                    created_at: version.created_at,
                    state: match version.state {
                        VersionState::Active => pb::key_version::State::Active,
                        VersionState::DecryptOnly => pb::key_version::State::DecryptOnly,
                        VersionState::Retired => pb::key_version::State::Retired,
                        VersionState::Destroyed => pb::key_version::State::Destroyed,
                    }
                    .into(),
                    destroyed_at: version.destroyed_at.unwrap_or_default(),
                })
                .collect(),
        }
    }
}

impl From<KeyChanged> for pb::KeyChangeResponse {
    fn from(changed: KeyChanged) -> Self {
        Self {
            events: changed.events.iter().map(Into::into).collect(),
            key_ring: changed.key_ring.map(Into::into),
            request_id: changed.request_id,
            policy_set: changed.policy_set,
        }
    }
}

impl From<KeyListing> for pb::ListKeysResponse {
    fn from(listing: KeyListing) -> Self {
        Self {
            key_rings: listing.key_rings.into_iter().map(Into::into).collect(),
            request_id: listing.request_id,
            policy_set: listing.policy_set,
        }
    }
}
