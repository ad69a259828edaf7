//! Series that exist from start. A counter appears on `/metrics` only once something touches
//! it, so before the first refusal a `rate()` ratio or an `absent()` alert has nothing to work
//! on and a dashboard panel says "No data" instead of 0. At start the server touches every
//! series whose labels it knows: the label sets below, and those other modules own (passed in
//! [`Known`]). A feature that is off leaves its series out (Redis mode, backups).

use metrics::{counter, gauge, histogram};

use super::{ConnectionFailure, Refusal, WriteFailure};

/// The label values other modules own, and the features in use.
#[derive(Debug, Default)]
pub struct Known<'a> {
    /// `sluice_events_rejected_total{reason}`: every rejection reason.
    pub rejection_reasons: &'a [&'static str],
    /// `sluice_auth_refusals_total{reason}`: every ErrorInfo reason of a refusal on who sent
    /// a call.
    pub auth_refusals: &'a [&'static str],
    /// `sluice_rpc_duration_seconds{method}`: every RPC, with code `OK`.
    pub rpcs: &'a [&'static str],
    /// `sluice_rate_limited_total{principal}`: the principals with rate limits.
    pub limited_principals: &'a [String],
    /// `sluice_breaker_opened_total{cause}`.
    pub breaker_causes: &'a [&'static str],
    /// Redis mode: the broker's series.
    pub redis: bool,
    /// Backups of the private cluster.
    pub backups: bool,
    /// Privacy keys from a KMS.
    pub kms: bool,
    /// sluice's own logs exported over OTLP.
    pub log_export: bool,
}

/// Counters without labels.
const PLAIN_COUNTERS: &[&str] = &[
    "sluice_events_received_total",
    "sluice_events_stored_total",
    "sluice_events_duplicate_total",
    "sluice_events_duplicate_conflicting_total",
    "sluice_events_spooled_total",
    "sluice_events_replayed_total",
    "sluice_events_erased_total",
    "sluice_spool_truncated_bytes_total",
    "sluice_spool_quarantined_total",
    "sluice_search_steps_cancelled_total",
    "sluice_audit_errors_total",
    "sluice_tail_batches_missed_total",
    "sluice_lifecycle_rows_deleted_total",
    "sluice_lifecycle_rows_archived_total",
    "sluice_lifecycle_partitions_dropped_total",
    "sluice_archive_objects_written_total",
    "sluice_archive_objects_deleted_total",
];

/// Histograms without labels.
const PLAIN_HISTOGRAMS: &[&str] = &[
    "sluice_ack_latency_seconds",
    "sluice_batch_events",
    "sluice_batch_write_seconds",
    "sluice_request_events",
];

/// `sluice_accept_errors_total{kind}`.
pub const ACCEPT_ERROR_KINDS: [&str; 5] = ["emfile", "enfile", "no_memory", "aborted", "other"];

/// `sluice_kms_failures_total{operation}`: the KMS calls a running server makes.
const KMS_OPERATIONS: [&str; 2] = ["GenerateDataKey", "Decrypt"];

/// `sluice_reads_refused_total{kind}`.
pub const READ_KINDS: [&str; 3] = ["queries", "exports", "tails"];

/// Rate limits: the `limit` label of `sluice_rate_limited_total`.
const LIMITS: [&str; 2] = ["events_per_second", "bytes_per_second"];

/// The value of a per-service or per-principal label past its first values.
const OTHER: &str = "other";

/// Touches every series `known` and this module know of, at 0.
pub fn register(known: &Known) {
    for name in PLAIN_COUNTERS {
        counter!(*name).increment(0);
    }
    for name in PLAIN_HISTOGRAMS {
        let _ = histogram!(*name);
    }
    // Counted up and down as connections come and go: none yet.
    gauge!("sluice_connections_open").increment(0.0);
    for reason in Refusal::ALL {
        counter!("sluice_events_refused_total", "reason" => reason.as_str()).increment(0);
    }
    for reason in known.rejection_reasons {
        counter!("sluice_events_rejected_total", "reason" => *reason).increment(0);
    }
    for failure in WriteFailure::ALL {
        if failure == WriteFailure::Redis && !known.redis {
            continue;
        }
        counter!("sluice_writer_errors_total", "kind" => failure.as_str()).increment(0);
    }
    for failure in ConnectionFailure::ALL {
        counter!("sluice_connections_rejected_total", "reason" => failure.as_str()).increment(0);
    }
    for kind in ACCEPT_ERROR_KINDS {
        counter!("sluice_accept_errors_total", "kind" => kind).increment(0);
    }
    for reason in known.auth_refusals {
        counter!("sluice_auth_refusals_total", "reason" => *reason).increment(0);
    }
    for principal in known.limited_principals {
        for limit in LIMITS {
            counter!("sluice_rate_limited_total", "principal" => principal.clone(), "limit" => limit)
                .increment(0);
        }
    }
    for outcome in super::OtlpOutcome::ALL {
        counter!("sluice_otlp_log_records_total", "outcome" => outcome.as_str()).increment(0);
    }
    for kind in READ_KINDS {
        counter!("sluice_reads_refused_total", "kind" => kind).increment(0);
    }
    for cause in known.breaker_causes {
        counter!("sluice_breaker_opened_total", "cause" => *cause).increment(0);
    }
    for status in ["ok", "failed"] {
        counter!("sluice_lifecycle_runs_total", "status" => status).increment(0);
    }
    for step in ["indexed", "sliced"] {
        counter!("sluice_search_steps_total", "step" => step).increment(0);
    }
    for source in ["cache", "store"] {
        counter!("sluice_archive_query_objects_total", "source" => source).increment(0);
    }
    counter!("sluice_archive_query_retries_total").increment(0);
    for kind in ["message", "metadata", "user"] {
        for outcome in ["ok", "failed"] {
            counter!("sluice_search_closed_index_builds_total", "kind" => kind, "outcome" => outcome)
                .increment(0);
        }
        let _ = histogram!("sluice_search_closed_index_build_seconds", "kind" => kind);
    }
    gauge!("sluice_search_closed_partitions_unindexed").set(0.0);
    for pools in ["write", "read"] {
        counter!("sluice_database_failovers_total", "pools" => pools).increment(0);
    }
    for method in known.rpcs {
        let _ = histogram!("sluice_rpc_duration_seconds", "method" => *method, "code" => "OK");
    }
    counter!("sluice_service_events_total", "service" => OTHER).increment(0);
    counter!("sluice_principal_events_total", "principal" => OTHER).increment(0);
    if known.redis {
        for outcome in ["stored", "duplicate"] {
            counter!("sluice_stream_events_written_total", "outcome" => outcome).increment(0);
        }
        counter!("sluice_redis_connections_replaced_total").increment(0);
    }
    if known.log_export {
        counter!("sluice_log_records_exported_total").increment(0);
        for reason in ["queue_full", "export_failed", "shut_down"] {
            counter!("sluice_log_records_dropped_total", "reason" => reason).increment(0);
        }
    }
    if known.kms {
        for operation in KMS_OPERATIONS {
            counter!("sluice_kms_failures_total", "operation" => operation).increment(0);
        }
    }
    if known.backups {
        for outcome in ["ok", "failed"] {
            counter!("sluice_backups_total", "outcome" => outcome).increment(0);
        }
    }
}
