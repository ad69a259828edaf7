//! Stats: events per service (total and last 24 h), an hourly trend, the top services, and,
//! for admins, the node's buffer, writers, circuit and ingest counters. It reads
//! `event_counts`, the hourly rollup the writers keep in the same transaction as each COPY,
//! so it never counts the events table.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

use super::{QueryError, Reader};
use crate::{
    auth::Caller,
    broker::Backlog,
    config::Scope,
    proto::{
        BufferStats, HourCount, IngestCounters, ServiceCount, StatsRequest, StatsResponse,
        WriterStats, wire::to_timestamp,
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
    let response = StatsResponse {
        total_events: services.iter().map(|service| service.total).sum(),
        archived_events: services.iter().map(|service| service.archived).sum(),
        services,
        hourly,
        top_services,
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
