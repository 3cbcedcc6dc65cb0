//! Follow-up work that outlives a call: counted so that shutdown can wait for it,
//! and the unary call whose answer, when the caller went away, is logged as
//! undelivered.

use std::sync::Arc;

use tonic::Status;

use crate::gatekeeper::{self, Gatekeeper};
use crate::identity::Caller;

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
    pub(super) fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<T>> {
        self.0
            .running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let tracked = Tracked(Arc::clone(&self.0));
        // The work stays in the request's span (its request id, for tracing).
        let work = tracing::Instrument::in_current_span(work);
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
    pub(super) async fn closing(&self) {
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

/// Writes the follow-up entry of a logged answer that did not reach the transport.
pub(super) async fn undelivered(
    gate: &Gatekeeper,
    caller: &Caller,
    receipt: &gatekeeper::Receipt,
    reason: &str,
) {
    if let Err(error) = gate.record_undelivered(caller, receipt, reason).await {
        tracing::error!(%error, request_id = receipt.request_id, reason, "undelivered answer not logged");
    }
}

/// A unary call's work running in its own task (see [`RingfenceService::pending`]);
/// if the call goes away first, the answer is logged as undelivered when it is ready.
pub(super) struct Pending<T: Send + 'static> {
    pub(super) task: Option<tokio::task::JoinHandle<Result<(T, gatekeeper::Receipt), Status>>>,
    pub(super) follow_ups: FollowUps,
    pub(super) gate: Arc<Gatekeeper>,
    pub(super) caller: Caller,
}

impl<T: Send + 'static> Pending<T> {
    pub(super) async fn wait(&mut self) -> Result<T, Status> {
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
