//! The writer pool: N tasks that take envelopes from the buffer, batch them by count, bytes and
//! time, write each batch to PostgreSQL, and only then acknowledge the envelopes.

pub mod breaker;
pub mod copy;
pub mod replay;
pub mod sink;
pub mod spool;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng;
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::{
    buffer::{Buffer, BufferReceiver, Durable, Envelope},
    config::WriterConfig,
    event::{EventRejection, ValidEvent},
    metrics,
};
use breaker::{Breaker, CircuitState};
use sink::{EventOutcome, Sink};
use spool::{Spool, SpoolError};

/// What the writers share.
#[derive(Clone)]
pub struct WriterContext {
    pub config: WriterConfig,
    pub pool: PgPool,
    pub buffer: Arc<Buffer>,
    pub receiver: BufferReceiver,
    pub breaker: Arc<Breaker>,
    /// Where batches go while the circuit is open; None when the spool is disabled.
    pub spool: Option<Arc<Spool>>,
}

/// Starts `config.workers` writers. They stop once the buffer is closed and drained.
pub fn spawn(context: &WriterContext) -> JoinSet<()> {
    let mut writers = JoinSet::new();
    for worker in 0..context.config.workers {
        writers.spawn(
            Writer {
                worker,
                sink: Sink::new(
                    context.pool.clone(),
                    worker as i16,
                    context.config.write_timeout,
                ),
                context: context.clone(),
            }
            .run(),
        );
    }
    writers
}

struct Writer {
    worker: usize,
    /// Writes through the shared pool into this writer's own rollup shard.
    sink: Sink,
    context: WriterContext,
}

impl std::ops::Deref for Writer {
    type Target = WriterContext;

    fn deref(&self) -> &WriterContext {
        &self.context
    }
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
        let mut receiver = self.receiver.lock().await;
        let first = receiver.recv().await?;
        let deadline =
            tokio::time::Instant::from_std(first.admitted_at + self.config.flush_interval);
        let mut events = first.events.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while events < self.config.batch_max_events && bytes < self.config.batch_max_bytes {
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

    /// Writes one batch, then acknowledges every envelope in it. The batch goes to PostgreSQL
    /// while the circuit is closed, and to the spool while it is open. Transient failures are
    /// retried with exponential backoff and jitter until one of the two takes the batch.
    async fn write(&self, batch: Vec<Envelope>) {
        let events: Vec<&ValidEvent> = batch
            .iter()
            .flat_map(|envelope| envelope.events.iter())
            .collect();
        let started = Instant::now();
        let mut backoff = self
            .config
            .retry_initial_backoff
            .max(Duration::from_millis(10));
        let mut attempt = 0u32;
        let outcomes = loop {
            attempt += 1;
            if self.breaker.allow() {
                match self.sink.write_batch(&events).await {
                    Ok(outcomes) => {
                        self.breaker.record_success();
                        break outcomes;
                    }
                    Err(error) => {
                        self.breaker.record_failure();
                        metrics::writer_error(sink::classify(&error).as_str());
                        tracing::warn!(worker = self.worker, attempt, events = events.len(), %error, "batch write failed");
                    }
                }
            }
            if self.breaker.state() != CircuitState::Closed
                && let Some(spool) = &self.spool
            {
                match spool_batch(spool, &events).await {
                    Ok(()) => {
                        metrics::events_spooled(events.len(), spool.bytes());
                        break vec![EventOutcome::Stored; events.len()];
                    }
                    Err(error) => {
                        metrics::writer_error("spool");
                        tracing::error!(worker = self.worker, %error, "cannot spool batch; events stay in the buffer");
                    }
                }
            }
            let delay = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(self.config.retry_max_backoff);
        };
        if attempt > 1 {
            tracing::info!(worker = self.worker, attempt, "batch written after retries");
        }
        metrics::batch_written(events.len(), started.elapsed());
        self.buffer.record_drained(events.len());
        drop(events);
        acknowledge(batch, outcomes);
    }
}

/// Appends a batch to the spool on a blocking thread (the append fsyncs).
async fn spool_batch(spool: &Arc<Spool>, events: &[&ValidEvent]) -> Result<(), SpoolError> {
    let payload = Spool::encode(events)?;
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || spool.append_encoded(payload))
        .await
        .map_err(|join| SpoolError::Io {
            path: "spool".into(),
            source: std::io::Error::other(join),
        })?
}

/// Splits the batch's outcomes back per envelope and sends each envelope's ack. Dropping the
/// envelope afterwards releases its buffer permits.
fn acknowledge(batch: Vec<Envelope>, outcomes: Vec<EventOutcome>) {
    let mut outcomes = outcomes.into_iter();
    for envelope in batch {
        let mut durable = Durable::default();
        for (event, outcome) in envelope.events.iter().zip(outcomes.by_ref()) {
            match outcome {
                EventOutcome::Stored => durable.stored += 1,
                EventOutcome::Duplicate => {
                    durable.stored += 1;
                    durable.duplicates += 1;
                }
                EventOutcome::DeadLettered { reason } => {
                    durable.dead_lettered.push(EventRejection {
                        index: event.index,
                        event_id: event.id.to_string(),
                        field: "event",
                        reason,
                        metric_reason: "database_refused",
                    })
                }
            }
        }
        metrics::events_committed(&durable, envelope.admitted_at.elapsed());
        // A closed receiver means the client went away; its events are durable regardless.
        let _ = envelope.ack.send(durable);
    }
}
