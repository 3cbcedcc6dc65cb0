//! gRPC handlers of `ringfence.v1.Ringfence`: proto -> domain via `TryFrom`, call the
//! [`Gatekeeper`], map back. Owns every tonic and prost type; holds no logic of its own.
//! The only `From<Error> for tonic::Status` lives here: callers get a precise code and
//! an actionable message, internals go to the server log.

mod convert;

use std::sync::Arc;

use futures_util::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use crate::gatekeeper::{self, Gatekeeper};
use crate::identity::{self, Caller};
use crate::keys;
use crate::pb;
use crate::policy;
use crate::tls::PeerInfo;

/// Records of one `DecryptRecords` stream processed concurrently (answers stay in order).
const STREAM_CONCURRENCY: usize = 32;
/// Why a streamed answer was not delivered: the stream ended before the transport took it.
const STREAM_CLOSED: &str = "stream closed before the answer was sent";
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
    max_message_bytes: usize,
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
    /// Serves `gate`; answers larger than `max_message_bytes` are not sent (the
    /// transport's encoding limit) and are logged as undelivered.
    pub fn new(gate: Arc<Gatekeeper>, max_message_bytes: usize) -> Self {
        Self {
            gate,
            stream_permits: Arc::new(tokio::sync::Semaphore::new(STREAM_RECORDS_IN_FLIGHT)),
            max_message_bytes,
        }
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

/// Writes the follow-up entry of a logged answer that did not reach the transport.
async fn undelivered(
    gate: &Gatekeeper,
    caller: &Caller,
    receipt: &gatekeeper::Receipt,
    reason: &str,
) {
    if let Err(error) = gate.record_undelivered(caller, receipt, reason).await {
        tracing::error!(%error, request_id = receipt.request_id, reason, "undelivered answer not logged");
    }
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

/// [`refuse_oversized`] for a decryption's answer.
async fn within_limit(
    gate: &Gatekeeper,
    caller: &Caller,
    (response, receipt): (pb::DecryptRecordResponse, gatekeeper::Receipt),
    max_message_bytes: usize,
) -> Result<(pb::DecryptRecordResponse, gatekeeper::Receipt), Status> {
    refuse_oversized(gate, caller, &response, &receipt, max_message_bytes).await?;
    Ok((response, receipt))
}

/// A unary decryption running in its own task, so that a cancelled call cannot stop
/// it between logging and answering; if the call goes away first, the answer is
/// logged as undelivered when it is ready.
struct Pending {
    task: Option<
        tokio::task::JoinHandle<Result<(pb::DecryptRecordResponse, gatekeeper::Receipt), Status>>,
    >,
    gate: Arc<Gatekeeper>,
    caller: Caller,
}

impl Pending {
    async fn wait(&mut self) -> Result<(pb::DecryptRecordResponse, gatekeeper::Receipt), Status> {
        let Some(task) = self.task.as_mut() else {
            return Err(Status::internal(
                "internal error; the server log has details",
            ));
        };
        let result = task.await;
        self.task = None;
        result.map_err(|error| {
            tracing::error!(%error, "decryption task failed");
            Status::internal("internal error; the server log has details")
        })?
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            let gate = Arc::clone(&self.gate);
            let caller = self.caller.clone();
            spawn_from_drop(async move {
                if let Ok(Ok((_, receipt))) = task.await {
                    undelivered(&gate, &caller, &receipt, "call cancelled by the client").await;
                }
            });
        }
    }
}

/// Spawns follow-up work from a `Drop`, which may run outside the runtime (when it is
/// shutting down): never a panic, a server log line instead.
fn spawn_from_drop(work: impl std::future::Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work);
        }
        Err(_) => tracing::error!(
            "an undelivered answer could not be logged: no runtime (server shutting down)"
        ),
    }
}

/// One answer of a bulk stream on its way to the transport, with the receipt that
/// is logged as undelivered if the stream ends before the transport takes it.
type Delivery = (
    Result<pb::DecryptRecordResponse, Status>,
    Option<gatekeeper::Receipt>,
);

/// The response stream of `DecryptRecords`: an answer counts as delivered when the
/// transport takes it from here; answers still queued when the transport drops the
/// stream (the client went away) get an `undelivered` entry.
pub struct DeliveryStream {
    receiver: tokio::sync::mpsc::Receiver<Delivery>,
    gate: Arc<Gatekeeper>,
    caller: Arc<Caller>,
}

impl futures_util::Stream for DeliveryStream {
    type Item = Result<pb::DecryptRecordResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.receiver
            .poll_recv(context)
            .map(|delivery| delivery.map(|(answer, _)| answer))
    }
}

impl Drop for DeliveryStream {
    fn drop(&mut self) {
        // Every answer still queued, or being queued by a producer that already holds
        // a slot, is received until the channel reports its end: none is lost unlogged.
        let (_, closed) = tokio::sync::mpsc::channel(1);
        let mut receiver = std::mem::replace(&mut self.receiver, closed);
        receiver.close();
        let gate = Arc::clone(&self.gate);
        let caller = Arc::clone(&self.caller);
        spawn_from_drop(async move {
            while let Some((_, receipt)) = receiver.recv().await {
                if let Some(receipt) = receipt {
                    undelivered(&gate, &caller, &receipt, STREAM_CLOSED).await;
                }
            }
        });
    }
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
        let receipt = encrypted.receipt();
        let response: pb::EncryptRecordResponse = encrypted.into();
        refuse_oversized(
            &self.gate,
            &caller,
            &response,
            &receipt,
            self.max_message_bytes,
        )
        .await?;
        Ok(Response::new(response))
    }

    async fn decrypt_record(
        &self,
        request: Request<pb::DecryptRecordRequest>,
    ) -> Result<Response<pb::DecryptRecordResponse>, Status> {
        let caller = self.caller(&request).await?;
        let gate = Arc::clone(&self.gate);
        let task_caller = caller.clone();
        let message = request.into_inner();
        let max_message_bytes = self.max_message_bytes;
        let mut pending = Pending {
            task: Some(tokio::spawn(async move {
                let answer = decrypt_one(&gate, &task_caller, message).await?;
                within_limit(&gate, &task_caller, answer, max_message_bytes).await
            })),
            gate: Arc::clone(&self.gate),
            caller,
        };
        let (response, _) = pending.wait().await?;
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

    type DecryptRecordsStream = DeliveryStream;

    async fn decrypt_records(
        &self,
        request: Request<Streaming<pb::DecryptRecordRequest>>,
    ) -> Result<Response<Self::DecryptRecordsStream>, Status> {
        let caller = Arc::new(self.caller(&request).await?);
        let inbound = request.into_inner();
        let gate = Arc::clone(&self.gate);
        let permits = Arc::clone(&self.stream_permits);
        let max_message_bytes = self.max_message_bytes;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Delivery>(STREAM_CONCURRENCY);
        let stream = DeliveryStream {
            receiver,
            gate: Arc::clone(&gate),
            caller: Arc::clone(&caller),
        };
        tokio::spawn(async move {
            let mut answers = inbound
                .enumerate()
                .map(|(index, message)| {
                    let gate = Arc::clone(&gate);
                    let caller = Arc::clone(&caller);
                    let permits = Arc::clone(&permits);
                    // Each record runs in its own task: its permit of the shared pool
                    // goes back when the record is answered, not when a slow reader
                    // takes the answer, so one stalled stream cannot hold the pool.
                    let task = tokio::spawn(async move {
                        let Ok(_permit) = permits.acquire_owned().await else {
                            return Err(Status::unavailable("server is shutting down"));
                        };
                        let message = message?;
                        let answer = match decrypt_one(&gate, &caller, message).await {
                            Ok((mut response, receipt)) => {
                                // The index is part of what the transport encodes.
                                response.index = index as u64;
                                within_limit(&gate, &caller, (response, receipt), max_message_bytes)
                                    .await
                            }
                            Err(status) => Err(status),
                        };
                        // A record that cannot be answered gets its own status; the
                        // stream goes on.
                        Ok(match answer {
                            Ok((response, receipt)) => (response, Some(receipt)),
                            Err(status) => (
                                pb::DecryptRecordResponse {
                                    index: index as u64,
                                    status: Some(pb::RecordStatus {
                                        code: status.code() as u32,
                                        message: format!("record {index}: {}", status.message()),
                                    }),
                                    ..pb::DecryptRecordResponse::default()
                                },
                                None,
                            ),
                        })
                    });
                    async move {
                        task.await.unwrap_or_else(|error| {
                            tracing::error!(%error, "record task failed");
                            Err(Status::internal(
                                "internal error; the server log has details",
                            ))
                        })
                    }
                })
                .buffered(STREAM_CONCURRENCY);
            // Every answer is drained, also after the stream ended: an answer whose
            // decisions are logged is either handed on or logged as undelivered.
            let mut open = true;
            while let Some(answer) = answers.next().await {
                match answer {
                    Ok((response, receipt)) if open => {
                        if let Err(returned) = sender.send((Ok(response), receipt)).await {
                            open = false;
                            if let (_, Some(receipt)) = returned.0 {
                                undelivered(&gate, &caller, &receipt, STREAM_CLOSED).await;
                            }
                        }
                    }
                    Ok((_, Some(receipt))) => {
                        undelivered(&gate, &caller, &receipt, STREAM_CLOSED).await;
                    }
                    Ok((_, None)) => {}
                    // The request stream itself broke (undecodable or oversized
                    // message): nothing more can be read, the stream ends with it.
                    Err(status) if open => {
                        open = false;
                        let _ = sender.send((Err(status), None)).await;
                    }
                    Err(_) => {}
                }
            }
        });
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_call_logs_its_answer_as_undelivered_once_it_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keys::Keyring::create_unlogged(
            &dir.path().join("keyring.json"),
            &keys::LocalMasterKey::generate().unwrap(),
            &[crate::Jurisdiction::new("US").unwrap()],
        )
        .unwrap();
        let policies = Arc::new(
            crate::policy::PolicyStore::load(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
            )
            .unwrap(),
        );
        let (log, _) = crate::audit::DecisionLog::open(&dir.path().join("log")).unwrap();
        let gate = Arc::new(Gatekeeper::new(keyring, policies, log, Default::default()));
        let caller = Caller {
            service: "us-support-tool".to_owned(),
            employee: Some("alice".to_owned()),
            method: "test",
        };
        let receipt = gatekeeper::Receipt {
            action: crate::policy::Action::Decrypt,
            request_id: "r-1".to_owned(),
            record: crate::audit::RecordEntry {
                record_type: "user_profile".to_owned(),
                record_id: "u-1".to_owned(),
                jurisdiction: "US".to_owned(),
            },
            policy_set: "ab".repeat(32),
            plaintext_fields: vec!["email".to_owned()],
        };
        let answer = receipt.clone();
        let pending = Pending {
            task: Some(tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Ok((pb::DecryptRecordResponse::default(), answer))
            })),
            gate: Arc::clone(&gate),
            caller,
        };
        // The call goes away while the answer is being made.
        drop(pending);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let mut lines = Vec::new();
        crate::audit::for_each_entry(&dir.path().join("log"), &Default::default(), |line, _| {
            lines.push(line.to_owned());
            Ok(())
        })
        .unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let entry: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(entry["kind"], "undelivered");
        assert_eq!(entry["request_id"], "r-1");
        assert_eq!(
            entry["outcome"],
            "undelivered: call cancelled by the client"
        );
        assert_eq!(entry["fields"][0]["field"], "email");
        assert_eq!(entry["fields"][0]["classification"], "pii");
    }
}
