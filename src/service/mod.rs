//! gRPC handlers of `ringfence.v1.Ringfence`: proto -> domain via `TryFrom`, call the
//! [`Gatekeeper`], map back. Owns every tonic and prost type; holds no logic of its own.
//! The only `From<Error> for tonic::Status` lives here: callers get a precise code and
//! an actionable message, internals go to the server log.

mod admin;
mod admission;
mod convert;
mod follow_ups;
mod stream;

pub use admin::KeyAdminService;
pub use admission::{Admission, Admitted};
pub use follow_ups::FollowUps;
pub use stream::{Bulk, CALLER_RECORDS_IN_FLIGHT, Decrypts, DeliveryStream, Rewraps};

use admission::caller;
use follow_ups::{Pending, undelivered};

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use crate::gatekeeper::{self, Gatekeeper};
use crate::identity::Caller;
use crate::keys;
use crate::pb;
use crate::policy;

/// Unary calls whose work runs at once, cancelled ones included.
pub const UNARY_IN_PROGRESS: usize = 1024;
/// Key administration calls whose work runs at once, cancelled ones included.
pub const KEY_ADMIN_IN_PROGRESS: usize = 16;
/// Why a streamed answer was not delivered: the stream ended before the transport took it.
const STREAM_CLOSED: &str = "stream closed before the answer was sent";

impl From<gatekeeper::Error> for Status {
    fn from(error: gatekeeper::Error) -> Self {
        use gatekeeper::Error as E;
        match error {
            E::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            E::Policy(
                error @ (policy::Error::UnknownPrincipal(_) | policy::Error::UnknownService(_)),
            ) => Status::unauthenticated(error.to_string()),
            E::Policy(
                error @ (policy::Error::UnknownRecordType(_)
                | policy::Error::UnknownField { .. }
                | policy::Error::UnknownJurisdiction(_)),
            ) => Status::invalid_argument(error.to_string()),
            E::Keys(keys::Error::UnknownJurisdiction(jurisdiction)) => Status::invalid_argument(
                format!("jurisdiction `{jurisdiction}` is not configured on this server"),
            ),
            E::Log(error) => {
                tracing::error!(%error, "request refused: decision log unavailable");
                Status::unavailable(
                    "the decision log cannot record this request, so nothing was encrypted or decrypted; retry later",
                )
            }
            E::Policy(error @ policy::Error::NotAnEmployee(_)) => {
                Status::permission_denied(error.to_string())
            }
            E::Policy(error @ policy::Error::Undeclared(_)) => {
                Status::failed_precondition(error.to_string())
            }
            error @ E::AdminDenied { .. } => {
                let message = match &error {
                    E::AdminDenied { policy_ids, .. } if !policy_ids.is_empty() => {
                        format!("{error} (policies: {})", policy_ids.join(", "))
                    }
                    _ => format!("{error}: no policy permits it"),
                };
                Status::permission_denied(message)
            }
            E::KeyChangeRefused(
                error @ (keys::Error::UnknownJurisdiction(_) | keys::Error::UnknownKeyVersion(..)),
            ) => Status::invalid_argument(error.to_string()),
            E::KeyChangeRefused(error) => Status::failed_precondition(error.to_string()),
            E::KeyAdmin(crate::keyadmin::Error::Busy(why)) => {
                tracing::warn!(%why, "key change refused: busy");
                Status::unavailable(
                    "another key change holds the keyring; nothing was changed: retry later",
                )
            }
            E::KeyAdmin(error @ crate::keyadmin::Error::Disabled(_)) => {
                Status::failed_precondition(error.to_string())
            }
            E::KeyAdmin(error) => {
                tracing::error!(%error, "key change failed");
                Status::internal(
                    "the key change failed; the decision log and the server log say what happened",
                )
            }
            E::Credentials(error) => Status::unauthenticated(error.to_string()),
            error @ E::EncryptDenied { .. } => {
                let message = match &error {
                    E::EncryptDenied { policy_ids, .. } if !policy_ids.is_empty() => {
                        format!("{error} (policies: {})", policy_ids.join(", "))
                    }
                    _ => error.to_string(),
                };
                Status::permission_denied(message)
            }
            E::Subjects(error @ crate::subjects::Error::Shredded { .. }) => {
                Status::failed_precondition(error.to_string())
            }
            E::Subjects(error @ crate::subjects::Error::Store(_)) => {
                tracing::error!(%error, "request refused: subject store unavailable");
                Status::unavailable(
                    "the subject store cannot serve this request, so nothing was encrypted or decrypted; retry later",
                )
            }
            error @ (E::Policy(_) | E::Keys(_) | E::Crypto(_) | E::Subjects(_)) => {
                tracing::error!(%error, "internal error");
                Status::internal("internal error; the server log has details")
            }
        }
    }
}

/// The `ringfence.v1.Ringfence` service.
#[derive(Debug, Clone)]
pub struct RingfenceService {
    gate: Arc<Gatekeeper>,
    /// Unary calls in progress, cancelled ones included (their work goes on).
    unary: Arc<tokio::sync::Semaphore>,
    max_message_bytes: usize,
    follow_ups: FollowUps,
    streams: Arc<stream::Slots>,
    stream_limits: crate::config::StreamLimits,
    /// `KeyAdmin` calls in progress (that service's own limit).
    key_admin_calls: Arc<tokio::sync::Semaphore>,
}

impl RingfenceService {
    /// Serves `gate`; answers larger than `max_message_bytes` are not sent (the
    /// transport's encoding limit) and are logged as undelivered.
    pub fn new(gate: Arc<Gatekeeper>, max_message_bytes: usize) -> Self {
        Self {
            gate,
            unary: Arc::new(tokio::sync::Semaphore::new(UNARY_IN_PROGRESS)),
            max_message_bytes,
            follow_ups: FollowUps::default(),
            streams: Arc::new(stream::Slots::new()),
            stream_limits: crate::config::StreamLimits::default(),
            key_admin_calls: Arc::new(tokio::sync::Semaphore::new(KEY_ADMIN_IN_PROGRESS)),
        }
    }

    /// What this service's bounded resources hold now (for metrics; `handshakes` is
    /// the listener's and left at 0).
    pub fn usage(&self) -> crate::metrics::Slots {
        let (streams, stream_records) = self.streams.usage();
        crate::metrics::Slots {
            unary_calls: UNARY_IN_PROGRESS.saturating_sub(self.unary.available_permits()),
            key_admin_calls: KEY_ADMIN_IN_PROGRESS
                .saturating_sub(self.key_admin_calls.available_permits()),
            streams,
            stream_records,
            handshakes: 0,
        }
    }

    /// With these limits on `DecryptRecords` streams.
    pub fn with_stream_limits(mut self, limits: crate::config::StreamLimits) -> Self {
        self.stream_limits = limits;
        self
    }

    /// The `ringfence.v1.KeyAdmin` service of the same gatekeeper, sharing this
    /// service's follow-up tracking (shutdown waits for key changes in progress) with
    /// a limit of its own on calls in progress ([`KEY_ADMIN_IN_PROGRESS`]), so that
    /// neither service can crowd out the other.
    pub fn key_admin(&self) -> KeyAdminService {
        KeyAdminService::new(
            Arc::clone(&self.gate),
            Arc::clone(&self.key_admin_calls),
            self.follow_ups.clone(),
        )
    }

    /// The work this service leaves running after a call returns (answers of calls
    /// that went away, their `undelivered` entries): the server drains it before it
    /// closes the decision log.
    pub fn follow_ups(&self) -> FollowUps {
        self.follow_ups.clone()
    }

    /// Serves one unary call: `work` decides, logs and makes the answer (with its
    /// receipt) in a task of its own ([`RingfenceService::pending`]); an answer over
    /// the message limit is refused and logged as undelivered.
    async fn unary<M, T, Work>(
        &self,
        request: Request<M>,
        work: impl FnOnce(Arc<Gatekeeper>, Caller, M) -> Work,
    ) -> Result<Response<T>, Status>
    where
        T: prost::Message + Send + 'static,
        Work:
            std::future::Future<Output = Result<(T, gatekeeper::Receipt), Status>> + Send + 'static,
    {
        let caller = caller(&request)?;
        let gate = Arc::clone(&self.gate);
        let max_message_bytes = self.max_message_bytes;
        // On the heap at once: the decision's future is large, and moved into the task
        // it would be copied at every step (a profile showed 4% of the server's CPU in
        // those copies).
        let answer = Box::pin(work(
            Arc::clone(&gate),
            caller.clone(),
            request.into_inner(),
        ));
        let task_caller = caller.clone();
        let mut pending = self.pending(caller, async move {
            let answer = answer.await?;
            within_limit(&gate, &task_caller, answer, max_message_bytes).await
        })?;
        Ok(Response::new(pending.wait().await?))
    }

    /// Runs `work` (which logs decisions and makes an answer) in its own task, so that
    /// a cancelled call cannot stop it between logging and answering. At most
    /// [`UNARY_IN_PROGRESS`] run at once, cancelled ones included: beyond,
    /// `RESOURCE_EXHAUSTED`, so that calls cancelled at once cannot pile up work.
    fn pending<T: Send + 'static>(
        &self,
        caller: Caller,
        work: impl std::future::Future<Output = Result<(T, gatekeeper::Receipt), Status>>
        + Send
        + 'static,
    ) -> Result<Pending<T>, Status> {
        let permit = Arc::clone(&self.unary).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the server is busy ({UNARY_IN_PROGRESS} calls in progress); retry with backoff"
            ))
        })?;
        Ok(Pending {
            task: self.follow_ups.spawn(async move {
                let _permit = permit;
                work.await
            }),
            follow_ups: self.follow_ups.clone(),
            gate: Arc::clone(&self.gate),
            caller,
        })
    }
}

impl RingfenceService {
    /// Serves one bulk stream of `B`.
    fn bulk<B: Bulk>(
        &self,
        request: Request<Streaming<B::Request>>,
    ) -> Result<Response<DeliveryStream<B>>, Status>
    where
        B::Request: Default,
    {
        let caller = caller(&request)?;
        let context = stream::Context {
            gate: Arc::clone(&self.gate),
            slots: Arc::clone(&self.streams),
            follow_ups: self.follow_ups.clone(),
            limits: self.stream_limits,
            max_message_bytes: self.max_message_bytes,
        };
        stream::serve::<B>(context, caller, request.into_inner()).map(Response::new)
    }
}

/// Decides, logs and decrypts one record; the answer comes with its receipt, taken
/// before the plaintext moves into the response.
async fn decrypt_one(
    gate: &Gatekeeper,
    caller: &Caller,
    message: pb::DecryptRecordRequest,
) -> Result<(pb::DecryptRecordResponse, gatekeeper::Receipt), Status> {
    let request = gatekeeper::DecryptRequest::try_from(message)?;
    let decrypted = gate.decrypt_record(caller, request).await?;
    let receipt = decrypted.receipt();
    Ok((decrypted.into(), receipt))
}

/// Decides, logs and rewraps one record: ciphertext only, so its receipt names no
/// plaintext field.
async fn rewrap_one(
    gate: &Gatekeeper,
    caller: &Caller,
    message: pb::RewrapRecordRequest,
) -> Result<(pb::RewrapRecordResponse, gatekeeper::Receipt), Status> {
    let request = gatekeeper::RewrapRequest::try_from(message)?;
    let rewrapped = gate.rewrap_record(caller, request).await?;
    let receipt = rewrapped.receipt();
    Ok((rewrapped.into(), receipt))
}

/// Refuses an answer the transport would refuse to encode, after logging that it
/// was not delivered.
async fn refuse_oversized(
    gate: &Gatekeeper,
    caller: &Caller,
    response: &impl prost::Message,
    receipt: &gatekeeper::Receipt,
    max_message_bytes: usize,
) -> Result<(), Status> {
    let size = response.encoded_len();
    if size <= max_message_bytes {
        return Ok(());
    }
    undelivered(gate, caller, receipt, "answer over the message size limit").await;
    Err(Status::out_of_range(format!(
        "the answer ({size} bytes) is larger than the server's message limit ({max_message_bytes} bytes): send fewer or smaller fields per request"
    )))
}

/// [`refuse_oversized`] for an answer with its receipt.
async fn within_limit<T: prost::Message>(
    gate: &Gatekeeper,
    caller: &Caller,
    (response, receipt): (T, gatekeeper::Receipt),
    max_message_bytes: usize,
) -> Result<(T, gatekeeper::Receipt), Status> {
    refuse_oversized(gate, caller, &response, &receipt, max_message_bytes).await?;
    Ok((response, receipt))
}

#[tonic::async_trait]
impl pb::ringfence_server::Ringfence for RingfenceService {
    async fn encrypt_record(
        &self,
        request: Request<pb::EncryptRecordRequest>,
    ) -> Result<Response<pb::EncryptRecordResponse>, Status> {
        self.unary(request, |gate, caller, message| async move {
            let plain = gatekeeper::PlainRecord::try_from(message)?;
            let encrypted = gate.encrypt_record(&caller, plain).await?;
            let receipt = encrypted.receipt();
            Ok((encrypted.into(), receipt))
        })
        .await
    }

    async fn decrypt_record(
        &self,
        request: Request<pb::DecryptRecordRequest>,
    ) -> Result<Response<pb::DecryptRecordResponse>, Status> {
        self.unary(request, |gate, caller, message| async move {
            decrypt_one(&gate, &caller, message).await
        })
        .await
    }

    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        self.unary(request, |gate, caller, message| async move {
            let ask = gatekeeper::AuthorizeRequest::try_from(message)?;
            let authorized = gate.authorize(&caller, ask).await?;
            let receipt = authorized.receipt();
            Ok((authorized.into(), receipt))
        })
        .await
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        caller(&request)?;
        let status = self.gate.policies().status();
        let last = status.last;
        let (succeeded, policy_set, diagnostics) = match last.result {
            Ok(hash) => (true, hash, Vec::new()),
            Err(diagnostics) => (false, String::new(), diagnostics),
        };
        Ok(Response::new(pb::GetStatusResponse {
            policy_set: status.policy_set,
            policy_set_loaded_at: status.loaded_at,
            reloads_succeeded: status.reloads_succeeded,
            reloads_failed: status.reloads_failed,
            last_reload: Some(pb::PolicyReload {
                at: last.at,
                succeeded,
                policy_set,
                diagnostics,
                trigger: last.trigger.as_str().to_owned(),
            }),
            decision_log_healthy: self.gate.log().is_healthy(),
            decision_log_problem: self.gate.log().problem().unwrap_or_default(),
            decision_log_failed_commits: self.gate.log().failed_commits(),
            last_proof: self
                .gate
                .policies()
                .last_proof()
                .map(|proof| pb::PolicyProof {
                    mode: proof.mode.as_str().to_owned(),
                    policy_set: proof.policy_set,
                    verdict: proof.verdict.to_owned(),
                    invariants: u32::try_from(proof.invariants).unwrap_or(u32::MAX),
                    proved: u32::try_from(proof.proved).unwrap_or(u32::MAX),
                    problems: proof.problems,
                    took_ms: proof.took_ms,
                    at: proof.at,
                    cached: proof.cached,
                    refused: proof.refused,
                }),
            reloads_refused_by_proof: status.reloads_refused_by_proof,
        }))
    }

    type DecryptRecordsStream = DeliveryStream<Decrypts>;

    async fn decrypt_records(
        &self,
        request: Request<Streaming<pb::DecryptRecordRequest>>,
    ) -> Result<Response<Self::DecryptRecordsStream>, Status> {
        self.bulk(request)
    }

    async fn rewrap_record(
        &self,
        request: Request<pb::RewrapRecordRequest>,
    ) -> Result<Response<pb::RewrapRecordResponse>, Status> {
        self.unary(request, |gate, caller, message| async move {
            rewrap_one(&gate, &caller, message).await
        })
        .await
    }

    type RewrapRecordsStream = DeliveryStream<Rewraps>;

    async fn rewrap_records(
        &self,
        request: Request<Streaming<pb::RewrapRecordRequest>>,
    ) -> Result<Response<Self::RewrapRecordsStream>, Status> {
        self.bulk(request)
    }
}

#[cfg(test)]
mod tests;
