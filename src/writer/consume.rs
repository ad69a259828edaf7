//! Writer nodes of Redis mode: consumers that read the streams through the consumer group,
//! write each read to PostgreSQL exactly as the direct-mode writers do (binary COPY, the
//! idempotent path for redeliveries, bad rows to `dead_letters`), and only then acknowledge
//! and delete the entries.
//!
//! - Entries a dead writer left pending are claimed after `redis.claim_idle` (`XAUTOCLAIM`).
//! - A writer waiting out a database outage renews its entries, so it is not taken for dead
//!   and its entries are not delivered again meanwhile.
//! - An entry delivered more than `redis.max_deliveries` times (it crashed or stalled writer
//!   after writer, or no writer can read it) goes to `dead_letters` with the reason.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    StoredPerService,
    breaker::Breaker,
    sink::{self, EventOutcome, Sink},
};
use chrono::{DateTime, Utc};

use crate::{
    backoff::Backoff,
    broker::{self, Broker, Entry},
    config::{RedisConfig, WriterConfig},
    event::ValidEvent,
    event::batch::{self, Batch},
    feed::TailFeed,
    metrics::{self, Counters, WriteFailure},
    privacy::SharedPrivacy,
};

/// The first rollup shard of consumers (local writers use 0..workers, replay i16::MAX).
const FIRST_SHARD: i16 = 1024;
/// Pause after Redis fails a read or an ack.
const REDIS_RETRY: Duration = Duration::from_millis(500);

/// What the consumers share.
#[derive(Clone)]
pub struct ConsumeContext {
    pub streams: Broker,
    pub pool: PgPool,
    pub writer: WriterConfig,
    pub redis: RedisConfig,
    /// The circuit of PostgreSQL writes.
    pub breaker: Arc<Breaker>,
    pub counters: Arc<Counters>,
    pub tail: Arc<TailFeed>,
    /// For the erasures that anonymize what they cover.
    pub privacy: SharedPrivacy,
    /// This node's name in the consumer group; each consumer appends its index.
    pub node: String,
    pub stopping: CancellationToken,
}

/// Starts `writer.workers` consumers. They stop at shutdown after their current read.
pub fn consumers(
    context: &ConsumeContext,
) -> impl Iterator<Item = impl Future<Output = ()> + Send + 'static> {
    let context = context.clone();
    (0..context.writer.workers).map(move |worker| run(context.clone(), worker))
}

async fn run(context: ConsumeContext, worker: usize) {
    let name = format!("{}-{worker}", context.node);
    let streams = loop {
        match context.streams.reader().await {
            Ok(streams) => break streams,
            Err(error) => {
                tracing::warn!(consumer = %name, %error, "cannot open a redis connection; retrying");
                if wait_or_stop(&context.stopping, REDIS_RETRY).await {
                    return;
                }
            }
        }
    };
    let consumer = Consumer {
        sink: Sink::new(
            context.pool.clone(),
            FIRST_SHARD + worker as i16,
            context.writer.write_timeout,
            context.privacy.clone(),
        ),
        name,
        worker,
        streams,
        context,
    };
    consumer.run().await;
}

struct Consumer {
    name: String,
    /// Worker 0 of each node also removes consumers of writers long gone.
    worker: usize,
    streams: Broker,
    sink: Sink,
    context: ConsumeContext,
}

impl Consumer {
    async fn run(self) {
        tracing::info!(consumer = %self.name, "stream consumer started");
        let claim_every = self.context.redis.claim_idle / 2;
        let mut last_claim: Option<Instant> = None;
        let mut acking: Option<JoinHandle<()>> = None;
        while !self.context.stopping.is_cancelled() {
            let claiming = last_claim.is_none_or(|at| at.elapsed() >= claim_every);
            let read = if claiming {
                last_claim = Some(Instant::now());
                self.streams.claim_stale(&self.name).await
            } else {
                self.streams.read_new(&self.name).await
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(error) if broker::is_missing_group(&error) => {
                    tracing::warn!(consumer = %self.name, %error, "a stream lost its consumer group; creating it again");
                    if let Err(error) = self.streams.create_group().await {
                        tracing::warn!(consumer = %self.name, %error, "cannot create the consumer group");
                    }
                    if wait_or_stop(&self.context.stopping, REDIS_RETRY).await {
                        break;
                    }
                    continue;
                }
                Err(error) => {
                    metrics::writer_error(WriteFailure::Redis);
                    tracing::warn!(consumer = %self.name, %error, "cannot read the streams; retrying");
                    if wait_or_stop(&self.context.stopping, REDIS_RETRY).await {
                        break;
                    }
                    continue;
                }
            };
            if claiming && !entries.is_empty() {
                tracing::info!(consumer = %self.name, entries = entries.len(), "claimed entries another writer left pending");
            }
            if claiming && self.worker == 0 {
                match self.streams.forget_idle_consumers().await {
                    Ok(0) => {}
                    Ok(forgotten) => {
                        tracing::info!(consumer = %self.name, forgotten, "removed consumers of writers gone for redis.consumer_expiry");
                    }
                    Err(error) => {
                        tracing::warn!(consumer = %self.name, %error, "cannot look for idle consumers");
                    }
                }
            }
            if !entries.is_empty() {
                self.handle(entries, &mut acking).await;
            }
        }
        finish(acking.take()).await;
        tracing::info!(consumer = %self.name, "stream consumer stopped");
    }

    /// Stores the events of `entries` (or dead-letters those past `max_deliveries`), keeping
    /// them owned meanwhile, then acknowledges what is done while the next read and COPY go
    /// on: they need not wait for Redis to fsync the acks. One ack at a time per consumer
    /// (`acking`, awaited before the next starts). Entries that cannot be read stay pending
    /// (a newer writer may read them) until they are past `max_deliveries`.
    async fn handle(&self, entries: Vec<Entry>, acking: &mut Option<JoinHandle<()>>) {
        let held: Vec<&Entry> = entries.iter().collect();
        let done = self.renewing(&held, self.store(&entries)).await;
        // What the ack needs of each entry: its id, shard and counts, not its events.
        let done: Vec<Entry> = entries
            .into_iter()
            .enumerate()
            .filter(|(index, _)| done.contains(index))
            .map(|(_, mut entry)| {
                if let Ok(batch) = &mut entry.events {
                    batch.events = Vec::new();
                }
                entry
            })
            .collect();
        finish(acking.take()).await;
        if done.is_empty() {
            return;
        }
        // On the node's shared connection: this consumer's own may be blocked in a read.
        let streams = self.context.streams.clone();
        let name = self.name.clone();
        let stopping = self.context.stopping.clone();
        *acking = Some(tokio::spawn(async move {
            acknowledge(&streams, &name, &stopping, &done).await;
        }));
    }

    /// Runs `work` while keeping `entries` owned: renewed every third of `claim_idle`, so that
    /// no step, however slow (a long COPY, a database outage), lets another writer take them
    /// for abandoned and count a delivery.
    async fn renewing<T>(&self, entries: &[&Entry], work: impl Future<Output = T>) -> T {
        let mut ticker = tokio::time::interval(self.context.redis.claim_idle / 3);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the entries were just delivered.
        ticker.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = ticker.tick() => {
                    if let Err(error) = self.streams.renew(&self.name, entries).await {
                        tracing::warn!(consumer = %self.name, %error, "cannot renew pending entries");
                    }
                }
            }
        }
    }

    /// The indices of the entries that are done: stored, or dead-lettered past
    /// `max_deliveries`. At shutdown only those dead-lettered so far; the rest stay pending
    /// for another writer.
    async fn store(&self, entries: &[Entry]) -> Vec<usize> {
        let max_deliveries = self.context.redis.max_deliveries;
        let mut done = Vec::new();
        let mut readable = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            if entry.deliveries > max_deliveries {
                if self.context.stopping.is_cancelled() {
                    return done;
                }
                if self.dead_letter(entry).await {
                    done.push(index);
                }
                continue;
            }
            match &entry.events {
                Ok(_) => readable.push(index),
                Err(reason) => {
                    tracing::error!(consumer = %self.name, entry = %entry.id, deliveries = entry.deliveries, %reason, "cannot read a stream entry; left for another delivery");
                }
            }
        }
        let batches: Vec<&Batch> = readable
            .iter()
            .filter_map(|index| entries[*index].events.as_ref().ok())
            .collect();
        let events: Vec<&ValidEvent> = batches
            .iter()
            .flat_map(|batch| batch.events.iter())
            .collect();
        let admitted_at = batch::earliest(batches.iter().map(|batch| batch.admitted_at));
        let Some(outcomes) = self.write(&events, admitted_at).await else {
            return done;
        };
        self.account(&events, &outcomes);
        done.extend(readable);
        done
    }

    /// Writes `events` until PostgreSQL takes them; None when the server stops first (their
    /// entries stay pending and are claimed after `claim_idle`).
    async fn write(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Option<Vec<EventOutcome>> {
        if events.is_empty() {
            return Some(Vec::new());
        }
        let context = &self.context;
        let mut backoff = Backoff::jittered(
            context
                .writer
                .retry_initial_backoff
                .max(Duration::from_millis(10)),
            context.writer.retry_max_backoff,
        );
        let started = Instant::now();
        loop {
            if context.breaker.allow() {
                let write_started = Instant::now();
                match self.sink.write_batch(events, admitted_at).await {
                    Ok(outcomes) => {
                        context.breaker.record_success(write_started.elapsed());
                        metrics::batch_written(events.len(), started.elapsed());
                        return Some(outcomes);
                    }
                    Err(error) => {
                        context.breaker.record_failure();
                        metrics::writer_error(sink::classify(&error).into());
                        tracing::warn!(consumer = %self.name, events = events.len(), %error, "batch write failed; the entries stay pending");
                    }
                }
            }
            if wait_or_stop(&context.stopping, backoff.next_delay()).await {
                return None;
            }
        }
    }

    /// Counts what was stored and hands it to Tail (copies of the events only while someone
    /// tails).
    fn account(&self, events: &[&ValidEvent], outcomes: &[EventOutcome]) {
        let counters = &self.context.counters;
        let tailed = self.context.tail.has_subscribers();
        let mut stored = Vec::new();
        let mut per_service = StoredPerService::default();
        let (mut written, mut duplicates) = (0u64, 0u64);
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome {
                EventOutcome::Stored => {
                    written += 1;
                    per_service.add(&event.service);
                    if tailed {
                        stored.push((*event).clone());
                    }
                }
                EventOutcome::Duplicate => duplicates += 1,
                EventOutcome::Erased => {}
                EventOutcome::Rejected(reason) => {
                    counters.event_rejected(&event.service, reason.as_str());
                }
            }
        }
        per_service.record(counters);
        metrics::stream_events_written(written, duplicates);
        if tailed && !stored.is_empty() {
            self.context.tail.publish(stored);
        }
    }

    /// Moves an entry past `max_deliveries` to `dead_letters`: its events, or, when it cannot
    /// be read, the entry itself. False when that failed (the entry then stays pending).
    async fn dead_letter(&self, entry: &Entry) -> bool {
        let reason = format!(
            "stream entry {} delivered {} times (redis.max_deliveries is {}) without being stored",
            entry.id, entry.deliveries, self.context.redis.max_deliveries
        );
        let written = match &entry.events {
            // Stops at the first failure: the entry then stays pending, and is tried again.
            Ok(batch) => {
                let mut outcome = Ok(());
                for event in &batch.events {
                    outcome =
                        sink::dead_letter_undeliverable(&self.context.pool, event, &reason).await;
                    if outcome.is_err() {
                        break;
                    }
                }
                outcome
            }
            Err(unreadable) => {
                sink::dead_letter_unreadable(
                    &self.context.pool,
                    &entry.payload,
                    &format!("{reason}: {unreadable}"),
                )
                .await
            }
        };
        match written {
            Ok(()) => {
                self.context.counters.events_rejected(
                    crate::figures::UNKNOWN_SERVICE,
                    "undeliverable",
                    entry.event_count.max(1),
                );
                tracing::error!(consumer = %self.name, entry = %entry.id, deliveries = entry.deliveries, "stream entry moved to dead letters");
                true
            }
            Err(error) => {
                metrics::writer_error(WriteFailure::DeadLetterRefused);
                tracing::error!(consumer = %self.name, entry = %entry.id, %error, "cannot dead-letter a stream entry; it stays pending");
                false
            }
        }
    }
}

/// Acknowledges stored or dead-lettered entries, retrying while Redis is away (an entry
/// not acknowledged is stored again after a claim: a duplicate, never a loss).
async fn acknowledge(
    streams: &Broker,
    consumer: &str,
    stopping: &CancellationToken,
    entries: &[Entry],
) {
    let entries: Vec<&Entry> = entries.iter().collect();
    loop {
        match streams.ack(&entries).await {
            Ok(_) => return,
            Err(error) => {
                metrics::writer_error(WriteFailure::Redis);
                tracing::warn!(consumer, %error, "cannot acknowledge stored entries; retrying");
                if wait_or_stop(stopping, REDIS_RETRY).await {
                    return;
                }
            }
        }
    }
}

/// Waits for a consumer's ack in flight, if any.
async fn finish(acking: Option<JoinHandle<()>>) {
    let Some(acking) = acking else {
        return;
    };
    if let Err(error) = acking.await {
        tracing::error!(%error, "an acknowledgement task failed; its entries stay pending");
    }
}

/// Sleeps `delay`, or less if the server starts stopping; true when it is stopping.
async fn wait_or_stop(stopping: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = stopping.cancelled() => {}
    }
    stopping.is_cancelled()
}
