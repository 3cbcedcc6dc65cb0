//! Admission: every request is authenticated and its caller checked against the
//! directory in one layer, before any handler runs; refusals are logged through the
//! failure limiter. Handlers only read the admitted [`Caller`]. The same layer opens
//! each call's tracing span and times it for the metrics.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::failures::Source;
use crate::gatekeeper::Gatekeeper;
use crate::identity::tls::PeerInfo;
use crate::identity::{self, Caller};

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
        let (reason, kind, source) = match outcome {
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
                        "unknown_principal",
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
                (error.to_string(), error.kind(), source)
            }
        };
        self.gate.metrics().authentication_failed(kind);
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
            let written = tokio::spawn(tracing::Instrument::in_current_span(async move {
                if let Err(error) = gate
                    .log_authentication_failure(&reason, remote, &source, held_back)
                    .await
                {
                    tracing::error!(%error, "authentication failure not logged");
                }
            }));
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
        let timer = Timer {
            metrics: Some(Arc::clone(self.admission.gate.metrics())),
            method: crate::metrics::Metrics::method(request.uri().path()),
            started: std::time::Instant::now(),
        };
        // One span per call; the gatekeeper records the decision log's request id in
        // it (a stream's records get spans of their own).
        let span = tracing::info_span!(
            "request",
            method = timer.method,
            request_id = tracing::field::Empty
        );
        let entered = span.enter();
        let admitted = self
            .admission
            .admit(request.extensions(), request.headers());
        match admitted {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                let answer = self.inner.call(request);
                drop(entered);
                Box::pin(tracing::Instrument::instrument(
                    async move { Ok(timer.response(answer.await?)) },
                    span,
                ))
            }
            Err(refusal) => {
                drop(entered);
                Box::pin(tracing::Instrument::instrument(
                    async move { Ok(timer.response(refusal.answer().await.into_http())) },
                    span,
                ))
            }
        }
    }
}

/// Times one call for the `ringfence_rpc_duration_seconds` metric: until its answer's
/// status is known (in the headers of an error, in the trailers after a body).
struct Timer {
    /// Taken when the call's status is recorded.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    method: &'static str,
    started: std::time::Instant,
}

impl Drop for Timer {
    /// A call dropped before its status was known (the client cancelled it, or its
    /// deadline passed) counts as `CANCELLED`.
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            metrics.rpc_finished(self.method, tonic::Code::Cancelled, self.started.elapsed());
        }
    }
}

impl Timer {
    fn response(
        self,
        response: tonic::codegen::http::Response<tonic::body::Body>,
    ) -> tonic::codegen::http::Response<tonic::body::Body> {
        if let Some(code) = grpc_status(response.headers()) {
            self.finish(code);
            return response;
        }
        response.map(|body| {
            tonic::body::Body::new(Timed {
                body,
                timer: Some(self),
            })
        })
    }

    fn finish(mut self, code: tonic::Code) {
        if let Some(metrics) = self.metrics.take() {
            metrics.rpc_finished(self.method, code, self.started.elapsed());
        }
    }
}

/// The gRPC status of a header or trailer map, if it has one.
fn grpc_status(headers: &tonic::codegen::http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

/// An answer's body that reports its status to the timer when its trailers pass (or
/// `CANCELLED` when the body is dropped before: the client went away).
struct Timed {
    body: tonic::body::Body,
    timer: Option<Timer>,
}

impl Drop for Timed {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.finish(tonic::Code::Cancelled);
        }
    }
}

impl http_body::Body for Timed {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(context);
        let code = match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| grpc_status(trailers).unwrap_or(tonic::Code::Unknown)),
            std::task::Poll::Ready(Some(Err(status))) => Some(status.code()),
            _ => None,
        };
        if let Some(code) = code
            && let Some(timer) = self.timer.take()
        {
            timer.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The caller [`Admission`] put into the request.
pub(super) fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            tracing::error!("a request reached a handler without admission");
            Status::unauthenticated("request is not authenticated")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_dropped_before_its_status_counts_as_cancelled_once() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let method = crate::metrics::Metrics::method("/ringfence.v1.Ringfence/EncryptRecord");
        let timer = |metrics: &Arc<crate::metrics::Metrics>| Timer {
            metrics: Some(Arc::clone(metrics)),
            method,
            started: std::time::Instant::now(),
        };
        // The client cancelled: the handler's future is dropped.
        drop(timer(&metrics));
        // A status recorded, then dropped: counted once, with its own code.
        timer(&metrics).finish(tonic::Code::Ok);
        assert_eq!(metrics.calls(method, tonic::Code::Cancelled), 1);
        assert_eq!(metrics.calls(method, tonic::Code::Ok), 1);
    }
}
