//! Stats: events per service (total, last 24 h, archived), an hourly trend, the top services,
//! the business figures of a window (accepted, rejected by reason, ack latency, processing
//! time, sizes, usage by hour and weekday; see `figures`), and, for admins, the node's buffer,
//! writers, circuit and ingest counters. It reads
//! `event_counts`, the hourly rollup the writers keep in the same transaction as each COPY,
//! so it never counts the events table.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

use super::{QueryError, Reader};
use crate::{
    auth::Caller,
    broker::Backlog,
    config::Scope,
    figures::store::{self, Summed},
    proto::{
        BufferStats, HourCount, IngestCounters, ServiceCount, ServiceFigures, StatsRequest,
        StatsResponse, UsagePattern, WriterStats,
        wire::{to_datetime, to_timestamp},
    },
};

const DEFAULT_TOP_N: usize = 10;
const DEFAULT_TREND_HOURS: i64 = 24;
const MAX_TREND_HOURS: i64 = 48;

pub async fn stats(
    reader: &Reader,
    caller: &Caller,
    request: StatsRequest,
) -> Result<StatsResponse, QueryError> {
    let allowed = caller.service_patterns();
    let top_n = if request.top_n == 0 {
        DEFAULT_TOP_N
    } else {
        request.top_n as usize
    };
    let trend_hours = match i64::from(request.trend_hours) {
        0 => DEFAULT_TREND_HOURS,
        hours => hours.min(MAX_TREND_HOURS),
    };
    let now = Utc::now();
    let this_hour = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now);
    let day_start = this_hour - TimeDelta::hours(23);
    let trend_start = this_hour - TimeDelta::hours(trend_hours - 1);
    let pool = &reader.store.read_pool;
    // The rollup counts archived events too (it keeps its hours when a day is archived);
    // the catalog says how many of them are archived.
    let per_service: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT c.service, c.total, c.last_24h, coalesce(a.archived, 0)::bigint FROM ( \
           SELECT service, sum(events)::bigint AS total, \
           coalesce(sum(events) FILTER (WHERE hour >= $1), 0)::bigint AS last_24h \
           FROM event_counts WHERE ($2::text[] IS NULL OR service LIKE ANY($2)) \
           GROUP BY service HAVING sum(events) > 0) c \
         LEFT JOIN (SELECT service, sum(rows) AS archived FROM archives GROUP BY service) a \
         USING (service) ORDER BY 2 DESC, 1",
    )
    .bind(day_start)
    .bind(allowed.clone())
    .fetch_all(pool)
    .await?;
    let hourly: BTreeMap<DateTime<Utc>, i64> = sqlx::query_as::<_, (DateTime<Utc>, i64)>(
        "SELECT hour, sum(events)::bigint FROM event_counts \
         WHERE hour >= $1 AND ($2::text[] IS NULL OR service LIKE ANY($2)) GROUP BY hour",
    )
    .bind(trend_start)
    .bind(allowed)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let services: Vec<ServiceCount> = per_service
        .into_iter()
        .map(|(service, total, last_24h, archived)| ServiceCount {
            service,
            total: total.max(0) as u64,
            last_24h: last_24h.max(0) as u64,
            archived: archived.clamp(0, total.max(0)) as u64,
        })
        .collect();
    let mut top_services = services.clone();
    top_services.sort_by(|left, right| {
        right
            .last_24h
            .cmp(&left.last_24h)
            .then(left.service.cmp(&right.service))
    });
    top_services.truncate(top_n);
    let hourly = (0..trend_hours)
        .map(|offset| {
            let hour = trend_start + TimeDelta::hours(offset);
            HourCount {
                hour: Some(to_timestamp(hour)),
                events: hourly.get(&hour).copied().unwrap_or(0).max(0) as u64,
            }
        })
        .collect();
    let (figures_start, figures_end) = figures_window(&request, now)?;
    let window = store::window(pool, figures_start, figures_end, caller.service_patterns()).await?;
    let mut all = Summed::default();
    for summed in window.services.values() {
        all.absorb(summed);
    }
    let mut figures: Vec<ServiceFigures> = window
        .services
        .iter()
        .map(|(service, summed)| service_figures(service, summed))
        .collect();
    figures.sort_by(|a, b| b.accepted.cmp(&a.accepted).then(a.service.cmp(&b.service)));
    let response = StatsResponse {
        total_events: services.iter().map(|service| service.total).sum(),
        archived_events: services.iter().map(|service| service.archived).sum(),
        services,
        hourly,
        top_services,
        figures,
        all_services: Some(service_figures("", &all)),
        usage: Some(UsagePattern {
            by_hour_of_day: window.by_hour_of_day.to_vec(),
            by_day_of_week: window.by_day_of_week.to_vec(),
        }),
        figures_start: Some(to_timestamp(figures_start)),
        figures_end: Some(to_timestamp(figures_end)),
        ..StatsResponse::default()
    };
    // Node-wide figures cover every service: only for admins.
    if !caller.has_scope(Scope::Admin) {
        return Ok(response);
    }
    Ok(StatsResponse {
        buffer: Some(buffer_stats(reader)),
        writer: Some(writer_stats(reader).await),
        ingest: Some(ingest_counters(reader)),
        ..response
    })
}

/// The window of the business figures: the request's, or the last 24 hours.
fn figures_window(
    request: &StatsRequest,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), QueryError> {
    let time = |field: &'static str, value: &Option<prost_types::Timestamp>| {
        value
            .as_ref()
            .map(|value| {
                to_datetime(value).map_err(|_| QueryError::invalid(field, "not a valid time"))
            })
            .transpose()
    };
    let end = time("end_time", &request.end_time)?.unwrap_or(now);
    let start = time("start_time", &request.start_time)?.unwrap_or(end - TimeDelta::hours(24));
    if start >= end {
        return Err(QueryError::invalid("start_time", "must be before end_time"));
    }
    Ok((start, end))
}

/// One line of business figures.
fn service_figures(service: &str, summed: &Summed) -> ServiceFigures {
    let rejected = summed.rejected_total();
    let events = summed.accepted + rejected;
    let rate = |count: u64| {
        if events == 0 {
            0.0
        } else {
            count as f64 / events as f64
        }
    };
    ServiceFigures {
        service: service.to_owned(),
        accepted: summed.accepted,
        rejected,
        rejected_by_reason: summed.rejected.clone().into_iter().collect(),
        rejection_rate: rate(rejected),
        rejection_rate_by_reason: summed
            .rejected
            .iter()
            .map(|(reason, count)| (reason.clone(), rate(*count)))
            .collect(),
        ack_latency_p50_ms: summed.ack_ms(0.50),
        ack_latency_p95_ms: summed.ack_ms(0.95),
        ack_latency_p99_ms: summed.ack_ms(0.99),
        processing_avg_ms: summed.processing_avg_ms(),
        processing_max_ms: summed.processing_max_us as f64 / 1000.0,
        size_under_1kib: summed.sizes[0],
        size_1_to_10kib: summed.sizes[1],
        size_over_10kib: summed.sizes[2],
    }
}

fn buffer_stats(reader: &Reader) -> BufferStats {
    let usage = reader.buffer.usage();
    BufferStats {
        events: usage.events as u64,
        bytes: usage.bytes as u64,
        max_events: usage.max_events as u64,
        max_bytes: usage.max_bytes as u64,
    }
}

async fn writer_stats(reader: &Reader) -> WriterStats {
    let backlog = match &reader.broker {
        Some(broker) => broker.backlog().await.unwrap_or_default(),
        None => Backlog::default(),
    };
    WriterStats {
        workers: reader.config.writer.workers as u32,
        circuit: reader.breaker.state().as_str().to_owned(),
        database_up: reader.store.is_reachable(Duration::from_millis(500)).await,
        spool_bytes: reader.spool.as_ref().map_or(0, |spool| spool.bytes()),
        stream_backlog_events: backlog.events,
        stream_backlog_bytes: backlog.bytes,
        mode: match &reader.broker {
            None => "direct".to_owned(),
            Some(_) => format!("{:?}", reader.config.role).to_lowercase(),
        },
    }
}

fn ingest_counters(reader: &Reader) -> IngestCounters {
    let totals = reader.counters.totals();
    let by_reason = |counts: &BTreeMap<&'static str, u64>| {
        counts
            .iter()
            .map(|(reason, count)| ((*reason).to_owned(), *count))
            .collect()
    };
    IngestCounters {
        received: totals.received,
        stored: totals.stored,
        duplicates: totals.duplicates,
        rejected: totals.rejected.values().sum(),
        rejected_by_reason: by_reason(&totals.rejected),
        refused: totals.refused.values().sum(),
        refused_by_reason: by_reason(&totals.refused),
        spooled: totals.spooled,
    }
}
