//! The catalog of archived objects in PostgreSQL (`archives`, `archive_users`,
//! `archive_garbage`, `archive_holds`): which object holds which service, day, time span and
//! users. Every change to the archive happens under one transaction-scoped advisory lock.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};

use super::format::Encoded;

/// Serializes every change to the archive (archiving, rewrites, expiry, garbage collection)
/// across nodes; held until the end of the transaction that takes it.
pub async fn lock(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice.archive'))")
        .execute(connection)
        .await
        .map(|_| ())
}

/// One archived object, as the catalog knows it.
#[derive(Debug, Clone)]
pub struct ArchivedObject {
    pub id: i64,
    pub path: String,
    pub service: String,
    pub day: NaiveDate,
    pub min_ts: DateTime<Utc>,
    pub max_ts: DateTime<Utc>,
    pub rows: i64,
    pub sha256: String,
    /// The selected user's events in this object, when the selection names a user.
    pub user_events: Option<i64>,
    /// The Bloom filter of its trace ids, when the selection names a trace and the object
    /// has one.
    pub trace_bloom: Option<Vec<u8>>,
}

impl ArchivedObject {
    /// Whether the object may hold events of `trace_id` (always, without a trace or a filter).
    pub fn may_hold_trace(&self, trace_id: Option<&str>) -> bool {
        match (trace_id, &self.trace_bloom) {
            (Some(trace_id), Some(filter)) => super::bloom::may_hold(filter, trace_id),
            _ => true,
        }
    }
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ArchivedObject {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            id: row.try_get("id")?,
            path: row.try_get("path")?,
            service: row.try_get("service")?,
            day: row.try_get("day")?,
            min_ts: row.try_get("min_ts")?,
            max_ts: row.try_get("max_ts")?,
            rows: row.try_get("rows")?,
            sha256: row.try_get("sha256")?,
            user_events: row.try_get("user_events")?,
            trace_bloom: row.try_get("trace_bloom")?,
        })
    }
}

/// Which objects a read or a delete must look at: those that may hold a matching event.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Any of these services; empty: all.
    pub services: Vec<String>,
    /// `service LIKE ANY(patterns)`: the services the caller may use.
    pub patterns: Option<Vec<String>>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub user_id: Option<String>,
    /// With it, objects carry their trace filter ([`ArchivedObject::may_hold_trace`]).
    pub trace_id: Option<String>,
}

/// The objects that may hold events of `selection`, oldest day first.
pub async fn select(
    connection: &mut PgConnection,
    selection: &Selection,
) -> Result<Vec<ArchivedObject>, sqlx::Error> {
    let mut builder = selection_query(selection);
    builder.push(" ORDER BY a.day, a.service, a.part");
    builder.build_query_as().fetch_all(connection).await
}

/// At most `limit` objects of `selection`, nearest first in a read's direction: newest end
/// first, or (`oldest_first`) oldest start first.
pub async fn select_nearest(
    connection: &mut PgConnection,
    selection: &Selection,
    oldest_first: bool,
    limit: i64,
) -> Result<Vec<ArchivedObject>, sqlx::Error> {
    let mut builder = selection_query(selection);
    builder.push(if oldest_first {
        " ORDER BY a.min_ts, a.id LIMIT "
    } else {
        " ORDER BY a.max_ts DESC, a.id LIMIT "
    });
    builder.push_bind(limit);
    builder.build_query_as().fetch_all(connection).await
}

fn selection_query(selection: &Selection) -> QueryBuilder<Postgres> {
    let mut builder = QueryBuilder::<Postgres>::new(if selection.trace_id.is_some() {
        "SELECT a.id, a.path, a.service, a.day, a.min_ts, a.max_ts, a.rows, a.sha256, a.trace_bloom, "
    } else {
        "SELECT a.id, a.path, a.service, a.day, a.min_ts, a.max_ts, a.rows, a.sha256, NULL::bytea AS trace_bloom, "
    });
    match &selection.user_id {
        Some(user_id) => builder
            .push("u.events AS user_events FROM archives a JOIN archive_users u ON u.archive_id = a.id AND u.user_id = ")
            .push_bind(user_id.clone()),
        None => builder.push("NULL::bigint AS user_events FROM archives a"),
    };
    builder.push(" WHERE TRUE");
    if !selection.services.is_empty() {
        builder
            .push(" AND a.service = ANY(")
            .push_bind(selection.services.clone())
            .push(")");
    }
    if let Some(patterns) = &selection.patterns {
        builder
            .push(" AND a.service LIKE ANY(")
            .push_bind(patterns.clone())
            .push(")");
    }
    if let Some(start) = selection.start {
        builder.push(" AND a.max_ts >= ").push_bind(start);
    }
    if let Some(end) = selection.end {
        builder.push(" AND a.min_ts < ").push_bind(end);
    }
    builder
}

/// The objects of one service's day.
pub async fn objects_of_day(
    connection: &mut PgConnection,
    service: &str,
    day: NaiveDate,
) -> Result<Vec<ArchivedObject>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, path, service, day, min_ts, max_ts, rows, sha256, NULL::bigint AS user_events, \
         NULL::bytea AS trace_bloom \
         FROM archives WHERE service = $1 AND day = $2 ORDER BY part",
    )
    .bind(service)
    .bind(day)
    .fetch_all(connection)
    .await
}

/// The object `id`, locked for a rewrite; None when it is gone (rewritten or expired since it
/// was selected).
pub async fn reload(
    connection: &mut PgConnection,
    id: i64,
) -> Result<Option<ArchivedObject>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, path, service, day, min_ts, max_ts, rows, sha256, NULL::bigint AS user_events, \
         NULL::bytea AS trace_bloom \
         FROM archives WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(connection)
    .await
}

/// The folder of a service's day: `service=<s>/date=<yyyy-mm-dd>/`.
pub fn day_prefix(service: &str, day: NaiveDate) -> String {
    format!("service={service}/date={}/", day.format("%Y-%m-%d"))
}

/// The next free part number of a service's day: past every recorded part and every path on
/// the garbage list, so that a path is never reused while an old object may still be there.
pub async fn next_part(
    connection: &mut PgConnection,
    service: &str,
    day: NaiveDate,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(max(part), 0) + 1 FROM ( \
           SELECT part FROM archives WHERE service = $1 AND day = $2 \
           UNION ALL \
           SELECT substring(path FROM 'part-([0-9]+)\\.')::int FROM archive_garbage \
           WHERE starts_with(path, $3)) parts",
    )
    .bind(service)
    .bind(day)
    .bind(day_prefix(service, day))
    .fetch_one(connection)
    .await
}

/// Where an object is written: what the catalog records of it besides its contents.
#[derive(Debug, Clone)]
pub struct Placement {
    pub path: String,
    pub uri: String,
    pub service: String,
    pub day: NaiveDate,
    pub part: i32,
}

/// Records a written object and its users, and takes it off the garbage list.
pub async fn record(
    connection: &mut PgConnection,
    placement: &Placement,
    encoded: &Encoded,
) -> Result<i64, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO archives (path, uri, service, day, part, min_ts, max_ts, rows, bytes, sha256, \
         trace_bloom) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
    )
    .bind(&placement.path)
    .bind(&placement.uri)
    .bind(&placement.service)
    .bind(placement.day)
    .bind(placement.part)
    .bind(encoded.min_ts)
    .bind(encoded.max_ts)
    .bind(encoded.rows)
    .bind(encoded.bytes.len() as i64)
    .bind(&encoded.sha256)
    .bind(&encoded.trace_bloom)
    .fetch_one(&mut *connection)
    .await?;
    let (users, counts): (Vec<String>, Vec<i64>) = encoded
        .users
        .iter()
        .map(|(user, count)| (user.clone(), *count))
        .unzip();
    sqlx::query(
        "INSERT INTO archive_users (archive_id, user_id, events) \
         SELECT $1, * FROM unnest($2::text[], $3::bigint[])",
    )
    .bind(id)
    .bind(users)
    .bind(counts)
    .execute(&mut *connection)
    .await?;
    sqlx::query("DELETE FROM archive_garbage WHERE path = $1")
        .bind(&placement.path)
        .execute(connection)
        .await?;
    Ok(id)
}

/// Drops an object from the catalog and puts it on the garbage list, in the caller's
/// transaction: once that commits, the object is removed from the store.
pub async fn forget(
    connection: &mut PgConnection,
    object: &ArchivedObject,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM archives WHERE id = $1")
        .bind(object.id)
        .execute(&mut *connection)
        .await?;
    sqlx::query("INSERT INTO archive_garbage (path) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&object.path)
        .execute(connection)
        .await?;
    Ok(())
}

/// Puts a path on the garbage list before its object is written, committed at once on `side`
/// (a connection outside the caller's transaction, taken before the archive lock so that the
/// lock holder never waits for the pool): if the writer dies before recording the object, the
/// next garbage collection removes it.
pub async fn expect_garbage(side: &mut PgConnection, path: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO archive_garbage (path) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(path)
        .execute(side)
        .await
        .map(|_| ())
}

/// Whether a path is still on the garbage list (not recorded since).
pub async fn still_garbage(connection: &mut PgConnection, path: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM archive_garbage WHERE path = $1) \
         AND NOT EXISTS (SELECT 1 FROM archives WHERE path = $1)",
    )
    .bind(path)
    .fetch_one(connection)
    .await
}

/// Paths waiting for removal.
pub async fn garbage(connection: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT path FROM archive_garbage ORDER BY since")
        .fetch_all(connection)
        .await
}

/// Takes paths off the garbage list once their objects are gone.
pub async fn collected(connection: &mut PgConnection, paths: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM archive_garbage WHERE path = ANY($1)")
        .bind(paths)
        .execute(connection)
        .await
        .map(|_| ())
}

/// Keeps `[start, end)` of `services` (all when None) out of the archive until `until`.
pub async fn hold(
    pool: &PgPool,
    services: Option<&[String]>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO archive_holds (services, start_ts, end_ts, until) VALUES ($1, $2, $3, $4)",
    )
    .bind(services)
    .bind(start)
    .bind(end)
    .bind(until)
    .execute(pool)
    .await
    .map(|_| ())
}

/// SQL condition: the `events` row aliased `e` is not under a hold.
pub const NOT_HELD: &str = "NOT EXISTS (SELECT 1 FROM archive_holds h WHERE h.until > now() \
     AND e.ts >= h.start_ts AND e.ts < h.end_ts \
     AND (h.services IS NULL OR e.service = ANY(h.services)))";

/// Removes holds that have ended.
pub async fn release_ended_holds(pool: &PgPool) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM archive_holds WHERE until <= now()")
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
}
