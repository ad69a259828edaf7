//! Monthly range partitions of `events`, created ahead of time so that no valid event ever
//! lacks a partition.

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use sqlx::PgPool;

/// First day of the month of `at`.
fn month_start(at: DateTime<Utc>) -> NaiveDate {
    NaiveDate::from_ymd_opt(at.year(), at.month(), 1).unwrap_or(NaiveDate::MIN)
}

/// The partition name and bounds of every month touching `[from, to]`.
pub fn months_between(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<(String, NaiveDate, NaiveDate)> {
    let last = month_start(to);
    let mut month = month_start(from);
    let mut months = Vec::new();
    while month <= last {
        let Some(next) = month.checked_add_months(Months::new(1)) else {
            break;
        };
        months.push((
            format!("events_p{}_{:02}", month.year(), month.month()),
            month,
            next,
        ));
        month = next;
    }
    months
}

/// The start of the oldest partition of `events`: nothing is stored before it. None when
/// there is no partition.
pub async fn oldest_start(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let oldest: Option<String> = sqlx::query_scalar(
        "SELECT min(c.relname::text) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_p[0-9]{4}_[0-9]{2}$'",
    )
    .fetch_one(pool)
    .await?;
    Ok(oldest.and_then(|name| partition_start(&name)))
}

/// The first instant of partition `events_pYYYY_MM`.
fn partition_start(name: &str) -> Option<DateTime<Utc>> {
    let (year, month) = name.strip_prefix("events_p")?.split_once('_')?;
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)?
        .and_hms_opt(0, 0, 0)
        .map(|start| start.and_utc())
}

/// Creates the missing monthly partitions covering `[from, to]`. Safe to call concurrently
/// from several writers and nodes (serialized by an advisory lock).
pub async fn ensure_partitions(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<usize, sqlx::Error> {
    let mut created = 0;
    let mut transaction = pool.begin().await?;
    // Creating a partition locks `events`; never queue behind a long reader (and hold up every
    // writer behind this DDL) for more than a few seconds. A timeout is retried later.
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *transaction)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice.partitions'))")
        .execute(&mut *transaction)
        .await?;
    // Column compression set on `events` (by name: `lz4` or `pglz`), to copy onto partitions.
    let compression: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, CASE attcompression WHEN 'l' THEN 'lz4' ELSE 'pglz' END \
         FROM pg_attribute WHERE attrelid = 'events'::regclass AND attnum > 0 \
         AND NOT attisdropped AND attcompression <> ''",
    )
    .fetch_all(&mut *transaction)
    .await?;
    for (name, start, end) in months_between(from, to) {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&mut *transaction)
            .await?;
        if exists {
            continue;
        }
        // Names and bounds come from dates formatted above, never from input.
        let statement = format!(
            "CREATE TABLE {name} PARTITION OF events FOR VALUES FROM ('{start}') TO ('{end}')"
        );
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut *transaction)
            .await?;
        // A partition does not inherit its parent's column compression (migration 0005).
        for (column, method) in &compression {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {name} ALTER COLUMN {column} SET COMPRESSION {method}"
            )))
            .execute(&mut *transaction)
            .await?;
        }
        tracing::info!(partition = %name, %start, %end, "created events partition");
        created += 1;
    }
    transaction.commit().await?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_give_their_first_instant() {
        assert_eq!(
            partition_start("events_p2026_11").map(|start| start.to_rfc3339()),
            Some("2026-11-01T00:00:00+00:00".to_owned())
        );
        assert_eq!(partition_start("events_p2026_13"), None);
        assert_eq!(partition_start("other"), None);
    }

    #[test]
    fn months_between_spans_year_boundaries() {
        let from = DateTime::parse_from_rfc3339("2026-11-15T00:00:00Z")
            .expect("date")
            .to_utc();
        let to = DateTime::parse_from_rfc3339("2027-01-02T00:00:00Z")
            .expect("date")
            .to_utc();
        let names: Vec<String> = months_between(from, to)
            .into_iter()
            .map(|(name, _, _)| name)
            .collect();
        assert_eq!(
            names,
            ["events_p2026_11", "events_p2026_12", "events_p2027_01"]
        );
        let (_, start, end) = &months_between(from, from)[0];
        assert_eq!(
            (start.to_string(), end.to_string()),
            ("2026-11-01".to_owned(), "2026-12-01".to_owned())
        );
    }
}
