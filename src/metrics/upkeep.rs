//! The server's upkeep: readiness checks, database failovers, backups and lifecycle runs.

use metrics::{counter, gauge, histogram};

/// Free bytes on a watched volume (`data`, `spool`).
pub fn disk_free(volume: &'static str, bytes: u64) {
    gauge!("sluice_disk_free_bytes", "volume" => volume).set(bytes as f64);
}

/// The server's resident memory.
pub fn resident_memory(bytes: u64) {
    gauge!("sluice_resident_memory_bytes").set(bytes as f64);
}

/// One readiness check: 1 when it passes, 0 when it fails.
pub fn health_check(check: &'static str, ok: bool) {
    gauge!("sluice_health_check", "check" => check).set(if ok { 1.0 } else { 0.0 });
}

/// A KMS call failed (`operation`: `GenerateDataKey`, `Decrypt`, ...).
pub fn kms_failure(operation: &'static str) {
    counter!("sluice_kms_failures_total", "operation" => operation).increment(1);
}

/// sluice's own log records sent over OTLP.
pub fn log_records_exported(records: u64) {
    counter!("sluice_log_records_exported_total").increment(records);
}

/// sluice's own log records not sent (`reason`: `queue_full`, `export_failed`, `shut_down`).
pub fn log_records_dropped(reason: &'static str, records: u64) {
    counter!("sluice_log_records_dropped_total", "reason" => reason).increment(records);
}

/// A pool moved to another database host (`pools`: `write`, `read`).
pub fn database_failover(pools: &'static str) {
    counter!("sluice_database_failovers_total", "pools" => pools).increment(1);
}

/// A base backup was taken (or failed).
pub fn backup_taken(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!("sluice_backups_total", "outcome" => outcome).increment(1);
}

/// Unix time at which the newest base backup finished.
pub fn backup_finished_at(seconds: f64) {
    gauge!("sluice_backup_last_finished_timestamp_seconds").set(seconds);
}

/// The WAL archiver: when it last archived a segment, and how many attempts failed.
pub fn wal_archiver(last_archived: Option<f64>, failed: i64) {
    if let Some(seconds) = last_archived {
        gauge!("sluice_wal_last_archived_timestamp_seconds").set(seconds);
    }
    gauge!("sluice_wal_archive_failures").set(failed as f64);
}

/// What one lifecycle run did.
#[derive(Debug, Default)]
pub struct LifecycleTotals {
    pub rows_deleted: u64,
    pub rows_archived: u64,
    pub objects_written: u64,
    pub objects_deleted: u64,
    pub partitions_dropped: u64,
}

/// A lifecycle run ended (`status`: `ok` or `failed`).
pub fn lifecycle_run(status: &'static str, totals: LifecycleTotals) {
    counter!("sluice_lifecycle_runs_total", "status" => status).increment(1);
    counter!("sluice_lifecycle_rows_deleted_total").increment(totals.rows_deleted);
    counter!("sluice_lifecycle_rows_archived_total").increment(totals.rows_archived);
    counter!("sluice_archive_objects_written_total").increment(totals.objects_written);
    counter!("sluice_archive_objects_deleted_total").increment(totals.objects_deleted);
    counter!("sluice_lifecycle_partitions_dropped_total").increment(totals.partitions_dropped);
}

/// A closed partition's search index was built (or its build failed), in `seconds`.
pub fn closed_index_built(kind: &'static str, ok: bool, seconds: f64) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!("sluice_search_closed_index_builds_total", "kind" => kind, "outcome" => outcome)
        .increment(1);
    histogram!("sluice_search_closed_index_build_seconds", "kind" => kind).record(seconds);
}

/// Closed partitions still lacking a search index after a build round.
pub fn closed_partitions_unindexed(count: usize) {
    gauge!("sluice_search_closed_partitions_unindexed").set(count as f64);
}
