//! Prometheus metrics. Every event that is not stored is counted here with its reason.
//!
//! A leaf module: callers pass plain numbers and the typed reasons below (or a rejection
//! reason's own `as_str()`), never their domain types.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_events_received_total` | counter | |
//! | `sluice_events_rejected_total` | counter | `reason` (a validation reason, `field_too_long` or `database_refused`) |
//! | `sluice_events_refused_total` | counter | `reason` ([`Refusal`]: `buffer_full`, `over_share`, `backlog_full`, `shutting_down`, `too_large`, `rate_limited`) |
//! | `sluice_events_stored_total` | counter | |
//! | `sluice_events_duplicate_total` | counter | |
//! | `sluice_events_duplicate_conflicting_total` | counter | |
//! | `sluice_ack_latency_seconds` | histogram | |
//! | `sluice_event_commit_seconds` | histogram | | (per event: admitted to the buffer → committed) |
//! | `sluice_service_events_total` | counter | `service` (the first [`TOP_LABEL_VALUES`] services stored since start, then `other`) |
//! | `sluice_principal_events_total` | counter | `principal` (the first [`TOP_LABEL_VALUES`] principals that sent events, then `other`) |
//! | `sluice_batch_events`, `sluice_batch_write_seconds` | histogram | |
//! | `sluice_request_events`, `sluice_event_bytes` | histogram | |
//! | `sluice_otlp_log_records_total` | counter | `outcome` (`stored`, `rejected` in a partial success, `refused` with the whole export) |
//! | `sluice_rpc_duration_seconds` | histogram | `method` (every RPC of `rpc::Rpc`), `code` | (until the call's status: a stream's whole life) |
//! | `sluice_search_steps_cancelled_total` | counter | | (a time-sliced scan's step cancelled at `search.max_scan_time`) |
//! | `sluice_search_steps_total` | counter | `step` (`indexed`: one partition through its closed-partition index; `sliced`: one time slice) |
//! | `sluice_archive_query_objects_total` | counter | `source` (`cache`: decoded by an earlier call; `store`: fetched, sha256-checked and decoded) |
//! | `sluice_archive_query_retries_total` | counter | | (a Query page read again: the archive changed under it) |
//! | `sluice_search_closed_index_builds_total` | counter | `kind` (`message`, `metadata`), `outcome` (`ok`, `failed`) | (an index of a closed partition built) |
//! | `sluice_search_closed_index_build_seconds` | histogram | `kind` |
//! | `sluice_search_closed_partitions_unindexed` | gauge | | (closed partitions still lacking an index after the last build round) |
//! | `sluice_writer_errors_total` | counter | `kind` ([`WriteFailure`]) |
//! | `sluice_stream_events_written_total` | counter | `outcome` (`stored`, `duplicate`): Redis mode, streams → PostgreSQL |
//! | `sluice_redis_connections_replaced_total` | counter | | (Redis Cluster mode: a connection whose commands kept failing with connection errors for 5 s, replaced by a fresh one from the seed nodes) |
//! | `sluice_stream_backlog_events`, `sluice_stream_backlog_bytes` | gauge | | (Redis mode: in the streams, not yet in PostgreSQL) |
//! | `sluice_buffer_events`, `sluice_buffer_bytes`, `sluice_buffer_capacity_events`, `sluice_buffer_capacity_bytes` | gauge | |
//! | `sluice_buffer_utilization` | gauge | | (the fuller of events and bytes, 0.0 to 1.0) |
//! | `sluice_database_up`, `sluice_ingest_serving` | gauge | |
//! | `sluice_events_spooled_total`, `sluice_events_replayed_total` | counter | |
//! | `sluice_spool_bytes` | gauge | |
//! | `sluice_spool_truncated_bytes_total` | counter | |
//! | `sluice_spool_quarantined_total` | counter | |
//! | `sluice_spool_quarantined_segments` | gauge | |
//! | `sluice_circuit_state` | gauge | `state` (`closed`, `open`, `half_open`) |
//! | `sluice_health_check` | gauge | `check` (`database`, `buffer`, `circuit`, `spool_quarantine`, `disk`, `memory`, `redis`, `redis_durability`, `backlog`): 1 passing, 0 failing |
//! | `sluice_disk_free_bytes` | gauge | `volume` (`data`, `spool`) |
//! | `sluice_resident_memory_bytes` | gauge | |
//! | `sluice_database_failovers_total` | counter | `pools` (`write`, `read`) |
//! | `sluice_backups_total` | counter | `outcome` (`ok`, `failed`) |
//! | `sluice_backup_last_finished_timestamp_seconds`, `sluice_wal_last_archived_timestamp_seconds` | gauge | |
//! | `sluice_wal_archive_failures` | gauge | | (PostgreSQL's `pg_stat_archiver.failed_count`) |
//! | `sluice_breaker_opened_total` | counter | `cause` (`failures`, `slow_writes`, `error_rate`, `probe_failed`) |
//! | `sluice_auth_refusals_total` | counter | `reason` (`INVALID_TOKEN`, `MISSING_SCOPE`, `SERVICE_DENIED`, `RATE_LIMITED`) |
//! | `sluice_rate_limited_total` | counter | `principal`, `limit` |
//! | `sluice_connections_open` | gauge | |
//! | `sluice_connections_rejected_total` | counter | `reason` ([`ConnectionFailure`]) |
//! | `sluice_accept_errors_total` | counter | `kind` (`emfile`, `enfile`, `no_memory`, `aborted`, `other`) |
//! | `sluice_audit_errors_total` | counter | | (an audit row could not be written) |
//! | `sluice_lifecycle_runs_total` | counter | `status` (`ok`, `failed`) |
//! | `sluice_lifecycle_rows_deleted_total`, `sluice_lifecycle_rows_archived_total`, `sluice_lifecycle_partitions_dropped_total` | counter | |
//! | `sluice_archive_objects_written_total`, `sluice_archive_objects_deleted_total` | counter | |
//!
//! One file per concern: [`calls`] (RPCs, request sizes, auth refusals), [`writer`] (buffer,
//! writers, circuit, spool, broker), [`connections`] (the listener), [`upkeep`] (health,
//! failovers, backups, lifecycle), [`counters`] (the totals Stats reads), and [`histogram`]
//! (the fixed-bucket per-event histograms); [`zero`] touches every series with a known label
//! set at start, so that each exists at 0 before it first counts.

mod calls;
mod connections;
mod counters;
mod histogram;
mod upkeep;
mod writer;
pub mod zero;

use std::{net::SocketAddr, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use calls::*;
pub use connections::*;
pub use counters::*;
pub use upkeep::*;
pub use writer::*;

use histogram::{EVENT_BYTES, EVENT_COMMIT_SECONDS};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install metrics recorder: {0}")]
    Install(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen for metrics on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the global recorder. Returns the handle that renders the exposition text.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("sluice_batch_events".to_owned()),
            COUNT_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("sluice_request_events".to_owned()),
            COUNT_BUCKETS,
        )?
        .install_recorder()?)
}

/// The exposition text: the exporter's metrics, then the fixed-bucket histograms.
fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    EVENT_BYTES.render(&mut out);
    EVENT_COMMIT_SECONDS.render(&mut out);
    out
}

/// Seconds. Acks take 1–10 ms on an idle server and 250–400 ms at the 2-core ceiling
/// (BENCHMARKS.md); batch writes 5–200 ms; reads 1–10 ms, and up to the read statement
/// timeout. Each decade gets 2–3 buckets, up to 10 s.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Events per batch or request: writers batch up to `writer.batch_max_events` (5,000 by
/// default; `sluice bench` sends 500 per request); a request holds at most
/// `grpc.max_events_per_request` (10,000).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// How often histogram samples are folded into their buckets whether or not anyone scrapes
/// (the exporter's own default upkeep period).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `address`; returns the bound address (useful with port 0).
pub async fn serve(
    handle: PrometheusHandle,
    address: SocketAddr,
) -> Result<SocketAddr, MetricsError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { address, source })?;
    // Histogram samples wait in the recorder until they are folded into their buckets, which
    // a scrape does; without scrapes they would pile up (several per request).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(render(&handle))),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}
