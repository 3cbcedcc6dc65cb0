//! gRPC handlers of `ringfence.v1.Ringfence`: proto -> domain via `TryFrom`, call the
//! [`Gatekeeper`], map back. Owns every tonic and prost type; holds no logic of its own.
//! The only `From<Error> for tonic::Status` lives here: callers get a precise code and
//! an actionable message, internals go to the server log.

mod convert;
mod stream;

pub use stream::{CALLER_RECORDS_IN_FLIGHT, DeliveryStream};

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use crate::failures::Source;
use crate::gatekeeper::{self, Gatekeeper};
use crate::identity::tls::PeerInfo;
use crate::identity::{self, Caller};
use crate::keys;
use crate::pb;
use crate::policy;

/// Unary calls whose work runs at once, cancelled ones included.
pub const UNARY_IN_PROGRESS: usize = 1024;
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

/// Admits a request to the `Ringfence` service only with an authenticated caller that
/// the directory knows (service and employee): everything else is refused here, before
/// any handler runs, with `UNAUTHENTICATED`, and the failure goes to the decision log
/// through the per-source limiter ([`crate::failures`]). Admitted requests carry their
/// [`Caller`] in their extensions; handlers take it from there and nowhere else.
#[derive(Debug, Clone)]
pub struct Admission {
    mode: identity::Mode,
    gate: Arc<Gatekeeper>,
}

impl Admission {
    /// Authenticates with `mode` against the directory of `gate`'s policies.
    pub fn new(mode: identity::Mode, gate: Arc<Gatekeeper>) -> Self {
        Self { mode, gate }
    }
}

impl Admission {
    /// The caller of a request with these extensions (the connection's [`PeerInfo`])
    /// and headers, if it is authenticated and in the directory.
    fn admit(
        &self,
        extensions: &tonic::codegen::http::Extensions,
        headers: &tonic::codegen::http::HeaderMap,
    ) -> Result<Caller, Box<Refusal>> {
        let peer = extensions.get::<PeerInfo>();
        let remote = peer.and_then(|peer| peer.remote);
        let proven = peer
            .and_then(|peer| peer.service.as_ref())
            .and_then(|service| service.as_ref().ok());
        let outcome = identity::authenticate(&self.mode, peer, |name| {
            headers
                .get_all(name)
                .iter()
                .map(|value| value.to_str().ok())
                .collect()
        });
        let (reason, source) = match outcome {
            Ok(caller) => {
                let known = self
                    .gate
                    .policies()
                    .current()
                    .check_caller(&caller.principal(), &caller.service);
                match known {
                    Ok(()) => return Ok(caller),
                    Err(error) => (
                        error.to_string(),
                        Source::Caller {
                            service: caller.service,
                            employee: caller.employee,
                        },
                    ),
                }
            }
            Err(error) => {
                let source = match (proven, remote) {
                    (Some(service), _) => Source::Caller {
                        service: service.clone(),
                        employee: None,
                    },
                    (None, Some(remote)) => Source::Address(remote.ip()),
                    (None, None) => Source::Unknown,
                };
                (error.to_string(), source)
            }
        };
        let held_back = self.gate.admit_authentication_failure(&source);
        Err(Box::new(Refusal {
            reason,
            remote,
            source,
            held_back,
            gate: Arc::clone(&self.gate),
        }))
    }
}

/// A request [`Admission`] refused, and whether its failure is to be logged.
struct Refusal {
    reason: String,
    remote: Option<std::net::SocketAddr>,
    source: Source,
    held_back: Option<u64>,
    gate: Arc<Gatekeeper>,
}

impl Refusal {
    /// Logs the failure if the limiter admitted it, then answers `UNAUTHENTICATED`.
    /// The entry is written by a task of its own: a client that resets the call
    /// cannot take it (and the count of failures held back with it) out of the log.
    async fn answer(self) -> Status {
        let Self {
            reason,
            remote,
            source,
            held_back,
            gate,
        } = self;
        if let Some(held_back) = held_back {
            let reason = reason.clone();
            let written = tokio::spawn(async move {
                if let Err(error) = gate
                    .log_authentication_failure(&reason, remote, &source, held_back)
                    .await
                {
                    tracing::error!(%error, "authentication failure not logged");
                }
            });
            let _ = written.await;
        }
        Status::unauthenticated(reason)
    }
}

/// A service behind [`Admission`]: no request reaches it unauthenticated.
#[derive(Debug, Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Admission,
}

impl<S> Admitted<S> {
    /// Puts `inner` behind `admission`.
    pub fn new(inner: S, admission: Admission) -> Self {
        Self { inner, admission }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Admitted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Admitted<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: tonic::codegen::http::Request<B>) -> Self::Future {
        match self
            .admission
            .admit(request.extensions(), request.headers())
        {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(refusal) => Box::pin(async move { Ok(refusal.answer().await.into_http()) }),
        }
    }
}

/// The caller [`Admission`] put into the request.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            tracing::error!("a request reached a handler without admission");
            Status::unauthenticated("request is not authenticated")
        })
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
        }
    }

    /// With these limits on `DecryptRecords` streams.
    pub fn with_stream_limits(mut self, limits: crate::config::StreamLimits) -> Self {
        self.stream_limits = limits;
        self
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
        let answer = work(Arc::clone(&gate), caller.clone(), request.into_inner());
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

/// Counts the tasks a call leaves behind, so that shutdown can wait for them.
#[derive(Debug, Clone, Default)]
pub struct FollowUps(Arc<FollowUpCount>);

#[derive(Debug, Default)]
struct FollowUpCount {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    /// Set when the server shuts down: streams stop reading.
    closing: std::sync::atomic::AtomicBool,
    closed: tokio::sync::Notify,
}

/// One running follow-up; the count goes down when it is dropped (the task ended or
/// the runtime dropped it).
struct Tracked(Arc<FollowUpCount>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self
            .0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl FollowUps {
    /// Spawns `work`, counted until it ends. Never panics, also from a `Drop` outside
    /// the runtime (while it shuts down): a server log line says what was lost.
    fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<T>> {
        self.0
            .running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let tracked = Tracked(Arc::clone(&self.0));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Some(runtime.spawn(async move {
                let _tracked = tracked;
                work.await
            })),
            Err(_) => {
                tracing::error!(
                    "follow-up work (an answer or its undelivered entry) lost: no runtime (server shutting down)"
                );
                None
            }
        }
    }

    /// Tells long-lived work (bulk streams) that the server shuts down: streams
    /// stop reading and end with `UNAVAILABLE` once their answers are handed over.
    pub fn close(&self) {
        self.0
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.closed.notify_waiters();
    }

    /// Resolves once [`FollowUps::close`] was called.
    async fn closing(&self) {
        loop {
            let closed = self.0.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.0.closing.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            closed.await;
        }
    }

    /// Waits until no follow-up runs, or `patience` has passed; returns how many still
    /// run.
    pub async fn drain(&self, patience: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let running = self.0.running.load(std::sync::atomic::Ordering::Acquire);
            if running == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.0.running.load(std::sync::atomic::Ordering::Acquire);
            }
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

/// A unary call's work running in its own task (see [`RingfenceService::pending`]);
/// if the call goes away first, the answer is logged as undelivered when it is ready.
struct Pending<T: Send + 'static> {
    task: Option<tokio::task::JoinHandle<Result<(T, gatekeeper::Receipt), Status>>>,
    follow_ups: FollowUps,
    gate: Arc<Gatekeeper>,
    caller: Caller,
}

impl<T: Send + 'static> Pending<T> {
    async fn wait(&mut self) -> Result<T, Status> {
        let Some(task) = self.task.as_mut() else {
            return Err(Status::unavailable("server is shutting down"));
        };
        let result = task.await;
        self.task = None;
        let (answer, _) = result.map_err(|error| {
            tracing::error!(%error, "request task failed");
            Status::internal("internal error; the server log has details")
        })??;
        Ok(answer)
    }
}

impl<T: Send + 'static> Drop for Pending<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            let gate = Arc::clone(&self.gate);
            let caller = self.caller.clone();
            self.follow_ups.spawn(async move {
                if let Ok(Ok((_, receipt))) = task.await {
                    undelivered(&gate, &caller, &receipt, "call cancelled by the client").await;
                }
            });
        }
    }
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
        }))
    }

    type DecryptRecordsStream = DeliveryStream;

    async fn decrypt_records(
        &self,
        request: Request<Streaming<pb::DecryptRecordRequest>>,
    ) -> Result<Response<Self::DecryptRecordsStream>, Status> {
        let caller = caller(&request)?;
        let context = stream::Context {
            gate: Arc::clone(&self.gate),
            slots: Arc::clone(&self.streams),
            follow_ups: self.follow_ups.clone(),
            limits: self.stream_limits,
            max_message_bytes: self.max_message_bytes,
        };
        stream::serve(context, caller, request.into_inner()).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_gate(dir: &std::path::Path) -> Arc<Gatekeeper> {
        let keyring = keys::Keyring::create_unlogged(
            &dir.join("keyring.json"),
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
        let (log, _) = crate::audit::DecisionLog::open(&dir.join("log")).unwrap();
        Arc::new(Gatekeeper::new(keyring, policies, log, Default::default()))
    }

    fn log_entries(dir: &std::path::Path) -> Vec<serde_json::Value> {
        let mut entries = Vec::new();
        crate::audit::for_each_entry(&dir.join("log"), &Default::default(), |line, _| {
            entries.push(serde_json::from_str(line).unwrap());
            Ok(())
        })
        .unwrap();
        entries
    }

    fn authenticated<T>(message: T, service: &str, employee: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Caller {
            service: service.to_owned(),
            employee: employee.map(str::to_owned),
            method: "test",
            lease: None,
            certificate: None,
        });
        request
    }

    /// Polls the call `make` returns once (far enough to start its work) and drops
    /// it, as a client that cancels does, then waits for what the call left behind.
    /// A loaded machine may finish the call within that one poll (then it was
    /// delivered): it is tried again, up to 20 times.
    async fn cancel<F: std::future::Future>(service: &RingfenceService, make: impl Fn() -> F) {
        let mut cancelled = false;
        for _ in 0..20 {
            let call = make();
            let mut call = std::pin::pin!(call);
            let polled_once =
                std::future::poll_fn(|context| std::task::Poll::Ready(call.as_mut().poll(context)))
                    .await;
            if polled_once.is_pending() {
                cancelled = true;
                break;
            }
        }
        assert!(cancelled, "every call finished within its first poll");
        let still_running = service
            .follow_ups()
            .drain(std::time::Duration::from_secs(10))
            .await;
        assert_eq!(still_running, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_encrypt_and_authorize_calls_are_logged_as_undelivered() {
        use pb::ringfence_server::Ringfence as _;
        let dir = tempfile::tempdir().unwrap();
        let service = RingfenceService::new(test_gate(dir.path()), 1 << 20);
        let encrypt = pb::EncryptRecordRequest {
            record_type: "user_profile".to_owned(),
            record_id: "u-1".to_owned(),
            jurisdiction: "US".to_owned(),
            fields: vec![pb::PlainField {
                name: "email".to_owned(),
                value: b"a@example.com".to_vec(),
            }],
        };
        cancel(&service, || {
            service.encrypt_record(authenticated(encrypt.clone(), "us-signup", None))
        })
        .await;
        let authorize = pb::AuthorizeRequest {
            record_type: "user_profile".to_owned(),
            record_id: "u-1".to_owned(),
            jurisdiction: "US".to_owned(),
            fields: vec!["email".to_owned()],
            purpose: "support".to_owned(),
            ticket: "INC-1".to_owned(),
        };
        cancel(&service, || {
            service.authorize(authenticated(
                authorize.clone(),
                "us-support-tool",
                Some("alice"),
            ))
        })
        .await;
        // Calls that finished within their first poll were delivered: only the last
        // decision of each kind, the cancelled one, has a follow-up.
        let entries = log_entries(dir.path());
        let undelivered: Vec<&serde_json::Value> = entries
            .iter()
            .filter(|e| e["kind"] == "undelivered")
            .collect();
        assert_eq!(undelivered.len(), 2, "{entries:#?}");
        for (kind, follow_up) in ["encrypt", "authorize"].into_iter().zip(undelivered) {
            let decided = entries.iter().rfind(|e| e["kind"] == kind).unwrap();
            assert_eq!(follow_up["request_id"], decided["request_id"]);
            assert_eq!(follow_up["principal"], decided["principal"]);
            assert_eq!(
                follow_up["outcome"],
                "undelivered: call cancelled by the client"
            );
            assert!(
                follow_up["fields"].as_array().is_none_or(Vec::is_empty),
                "nothing was read: {follow_up}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_the_transport_never_takes_from_ends_and_every_answer_is_followed_up() {
        use futures_util::StreamExt as _;
        use pb::ringfence_server::Ringfence as _;
        let dir = tempfile::tempdir().unwrap();
        let gate = test_gate(dir.path());
        let service = RingfenceService::new(Arc::clone(&gate), 1 << 20).with_stream_limits(
            crate::config::StreamLimits {
                max_per_caller: 1,
                send_timeout: std::time::Duration::from_millis(300),
            },
        );
        let encrypt = pb::EncryptRecordRequest {
            record_type: "user_profile".to_owned(),
            record_id: "u-1".to_owned(),
            jurisdiction: "US".to_owned(),
            fields: vec![pb::PlainField {
                name: "email".to_owned(),
                value: b"a@example.com".to_vec(),
            }],
        };
        let record = service
            .encrypt_record(authenticated(encrypt, "us-signup", None))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        let requests = |count: usize| {
            let record = record.clone();
            futures_util::stream::iter((0..count).map(move |_| {
                Ok(pb::DecryptRecordRequest {
                    record: Some(record.clone()),
                    fields: vec!["email".to_owned()],
                    purpose: "support".to_owned(),
                    ticket: "INC-1".to_owned(),
                })
            }))
        };
        let context = || stream::Context {
            gate: Arc::clone(&gate),
            slots: Arc::clone(&service.streams),
            follow_ups: service.follow_ups(),
            limits: service.stream_limits,
            max_message_bytes: 1 << 20,
        };
        let alice = Caller {
            service: "us-support-tool".to_owned(),
            employee: Some("alice".to_owned()),
            method: "test",
            lease: None,
            certificate: None,
        };
        // A transport that never takes an answer: the stream is never polled.
        let mut stalled = stream::serve(context(), alice.clone(), requests(100)).unwrap();
        let second = stream::serve(context(), alice.clone(), requests(1));
        assert_eq!(
            second.err().map(|status| status.code()),
            Some(tonic::Code::ResourceExhausted),
            "one stream per caller here"
        );
        let still_running = service
            .follow_ups()
            .drain(std::time::Duration::from_secs(10))
            .await;
        assert_eq!(still_running, 0, "the stalled stream's work ended");
        let entries = log_entries(dir.path());
        let ids = |kind: &str| -> std::collections::BTreeSet<String> {
            entries
                .iter()
                .filter(|e| e["kind"] == kind && e["action"] == "decrypt")
                .map(|e| e["request_id"].as_str().unwrap().to_owned())
                .collect()
        };
        let read = ids("decrypt");
        assert!(
            (stream::STREAM_CONCURRENCY..100).contains(&read.len()),
            "{} records read: bounded by the stream, not the request",
            read.len()
        );
        assert_eq!(read, ids("undelivered"), "every answer made is followed up");
        // The transport, if it ever asks, learns why.
        let told = stalled.next().await.unwrap().unwrap_err();
        assert_eq!(told.code(), tonic::Code::DeadlineExceeded, "{told:?}");
        assert!(stalled.next().await.is_none());

        // A client that sent all it had (the request stream ended) and takes nothing:
        // its last answers wait in the queue under the same timeout, holding the slot.
        let short = stream::serve(context(), alice.clone(), requests(2)).unwrap();
        assert!(stream::serve(context(), alice.clone(), requests(0)).is_err());
        let still_running = service
            .follow_ups()
            .drain(std::time::Duration::from_secs(10))
            .await;
        assert_eq!(still_running, 0);
        let undelivered = log_entries(dir.path())
            .iter()
            .filter(|e| e["kind"] == "undelivered")
            .count();
        assert_eq!(undelivered, read.len() + 2);
        assert!(stream::serve(context(), alice, requests(0)).is_ok());
        drop(short);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_call_logs_its_answer_as_undelivered_once_it_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let gate = test_gate(dir.path());
        let caller = Caller {
            service: "us-support-tool".to_owned(),
            employee: Some("alice".to_owned()),
            method: "test",
            lease: None,
            certificate: None,
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
        let service = RingfenceService::new(Arc::clone(&gate), 1 << 20);
        let pending = service
            .pending(caller, async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                Ok((pb::DecryptRecordResponse::default(), answer))
            })
            .unwrap();
        // The call goes away while the answer is being made; shutdown waits for the
        // answer and its follow-up.
        drop(pending);
        let still_running = service
            .follow_ups()
            .drain(std::time::Duration::from_secs(10))
            .await;
        assert_eq!(still_running, 0);
        let entries = log_entries(dir.path());
        assert_eq!(entries.len(), 1, "{entries:?}");
        let entry = &entries[0];
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
