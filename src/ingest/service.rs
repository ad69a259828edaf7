//! The IngestService handlers: `Ingest` (client streaming), `Publish` (unary) and
//! `IngestStream` (bidirectional, one ack per request).

use std::{pin::Pin, sync::Arc};

use chrono::Utc;
use futures::{Stream, StreamExt, stream::FuturesUnordered};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use uuid::Uuid;

use super::{IngestError, Progress, validate::Validator};
use crate::{
    auth::Caller,
    broker::BacklogGate,
    buffer::{AckReceiver, AdmitError, Buffer, Durable, Holder},
    config::Config,
    event::{EventRejection, RejectReason, TraceId, ValidEvent},
    lifecycle::RetentionPolicy,
    metrics::{Counters, Refusal},
    privacy::{
        Privacy, SharedPrivacy,
        optouts::{OptOutSet, OptOuts},
    },
    proto::status,
    proto::{
        IngestAck, IngestRequest, IngestResponse, Rejection, ingest_service_server::IngestService,
    },
    rpc::{Admission, Call, Rpc},
    telemetry,
};

/// What a refusal for the Redis backlog asks clients to wait (the backlog is read every 500 ms).
const BACKLOG_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Acks produced by IngestStream that the client has not read yet.
const ACK_QUEUE: usize = 64;

/// Handles IngestService calls. Cheap to clone.
#[derive(Clone)]
pub struct IngestHandler {
    buffer: Arc<Buffer>,
    config: Arc<Config>,
    counters: Arc<Counters>,
    admission: Arc<Admission>,
    retention: Arc<RetentionPolicy>,
    privacy: SharedPrivacy,
    optouts: Arc<OptOuts>,
    /// Cancelled when the server starts shutting down: streams stop reading and settle.
    shutdown: CancellationToken,
    /// Redis mode: refuses while the streams' backlog is over its limit.
    backlog: Option<Arc<BacklogGate>>,
}

/// What the ingest side needs from the rest of the server.
pub struct IngestDeps {
    pub buffer: Arc<Buffer>,
    pub config: Arc<Config>,
    pub counters: Arc<Counters>,
    pub admission: Arc<Admission>,
    pub retention: Arc<RetentionPolicy>,
    pub privacy: SharedPrivacy,
    pub optouts: Arc<OptOuts>,
    pub shutdown: CancellationToken,
    pub backlog: Option<Arc<BacklogGate>>,
}

impl IngestHandler {
    pub fn new(deps: IngestDeps) -> Self {
        Self {
            buffer: deps.buffer,
            config: deps.config,
            counters: deps.counters,
            admission: deps.admission,
            retention: deps.retention,
            privacy: deps.privacy,
            optouts: deps.optouts,
            shutdown: deps.shutdown,
            backlog: deps.backlog,
        }
    }

    /// Refuses (and counts) a request of more events than `grpc.max_events_per_request`.
    pub(crate) fn check_request_size(&self, events: usize) -> Result<(), IngestError> {
        let limit = self.config.grpc.max_events_per_request;
        if events > limit {
            self.counters.events_refused(Refusal::TooLarge, events);
            return Err(IngestError::TooManyEvents { events, limit });
        }
        Ok(())
    }

    /// Validates a request's events (numbered from `first_index`). Invalid events, and events
    /// for services the caller may not write, are counted and returned as rejections; the
    /// request fails only when it is too large as a whole or over the caller's rate limit.
    /// `known_ids[offset]`, when there, is the id of the request's event at `offset`, already
    /// a UUID (its text is then not read).
    fn validate(
        &self,
        call: &Call,
        request: IngestRequest,
        first_index: u64,
        trace_id: Option<TraceId>,
        known_ids: &[Uuid],
    ) -> Result<Validated, IngestError> {
        let _span = tracing::info_span!("validate", events = request.events.len()).entered();
        self.check_request_size(request.events.len())?;
        // A stream lives long: its caller is looked up again under the policy in force, so a
        // reload (scopes, services, limits) or an expired token applies from this message on.
        let caller = &self.admission.refresh(call)?;
        if let Err(limited) = caller.admit(request.events.len(), || {
            request.events.iter().map(event_bytes).sum()
        }) {
            self.counters
                .events_refused(Refusal::RateLimited, request.events.len());
            return Err(IngestError::Auth(limited));
        }
        self.counters.events_received(request.events.len());
        self.counters
            .principal_events(&caller.principal, request.events.len() as u64);
        crate::metrics::request_sizes(request.events.len(), request.events.iter().map(event_bytes));
        let validator =
            Validator::new(&self.config.validation, Utc::now()).with_retention(&self.retention);
        let privacy = self.privacy.load();
        let optouts = self.optouts.current();
        let mut validated = Validated {
            events: Vec::with_capacity(request.events.len()),
            rejections: Vec::new(),
            holder: caller.holder(),
        };
        for (offset, event) in request.events.into_iter().enumerate() {
            let index = first_index + offset as u64;
            let checked = match known_ids.get(offset) {
                Some(id) => validator.validate_known_id(index, event, *id),
                None => validator.validate(index, event),
            };
            let rejection = match checked {
                Ok(mut valid) => {
                    valid.trace_id = trace_id;
                    match may_keep(caller, &privacy, &optouts, &mut valid) {
                        Ok(()) => {
                            validated.events.push(valid);
                            continue;
                        }
                        Err(reason) => EventRejection {
                            index: valid.index,
                            event_id: valid.id.to_string(),
                            service: valid.service,
                            reason,
                        },
                    }
                }
                Err(rejection) => rejection,
            };
            self.counters
                .event_rejected(&rejection.service, rejection.reason.as_str());
            validated.rejections.push(rejection);
        }
        Ok(validated)
    }

    /// Admits valid events to the buffer, as `holder`'s. None when there was nothing valid to
    /// admit.
    async fn admit(
        &self,
        call: &Call,
        events: Vec<ValidEvent>,
        holder: &Holder,
    ) -> Result<Option<AckReceiver>, AdmitError> {
        if events.is_empty() {
            return Ok(None);
        }
        let count = events.len();
        if self.backlog.as_ref().is_some_and(|gate| gate.is_over()) {
            self.counters.events_refused(Refusal::BacklogFull, count);
            return Err(AdmitError::Full {
                retry_after: BACKLOG_RETRY_AFTER,
            });
        }
        match self
            .buffer
            .admit(events, holder, call.previous_attempts)
            .await
        {
            Ok(ack) => Ok(Some(ack)),
            Err(refusal) => {
                let reason = match refusal {
                    AdmitError::Full { .. } => Refusal::BufferFull,
                    AdmitError::OverShare { .. } => Refusal::OverShare,
                    AdmitError::Closed => Refusal::ShuttingDown,
                    AdmitError::TooLarge { .. } => Refusal::TooLarge,
                };
                self.counters.events_refused(reason, count);
                Err(refusal)
            }
        }
    }
}

/// A whole batch from another protocol (OTLP, [`crate::otlp`]).
impl IngestHandler {
    /// The envelope every call goes through.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Takes `events` as one request: validated as the native RPCs validate (rate limits,
    /// services, opt-outs, privacy), the valid ones admitted whole or not at all, and waited
    /// for until durable. Each event's id is `ids[index]` when there (the event's own `id`
    /// text is then not read) and its trace `trace_ids[index]`. Returns the events refused
    /// for good (invalid, or dead-lettered by PostgreSQL); every transient condition is an
    /// error, with nothing taken.
    pub async fn ingest_batch(
        &self,
        call: &Call,
        events: Vec<crate::proto::Event>,
        ids: &[Uuid],
        trace_ids: &[Option<TraceId>],
    ) -> Result<Vec<EventRejection>, IngestError> {
        let request = IngestRequest {
            events,
            sequence: 0,
        };
        let mut validated = self.validate(call, request, 0, None, ids)?;
        for event in &mut validated.events {
            event.trace_id = usize::try_from(event.index)
                .ok()
                .and_then(|index| trace_ids.get(index).copied().flatten());
        }
        let mut rejected = validated.rejections;
        let ack = self
            .admit(call, validated.events, &validated.holder)
            .await
            .map_err(|refusal| refusal_error(refusal, Progress::default()))?;
        if let Some(ack) = ack {
            let durable = ack.await.map_err(|_| IngestError::NotDurable {
                progress: Progress::default(),
            })?;
            rejected.extend(durable.rejected);
        }
        Ok(rejected)
    }
}

/// Whether a valid event may go on to the buffer: its caller may write its service, its user
/// did not opt out, and privacy applies (pseudonymized user id, redacted values), in place, so
/// that plain user ids and redacted values go no further.
fn may_keep(
    caller: &Caller,
    privacy: &Privacy,
    optouts: &OptOutSet,
    valid: &mut ValidEvent,
) -> Result<(), RejectReason> {
    if !caller.may_use(&valid.service) {
        return Err(RejectReason::ServiceForbidden {
            principal: caller.principal.clone(),
            service: valid.service.clone(),
        });
    }
    // Opted-out users: a keyed hash and a lookup, only when anyone opted out.
    if !optouts.is_empty()
        && let Some(user) = valid.user_id.as_deref()
        && optouts.refuses(&privacy.hash(user), &valid.service)
    {
        return Err(RejectReason::OptedOut);
    }
    privacy
        .protect_event(valid)
        .map_err(|error| RejectReason::Privacy(error.to_string()))
}

/// An event's size as sluice counts it (`sluice_event_bytes`, `bytes_per_second`): its text
/// fields plus its metadata as JSON. Cheap: decoding already holds the metadata as text, where
/// a protobuf `encoded_len` would have to rebuild the Struct.
fn event_bytes(event: &crate::proto::Event) -> usize {
    event.id.len()
        + event.service.len()
        + event.message.len()
        + event.user_id.len()
        + event
            .metadata
            .as_ref()
            .map_or(0, |metadata| metadata.json_len())
}

struct Validated {
    events: Vec<ValidEvent>,
    rejections: Vec<EventRejection>,
    /// Whose room in the buffer the events take.
    holder: Holder,
}

/// Running totals of one call.
struct Tally {
    accepted: u64,
    rejected: u64,
    rejections: Vec<Rejection>,
    max_reported: usize,
}

impl Tally {
    fn new(max_reported: usize) -> Self {
        Self {
            accepted: 0,
            rejected: 0,
            rejections: Vec::new(),
            max_reported,
        }
    }

    fn reject(&mut self, rejections: Vec<EventRejection>) {
        self.rejected += rejections.len() as u64;
        let room = self.max_reported.saturating_sub(self.rejections.len());
        self.rejections
            .extend(rejections.into_iter().take(room).map(Rejection::from));
    }

    fn absorb(&mut self, durable: Durable) {
        self.accepted += durable.stored;
        self.reject(durable.rejected);
    }

    fn progress(&self) -> Progress {
        Progress {
            accepted: self.accepted,
            rejected: self.rejected,
        }
    }

    fn into_response(self) -> IngestResponse {
        IngestResponse {
            accepted: self.accepted,
            rejected: self.rejected,
            rejections: self.rejections,
        }
    }

    fn into_ack(self, sequence: u64) -> IngestAck {
        IngestAck {
            sequence,
            accepted: self.accepted,
            rejected: self.rejected,
            rejections: self.rejections,
            ..IngestAck::default()
        }
    }
}

/// Waits for every pending ack, adding each to the tally. Fails if any envelope was abandoned
/// (the server stopped before committing it).
async fn settle(
    pending: &mut FuturesUnordered<AckReceiver>,
    tally: &mut Tally,
) -> Result<(), IngestError> {
    let mut lost = false;
    while let Some(outcome) = pending.next().await {
        match outcome {
            Ok(durable) => tally.absorb(durable),
            Err(_) => lost = true,
        }
    }
    if lost {
        return Err(IngestError::NotDurable {
            progress: tally.progress(),
        });
    }
    Ok(())
}

/// Turns a refused admission into the call's error, once earlier events are settled.
fn refusal_error(refusal: AdmitError, progress: Progress) -> IngestError {
    match refusal {
        AdmitError::Full { retry_after } => IngestError::BufferFull {
            retry_after,
            progress,
        },
        AdmitError::OverShare {
            retry_after,
            held,
            share,
        } => IngestError::OverShare {
            retry_after,
            held,
            share,
            progress,
        },
        AdmitError::Closed => IngestError::ShuttingDown { progress },
        AdmitError::TooLarge {
            events,
            bytes,
            max_events,
            max_bytes,
        } => IngestError::LargerThanBuffer {
            events,
            bytes,
            max_events,
            max_bytes,
        },
    }
}

/// Maps a failure reading the client's stream: oversized messages become INVALID_ARGUMENT.
fn stream_error(status: Status) -> IngestError {
    if status::is_oversized_message(&status) {
        return IngestError::MessageTooLarge {
            detail: status.message().to_owned(),
        };
    }
    IngestError::Stream(status)
}

type AckStream = Pin<Box<dyn Stream<Item = Result<IngestAck, Status>> + Send + 'static>>;

impl IngestHandler {
    /// Ingest (client streaming): the body of the RPC.
    async fn ingest_call(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestResponse>, Status> {
        let call = self.admission.admit(&request, Rpc::Ingest, &[])?;
        let trace_id = telemetry::request_trace_id(request.metadata());
        let mut stream = request.into_inner();
        let mut tally = Tally::new(self.config.validation.max_reported_rejections);
        let mut pending = FuturesUnordered::new();
        let mut next_index = 0u64;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    settle(&mut pending, &mut tally).await?;
                    return Err(IngestError::ShuttingDown { progress: tally.progress() }.into());
                }
                Some(outcome) = pending.next(), if !pending.is_empty() => match outcome {
                    Ok(durable) => tally.absorb(durable),
                    Err(_) => {
                        settle(&mut pending, &mut tally).await.ok();
                        return Err(IngestError::NotDurable { progress: tally.progress() }.into());
                    }
                },
                message = stream.message() => {
                    let request = match message {
                        Ok(Some(request)) => request,
                        Ok(None) => break,
                        Err(status) => {
                            settle(&mut pending, &mut tally).await?;
                            return Err(tally.progress().trail(stream_error(status).into()));
                        }
                    };
                    let count = request.events.len() as u64;
                    let validated = match self.validate(&call, request, next_index, trace_id, &[]) {
                        Ok(validated) => validated,
                        Err(error) => {
                            settle(&mut pending, &mut tally).await?;
                            return Err(tally.progress().trail(error.into()));
                        }
                    };
                    match self.admit(&call, validated.events, &validated.holder).await {
                        Ok(ack) => {
                            pending.extend(ack);
                            tally.reject(validated.rejections);
                            next_index += count;
                        }
                        Err(refusal) => {
                            settle(&mut pending, &mut tally).await?;
                            return Err(refusal_error(refusal, tally.progress()).into());
                        }
                    }
                }
            }
        }
        settle(&mut pending, &mut tally).await?;
        Ok(Response::new(tally.into_response()))
    }

    /// Publish (unary): the body of the RPC.
    async fn publish_call(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let call = self.admission.admit(&request, Rpc::Publish, &[])?;
        let trace_id = telemetry::request_trace_id(request.metadata());
        let mut tally = Tally::new(self.config.validation.max_reported_rejections);
        let validated = self.validate(&call, request.into_inner(), 0, trace_id, &[])?;
        let ack = self
            .admit(&call, validated.events, &validated.holder)
            .await
            .map_err(|refusal| refusal_error(refusal, Progress::default()))?;
        tally.reject(validated.rejections);
        if let Some(ack) = ack {
            let durable = ack.await.map_err(|_| IngestError::NotDurable {
                progress: Progress::default(),
            })?;
            tally.absorb(durable);
        }
        Ok(Response::new(tally.into_response()))
    }
}

#[tonic::async_trait]
impl IngestService for IngestHandler {
    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestResponse>, Status> {
        self.ingest_call(request).await
    }

    async fn publish(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        self.publish_call(request).await
    }

    type IngestStreamStream = AckStream;

    async fn ingest_stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        let call = self.admission.admit(&request, Rpc::IngestStream, &[])?;
        let trace_id = telemetry::request_trace_id(request.metadata());
        let (acks, ack_stream) = mpsc::channel(ACK_QUEUE);
        let handler = self.clone();
        // The stream is served by its own task, still inside the RPC's span.
        tokio::spawn(
            handler
                .serve_ack_stream(call, trace_id, request.into_inner(), acks)
                .instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_stream))))
    }
}

type PendingAck = Pin<Box<dyn Future<Output = IngestAck> + Send>>;

impl IngestHandler {
    /// Reads requests and answers each sequence once it is durable, or refuses that sequence
    /// (buffer full, shutting down) without ending the stream.
    async fn serve_ack_stream(
        self,
        call: Call,
        trace_id: Option<TraceId>,
        mut stream: Streaming<IngestRequest>,
        acks: mpsc::Sender<Result<IngestAck, Status>>,
    ) {
        let max_reported = self.config.validation.max_reported_rejections;
        let mut pending: FuturesUnordered<PendingAck> = FuturesUnordered::new();
        let mut reading = true;
        // Why the stream ends with an error, sent only after every pending ack: a status ends
        // the response stream, and acks after it could not reach the client.
        let mut final_error: Option<Status> = None;
        while reading || !pending.is_empty() {
            let ack = tokio::select! {
                () = self.shutdown.cancelled(), if reading => {
                    reading = false;
                    final_error = Some(IngestError::ShuttingDown { progress: Progress::default() }.into());
                    None
                }
                Some(ack) = pending.next(), if !pending.is_empty() => Some(Ok(ack)),
                message = stream.message(), if reading => match message {
                    Ok(Some(request)) => {
                        self.answer(&call, trace_id, request, max_reported, &mut pending).await
                    }
                    Ok(None) => {
                        reading = false;
                        None
                    }
                    Err(status) => {
                        // The client is gone or sent garbage: stop reading, send the acks
                        // still pending if the client listens, then the error.
                        reading = false;
                        final_error = Some(stream_error(status).into());
                        None
                    }
                },
            };
            let Some(mut ack) = ack else { continue };
            if let Ok(ack) = &mut ack {
                self.grant_credit(&call, ack);
            }
            if acks.send(ack).await.is_err() {
                return;
            }
        }
        if let Some(error) = final_error {
            // The client may be gone already, which is fine.
            let _ = acks.send(Err(error)).await;
        }
    }

    /// The credit an ack carries: how many more events (and bytes) the sender may send now
    /// without being refused for room. Nothing with a refusal: its `retry_after` says when.
    fn grant_credit(&self, call: &Call, ack: &mut IngestAck) {
        if ack.code != 0 {
            return;
        }
        let (events, bytes) = self.buffer.credit(&call.caller.holder());
        ack.credit_events = Some(events as u64);
        ack.credit_bytes = Some(bytes as u64);
    }

    /// Handles one request of IngestStream: an immediate ack (refusal, or nothing to store) or
    /// a pending ack pushed to `pending`.
    async fn answer(
        &self,
        call: &Call,
        trace_id: Option<TraceId>,
        request: IngestRequest,
        max_reported: usize,
        pending: &mut FuturesUnordered<PendingAck>,
    ) -> Option<Result<IngestAck, Status>> {
        let sequence = request.sequence;
        let mut tally = Tally::new(max_reported);
        let validated = match self.validate(call, request, 0, trace_id, &[]) {
            Ok(validated) => validated,
            Err(error) => return Some(Ok(refused_ack(sequence, error))),
        };
        tally.reject(validated.rejections);
        match self.admit(call, validated.events, &validated.holder).await {
            Ok(None) => Some(Ok(tally.into_ack(sequence))),
            Ok(Some(receiver)) => {
                pending.push(Box::pin(async move {
                    match receiver.await {
                        Ok(durable) => {
                            tally.absorb(durable);
                            tally.into_ack(sequence)
                        }
                        Err(_) => refused_ack(
                            sequence,
                            IngestError::NotDurable {
                                progress: Progress::default(),
                            },
                        ),
                    }
                }));
                None
            }
            Err(refusal) => Some(Ok(refused_ack(
                sequence,
                refusal_error(refusal, Progress::default()),
            ))),
        }
    }
}

/// An ack that refuses a whole request, with the same code and retry delay the unary call
/// would return as a status.
fn refused_ack(sequence: u64, error: IngestError) -> IngestAck {
    use tonic_types::StatusExt;
    let status = Status::from(error);
    let retry_after = status
        .get_error_details()
        .retry_info()
        .and_then(|retry| retry.retry_delay)
        .and_then(|delay| prost_types::Duration::try_from(delay).ok());
    IngestAck {
        sequence,
        code: status.code() as i32,
        message: status.message().to_owned(),
        retry_after,
        ..IngestAck::default()
    }
}
