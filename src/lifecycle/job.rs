//! One run of the lifecycle job, under a PostgreSQL advisory lock so that only one node runs
//! it at a time, recorded in `lifecycle_runs`, the log and the metrics.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, pool::PoolConnection};

use super::{
    archiving,
    policy::{RetentionPolicy, SWEEP_SERVICES, Sweep},
    report::{LifecycleError, Report},
};
use crate::{archive::Archive, metrics, store::partitions};

/// Rows deleted per statement, so that no delete holds locks for long.
const DELETE_BATCH: i64 = 5_000;
/// The advisory lock key of the job.
const LOCK: &str = "sluice.lifecycle";

/// Runs the job once, unless another node is running it.
pub async fn run_once(
    pool: &PgPool,
    policy: &RetentionPolicy,
    archive: &Archive,
) -> Result<Report, LifecycleError> {
    let started_at = Utc::now();
    let started = Instant::now();
    let mut lock = match lock(pool).await {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            tracing::info!("lifecycle job skipped: another node is running it");
            return Ok(Report::default());
        }
        Err(error) => {
            // No database, so no row in lifecycle_runs: the metric is the only record.
            metrics::lifecycle_run("failed", metrics::LifecycleTotals::default());
            return Err(error.into());
        }
    };
    let mut report = Report {
        ran: true,
        ..Report::default()
    };
    let outcome = sweep(pool, policy, archive, Utc::now(), &mut report).await;
    report.seconds = started.elapsed().as_secs_f64();
    let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(LOCK)
        .execute(&mut *lock)
        .await;
    if let Err(error) = unlocked {
        // The lock goes with the session; closing the connection releases it.
        tracing::warn!(%error, "cannot release the lifecycle lock; closing its connection");
        lock.detach();
    }
    let (status, error) = match &outcome {
        Ok(()) => ("ok", None),
        Err(error) => ("failed", Some(error.to_string())),
    };
    metrics::lifecycle_run(
        status,
        metrics::LifecycleTotals {
            rows_deleted: report.rows_deleted,
            rows_archived: report.rows_archived,
            objects_written: report.objects_written,
            objects_deleted: report.objects_deleted,
            partitions_dropped: report.partitions_dropped.len() as u64,
        },
    );
    sqlx::query(
        "INSERT INTO lifecycle_runs (started_at, status, rows_deleted, partitions_dropped, \
         counts_deleted, dead_letters_deleted, error, rows_archived, objects_written, \
         objects_deleted) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(started_at)
    .bind(status)
    .bind(report.rows_deleted as i64)
    .bind(&report.partitions_dropped)
    .bind(report.counts_deleted as i64)
    .bind(report.dead_letters_deleted as i64)
    .bind(error)
    .bind(report.rows_archived as i64)
    .bind(report.objects_written as i64)
    .bind(report.objects_deleted as i64)
    .execute(pool)
    .await?;
    outcome?;
    tracing::info!(
        rows_deleted = report.rows_deleted,
        rows_archived = report.rows_archived,
        objects_written = report.objects_written,
        objects_deleted = report.objects_deleted,
        partitions_dropped = ?report.partitions_dropped,
        counts_deleted = report.counts_deleted,
        dead_letters_deleted = report.dead_letters_deleted,
        seconds = report.seconds,
        "lifecycle run finished"
    );
    Ok(report)
}

/// The job's advisory lock on a connection of its own; None when another node holds it.
async fn lock(pool: &PgPool) -> Result<Option<PoolConnection<Postgres>>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(LOCK)
        .fetch_one(&mut *connection)
        .await?;
    Ok(locked.then_some(connection))
}

/// Archive first, then delete: nothing within its retention is deleted, nothing past it is
/// archived.
async fn sweep(
    pool: &PgPool,
    policy: &RetentionPolicy,
    archive: &Archive,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<(), LifecycleError> {
    // Archive failures (a full disk, S3 down) leave the hot rows in place and fail the run,
    // but never stop retention: that runs either way.
    let archived = match archiving::tidy(pool, archive).await {
        Ok(()) => archiving::move_old_events(pool, archive, policy, now, report).await,
        Err(error) => Err(error),
    };
    if let Err(error) = &archived {
        tracing::error!(%error, "archiving failed; applying retention anyway");
    }
    let past_every_rule = now - policy.longest();
    report.partitions_dropped = drop_partitions_before(pool, past_every_rule).await?;
    for sweep in policy.sweeps() {
        let cutoff = now - sweep.keep;
        report.rows_deleted += delete_events_before(pool, &sweep, cutoff).await?;
        report.dead_letters_deleted +=
            delete_before(pool, "dead_letters", "ts", &sweep, cutoff).await?;
        // An hour of the rollup goes once all of it is past the retention; until then it still
        // counts the rows of that hour deleted above (Stats may over-count one boundary hour).
        let hour_cutoff = cutoff - Duration::from_secs(3600);
        report.counts_deleted +=
            delete_before(pool, "event_counts", "hour", &sweep, hour_cutoff).await?;
        // The business figures of an hour go with it (not counted in the report).
        delete_before(pool, "ingest_figures", "hour", &sweep, hour_cutoff).await?;
        delete_before(pool, "ingest_rejections", "hour", &sweep, hour_cutoff).await?;
        archiving::expire_objects(pool, archive, &sweep, cutoff, report).await?;
    }
    // An erasure outlives every event it could reach: past the longest retention, none of
    // them is kept anywhere.
    report.erasures_expired = crate::writer::erasures::expire(pool, policy.longest()).await?;
    archived
}

async fn delete_events_before(
    pool: &PgPool,
    sweep: &Sweep,
    cutoff: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let statement = format!(
        "WITH doomed AS (SELECT id, ts FROM events WHERE ts < $1 AND {SWEEP_SERVICES} LIMIT $4) \
         DELETE FROM events e USING doomed d WHERE e.id = d.id AND e.ts = d.ts"
    );
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
            .bind(cutoff)
            .bind(sweep.include.clone())
            .bind(sweep.exclude.clone())
            .bind(DELETE_BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += batch;
        // Only an empty batch ends it: rows removed meanwhile can make a batch come short.
        if batch == 0 {
            return Ok(deleted);
        }
    }
}

/// Deletes a small table's rows older than `cutoff` for one sweep, in one statement.
async fn delete_before(
    pool: &PgPool,
    table: &'static str,
    column: &'static str,
    sweep: &Sweep,
    cutoff: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let statement = format!("DELETE FROM {table} WHERE {column} < $1 AND {SWEEP_SERVICES}");
    Ok(sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(cutoff)
        .bind(sweep.include.clone())
        .bind(sweep.exclude.clone())
        .execute(pool)
        .await?
        .rows_affected())
}

/// Detaches and drops every `events` partition whose whole range ends before `cutoff`.
async fn drop_partitions_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
) -> Result<Vec<String>, sqlx::Error> {
    let mut dropped = Vec::new();
    for partition in partitions::list(pool).await? {
        if partition.end > cutoff {
            continue;
        }
        let name = partition.name;
        // CONCURRENTLY does not block ingest into the other partitions; it cannot run in a
        // transaction block, hence the simple-protocol statement.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE events DETACH PARTITION {name} CONCURRENTLY"
        )))
        .execute(pool)
        .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
            .execute(pool)
            .await?;
        tracing::info!(partition = %name, "dropped a partition past every retention");
        dropped.push(name);
    }
    Ok(dropped)
}
