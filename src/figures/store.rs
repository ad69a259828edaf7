//! The figures in PostgreSQL (`ingest_figures`, `ingest_rejections`): each node adds its
//! tallies every `metrics.figures_interval`; Stats sums them over a window.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Datelike, Timelike, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{BUCKETS, Figures, Tally, percentile_ms};

/// Adds `figures` taken from a node to the tables, in one transaction.
pub async fn add(
    pool: &PgPool,
    figures: &std::collections::HashMap<(String, DateTime<Utc>), Tally>,
) -> Result<(), sqlx::Error> {
    let mut services = Vec::new();
    let mut hours = Vec::new();
    let mut accepted = Vec::new();
    let (mut small, mut medium, mut large) = (Vec::new(), Vec::new(), Vec::new());
    let mut buckets: Vec<i64> = Vec::new();
    let (mut sums, mut maxima) = (Vec::new(), Vec::new());
    let (mut rejected_services, mut rejected_hours, mut reasons, mut counts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let int = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    for ((service, hour), tally) in figures {
        for (reason, count) in &tally.rejected {
            rejected_services.push(service.as_str());
            rejected_hours.push(*hour);
            reasons.push(*reason);
            counts.push(int(*count));
        }
        if tally.accepted == 0 && tally.ack_buckets.iter().all(|count| *count == 0) {
            continue;
        }
        services.push(service.as_str());
        hours.push(*hour);
        accepted.push(int(tally.accepted));
        small.push(int(tally.sizes[0]));
        medium.push(int(tally.sizes[1]));
        large.push(int(tally.sizes[2]));
        buckets.extend(tally.ack_buckets.iter().map(|count| int(*count)));
        sums.push(int(tally.processing_sum_us));
        maxima.push(int(tally.processing_max_us));
    }
    let mut transaction = pool.begin().await?;
    if !services.is_empty() {
        // Each row's buckets are its slice of one flat array (unnest flattens 2-D arrays).
        sqlx::query(
            "INSERT INTO ingest_figures AS f (service, hour, accepted, size_small, size_medium, \
               size_large, ack_buckets, processing_sum_us, processing_max_us) \
             SELECT t.service, t.hour, t.accepted, t.small, t.medium, t.large, \
               ($7::bigint[])[(t.n - 1) * $10 + 1 : t.n * $10], t.sum_us, t.max_us \
             FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[], \
               $5::bigint[], $6::bigint[], $8::bigint[], $9::bigint[]) WITH ORDINALITY \
               AS t(service, hour, accepted, small, medium, large, sum_us, max_us, n) \
             ON CONFLICT (service, hour) DO UPDATE SET \
               accepted = f.accepted + excluded.accepted, \
               size_small = f.size_small + excluded.size_small, \
               size_medium = f.size_medium + excluded.size_medium, \
               size_large = f.size_large + excluded.size_large, \
               ack_buckets = ARRAY(SELECT a + b FROM unnest(f.ack_buckets, excluded.ack_buckets) \
                 WITH ORDINALITY AS u(a, b, i) ORDER BY i), \
               processing_sum_us = f.processing_sum_us + excluded.processing_sum_us, \
               processing_max_us = greatest(f.processing_max_us, excluded.processing_max_us)",
        )
        .bind(&services)
        .bind(&hours)
        .bind(&accepted)
        .bind(&small)
        .bind(&medium)
        .bind(&large)
        .bind(&buckets)
        .bind(&sums)
        .bind(&maxima)
        .bind(BUCKETS as i64)
        .execute(&mut *transaction)
        .await?;
    }
    if !reasons.is_empty() {
        sqlx::query(
            "INSERT INTO ingest_rejections AS r (service, hour, reason, events) \
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::bigint[]) \
             ON CONFLICT (service, hour, reason) DO UPDATE SET events = r.events + excluded.events",
        )
        .bind(&rejected_services)
        .bind(&rejected_hours)
        .bind(&reasons)
        .bind(&counts)
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await
}

/// Adds the node's figures every `interval` until `shutdown`, and once more then. Figures that
/// cannot be stored are kept for the next round.
pub async fn flush_every(
    pool: PgPool,
    figures: Arc<Figures>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticks.tick() => false,
            () = shutdown.cancelled() => true,
        };
        let taken = figures.take();
        if !taken.is_empty()
            && let Err(error) = add(&pool, &taken).await
        {
            tracing::warn!(%error, "business figures not stored yet; kept for the next round");
            figures.restore(taken);
        }
        if stopping {
            return;
        }
    }
}

/// One service's figures over a window, summed from its hours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summed {
    pub accepted: u64,
    pub sizes: [u64; 3],
    pub ack_buckets: Vec<u64>,
    pub processing_sum_us: u64,
    pub processing_max_us: u64,
    pub rejected: BTreeMap<String, u64>,
}

impl Summed {
    fn add_buckets(&mut self, buckets: &[i64]) {
        if self.ack_buckets.len() < buckets.len() {
            self.ack_buckets.resize(buckets.len(), 0);
        }
        for (total, count) in self.ack_buckets.iter_mut().zip(buckets) {
            *total += u64::try_from(*count).unwrap_or(0);
        }
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Ack latency at `quantile`, in ms (0 without requests).
    pub fn ack_ms(&self, quantile: f64) -> f64 {
        percentile_ms(&self.ack_buckets, quantile).unwrap_or(0.0)
    }

    /// Mean admission-to-commit time per event, in ms.
    pub fn processing_avg_ms(&self) -> f64 {
        if self.accepted == 0 {
            return 0.0;
        }
        self.processing_sum_us as f64 / self.accepted as f64 / 1000.0
    }

    /// Adds another service's figures (the all-services line).
    pub fn absorb(&mut self, other: &Summed) {
        self.accepted += other.accepted;
        for (total, count) in self.sizes.iter_mut().zip(other.sizes) {
            *total += count;
        }
        let buckets: Vec<i64> = other
            .ack_buckets
            .iter()
            .map(|count| i64::try_from(*count).unwrap_or(i64::MAX))
            .collect();
        self.add_buckets(&buckets);
        self.processing_sum_us = self
            .processing_sum_us
            .saturating_add(other.processing_sum_us);
        self.processing_max_us = self.processing_max_us.max(other.processing_max_us);
        for (reason, count) in &other.rejected {
            *self.rejected.entry(reason.clone()).or_default() += count;
        }
    }
}

/// The figures of a window: per service, and events accepted per UTC hour of day and day of
/// week (Monday first).
#[derive(Debug, Default)]
pub struct Window {
    pub services: BTreeMap<String, Summed>,
    pub by_hour_of_day: [u64; 24],
    pub by_day_of_week: [u64; 7],
}

/// Sums the hours in `[start, end)` of the services `patterns` allows (all when None).
pub async fn window(
    pool: &PgPool,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    patterns: Option<Vec<String>>,
) -> Result<Window, sqlx::Error> {
    type Row = (
        String,
        DateTime<Utc>,
        i64,
        i64,
        i64,
        i64,
        Vec<i64>,
        i64,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT service, hour, accepted, size_small, size_medium, size_large, ack_buckets, \
           processing_sum_us, processing_max_us FROM ingest_figures \
         WHERE hour >= date_trunc('hour', $1::timestamptz) AND hour < $2 \
           AND ($3::text[] IS NULL OR service LIKE ANY($3))",
    )
    .bind(start)
    .bind(end)
    .bind(patterns.clone())
    .fetch_all(pool)
    .await?;
    let count = |value: i64| u64::try_from(value).unwrap_or(0);
    let mut window = Window::default();
    for (service, hour, accepted, small, medium, large, buckets, sum_us, max_us) in rows {
        let summed = window.services.entry(service).or_default();
        summed.accepted += count(accepted);
        for (total, value) in summed.sizes.iter_mut().zip([small, medium, large]) {
            *total += count(value);
        }
        summed.add_buckets(&buckets);
        summed.processing_sum_us = summed.processing_sum_us.saturating_add(count(sum_us));
        summed.processing_max_us = summed.processing_max_us.max(count(max_us));
        window.by_hour_of_day[hour.hour() as usize] += count(accepted);
        window.by_day_of_week[hour.weekday().num_days_from_monday() as usize] += count(accepted);
    }
    let rejections: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT service, reason, sum(events)::bigint FROM ingest_rejections \
         WHERE hour >= date_trunc('hour', $1::timestamptz) AND hour < $2 \
           AND ($3::text[] IS NULL OR service LIKE ANY($3)) GROUP BY service, reason",
    )
    .bind(start)
    .bind(end)
    .bind(patterns)
    .fetch_all(pool)
    .await?;
    for (service, reason, events) in rejections {
        let summed = window.services.entry(service).or_default();
        *summed.rejected.entry(reason).or_default() += count(events);
    }
    Ok(window)
}
