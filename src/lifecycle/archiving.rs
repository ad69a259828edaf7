//! The archive side of a lifecycle run: events past `archive.after` move from `events` into
//! objects (one service's day at a time, in parts), and objects past their service's
//! retention are removed.

use chrono::{DateTime, DurationRound, NaiveDate, TimeDelta, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    policy::{RetentionPolicy, SWEEP_SERVICES, Sweep},
    report::{LifecycleError, Report},
};
use crate::{
    archive::{self, Archive, PART_MAX_RAW_BYTES, PART_MAX_ROWS, catalog, format::Encoder},
    store,
};

/// Rows read per statement while filling an object.
const PAGE: i64 = 1_000;

/// Moves every event older than the start of the UTC day `after` ago (and still within its
/// service's retention) into the archive.
pub async fn move_old_events(
    pool: &PgPool,
    archive: &Archive,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<(), LifecycleError> {
    let Some(after) = archive.after else {
        return Ok(());
    };
    let day = TimeDelta::days(1);
    let cutoff = (now - after).duration_trunc(day).unwrap_or(now - after);
    for sweep in policy.sweeps() {
        // These events expire before they reach archive age: never archived.
        if sweep.keep <= after {
            continue;
        }
        let window_start = now - sweep.keep;
        let statement = format!(
            "SELECT DISTINCT service, (ts AT TIME ZONE 'UTC')::date FROM events e \
             WHERE ts >= $1 AND ts < $4 AND {SWEEP_SERVICES} AND {} ORDER BY 2, 1",
            catalog::NOT_HELD
        );
        let days: Vec<(String, NaiveDate)> = sqlx::query_as(sqlx::AssertSqlSafe(statement))
            .bind(window_start)
            .bind(sweep.include.clone())
            .bind(sweep.exclude.clone())
            .bind(cutoff)
            .fetch_all(pool)
            .await?;
        for (service, date) in days {
            let day_start = date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
            let from = day_start.max(window_start);
            let to = (day_start + day).min(cutoff);
            while let Some(part) = archive_part(pool, archive, &service, date, from, to).await? {
                report.rows_archived += part.archived;
                report.rows_already_archived += part.already_archived;
                report.objects_written += u64::from(part.archived > 0);
            }
        }
    }
    Ok(())
}

/// What one part did.
struct Part {
    archived: u64,
    /// Rows whose `(id, ts)` an object of the day already holds (a client resent an archived
    /// event):
    /// deleted, not archived twice.
    already_archived: u64,
}

/// Writes the next object of one service's day from its oldest rows in `[from, to)`, and
/// deletes those rows in the transaction that records the object. None when no row is left.
async fn archive_part(
    pool: &PgPool,
    archive: &Archive,
    service: &str,
    day: NaiveDate,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Option<Part>, LifecycleError> {
    // Both connections before the lock: its holder never waits for the pool.
    let mut side = pool.acquire().await?;
    let mut transaction = pool.begin().await?;
    catalog::lock(&mut transaction).await?;
    // A day archived before holds ids a resent event may repeat: read them (rare: late or
    // resent events only).
    let archived_keys = archive.keys_of_day(&mut transaction, service, day).await?;
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *transaction)
        .await?;
    // Pages walk the (service, ts, id) index: each starts where the last ended (`$2` is
    // the last key's ts, and `(ts, id) > ($2, $4)` excludes what was read), never rescanning.
    let page_after = format!(
        "SELECT id, ts, user_id, trace_id, {} FROM events e WHERE service = $1 AND ts >= $2 AND ts < $3 \
         AND (ts, id) > ($2, $4) AND {} ORDER BY ts, id LIMIT $5",
        store::EVENT_JSON,
        catalog::NOT_HELD
    );
    let first_page = format!(
        "SELECT id, ts, user_id, trace_id, {} FROM events e WHERE service = $1 AND ts >= $2 AND ts < $3 \
         AND $4::uuid IS NULL AND {} ORDER BY ts, id LIMIT $5",
        store::EVENT_JSON,
        catalog::NOT_HELD
    );
    let mut encoder = Encoder::new()?;
    let mut ids: Vec<Uuid> = Vec::new();
    let mut stamps: Vec<DateTime<Utc>> = Vec::new();
    let mut already_archived = 0u64;
    loop {
        let (statement, start) = match stamps.last() {
            Some(last) => (page_after.as_str(), *last),
            None => (first_page.as_str(), from),
        };
        type Row = (Uuid, DateTime<Utc>, Option<String>, Option<String>, String);
        let page: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(statement))
            .bind(service)
            .bind(start)
            .bind(to)
            .bind(ids.last())
            .bind(PAGE)
            .fetch_all(&mut *transaction)
            .await?;
        let full = page.len() as i64 == PAGE;
        for (id, ts, user_id, trace_id, line) in page {
            if archived_keys.contains(&(id, ts)) {
                already_archived += 1;
            } else {
                encoder.push(&line, ts, user_id.as_deref(), trace_id.as_deref())?;
            }
            ids.push(id);
            stamps.push(ts);
        }
        if !full || encoder.rows() >= PART_MAX_ROWS || encoder.raw_bytes() >= PART_MAX_RAW_BYTES {
            break;
        }
    }
    if ids.is_empty() {
        return Ok(None);
    }
    let encoded = encoder.finish()?;
    if let Some(encoded) = &encoded {
        archive
            .store(&mut side, &mut transaction, service, day, encoded)
            .await?;
    }
    let deleted = sqlx::query(
        "DELETE FROM events WHERE service = $1 \
         AND (id, ts) IN (SELECT * FROM unnest($2::uuid[], $3::timestamptz[]))",
    )
    .bind(service)
    .bind(&ids)
    .bind(&stamps)
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    transaction.commit().await?;
    if deleted != ids.len() as u64 {
        // A Delete removed some of them meanwhile; it rewrites this object once it gets the
        // archive lock.
        tracing::info!(service, %day, archived = ids.len(), deleted, "rows left during archiving");
    }
    let archived = ids.len() as u64 - already_archived;
    tracing::debug!(service, %day, archived, already_archived, "archived a part");
    Ok(Some(Part {
        archived,
        already_archived,
    }))
}

/// Removes the objects of a sweep's services whose every event is past the retention.
pub async fn expire_objects(
    pool: &PgPool,
    archive: &Archive,
    sweep: &Sweep,
    cutoff: DateTime<Utc>,
    report: &mut Report,
) -> Result<(), LifecycleError> {
    let statement =
        format!("SELECT id FROM archives WHERE max_ts < $1 AND {SWEEP_SERVICES} ORDER BY id");
    let expired: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
        .bind(cutoff)
        .bind(sweep.include.clone())
        .bind(sweep.exclude.clone())
        .fetch_all(pool)
        .await?;
    for id in expired {
        if archive.expire(pool, id).await? {
            report.objects_deleted += 1;
        }
    }
    Ok(())
}

/// Housekeeping before a run: leftover objects of dead runs, and holds that have ended.
pub async fn tidy(pool: &PgPool, archive: &Archive) -> Result<(), LifecycleError> {
    archive.collect_garbage(pool).await?;
    catalog::release_ended_holds(pool).await?;
    Ok(())
}

impl From<std::io::Error> for LifecycleError {
    fn from(error: std::io::Error) -> Self {
        Self::Archive(archive::ArchiveError::Compress(error))
    }
}
