//! Range partitions of `events` on `ts`, created ahead of time so that no valid event ever
//! lacks a partition.
//!
//! A partition holds one UTC day (`events_pYYYY_MM_DD`): a day stops taking writes once it is
//! over, and only then gets its search indexes ([`super::closed_indexes`]), so ingest never
//! pays for them, and a search reads a day's index in a few milliseconds. A month that ended
//! more than [`DAILY_DAYS`] ago and that no partition touches yet (the start of a long
//! retention window, a backfill, a restore) gets one monthly partition (`events_pYYYY_MM`), as
//! every partition did before daily ones, so that a retention of years does not mean
//! thousands of empty tables. Both kinds live side by side, and every reader of partition
//! names goes through [`Partition::parse`].

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use sqlx::PgPool;

/// How far back new partitions are daily: a month that ended before is created whole.
pub const DAILY_DAYS: u64 = 62;

/// A partition of `events`: its name and its range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Midnight UTC of `day`.
fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(chrono::NaiveTime::MIN).and_utc()
}

/// First day of the month of `day`.
fn month_start(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

impl Partition {
    /// The partition of one day.
    pub fn day(day: NaiveDate) -> Self {
        Self {
            name: format!("events_p{}_{:02}_{:02}", day.year(), day.month(), day.day()),
            start: midnight(day),
            end: midnight(day + Days::new(1)),
        }
    }

    /// The partition of the month of `day`.
    pub fn month(day: NaiveDate) -> Self {
        let first = month_start(day);
        let next = first
            .checked_add_months(Months::new(1))
            .unwrap_or(NaiveDate::MAX);
        Self {
            name: format!("events_p{}_{:02}", first.year(), first.month()),
            start: midnight(first),
            end: midnight(next),
        }
    }

    /// The partition a name sluice gave stands for: `events_pYYYY_MM_DD` or `events_pYYYY_MM`.
    /// None for any other table.
    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.strip_prefix("events_p")?.split('_');
        let (year, month) = (parts.next()?, parts.next()?);
        let day = parts.next();
        if parts.next().is_some() || year.len() != 4 || month.len() != 2 {
            return None;
        }
        let (year, month) = (year.parse().ok()?, month.parse().ok()?);
        let partition = match day {
            Some(day) if day.len() == 2 => {
                Self::day(NaiveDate::from_ymd_opt(year, month, day.parse().ok()?)?)
            }
            Some(_) => return None,
            None => Self::month(NaiveDate::from_ymd_opt(year, month, 1)?),
        };
        (partition.name == name).then_some(partition)
    }

    /// Whether its range and `[start, end)` share an instant.
    pub fn overlaps(&self, start: DateTime<Utc>, end: DateTime<Utc>) -> bool {
        self.start < end && start < self.end
    }
}

/// The names of every partition of `events`.
async fn children(executor: impl sqlx::PgExecutor<'_>) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'events'::regclass",
    )
    .fetch_all(executor)
    .await
}

/// The partitions of `events` that sluice made, oldest first.
pub async fn list(executor: impl sqlx::PgExecutor<'_>) -> Result<Vec<Partition>, sqlx::Error> {
    let names = children(executor).await?;
    Ok(oldest_first(
        names
            .iter()
            .filter_map(|name| Partition::parse(name))
            .collect(),
    ))
}

/// Every partition of `events`, oldest first; None when one of them is not a partition
/// sluice made (one an operator attached, a default partition): where rows may be is then
/// not known from the names.
pub async fn all_known(
    executor: impl sqlx::PgExecutor<'_>,
) -> Result<Option<Vec<Partition>>, sqlx::Error> {
    let names = children(executor).await?;
    let partitions: Option<Vec<Partition>> =
        names.iter().map(|name| Partition::parse(name)).collect();
    Ok(partitions.map(oldest_first))
}

fn oldest_first(mut partitions: Vec<Partition>) -> Vec<Partition> {
    partitions.sort_by_key(|partition| partition.start);
    partitions
}

/// The start of the oldest partition of `events`: nothing is stored before it. None when
/// there is no partition.
pub async fn oldest_start(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(list(pool).await?.first().map(|partition| partition.start))
}

/// The partitions to create so that `[from, to]` is covered, given the `existing` ones and
/// `today`: a month that ended [`DAILY_DAYS`] before today or earlier, that no partition
/// touches, gets a monthly partition; every other uncovered day a daily one.
pub fn missing(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    existing: &[Partition],
    today: NaiveDate,
) -> Vec<Partition> {
    let daily_from = midnight(today - Days::new(DAILY_DAYS));
    let mut wanted: Vec<Partition> = Vec::new();
    let covered = |partition: &Partition, wanted: &[Partition]| {
        existing
            .iter()
            .chain(wanted)
            .any(|other| other.overlaps(partition.start, partition.end))
    };
    let last = to.date_naive();
    let mut day = from.date_naive();
    while day <= last {
        let month = Partition::month(day);
        if month.end <= daily_from && !covered(&month, &wanted) {
            day = month.end.date_naive();
            wanted.push(month);
            continue;
        }
        let daily = Partition::day(day);
        if !covered(&daily, &wanted) {
            wanted.push(daily);
        }
        day = day + Days::new(1);
    }
    wanted
}

/// Creates the missing partitions covering `[from, to]` (see [`missing`]). Safe to call
/// concurrently from several writers and nodes (serialized by an advisory lock).
pub async fn ensure_partitions(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<usize, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    // Creating a partition locks `events`; never queue behind a long reader (and hold up every
    // writer behind this DDL) for more than a few seconds. A timeout is retried later.
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *transaction)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('sluice.partitions'))")
        .execute(&mut *transaction)
        .await?;
    let existing = list(&mut *transaction).await?;
    let wanted = missing(from, to, &existing, Utc::now().date_naive());
    if wanted.is_empty() {
        return Ok(0);
    }
    // Column compression set on `events` (by name: `lz4` or `pglz`), to copy onto partitions.
    let compression: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, CASE attcompression WHEN 'l' THEN 'lz4' ELSE 'pglz' END \
         FROM pg_attribute WHERE attrelid = 'events'::regclass AND attnum > 0 \
         AND NOT attisdropped AND attcompression <> ''",
    )
    .fetch_all(&mut *transaction)
    .await?;
    for Partition { name, start, end } in &wanted {
        // Names and bounds come from dates formatted above, never from input.
        let statement = format!(
            "CREATE TABLE {name} PARTITION OF events FOR VALUES FROM ('{}') TO ('{}')",
            start.to_rfc3339(),
            end.to_rfc3339()
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
    }
    transaction.commit().await?;
    Ok(wanted.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("date").to_utc()
    }

    fn names(partitions: &[Partition]) -> Vec<&str> {
        partitions
            .iter()
            .map(|partition| partition.name.as_str())
            .collect()
    }

    #[test]
    fn names_of_days_and_months_give_their_ranges_and_nothing_else_parses() {
        let day = Partition::parse("events_p2026_11_30").expect("a day");
        assert_eq!(day.start, at("2026-11-30T00:00:00Z"));
        assert_eq!(day.end, at("2026-12-01T00:00:00Z"));
        let month = Partition::parse("events_p2026_12").expect("a month");
        assert_eq!(month.start, at("2026-12-01T00:00:00Z"));
        assert_eq!(month.end, at("2027-01-01T00:00:00Z"));
        for other in [
            "events_p2026_13",
            "events_p2026_02_30",
            "events_p2026_2_01",
            "events_p2026_12_01_x",
            "events_default",
            "other",
        ] {
            assert_eq!(Partition::parse(other), None, "{other}");
        }
    }

    #[test]
    fn months_long_past_get_one_partition_and_the_recent_ones_a_partition_a_day() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 3).expect("today");
        // 62 days before today is October 2nd: September ended before, October did not.
        let wanted = missing(
            at("2026-08-20T10:00:00Z"),
            at("2026-12-05T00:00:00Z"),
            &[],
            today,
        );
        let names = names(&wanted);
        assert_eq!(
            names[..4],
            [
                "events_p2026_08",
                "events_p2026_09",
                "events_p2026_10_01",
                "events_p2026_10_02"
            ]
        );
        assert_eq!(names.last(), Some(&"events_p2026_12_05"));
        assert_eq!(names.len(), 2 + 31 + 30 + 5);
    }

    #[test]
    fn existing_partitions_of_either_kind_are_never_overlapped() {
        let today = NaiveDate::from_ymd_opt(2027, 4, 10).expect("today");
        // A monthly partition made before daily ones, and a day of a month long past already
        // made daily: the rest of that month goes day by day, January's days are covered.
        let existing = [
            Partition::month(NaiveDate::from_ymd_opt(2027, 1, 1).expect("month")),
            Partition::day(NaiveDate::from_ymd_opt(2026, 12, 30).expect("day")),
        ];
        let wanted = missing(
            at("2026-12-29T00:00:00Z"),
            at("2027-02-01T12:00:00Z"),
            &existing,
            today,
        );
        assert_eq!(
            names(&wanted),
            [
                "events_p2026_12_29",
                "events_p2026_12_31",
                "events_p2027_02_01"
            ]
        );
        assert!(
            missing(
                at("2027-01-05T00:00:00Z"),
                at("2027-01-06T00:00:00Z"),
                &existing,
                today
            )
            .is_empty()
        );
    }
}
