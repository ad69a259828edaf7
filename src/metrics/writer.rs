//! The write path: the buffer, writers and their circuit, the spool, and the Redis broker.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// What went wrong in a writer: the `kind` label of `sluice_writer_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// An id already stored: the batch goes the idempotent way.
    Duplicate,
    /// No partition for a row's timestamp.
    MissingPartition,
    /// A value PostgreSQL refuses.
    BadData,
    /// Connection lost, database down, timeout: retried.
    Transient,
    /// The spool could not take a batch.
    Spool,
    /// A refused event could not be kept in `dead_letters` either.
    DeadLetterRefused,
    /// Redis refused or did not answer an append, a read or an ack (Redis mode).
    Redis,
}

impl WriteFailure {
    pub const ALL: [WriteFailure; 7] = [
        WriteFailure::Duplicate,
        WriteFailure::MissingPartition,
        WriteFailure::BadData,
        WriteFailure::Transient,
        WriteFailure::Spool,
        WriteFailure::DeadLetterRefused,
        WriteFailure::Redis,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::MissingPartition => "missing_partition",
            Self::BadData => "bad_data",
            Self::Transient => "transient",
            Self::Spool => "spool",
            Self::DeadLetterRefused => "dead_letter_refused",
            Self::Redis => "redis",
        }
    }
}

/// Events a Redis-mode writer node moved from the streams to PostgreSQL: newly `stored`, or
/// already there (`duplicate`: a redelivery after a claim, or a client's resend).
pub fn stream_events_written(stored: u64, duplicates: u64) {
    counter!("sluice_stream_events_written_total", "outcome" => "stored").increment(stored);
    counter!("sluice_stream_events_written_total", "outcome" => "duplicate").increment(duplicates);
}

/// The Redis streams' backlog, as a writer or ingest node last read it.
/// A Redis Cluster connection that stayed broken was replaced by a fresh one.
pub fn redis_connection_replaced() {
    counter!("sluice_redis_connections_replaced_total").increment(1);
}

pub fn stream_backlog(events: u64, bytes: u64) {
    gauge!("sluice_stream_backlog_events").set(events as f64);
    gauge!("sluice_stream_backlog_bytes").set(bytes as f64);
}

/// Duplicates (same `id` and `ts`) whose content differs from the stored event.
pub fn duplicates_conflicting(count: u64) {
    if count > 0 {
        counter!("sluice_events_duplicate_conflicting_total").increment(count);
    }
}

pub fn batch_written(events: usize, elapsed: Duration) {
    histogram!("sluice_batch_events").record(events as f64);
    histogram!("sluice_batch_write_seconds").record(elapsed.as_secs_f64());
}

pub fn circuit(state: &'static str) {
    for known in ["closed", "open", "half_open"] {
        gauge!("sluice_circuit_state", "state" => known).set(if known == state {
            1.0
        } else {
            0.0
        });
    }
}

/// The circuit opened; `cause` is `failures`, `slow_writes`, `error_rate` or `probe_failed`.
pub fn breaker_opened(cause: &'static str) {
    counter!("sluice_breaker_opened_total", "cause" => cause).increment(1);
}

pub fn writer_error(failure: WriteFailure) {
    counter!("sluice_writer_errors_total", "kind" => failure.as_str()).increment(1);
}

/// Buffer occupancy and capacity.
pub fn buffer(events: usize, bytes: usize, max_events: usize, max_bytes: usize) {
    gauge!("sluice_buffer_events").set(events as f64);
    gauge!("sluice_buffer_bytes").set(bytes as f64);
    gauge!("sluice_buffer_capacity_events").set(max_events as f64);
    gauge!("sluice_buffer_capacity_bytes").set(max_bytes as f64);
    // The fuller of the two bounds, 0.0 to 1.0: what admission runs out of first.
    let utilization =
        (events as f64 / max_events.max(1) as f64).max(bytes as f64 / max_bytes.max(1) as f64);
    gauge!("sluice_buffer_utilization").set(utilization);
}

pub fn serving(database_up: bool, serving: bool) {
    gauge!("sluice_database_up").set(if database_up { 1.0 } else { 0.0 });
    gauge!("sluice_ingest_serving").set(if serving { 1.0 } else { 0.0 });
}

pub fn spool_replayed(count: usize, spool_bytes: u64) {
    counter!("sluice_events_replayed_total").increment(count as u64);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

pub fn spool_recovered(truncated_bytes: u64, spool_bytes: u64) {
    counter!("sluice_spool_truncated_bytes_total").increment(truncated_bytes);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

/// A spool segment moved aside because a record in it could not be decoded; `segments` is
/// how many are now in quarantine.
pub fn spool_quarantined(segments: usize) {
    counter!("sluice_spool_quarantined_total").increment(1);
    gauge!("sluice_spool_quarantined_segments").set(segments as f64);
}

/// Bytes the spool holds now.
pub fn spool_size(bytes: u64) {
    gauge!("sluice_spool_bytes").set(bytes as f64);
}

pub fn spool_quarantine(segments: usize) {
    gauge!("sluice_spool_quarantined_segments").set(segments as f64);
}

/// Events not written because an erasure (Delete) that ended after their admission covers
/// them: another node's spool, the broker or a late write brought them after the Delete.
pub fn events_erased(count: u64) {
    counter!("sluice_events_erased_total").increment(count);
}
