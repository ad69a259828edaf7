//! The writer pool: N tasks that take envelopes from the buffer, batch them by count, bytes and
//! time, write each batch to PostgreSQL (or, while the circuit is open, to the spool), and only
//! then acknowledge the envelopes. All writers share one connection pool; each counts into its
//! own rollup shard.

pub(crate) mod breaker;
pub mod consume;
pub mod copy;
pub mod erasures;
pub(crate) mod replay;
pub(crate) mod sink;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use tracing::Instrument;

use crate::{backoff::Backoff, feed::TailFeed, privacy::SharedPrivacy, telemetry};
use crate::{
    broker::{Broker, BrokerError},
    buffer::{Buffer, BufferReceiver, Durable, Envelope},
    config::WriterConfig,
    event::{EventRejection, ValidEvent},
    figures::Accepted,
    metrics::{self, Counters, WriteFailure},
    spool::Spool,
};
use breaker::{Breaker, CircuitState};
use sink::{EventOutcome, Sink};

/// Where the writers' batches go.
#[derive(Clone)]
pub enum Destination {
    /// PostgreSQL: direct mode (the keys, for the erasures that anonymize).
    Postgres(PgPool, SharedPrivacy),
    /// The Redis streams: ingest nodes of Redis mode. Writer nodes move the entries on to
    /// PostgreSQL ([`consume`]).
    Broker(Broker),
}

impl Destination {
    /// One writer's way there; `shard` is its rollup shard in PostgreSQL.
    fn target(&self, shard: i16, write_timeout: Duration) -> Target {
        match self {
            Self::Postgres(pool, privacy) => Target::Postgres(Sink::new(
                pool.clone(),
                shard,
                write_timeout,
                privacy.clone(),
            )),
            Self::Broker(streams) => Target::Broker(streams.clone()),
        }
    }
}

/// One writer's way to its destination.
enum Target {
    Postgres(Sink),
    Broker(Broker),
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl WriteError {
    fn failure(&self) -> WriteFailure {
        match self {
            Self::Database(error) => sink::classify(error).into(),
            Self::Broker(_) => WriteFailure::Redis,
        }
    }
}

impl Target {
    /// Writes a batch: one outcome per event, or the error that stopped it (retry it).
    async fn write_batch(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<EventOutcome>, WriteError> {
        match self {
            Self::Postgres(sink) => Ok(sink.write_batch(events, admitted_at).await?),
            Self::Broker(streams) => {
                streams.append(events, admitted_at).await?;
                Ok(vec![EventOutcome::Stored; events.len()])
            }
        }
    }

    /// Whether this writer stores into PostgreSQL itself (and so feeds Tail and the
    /// per-service counters).
    fn stores(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// What the writers share.
#[derive(Clone)]
pub struct WriterContext {
    pub config: WriterConfig,
    pub destination: Destination,
    pub buffer: Arc<Buffer>,
    pub receiver: BufferReceiver,
    pub breaker: Arc<Breaker>,
    /// Where batches go while the circuit is open; None when the spool is disabled.
    pub spool: Option<Spool>,
    pub counters: Arc<Counters>,
    /// Durable batches go to Tail subscribers, when there are any.
    pub tail: Arc<TailFeed>,
}

/// Starts `config.workers` writers. They stop once the buffer is closed and drained.
pub fn writers(
    context: &WriterContext,
) -> impl Iterator<Item = impl Future<Output = ()> + Send + 'static> {
    let context = context.clone();
    (0..context.config.workers).map(move |worker| {
        Writer {
            worker,
            target: context
                .destination
                .target(worker as i16, context.config.write_timeout),
            context: context.clone(),
        }
        .run()
    })
}

struct Writer {
    worker: usize,
    /// PostgreSQL (through the shared pool, into this writer's own rollup shard) or Redis.
    target: Target,
    context: WriterContext,
}

impl Writer {
    async fn run(self) {
        tracing::debug!(worker = self.worker, "writer started");
        while let Some(batch) = self.collect().await {
            self.write(batch).await;
        }
        tracing::debug!(
            worker = self.worker,
            "writer stopped: buffer closed and drained"
        );
    }

    /// Waits for a first envelope, then gathers more until the batch is full or the first one
    /// has waited `flush_interval`. None once the buffer is closed and empty.
    async fn collect(&self) -> Option<Vec<Envelope>> {
        let config = &self.context.config;
        let mut receiver = self.context.receiver.lock().await;
        let first = receiver.recv().await?;
        let deadline = first.admitted_at + config.flush_interval;
        let mut events = first.events.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while events < config.batch_max_events && bytes < config.batch_max_bytes {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(envelope)) => {
                    events += envelope.events.len();
                    bytes += envelope.bytes;
                    batch.push(envelope);
                }
                Ok(None) | Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Writes one batch, then acknowledges every envelope in it. Events no PostgreSQL field
    /// can hold are rejected first. The rest go to PostgreSQL while the circuit is closed, and
    /// to the spool while it is open. Transient failures are retried with exponential backoff
    /// and jitter until one of the two takes the batch.
    async fn write(&self, batch: Vec<Envelope>) {
        let events: Vec<&ValidEvent> = batch
            .iter()
            .flat_map(|envelope| envelope.events.iter())
            .collect();
        let (writable, mut outcomes) = split_unwritable(&events);
        let span = tracing::info_span!(
            "write_batch",
            worker = self.worker,
            events = events.len(),
            requests = batch.len()
        );
        telemetry::link_requests(
            &span,
            batch.iter().filter_map(|envelope| envelope.origin.as_ref()),
        );
        let started = Instant::now();
        let admitted_at = batch.iter().map(|envelope| envelope.admitted_wall).min();
        let written = self
            .write_retrying(&writable, admitted_at)
            .instrument(span)
            .await;
        for (position, outcome) in writable.iter().map(|(position, _)| *position).zip(written) {
            outcomes[position] = Some(outcome);
        }
        metrics::batch_written(events.len(), started.elapsed());
        self.context
            .buffer
            .record_drained(events.len(), started.elapsed());
        drop(events);
        let stores = self.target.stores();
        let tailed = stores && self.context.tail.has_subscribers();
        let stored = acknowledge(batch, outcomes, &self.context.counters, stores, tailed);
        if tailed {
            self.context.tail.publish(stored);
        }
    }

    /// Writes `events` (with their positions in the batch) until PostgreSQL or the spool
    /// takes them; one outcome per event, in order.
    async fn write_retrying(
        &self,
        events: &[(usize, &ValidEvent)],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Vec<EventOutcome> {
        if events.is_empty() {
            return Vec::new();
        }
        let events: Vec<&ValidEvent> = events.iter().map(|(_, event)| *event).collect();
        let context = &self.context;
        let mut backoff = Backoff::jittered(
            context
                .config
                .retry_initial_backoff
                .max(Duration::from_millis(10)),
            context.config.retry_max_backoff,
        );
        let mut attempt = 0u32;
        let outcomes = loop {
            attempt += 1;
            if context.breaker.allow() {
                let started = Instant::now();
                match self.target.write_batch(&events, admitted_at).await {
                    Ok(outcomes) => {
                        context.breaker.record_success(started.elapsed());
                        break outcomes;
                    }
                    Err(error) => {
                        context.breaker.record_failure();
                        metrics::writer_error(error.failure());
                        tracing::warn!(worker = self.worker, attempt, events = events.len(), %error, "batch write failed");
                    }
                }
            }
            if context.breaker.state() != CircuitState::Closed
                && let Some(spool) = &context.spool
            {
                match spool.append(&events, admitted_at).await {
                    Ok(()) => {
                        context.counters.events_spooled(events.len(), spool.bytes());
                        break vec![EventOutcome::Stored; events.len()];
                    }
                    Err(error) => {
                        metrics::writer_error(WriteFailure::Spool);
                        tracing::error!(worker = self.worker, %error, "cannot spool batch; events stay in the buffer");
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        };
        if attempt > 1 {
            tracing::info!(worker = self.worker, attempt, "batch written after retries");
        }
        outcomes
    }
}

/// Splits off the events no PostgreSQL field can hold: the rest, with their positions in the
/// batch, and an outcome slot per event, already filled for the refused ones.
fn split_unwritable<'a>(
    events: &[&'a ValidEvent],
) -> (Vec<(usize, &'a ValidEvent)>, Vec<Option<EventOutcome>>) {
    let mut writable = Vec::with_capacity(events.len());
    let mut outcomes = vec![None; events.len()];
    for (position, event) in events.iter().enumerate() {
        match copy::check(event) {
            Ok(()) => writable.push((position, *event)),
            Err(reason) => outcomes[position] = Some(EventOutcome::Rejected(Box::new(reason))),
        }
    }
    (writable, outcomes)
}

/// Stored events per service, for `sluice_service_events_total`: one counter update per
/// distinct service of the batch, however its events interleave.
#[derive(Default)]
pub(super) struct StoredPerService(Vec<(String, u64)>);

impl StoredPerService {
    /// Batches mostly carry few services: the last one seen is tried first.
    pub(super) fn add(&mut self, service: &str) {
        if let Some((_, count)) = self.0.iter_mut().rev().find(|(known, _)| known == service) {
            *count += 1;
            return;
        }
        self.0.push((service.to_owned(), 1));
    }

    pub(super) fn record(self, counters: &Counters) {
        for (service, count) in self.0 {
            counters.service_events(&service, count);
        }
    }
}

/// Splits the batch's outcomes back per envelope and sends each envelope's ack. Dropping the
/// envelope afterwards releases its buffer permits. With `count_stored` (this writer stores into
/// PostgreSQL, not an ingest node's writer to Redis), counts the stored events per service on the way,
/// while each event's memory is at hand. With `keep_stored`, returns the events stored (moved,
/// not copied, for Tail); otherwise nothing.
fn acknowledge(
    batch: Vec<Envelope>,
    outcomes: Vec<Option<EventOutcome>>,
    counters: &Counters,
    count_stored: bool,
    keep_stored: bool,
) -> Vec<ValidEvent> {
    let mut outcomes = outcomes.into_iter();
    let mut stored = Vec::new();
    let mut per_service = StoredPerService::default();
    for mut envelope in batch {
        let mut durable = Durable::default();
        // The request's accepted events by service, for the business figures.
        let mut accepted: Vec<(String, Accepted)> = Vec::new();
        for (event, outcome) in std::mem::take(&mut envelope.events)
            .into_iter()
            .zip(outcomes.by_ref())
        {
            if matches!(
                outcome,
                Some(EventOutcome::Stored | EventOutcome::Erased | EventOutcome::Duplicate)
            ) {
                tally(&mut accepted, &event);
            }
            match outcome {
                Some(EventOutcome::Stored) => {
                    durable.stored += 1;
                    if count_stored {
                        per_service.add(&event.service);
                    }
                    if keep_stored {
                        stored.push(event);
                    }
                }
                // Accepted, then erased by a Delete or Anonymize that covered it: the client's
                // event was taken, as the call's ack says.
                Some(EventOutcome::Erased) => durable.stored += 1,
                Some(EventOutcome::Duplicate) => {
                    durable.stored += 1;
                    durable.duplicates += 1;
                }
                Some(EventOutcome::Rejected(reason)) => {
                    counters.event_rejected(&event.service, reason.as_str());
                    durable.rejected.push(EventRejection {
                        index: event.index,
                        event_id: event.id.to_string(),
                        service: event.service.clone(),
                        reason: *reason,
                    });
                }
                // Every position is filled by `write`; an empty one would be a bug, and the
                // event is then reported as not stored rather than acknowledged.
                None => {
                    tracing::error!(event_id = %event.id, "writer lost track of an event's outcome");
                    durable.rejected.push(EventRejection {
                        index: event.index,
                        event_id: event.id.to_string(),
                        service: event.service.clone(),
                        reason: crate::event::RejectReason::DatabaseRefused(
                            "not written: internal error, resend it".to_owned(),
                        ),
                    });
                }
            }
        }
        let latency = envelope.admitted_at.elapsed();
        counters.events_committed(durable.stored, durable.duplicates, latency);
        counters.figures().acknowledged(&accepted, latency);
        // A closed receiver means the client went away; its events are durable regardless.
        let _ = envelope.ack.send(durable);
    }
    per_service.record(counters);
    stored
}

/// Counts one accepted event under its service: requests mostly carry one service, so the
/// last entry is tried first.
fn tally(accepted: &mut Vec<(String, Accepted)>, event: &ValidEvent) {
    let bytes = event.message.len() + event.metadata_json.len();
    if let Some((_, counts)) = accepted
        .iter_mut()
        .rev()
        .find(|(service, _)| *service == event.service)
    {
        counts.add(bytes);
        return;
    }
    let mut counts = Accepted::default();
    counts.add(bytes);
    accepted.push((event.service.clone(), counts));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritable_events_are_split_off_with_their_positions() {
        let fine = ValidEvent::sample(0);
        let huge = ValidEvent {
            trace_id: None,
            user_id: Some("u".repeat(copy::MAX_FIELD_BYTES + 1)),
            ..fine.clone()
        };
        let (writable, outcomes) = split_unwritable(&[&fine, &huge, &fine]);
        assert_eq!(
            writable
                .iter()
                .map(|(position, _)| *position)
                .collect::<Vec<_>>(),
            [0, 2]
        );
        assert!(matches!(
            &outcomes[1],
            Some(EventOutcome::Rejected(reason)) if reason.field() == "user_id"
        ));
        assert!(outcomes[0].is_none() && outcomes[2].is_none());
    }
}
