//! Bulk streams (`DecryptRecords`, `RewrapRecords`), bounded so that no caller stalls
//! the others.
//! Owns the stream's driver (read, decide and decrypt through the gatekeeper, answer
//! in order), its queue to the transport and the per-caller stream slots; it may not
//! decide, log or decrypt by itself (that is the gatekeeper's).
//!
//! What one stream may hold, and for how long:
//! - a permit of its caller's pool ([`CALLER_RECORDS_IN_FLIGHT`]) for every record it
//!   has read and not yet handed to the transport, taken before the record is read;
//! - at most [`STREAM_CONCURRENCY`] such records and [`STREAM_BUFFER_BYTES`] of their
//!   requests (which bound their answers), and [`STREAM_QUEUE`] answers queued;
//! - a permit of the server-wide pool ([`RECORDS_IN_PROGRESS`]) only while a record
//!   is being decided and decrypted;
//! - one of its caller's stream slots (`--max-streams-per-caller`).
//!
//! A client that stops taking answers stalls only its own streams: when an answer
//! waits longer than `--stream-send-timeout-secs`, the stream ends with
//! `DEADLINE_EXCEEDED`, every answer it made and did not hand over is logged as
//! undelivered, and its permits go back. An employee token is checked before every
//! record: when it expires, or the identity provider's keys are reloaded, the stream
//! ends with `UNAUTHENTICATED` (answers already made are still delivered).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use super::{FollowUps, STREAM_CLOSED, decrypt_one, rewrap_one, undelivered, within_limit};
use crate::config::StreamLimits;
use crate::gatekeeper::{self, Gatekeeper};
use crate::identity::Caller;
use crate::pb;

/// Records one stream has read and not yet handed to the transport.
pub const STREAM_CONCURRENCY: usize = 32;
/// Bytes of requests one stream has read and not yet answered (a request bounds the
/// size of its answer); one request may take it over the limit.
pub const STREAM_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Answers one stream queues for the transport.
pub const STREAM_QUEUE: usize = 2;
/// Records all streams of one caller have read and not yet handed to the transport.
pub const CALLER_RECORDS_IN_FLIGHT: usize = 256;
/// Records being decided and decrypted at once, all streams together.
pub const RECORDS_IN_PROGRESS: usize = 128;

/// The answer of one record of a bulk stream, with its receipt.
pub type Answer<R> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(R, gatekeeper::Receipt), Status>> + Send>,
>;

/// One kind of bulk stream: its messages, and how one record is answered.
pub trait Bulk: Send + Sync + 'static {
    /// What the client sends per record.
    type Request: prost::Message + Send + 'static;
    /// What the server answers per record.
    type Response: prost::Message + Send + 'static;
    /// The call's name, for messages.
    const NAME: &'static str;
    /// Answers one record, with the receipt of what the answer carries.
    fn answer(
        gate: Arc<Gatekeeper>,
        caller: Arc<Caller>,
        request: Self::Request,
    ) -> Answer<Self::Response>;
    /// Sets the position of the request answered.
    fn set_index(response: &mut Self::Response, index: u64);
    /// The answer of a record that could not be answered: its index and status.
    fn record_status(index: u64, status: pb::RecordStatus) -> Self::Response;
}

/// `DecryptRecords`.
#[derive(Debug)]
pub struct Decrypts;

impl Bulk for Decrypts {
    type Request = pb::DecryptRecordRequest;
    type Response = pb::DecryptRecordResponse;
    const NAME: &'static str = "DecryptRecords";

    fn answer(
        gate: Arc<Gatekeeper>,
        caller: Arc<Caller>,
        request: Self::Request,
    ) -> Answer<Self::Response> {
        Box::pin(async move { decrypt_one(&gate, &caller, request).await })
    }

    fn set_index(response: &mut Self::Response, index: u64) {
        response.index = index;
    }

    fn record_status(index: u64, status: pb::RecordStatus) -> Self::Response {
        pb::DecryptRecordResponse {
            index,
            status: Some(status),
            ..pb::DecryptRecordResponse::default()
        }
    }
}

/// `RewrapRecords`.
#[derive(Debug)]
pub struct Rewraps;

impl Bulk for Rewraps {
    type Request = pb::RewrapRecordRequest;
    type Response = pb::RewrapRecordResponse;
    const NAME: &'static str = "RewrapRecords";

    fn answer(
        gate: Arc<Gatekeeper>,
        caller: Arc<Caller>,
        request: Self::Request,
    ) -> Answer<Self::Response> {
        Box::pin(async move { rewrap_one(&gate, &caller, request).await })
    }

    fn set_index(response: &mut Self::Response, index: u64) {
        response.index = index;
    }

    fn record_status(index: u64, status: pb::RecordStatus) -> Self::Response {
        pb::RewrapRecordResponse {
            index,
            status: Some(status),
            ..pb::RewrapRecordResponse::default()
        }
    }
}

/// The open streams of each caller.
#[derive(Debug)]
pub(super) struct Slots {
    callers: Mutex<HashMap<(String, Option<String>), CallerStreams>>,
    in_progress: Arc<Semaphore>,
}

#[derive(Debug)]
struct CallerStreams {
    open: usize,
    records: Arc<Semaphore>,
}

impl Slots {
    pub(super) fn new() -> Self {
        Self {
            callers: Mutex::default(),
            in_progress: Arc::new(Semaphore::new(RECORDS_IN_PROGRESS)),
        }
    }

    /// Streams open, and records being decided and decrypted, now.
    pub(super) fn usage(&self) -> (usize, usize) {
        let open = match self.callers.lock() {
            Ok(callers) => callers.values().map(|streams| streams.open).sum(),
            Err(poisoned) => poisoned
                .into_inner()
                .values()
                .map(|streams| streams.open)
                .sum(),
        };
        (
            open,
            RECORDS_IN_PROGRESS.saturating_sub(self.in_progress.available_permits()),
        )
    }

    /// One more stream for `caller`, or `RESOURCE_EXHAUSTED` at the limit.
    fn open(self: &Arc<Self>, caller: &Caller, limit: usize) -> Result<Slot, Status> {
        let key = (caller.service.clone(), caller.employee.clone());
        let mut callers = match self.callers.lock() {
            Ok(callers) => callers,
            Err(poisoned) => poisoned.into_inner(),
        };
        let streams = callers.entry(key.clone()).or_insert_with(|| CallerStreams {
            open: 0,
            records: Arc::new(Semaphore::new(CALLER_RECORDS_IN_FLIGHT)),
        });
        if streams.open >= limit {
            return Err(Status::resource_exhausted(format!(
                "{} already has {limit} bulk streams open, the most one caller may have (--max-streams-per-caller): finish one first, or send more records per stream",
                caller.principal()
            )));
        }
        streams.open += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            key,
            records: Arc::clone(&streams.records),
        })
    }
}

/// One open stream of a caller; gives its slot back when dropped.
struct Slot {
    slots: Arc<Slots>,
    key: (String, Option<String>),
    records: Arc<Semaphore>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut callers = match self.slots.callers.lock() {
            Ok(callers) => callers,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(streams) = callers.get_mut(&self.key) {
            streams.open = streams.open.saturating_sub(1);
            if streams.open == 0 {
                callers.remove(&self.key);
            }
        }
    }
}

/// One answer on its way to the transport: the receipt is logged as undelivered if
/// the stream ends before the transport takes it; the permit goes back when it does.
struct Delivery<B: Bulk> {
    answer: Result<B::Response, Status>,
    receipt: Option<gatekeeper::Receipt>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// What the driver and the transport's end share.
struct Shared<B: Bulk> {
    receiver: Mutex<mpsc::Receiver<Delivery<B>>>,
    /// Why the stream ended early, told to the transport after the last answer.
    ended: Mutex<Option<Status>>,
}

/// The response stream of a bulk call: an answer counts as delivered when the
/// transport takes it from here; answers still queued when the transport drops the
/// stream (the client went away) get an `undelivered` entry.
pub struct DeliveryStream<B: Bulk> {
    shared: Arc<Shared<B>>,
    gate: Arc<Gatekeeper>,
    caller: Arc<Caller>,
    follow_ups: FollowUps,
}

impl<B: Bulk> futures_util::Stream for DeliveryStream<B> {
    type Item = Result<B::Response, Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let mut receiver = match self.shared.receiver.lock() {
            Ok(receiver) => receiver,
            Err(poisoned) => poisoned.into_inner(),
        };
        receiver.poll_recv(context).map(|delivery| match delivery {
            // The permit goes back here: the transport has the answer.
            Some(delivery) => Some(delivery.answer),
            None => {
                let mut ended = match self.shared.ended.lock() {
                    Ok(ended) => ended,
                    Err(poisoned) => poisoned.into_inner(),
                };
                ended.take().map(Err)
            }
        })
    }
}

impl<B: Bulk> Drop for DeliveryStream<B> {
    fn drop(&mut self) {
        // Every answer still queued, or being queued by a producer that already holds
        // a slot, is received until the channel reports its end: none is lost unlogged.
        let mut receiver = {
            let mut slot = match self.shared.receiver.lock() {
                Ok(slot) => slot,
                Err(poisoned) => poisoned.into_inner(),
            };
            let (_, closed) = mpsc::channel(1);
            std::mem::replace(&mut *slot, closed)
        };
        receiver.close();
        let gate = Arc::clone(&self.gate);
        let caller = Arc::clone(&self.caller);
        self.follow_ups.spawn(async move {
            while let Some(delivery) = receiver.recv().await {
                if let Some(receipt) = delivery.receipt {
                    undelivered(&gate, &caller, &receipt, STREAM_CLOSED).await;
                }
            }
        });
    }
}

/// What a stream needs from its service.
pub(super) struct Context {
    pub(super) gate: Arc<Gatekeeper>,
    pub(super) slots: Arc<Slots>,
    pub(super) follow_ups: FollowUps,
    pub(super) limits: StreamLimits,
    pub(super) max_message_bytes: usize,
}

/// Starts serving one bulk stream.
pub(super) fn serve<B: Bulk>(
    context: Context,
    caller: Caller,
    inbound: impl Inbound<B::Request>,
) -> Result<DeliveryStream<B>, Status> {
    let slot = context.slots.open(&caller, context.limits.max_per_caller)?;
    let caller = Arc::new(caller);
    let (sender, receiver) = mpsc::channel::<Delivery<B>>(STREAM_QUEUE);
    let shared = Arc::new(Shared {
        receiver: Mutex::new(receiver),
        ended: Mutex::new(None),
    });
    let stream = DeliveryStream {
        shared: Arc::clone(&shared),
        gate: Arc::clone(&context.gate),
        caller: Arc::clone(&caller),
        follow_ups: context.follow_ups.clone(),
    };
    let follow_ups = context.follow_ups.clone();
    follow_ups.spawn(
        Driver::<B> {
            context,
            caller,
            slot,
            sender,
            shared,
        }
        .run(inbound),
    );
    Ok(stream)
}

/// The request stream of a bulk call (tonic's `Streaming`, or any other).
pub(super) trait Inbound<R>:
    futures_util::Stream<Item = Result<R, Status>> + Send + Unpin + 'static
{
}

impl<R, S> Inbound<R> for S where
    S: futures_util::Stream<Item = Result<R, Status>> + Send + Unpin + 'static
{
}

/// A record being answered: its answer, with the permit of its caller's pool.
type InFlight<R> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (R, Option<gatekeeper::Receipt>, OwnedSemaphorePermit, usize),
            > + Send,
    >,
>;

struct Driver<B: Bulk> {
    context: Context,
    caller: Arc<Caller>,
    slot: Slot,
    sender: mpsc::Sender<Delivery<B>>,
    shared: Arc<Shared<B>>,
}

impl<B: Bulk> Driver<B> {
    async fn run(self, mut inbound: impl Inbound<B::Request>) {
        let mut in_flight: FuturesOrdered<InFlight<B::Response>> = FuturesOrdered::new();
        let mut buffered = 0usize;
        let mut index = 0u64;
        let mut reading = true;
        let mut permit: Option<OwnedSemaphorePermit> = None;
        // Why the transport takes no more answers (the client left, or stalled).
        let mut closed: Option<String> = None;
        let mut ending: Option<Status> = None;
        loop {
            if !reading && in_flight.is_empty() {
                break;
            }
            let room = in_flight.len() < STREAM_CONCURRENCY && buffered < STREAM_BUFFER_BYTES;
            tokio::select! {
                biased;
                Some((response, receipt, held, bytes)) = in_flight.next(), if !in_flight.is_empty() => {
                    buffered -= bytes;
                    match &closed {
                        None => {
                            closed = self.deliver(response, receipt, held).await;
                            if closed.is_some() {
                                reading = false;
                            }
                        }
                        Some(reason) => {
                            if let Some(receipt) = receipt {
                                undelivered(&self.context.gate, &self.caller, &receipt, reason).await;
                            }
                        }
                    }
                }
                acquired = Arc::clone(&self.slot.records).acquire_owned(), if reading && permit.is_none() && room => {
                    permit = acquired.ok();
                    if permit.is_none() {
                        reading = false;
                    }
                }
                () = self.context.follow_ups.closing(), if reading => {
                    reading = false;
                    ending = Some(Status::unavailable(
                        "the server is shutting down: the stream ends here (answers before it stand); send the rest to another replica or retry later",
                    ));
                }
                message = inbound.next(), if reading && permit.is_some() => {
                    let Some(held) = permit.take() else { continue };
                    match message {
                        None => reading = false,
                        // The request stream itself broke (undecodable or oversized
                        // message): nothing more can be read, the stream ends with it.
                        Some(Err(status)) => {
                            reading = false;
                            ending = Some(status);
                        }
                        Some(Ok(message)) => {
                            if let Err(error) = self.caller.check_credentials() {
                                reading = false;
                                ending = Some(Status::unauthenticated(format!(
                                    "record {index}: {error}; the stream ends here (answers before it stand): open a new one with current credentials"
                                )));
                                continue;
                            }
                            let bytes = message.encoded_len();
                            buffered += bytes;
                            in_flight.push_back(self.answer(index, message, held, bytes));
                            index += 1;
                        }
                    }
                }
            }
        }
        if closed.is_none() {
            self.finish(ending).await;
        }
    }

    /// Ends a stream whose client still takes answers: tells why it ends early (after
    /// the last answer, whatever the queue) and waits, within the send timeout, for
    /// the transport to take what is queued.
    async fn finish(self, ending: Option<Status>) {
        if let Some(status) = ending
            && let Ok(mut ended) = self.shared.ended.lock()
        {
            *ended = Some(status);
        }
        // The answers still queued hold this stream's slot and permits until the
        // transport takes them, and are bound by the same send timeout.
        let timeout = self.context.limits.send_timeout;
        if tokio::time::timeout(timeout, self.sender.reserve_many(STREAM_QUEUE))
            .await
            .is_err()
        {
            self.abandon(&format!(
                "the client took no answer for {} s (--stream-send-timeout-secs)",
                timeout.as_secs()
            ))
            .await;
        }
    }

    /// Answers one record in its own task (so that a client that goes away cannot
    /// stop it between logging and answering).
    fn answer(
        &self,
        index: u64,
        message: B::Request,
        held: OwnedSemaphorePermit,
        bytes: usize,
    ) -> InFlight<B::Response> {
        let gate = Arc::clone(&self.context.gate);
        let caller = Arc::clone(&self.caller);
        let in_progress = Arc::clone(&self.context.slots.in_progress);
        let max_message_bytes = self.context.max_message_bytes;
        // Each record of a stream is a request of its own, with its own request id.
        let span = tracing::info_span!("record", index, request_id = tracing::field::Empty);
        let task = self
            .context
            .follow_ups
            .spawn(tracing::Instrument::instrument(
                async move {
                    let answer = match in_progress.acquire_owned().await {
                        Ok(_working) => {
                            match B::answer(Arc::clone(&gate), Arc::clone(&caller), message).await {
                                Ok((mut response, receipt)) => {
                                    // The index is part of what the transport encodes.
                                    B::set_index(&mut response, index);
                                    within_limit(
                                        &gate,
                                        &caller,
                                        (response, receipt),
                                        max_message_bytes,
                                    )
                                    .await
                                }
                                Err(status) => Err(status),
                            }
                        }
                        Err(_) => Err(Status::unavailable("server is shutting down")),
                    };
                    // A record that cannot be answered gets its own status; the stream goes on.
                    match answer {
                        Ok((response, receipt)) => (response, Some(receipt)),
                        Err(status) => (record_status::<B>(index, &status), None),
                    }
                },
                span,
            ));
        Box::pin(async move {
            let (response, receipt) = match task {
                Some(task) => task.await.unwrap_or_else(|error| {
                    tracing::error!(%error, "record task failed");
                    let status = Status::internal("internal error; the server log has details");
                    (record_status::<B>(index, &status), None)
                }),
                None => (
                    record_status::<B>(index, &Status::unavailable("server is shutting down")),
                    None,
                ),
            };
            (response, receipt, held, bytes)
        })
    }

    /// Hands one answer to the transport's queue; why not, when the stream can take
    /// no more (the client left, or took nothing for the send timeout: then every
    /// answer queued is logged as undelivered and the stream ends with
    /// `DEADLINE_EXCEEDED`).
    async fn deliver(
        &self,
        response: B::Response,
        receipt: Option<gatekeeper::Receipt>,
        held: OwnedSemaphorePermit,
    ) -> Option<String> {
        let timeout = self.context.limits.send_timeout;
        let reason = match tokio::time::timeout(timeout, self.sender.reserve()).await {
            Ok(Ok(slot)) => {
                slot.send(Delivery {
                    answer: Ok(response),
                    receipt,
                    _permit: Some(held),
                });
                return None;
            }
            Ok(Err(_)) => STREAM_CLOSED.to_owned(),
            Err(_) => {
                let reason = format!(
                    "the client took no answer for {} s (--stream-send-timeout-secs)",
                    timeout.as_secs()
                );
                self.abandon(&reason).await;
                reason
            }
        };
        if let Some(receipt) = receipt {
            undelivered(&self.context.gate, &self.caller, &receipt, &reason).await;
        }
        Some(reason)
    }

    /// Ends a stalled stream: the transport is told why when (if ever) it asks for
    /// the next answer, and the answers queued for it are logged as undelivered.
    async fn abandon(&self, reason: &str) {
        if let Ok(mut ended) = self.shared.ended.lock() {
            *ended = Some(Status::deadline_exceeded(format!(
                "{reason}: the stream ends; answers not taken are logged as undelivered"
            )));
        }
        let mut queued = Vec::new();
        if let Ok(mut receiver) = self.shared.receiver.lock() {
            receiver.close();
            while let Ok(delivery) = receiver.try_recv() {
                queued.extend(delivery.receipt);
            }
        }
        for receipt in queued {
            undelivered(&self.context.gate, &self.caller, &receipt, reason).await;
        }
    }
}

/// The answer of a record that could not be answered: its index and status.
fn record_status<B: Bulk>(index: u64, status: &Status) -> B::Response {
    B::record_status(
        index,
        pb::RecordStatus {
            code: status.code() as u32,
            message: format!("record {index}: {}", status.message()),
        },
    )
}
