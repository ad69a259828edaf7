//! Writing one batch to PostgreSQL.
//!
//! - Fast path: one binary `COPY events` (atomic on its own).
//! - A unique violation (an event resent with the same id) switches the batch to the
//!   idempotent path: COPY into a temporary staging table, then
//!   `INSERT … SELECT … ON CONFLICT DO NOTHING`, all in one transaction.
//! - A data error (a value PostgreSQL refuses) bisects the batch until the bad events are
//!   isolated; those go to `dead_letters` and the rest commit.
//! - A missing partition is created, then the batch is retried.
//! - Anything else (connection lost, database down) is returned as transient: the caller retries.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool, postgres::PgCopyIn};
use uuid::Uuid;

use super::{copy, erasures};
use crate::{
    event::{RejectReason, ValidEvent},
    metrics::{self, WriteFailure},
    privacy::SharedPrivacy,
    store::{self, partitions},
};

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    Stored,
    Duplicate,
    /// Not stored: an erasure (Delete) that ended after the event was admitted covers it.
    Erased,
    /// Not stored: refused before the write, or by PostgreSQL (then kept in `dead_letters`).
    /// Boxed: a batch holds an outcome per event, nearly all `Stored`, and the reason would
    /// make every one of them several times larger.
    Rejected(Box<RejectReason>),
}

/// How a database error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An id already stored: retry idempotently.
    Duplicate,
    /// No partition for a row's timestamp: create it, retry.
    MissingPartition,
    /// A value the database refuses: isolate the offending events.
    BadData,
    /// Anything else: retry later with backoff.
    Transient,
}

impl From<FailureKind> for WriteFailure {
    fn from(kind: FailureKind) -> Self {
        match kind {
            FailureKind::Duplicate => Self::Duplicate,
            FailureKind::MissingPartition => Self::MissingPartition,
            FailureKind::BadData => Self::BadData,
            FailureKind::Transient => Self::Transient,
        }
    }
}

/// Classifies an error by SQLSTATE.
pub fn classify(error: &sqlx::Error) -> FailureKind {
    let Some(database_error) = error.as_database_error() else {
        return FailureKind::Transient;
    };
    let code = store::sqlstate(error).unwrap_or_default();
    match code.as_str() {
        store::sqlstates::UNIQUE_VIOLATION => FailureKind::Duplicate,
        store::sqlstates::CHECK_VIOLATION if database_error.message().contains("no partition") => {
            FailureKind::MissingPartition
        }
        // Data exceptions, integrity violations, program limits (e.g. an index row too large).
        state if state.starts_with("22") || state.starts_with("23") || state.starts_with("54") => {
            FailureKind::BadData
        }
        _ => FailureKind::Transient,
    }
}

/// How much of a batch's COPY is encoded before it is sent. PostgreSQL parses the first rows
/// while the next ones are encoded, and the buffer (ours, and sqlx's copy of it on its way to
/// the socket) stays this small and in the cache, instead of growing to the whole batch (a
/// megabyte and more of a default batch, written cold, then copied cold).
const COPY_CHUNK_BYTES: usize = 128 * 1024;

/// The largest COPY buffer a writer keeps between batches: a chunk and a row of a few hundred
/// bytes fit; a buffer grown past it by an unusually wide row is freed.
const MAX_KEPT_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// Writes batches through one pool, counting stored events into its own rollup shard, so
/// writers never wait on each other's rollup rows.
#[derive(Debug)]
pub struct Sink {
    pool: PgPool,
    /// For the erasures that anonymize what they cover.
    privacy: SharedPrivacy,
    shard: i16,
    timeout: Duration,
    /// The COPY buffer of the last batch (a chunk of it at a time), reused by the next. A fresh
    /// buffer per batch came from pages the allocator had returned to the system, and the
    /// kernel zeroing them took 4% of the server's CPU (BENCHMARKS.md, "One COPY buffer per
    /// writer").
    payload: Mutex<BytesMut>,
}

impl Sink {
    /// `timeout` bounds each database step of a batch write: a database that hangs (a
    /// black-holed network, a lock held for long) counts as a failure for the circuit breaker
    /// instead of stalling.
    pub fn new(pool: PgPool, shard: i16, timeout: Duration, privacy: SharedPrivacy) -> Self {
        Self {
            pool,
            privacy,
            shard,
            timeout,
            payload: Mutex::new(BytesMut::new()),
        }
    }

    /// Sends `events` through `copy_in` as one binary COPY, encoded in pieces of about
    /// [`COPY_CHUNK_BYTES`] into the buffer the last batch left (see [`Self::keep_payload`]).
    /// An event that [`copy::check`] refuses fails the write (writers reject those before they
    /// reach a sink), and the COPY, dropped unfinished, stores nothing of it.
    /// With `rollup`, each event is also counted there as its row is written (while its
    /// memory is at hand, not in a pass of its own).
    async fn send_rows<'a>(
        &self,
        copy_in: &mut PgCopyIn<&mut PgConnection>,
        events: &[&'a ValidEvent],
        rollup: Option<&mut Rollup<'a>>,
    ) -> Result<(), sqlx::Error> {
        let mut buffer =
            std::mem::take(&mut *self.payload.lock().unwrap_or_else(PoisonError::into_inner));
        buffer.clear();
        let sent = send_rows(copy_in, events, &mut buffer, rollup).await;
        self.keep_payload(buffer);
        sent
    }

    /// Keeps `payload`'s memory for the next batch, unless it grew past
    /// [`MAX_KEPT_PAYLOAD_BYTES`].
    fn keep_payload(&self, mut payload: BytesMut) {
        if payload.capacity() > MAX_KEPT_PAYLOAD_BYTES {
            return;
        }
        payload.clear();
        *self.payload.lock().unwrap_or_else(PoisonError::into_inner) = payload;
    }

    /// Bounds one database step (a transaction), not a whole batch: isolating bad rows takes
    /// many steps and must be able to finish.
    async fn timed<T>(
        &self,
        step: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        match tokio::time::timeout(self.timeout, step).await {
            Ok(result) => result,
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("a database write took longer than {:?}", self.timeout),
            ))),
        }
    }

    /// Writes `events`, returning one outcome per event in order, or the transient error that
    /// stopped it (nothing of the batch is then committed by the failing step; retrying is safe
    /// because retries are idempotent).
    /// `admitted_at` is when the batch's first event was admitted (None: not known): the
    /// erasures that ended after it reach the batch ([`erasures`]).
    pub async fn write_batch(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<EventOutcome>, sqlx::Error> {
        let pool = &self.pool;
        let mut created_partitions = false;
        loop {
            let error = match self.timed(self.copy_fast(events, admitted_at)).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(error) => error,
            };
            match classify(&error) {
                FailureKind::Duplicate | FailureKind::BadData => {
                    return self.write_isolating(events, admitted_at).await;
                }
                FailureKind::MissingPartition if !created_partitions => {
                    self.timed(create_partitions_for(pool, events)).await?;
                    created_partitions = true;
                }
                FailureKind::MissingPartition => {
                    return self.write_isolating(events, admitted_at).await;
                }
                FailureKind::Transient => return Err(error),
            }
        }
    }

    /// The events of a write that the erasures reaching it leave (anonymized where one
    /// anonymizes), read in the write's transaction under the erasure lock; one outcome per
    /// event, `Erased` or `Stored`. None when no erasure reaches the write (the usual case):
    /// every event is then written as it is, with no per-event copy or pass for nothing.
    async fn after_erasures<'a>(
        &self,
        transaction: &mut PgConnection,
        events: &[&'a ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<Option<(Vec<Cow<'a, ValidEvent>>, Vec<EventOutcome>)>, sqlx::Error> {
        let reaching = erasures::Reaching::read(transaction, admitted_at).await?;
        if reaching.is_empty() {
            return Ok(None);
        }
        let privacy = self.privacy.load();
        let mut kept = Vec::with_capacity(events.len());
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            match reaching.apply(event, &privacy) {
                Some(event) => {
                    kept.push(event);
                    outcomes.push(EventOutcome::Stored);
                }
                None => outcomes.push(EventOutcome::Erased),
            }
        }
        let erased = events.len() - kept.len();
        if erased > 0 {
            metrics::events_erased(erased as u64);
            tracing::info!(erased, "events covered by an erasure were not written");
        }
        Ok(Some((kept, outcomes)))
    }

    async fn copy_fast(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<EventOutcome>, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let left = self
            .after_erasures(&mut transaction, events, admitted_at)
            .await?;
        let (kept, outcomes) = kept_events(events, left.as_ref());
        if !kept.is_empty() {
            let statement = format!("COPY events ({}) FROM STDIN (FORMAT binary)", copy::COLUMNS);
            let mut copy_in = transaction.copy_in_raw(&statement).await?;
            let mut rollup = Rollup::default();
            self.send_rows(&mut copy_in, &kept, Some(&mut rollup))
                .await?;
            copy_in.finish().await?;
            add_to_rollup(&mut transaction, self.shard, rollup).await?;
        }
        transaction.commit().await?;
        Ok(outcomes)
    }

    /// The idempotent path with bisection of bad rows.
    fn write_isolating<'a>(
        &'a self,
        events: &'a [&'a ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> BoxFuture<'a, Result<Vec<EventOutcome>, sqlx::Error>> {
        Box::pin(async move {
            let pool = &self.pool;
            let mut created_partitions = false;
            loop {
                let error = match self
                    .timed(self.insert_deduplicated(events, admitted_at))
                    .await
                {
                    Ok(outcomes) => return Ok(outcomes),
                    Err(error) => error,
                };
                match classify(&error) {
                    FailureKind::MissingPartition if !created_partitions => {
                        self.timed(create_partitions_for(pool, events)).await?;
                        created_partitions = true;
                    }
                    FailureKind::Transient => return Err(error),
                    FailureKind::Duplicate
                    | FailureKind::BadData
                    | FailureKind::MissingPartition => {
                        if let [event] = events {
                            let mut reason = client_reason(&error);
                            match self.timed(dead_letter(pool, event, &error)).await {
                                Ok(()) => {}
                                Err(transient)
                                    if classify(&transient) == FailureKind::Transient =>
                                {
                                    return Err(transient);
                                }
                                // The dead-letter row itself is refused: still tell the client,
                                // never retry a batch forever for it.
                                Err(refused) => {
                                    tracing::error!(event_id = %event.id, error = %refused, "cannot keep refused event in dead letters");
                                    metrics::writer_error(WriteFailure::DeadLetterRefused);
                                    reason
                                        .push_str("; it could not be kept in dead letters either");
                                }
                            }
                            return Ok(vec![EventOutcome::Rejected(Box::new(
                                RejectReason::DatabaseRefused(reason),
                            ))]);
                        }
                        let (left, right) = events.split_at(events.len() / 2);
                        let mut outcomes = self.write_isolating(left, admitted_at).await?;
                        outcomes.extend(self.write_isolating(right, admitted_at).await?);
                        return Ok(outcomes);
                    }
                }
            }
        })
    }

    async fn insert_deduplicated(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<Vec<EventOutcome>, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let left = self
            .after_erasures(&mut transaction, events, admitted_at)
            .await?;
        let (kept, mut outcomes) = kept_events(events, left.as_ref());
        let events = kept.as_slice();
        sqlx::query("CREATE TEMP TABLE IF NOT EXISTS sluice_staging (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        .execute(&mut *transaction)
        .await?;
        let statement = format!(
            "COPY sluice_staging ({}) FROM STDIN (FORMAT binary)",
            copy::COLUMNS
        );
        let mut copy_in = transaction.copy_in_raw(&statement).await?;
        self.send_rows(&mut copy_in, events, None).await?;
        copy_in.finish().await?;
        let inserted: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO events ({columns}) SELECT {columns} FROM sluice_staging ON CONFLICT DO NOTHING RETURNING id, ts",
            columns = copy::COLUMNS
        )))
        .fetch_all(&mut *transaction)
        .await?;
        // The key is (id, ts): count the rows inserted per key, and give them to the first
        // events of the batch with that key; the rest were already stored.
        let mut newly_stored: HashMap<(Uuid, DateTime<Utc>), usize> = HashMap::new();
        for key in inserted {
            *newly_stored.entry(key).or_default() += 1;
        }
        let written: Vec<EventOutcome> = events
            .iter()
            .map(
                |event| match newly_stored.get_mut(&(event.id, event.timestamp)) {
                    Some(remaining) if *remaining > 0 => {
                        *remaining -= 1;
                        EventOutcome::Stored
                    }
                    _ => EventOutcome::Duplicate,
                },
            )
            .collect();
        let mut rollup = Rollup::default();
        for (event, _) in events
            .iter()
            .zip(&written)
            .filter(|(_, outcome)| **outcome == EventOutcome::Stored)
        {
            rollup.add(event);
        }
        add_to_rollup(&mut transaction, self.shard, rollup).await?;
        let conflicting = if written.contains(&EventOutcome::Duplicate) {
            count_conflicting(&mut transaction).await?
        } else {
            0
        };
        transaction.commit().await?;
        metrics::duplicates_conflicting(conflicting);
        // The written events' outcomes in the places the erasures left them.
        let mut written = written.into_iter();
        for outcome in &mut outcomes {
            if *outcome == EventOutcome::Stored
                && let Some(written) = written.next()
            {
                *outcome = written;
            }
        }
        Ok(outcomes)
    }
}

/// Staged events whose `(id, ts)` is stored with other content: the first version stays (the
/// idempotency-key rule), and a client that reuses ids for new events shows up in
/// `sluice_events_duplicate_conflicting_total`.
async fn count_conflicting(connection: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let conflicting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sluice_staging s JOIN events e ON e.id = s.id AND e.ts = s.ts \
         WHERE (e.service, e.message, e.user_id, e.metadata) \
         IS DISTINCT FROM (s.service, s.message, s.user_id, s.metadata)",
    )
    .fetch_one(connection)
    .await?;
    Ok(conflicting.max(0) as u64)
}

/// Adds stored events to the per-service hourly counts of `shard`, in the caller's
/// transaction. Keys are upserted in sorted order.
async fn add_to_rollup(
    connection: &mut PgConnection,
    shard: i16,
    Rollup(counts): Rollup<'_>,
) -> Result<(), sqlx::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let services: Vec<&str> = counts.keys().map(|(service, _)| *service).collect();
    let hours: Vec<DateTime<Utc>> = counts
        .keys()
        .map(|(_, hour)| DateTime::from_timestamp(*hour, 0).unwrap_or_default())
        .collect();
    let totals: Vec<i64> = counts.values().copied().collect();
    sqlx::query(
        "INSERT INTO event_counts (service, hour, shard, events) \
         SELECT service, hour, $4, events FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) \
         AS counts (service, hour, events) \
         ON CONFLICT (service, hour, shard) DO UPDATE SET events = event_counts.events + excluded.events",
    )
    .bind(services)
    .bind(hours)
    .bind(totals)
    .bind(shard)
    .execute(connection)
    .await?;
    Ok(())
}

/// The events to write, and every event's outcome so far, given what the erasures left
/// ([`Sink::after_erasures`]; None: all of them, as they are).
fn kept_events<'a>(
    events: &[&'a ValidEvent],
    left: Option<&'a (Vec<Cow<'a, ValidEvent>>, Vec<EventOutcome>)>,
) -> (Vec<&'a ValidEvent>, Vec<EventOutcome>) {
    match left {
        None => (events.to_vec(), vec![EventOutcome::Stored; events.len()]),
        Some((kept, outcomes)) => (kept.iter().map(AsRef::as_ref).collect(), outcomes.clone()),
    }
}

/// Stored events per service and hour (the keys of `event_counts`), counted one event at a
/// time.
#[derive(Debug, Default)]
struct Rollup<'a>(BTreeMap<(&'a str, i64), i64>);

impl<'a> Rollup<'a> {
    fn add(&mut self, event: &'a ValidEvent) {
        let hour = event.timestamp.timestamp().div_euclid(3600) * 3600;
        *self.0.entry((event.service.as_str(), hour)).or_default() += 1;
    }
}

async fn dead_letter(
    pool: &PgPool,
    event: &ValidEvent,
    error: &sqlx::Error,
) -> Result<(), sqlx::Error> {
    insert_dead_letter(pool, event, &database_reason(error), store::sqlstate(error)).await?;
    tracing::warn!(event_id = %event.id, service = %event.service, error = %database_reason(error), "event refused by PostgreSQL, moved to dead letters");
    Ok(())
}

/// Keeps an event no writer could store (its stream entry went past `redis.max_deliveries`).
pub(crate) async fn dead_letter_undeliverable(
    pool: &PgPool,
    event: &ValidEvent,
    reason: &str,
) -> Result<(), sqlx::Error> {
    insert_dead_letter(pool, event, reason, None).await
}

/// Keeps a stream entry no writer can read, as its raw payload (`service` is `(unreadable)`).
pub(crate) async fn dead_letter_unreadable(
    pool: &PgPool,
    payload: &[u8],
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (event_id, ts, service, raw, error) \
         VALUES ($1, now(), '(unreadable)', $2, $3)",
    )
    .bind(Uuid::now_v7())
    .bind(payload)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

async fn insert_dead_letter(
    pool: &PgPool,
    event: &ValidEvent,
    reason: &str,
    sqlstate: Option<String>,
) -> Result<(), sqlx::Error> {
    let raw = serde_json::json!({
        "id": event.id,
        "service": event.service,
        "message": event.message,
        "timestamp": event.timestamp,
        "user_id": event.user_id,
        "metadata": event.metadata_json,
    });
    // Strip NUL so that the user id stays findable for deletion even when it was the culprit.
    let user_id = event
        .user_id
        .as_ref()
        .map(|user_id| user_id.replace('\0', ""));
    sqlx::query(
        "INSERT INTO dead_letters (event_id, ts, service, user_id, raw, error, sqlstate) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id, ts) DO NOTHING",
    )
    .bind(event.id)
    .bind(event.timestamp)
    .bind(&event.service)
    .bind(user_id)
    .bind(raw.to_string().into_bytes())
    .bind(reason)
    .bind(sqlstate)
    .execute(pool)
    .await?;
    Ok(())
}

async fn create_partitions_for(pool: &PgPool, events: &[&ValidEvent]) -> Result<(), sqlx::Error> {
    let timestamps = events.iter().map(|event| event.timestamp);
    let (Some(oldest), Some(newest)) = (timestamps.clone().min(), timestamps.max()) else {
        return Ok(());
    };
    partitions::ensure_partitions(pool, oldest, newest)
        .await
        .map(|_| ())
}

/// `events` as one binary COPY through `copy_in`, encoded into `buffer` and sent each time it
/// holds [`COPY_CHUNK_BYTES`].
async fn send_rows<'a>(
    copy_in: &mut PgCopyIn<&mut PgConnection>,
    events: &[&'a ValidEvent],
    buffer: &mut BytesMut,
    mut rollup: Option<&mut Rollup<'a>>,
) -> Result<(), sqlx::Error> {
    buffer.reserve(COPY_CHUNK_BYTES);
    copy::put_header(buffer);
    for (position, event) in events.iter().enumerate() {
        copy::put_row(buffer, event).map_err(|reason| {
            sqlx::Error::Encode(Box::new(copy::FieldTooLong { position, reason }))
        })?;
        if let Some(rollup) = rollup.as_deref_mut() {
            rollup.add(event);
        }
        if buffer.len() >= COPY_CHUNK_BYTES {
            copy_in.send(&buffer[..]).await?;
            buffer.clear();
        }
    }
    copy::put_trailer(buffer);
    copy_in.send(&buffer[..]).await?;
    Ok(())
}

/// What the client reads: the SQLSTATE, never the database's own words (they stay in the
/// dead-letter row and the log).
fn client_reason(error: &sqlx::Error) -> String {
    match store::sqlstate(error) {
        Some(sqlstate) => {
            format!("refused by PostgreSQL (SQLSTATE {sqlstate}); kept in dead_letters")
        }
        None => "refused by PostgreSQL; kept in dead_letters".to_owned(),
    }
}

/// The database's own words, for the dead-letter row and the log.
fn database_reason(error: &sqlx::Error) -> String {
    match error.as_database_error() {
        Some(database_error) => format!("rejected by PostgreSQL: {}", database_error.message()),
        None => format!("rejected by PostgreSQL: {error}"),
    }
}
