//! gRPC handlers of `ringfence.v1.Ringfence`: proto -> domain via `TryFrom`, call the
//! [`Gatekeeper`], map back. Owns every tonic and prost type; holds no logic of its own.
//! The only `From<Error> for tonic::Status` lives here: callers get a precise code and
//! an actionable message, internals go to the server log.

mod convert;

use std::sync::Arc;

use futures_util::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::gatekeeper::{self, Gatekeeper};
use crate::identity::{self, Caller};
use crate::keys;
use crate::pb;
use crate::policy;
use crate::tls::PeerInfo;

/// Records of one `DecryptRecords` stream processed concurrently (answers stay in order).
const STREAM_CONCURRENCY: usize = 32;
/// Records of all `DecryptRecords` streams together in progress at once: bounds the
/// memory and CPU that bulk jobs can hold, whatever the number of streams.
const STREAM_RECORDS_IN_FLIGHT: usize = 128;

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
            error @ E::EncryptDenied { .. } => {
                let message = match &error {
                    E::EncryptDenied { policy_ids, .. } if !policy_ids.is_empty() => {
                        format!("{error} (policies: {})", policy_ids.join(", "))
                    }
                    _ => error.to_string(),
                };
                Status::permission_denied(message)
            }
            error @ (E::Policy(_) | E::Keys(_) | E::Crypto(_)) => {
                tracing::error!(%error, "internal error");
                Status::internal("internal error; the server log has details")
            }
        }
    }
}

/// The outcome of authenticating one request, put into its extensions by
/// [`authenticate`]; handlers log failures before refusing.
#[derive(Debug, Clone)]
pub struct Authentication(pub Result<Caller, identity::Error>);

/// Authenticates each request from its connection's proven identity and its metadata,
/// and puts the outcome into its extensions. Never refuses by itself: the handler
/// records a failure in the decision log first.
pub fn authenticate(
    mode: &identity::Mode,
    mut request: Request<()>,
) -> Result<Request<()>, Status> {
    let outcome = identity::authenticate(mode, request.extensions().get::<PeerInfo>(), |name| {
        request
            .metadata()
            .get_all(name)
            .iter()
            .map(|value| value.to_str().ok())
            .collect()
    });
    request.extensions_mut().insert(Authentication(outcome));
    Ok(request)
}

/// The `ringfence.v1.Ringfence` service.
#[derive(Debug, Clone)]
pub struct RingfenceService {
    gate: Arc<Gatekeeper>,
    stream_permits: Arc<tokio::sync::Semaphore>,
}

impl RingfenceService {
    /// The authenticated caller, or UNAUTHENTICATED after the failure is logged.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let error = match request.extensions().get::<Authentication>() {
            Some(Authentication(Ok(caller))) => return Ok(caller.clone()),
            Some(Authentication(Err(error))) => error.to_string(),
            None => "request is not authenticated".to_owned(),
        };
        let peer = request.extensions().get::<PeerInfo>();
        let remote = peer.and_then(|peer| peer.remote);
        let service = peer
            .and_then(|peer| peer.service.as_ref())
            .and_then(|service| service.as_ref().ok())
            .map(String::as_str);
        if let Err(log_error) = self
            .gate
            .record_authentication_failure(&error, remote, service)
            .await
        {
            tracing::error!(%log_error, "authentication failure not logged");
        }
        Err(Status::unauthenticated(error))
    }
}

impl RingfenceService {
    /// Serves `gate`.
    pub fn new(gate: Arc<Gatekeeper>) -> Self {
        Self {
            gate,
            stream_permits: Arc::new(tokio::sync::Semaphore::new(STREAM_RECORDS_IN_FLIGHT)),
        }
    }
}

async fn decrypt_one(
    gate: &Gatekeeper,
    caller: &Caller,
    message: pb::DecryptRecordRequest,
) -> Result<pb::DecryptRecordResponse, Status> {
    let request = gatekeeper::DecryptRequest::try_from(message)?;
    let decrypted = gate.decrypt_record(caller, request).await?;
    Ok(decrypted.into())
}

#[tonic::async_trait]
impl pb::ringfence_server::Ringfence for RingfenceService {
    async fn encrypt_record(
        &self,
        request: Request<pb::EncryptRecordRequest>,
    ) -> Result<Response<pb::EncryptRecordResponse>, Status> {
        let caller = self.caller(&request).await?;
        let plain = gatekeeper::PlainRecord::try_from(request.into_inner())?;
        let encrypted = self.gate.encrypt_record(&caller, plain).await?;
        Ok(Response::new(encrypted.into()))
    }

    async fn decrypt_record(
        &self,
        request: Request<pb::DecryptRecordRequest>,
    ) -> Result<Response<pb::DecryptRecordResponse>, Status> {
        let caller = self.caller(&request).await?;
        let response = decrypt_one(&self.gate, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ask = gatekeeper::AuthorizeRequest::try_from(request.into_inner())?;
        let authorized = self.gate.authorize(&caller, ask).await?;
        Ok(Response::new(authorized.into()))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.caller(&request).await?;
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
        }))
    }

    type DecryptRecordsStream = ReceiverStream<Result<pb::DecryptRecordResponse, Status>>;

    async fn decrypt_records(
        &self,
        request: Request<Streaming<pb::DecryptRecordRequest>>,
    ) -> Result<Response<Self::DecryptRecordsStream>, Status> {
        let caller = Arc::new(self.caller(&request).await?);
        let inbound = request.into_inner();
        let gate = Arc::clone(&self.gate);
        let permits = Arc::clone(&self.stream_permits);
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_CONCURRENCY);
        tokio::spawn(async move {
            let mut answers = inbound
                .enumerate()
                .map(|(index, message)| {
                    let gate = Arc::clone(&gate);
                    let caller = Arc::clone(&caller);
                    let permits = Arc::clone(&permits);
                    async move {
                        let Ok(_permit) = permits.acquire_owned().await else {
                            return Err(Status::unavailable("server is shutting down"));
                        };
                        let answer = match message {
                            Ok(message) => decrypt_one(&gate, &caller, message).await,
                            Err(status) => Err(status),
                        };
                        answer.map_err(|status| {
                            Status::new(
                                status.code(),
                                format!("record {index}: {}", status.message()),
                            )
                        })
                    }
                })
                .buffered(STREAM_CONCURRENCY);
            while let Some(answer) = answers.next().await {
                let failed = answer.is_err();
                // Stop on the first error, or when the client went away.
                if sender.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
