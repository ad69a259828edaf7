//! Query: one page of events matching a filter, newest first or oldest first, with a keyset
//! page token. Filters an index narrows (user, trace, one or more services alone) read their
//! page straight; the others run a bounded, time-sliced scan ([`ScanPlan`]).

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures::{Stream, TryStreamExt};
use serde_json::Value as Json;
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::{
    QueryError, Reader,
    archived::{self, Direction, Found, Position, Unsettled},
    cursor::Cursor,
    nearest_day, needle,
    scan::{ScanPlan, Step, StepBound, Window},
};
use crate::{
    archive::{ArchiveError, format::ArchivedEvent},
    auth::Caller,
    config::{Scope, SearchConfig},
    filter::{ContentIndexes, Filter},
    metrics,
    privacy::{Privacy, holds_encrypted},
    proto::{Event, Metadata, Order, QueryRequest, QueryResponse, wire::to_timestamp},
    store::{self, closed_indexes::IndexedRange, jsonb_text::JsonbText, partitions, sqlstates},
};

/// The most events one Query page may return.
pub const MAX_PAGE: u32 = 10_000;
/// Events per page when the request asks for none.
pub const DEFAULT_PAGE: u32 = 100;

/// A stored event as the read side selects it.
pub struct EventRow {
    pub id: Uuid,
    pub service: String,
    pub message: String,
    pub ts: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub user_id: Option<String>,
    pub metadata: RowMetadata,
    pub trace_id: Option<String>,
    /// The message's and the metadata's size as stored, for the response's byte bound.
    pub bytes: i64,
}

/// A row's metadata, read as `jsonb`'s text. Encoded for the reply as the row streams in, so
/// that the encoding overlaps PostgreSQL's sending of the rows after it; text that holds an
/// encrypted value waits for the caller's scope, which says how to reveal it.
pub enum RowMetadata {
    Encoded(Metadata),
    Sealed(Vec<u8>),
    /// Not one JSON object (never stored): the reply fails when it is built.
    Unreadable(serde_json::Error),
}

impl RowMetadata {
    fn from_text(text: Vec<u8>) -> Self {
        if holds_encrypted(&text) {
            return Self::Sealed(text);
        }
        match Metadata::from_stored_text(text) {
            Ok(metadata) => Self::Encoded(metadata),
            Err(error) => Self::Unreadable(error),
        }
    }
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for EventRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let message: String = row.try_get("message")?;
        let JsonbText(metadata) = row.try_get("metadata")?;
        Ok(Self {
            id: row.try_get("id")?,
            service: row.try_get("service")?,
            bytes: (message.len() + metadata.len()) as i64,
            message,
            ts: row.try_get("ts")?,
            ingested_at: row.try_get("ingested_at")?,
            user_id: row.try_get("user_id")?,
            metadata: RowMetadata::from_text(metadata),
            trace_id: row.try_get("trace_id")?,
        })
    }
}

impl EventRow {
    /// The row as Query returns it: encrypted metadata values opened (or hidden, without
    /// `show`), and the metadata encoded from its stored text without a tree in between
    /// (BENCHMARKS.md, "Query pages encoded from the stored text").
    fn into_event(self, privacy: &Privacy, show: bool) -> Result<Event, QueryError> {
        let metadata = match self.metadata {
            RowMetadata::Encoded(metadata) => metadata,
            RowMetadata::Sealed(text) => {
                let text = privacy.revealed_text(self.id, text, show)?;
                Metadata::from_stored_text(text).map_err(QueryError::StoredMetadata)?
            }
            RowMetadata::Unreadable(error) => return Err(QueryError::StoredMetadata(error)),
        };
        Ok(Event {
            id: self.id.to_string(),
            service: self.service,
            message: self.message,
            timestamp: Some(to_timestamp(self.ts)),
            user_id: self.user_id.unwrap_or_default(),
            metadata: Some(metadata),
            ingested_at: Some(to_timestamp(self.ingested_at)),
            trace_id: self.trace_id.unwrap_or_default(),
        })
    }
}

/// One page of Query: its rows, where the next one starts, and how far a scan reached.
#[derive(Default)]
struct Page {
    rows: Vec<EventRow>,
    next: Option<Cursor>,
    scanned_until: Option<DateTime<Utc>>,
    /// How many of `rows` came from the archive.
    archived: u32,
}

/// Times a call reads its page again when the archive changes under it.
const ARCHIVE_ATTEMPTS: u32 = 3;

/// A page over both tiers: the rows (PostgreSQL) and the archived objects, merged in the
/// page's order ([`archived`] says how and why a page is read again).
async fn tiered_page(
    reader: &Reader,
    filter: &Filter,
    cursor: Option<Cursor>,
    limit: u32,
    oldest_first: bool,
) -> Result<Page, QueryError> {
    let direction = Direction { oldest_first };
    let pool = &reader.store.read_pool;
    let position = cursor.map(|cursor| (cursor.ts, cursor.id));
    for _ in 0..ARCHIVE_ATTEMPTS {
        let started = Instant::now();
        let mut archived = archived::Reading::begin(
            &reader.archive,
            pool,
            filter,
            position,
            direction,
            reader.config.archive.query_concurrency,
        )
        .await?;
        let rows = rows_page(reader, filter, cursor, limit, oldest_first).await?;
        let found = if archived.is_empty() {
            Ok(Found::none())
        } else {
            let positions: Vec<Position> = rows.rows.iter().map(|row| (row.ts, row.id)).collect();
            let deadline = archived::deadline(started, reader.config.search.max_scan_time);
            let rows_bound = rows.next.map(|next| (next.ts, next.id));
            archived
                .finish(
                    filter,
                    &positions,
                    rows_bound,
                    limit as usize,
                    deadline,
                    pool,
                )
                .await
        };
        let page = match found {
            Ok(found) => merge(
                rows,
                found,
                limit as usize,
                reader.config.reads.max_response_bytes,
                direction,
            ),
            Err(Unsettled::Changed) => {
                metrics::archive_query_retried();
                continue;
            }
            Err(Unsettled::Failed(error)) => return Err(error.into()),
        };
        let end = page.next.map(|next| (next.ts, next.id));
        match archived.check_unchanged(filter, end, pool).await {
            Ok(()) => return Ok(page),
            Err(Unsettled::Changed) => metrics::archive_query_retried(),
            Err(Unsettled::Failed(error)) => return Err(error.into()),
        }
    }
    Err(ArchiveError::Moving.into())
}

/// The rows' part of a page: read straight when an index narrows the filter, else scanned.
async fn rows_page(
    reader: &Reader,
    filter: &Filter,
    cursor: Option<Cursor>,
    limit: u32,
    oldest_first: bool,
) -> Result<Page, QueryError> {
    if filter.needs_scan() {
        return scan_page(reader, filter, cursor, limit, oldest_first).await;
    }
    let Rows { mut rows, cut } = walk_rows(reader, filter, cursor, limit, oldest_first).await?;
    let more = cut || rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|last| Cursor::at(last.ts, last.id)))
        .flatten();
    Ok(Page {
        rows,
        next,
        ..Page::default()
    })
}

/// The rows of a page an index narrows: through the nearest day first when the page walks
/// the services' index over many days ([`nearest_day`]), else in one read.
async fn walk_rows(
    reader: &Reader,
    filter: &Filter,
    cursor: Option<Cursor>,
    limit: u32,
    oldest_first: bool,
) -> Result<Rows, QueryError> {
    let budget = reader.config.reads.max_response_bytes;
    let Some((near, rest)) = nearest_day::split(filter, cursor.as_ref(), oldest_first, Utc::now())
    else {
        return page_rows(
            reader,
            filter,
            cursor,
            None,
            None,
            limit,
            oldest_first,
            budget,
        )
        .await;
    };
    let first = page_rows(
        reader,
        &near,
        cursor,
        None,
        None,
        limit,
        oldest_first,
        budget,
    )
    .await?;
    let got = first.rows.len();
    if first.cut || got > limit as usize {
        return Ok(first);
    }
    let used: usize = first
        .rows
        .iter()
        .map(|row| usize::try_from(row.bytes).unwrap_or(0))
        .sum();
    let left = budget.saturating_sub(used);
    // `limit - got` more, and the one after them that says whether there are more still.
    let then = page_rows(
        reader,
        &rest,
        cursor,
        None,
        None,
        limit - got as u32,
        oldest_first,
        left,
    )
    .await?;
    let mut rows = first.rows;
    let mut cut = then.cut;
    // A read's first row always fits its budget; after the first day's rows it must fit
    // what they left.
    match then.rows.first() {
        Some(row) if got > 0 && usize::try_from(row.bytes).unwrap_or(0) > left => cut = true,
        _ => rows.extend(then.rows),
    }
    Ok(Rows { rows, cut })
}

/// The page of rows and archived events together: everything up to the nearer of the two
/// parts' bounds, in order, at most `limit` events and `bytes` (the first always fits).
fn merge(rows: Page, found: Found, limit: usize, bytes: usize, direction: Direction) -> Page {
    let rows_bound = rows.next.map(|next| (next.ts, next.id));
    let bound = match (rows_bound, found.bound) {
        (Some(a), Some(b)) => Some(if direction.before(a, b) { a } else { b }),
        (a, b) => a.or(b),
    };
    if found.events.is_empty() && bound == rows_bound {
        return rows;
    }
    let mut all: Vec<(EventRow, bool)> = rows
        .rows
        .into_iter()
        .map(|row| (row, false))
        .chain(
            found
                .events
                .into_iter()
                .map(|event| (EventRow::from(event), true)),
        )
        .filter(|(row, _)| bound.is_none_or(|bound| !direction.before(bound, (row.ts, row.id))))
        .collect();
    all.sort_by(|(a, _), (b, _)| archived::order(direction, (a.ts, a.id), (b.ts, b.id)));
    let available = all.len();
    let mut taken = Vec::with_capacity(available.min(limit));
    let mut archived = 0u32;
    let mut used = 0usize;
    for (row, from_archive) in all {
        let size = usize::try_from(row.bytes).unwrap_or(0);
        if taken.len() == limit || (!taken.is_empty() && used + size > bytes) {
            break;
        }
        used += size;
        archived += u32::from(from_archive);
        taken.push(row);
    }
    let scan = rows.next.map(|next| (next.slice, next.unindexed));
    let next = if taken.len() < available {
        taken.last().map(|last| (last.ts, last.id))
    } else {
        bound
    };
    let next = next.map(|(ts, id)| Cursor {
        slice: scan.and_then(|(slice, _)| slice),
        unindexed: scan.and_then(|(_, unindexed)| unindexed),
        ..Cursor::at(ts, id)
    });
    Page {
        scanned_until: next.map(|next| next.ts),
        rows: taken,
        next,
        archived,
    }
}

impl From<ArchivedEvent> for EventRow {
    fn from(event: ArchivedEvent) -> Self {
        let metadata = serde_json::to_vec(&event.metadata).unwrap_or_default();
        Self {
            bytes: (event.message.len() + metadata.len()) as i64,
            id: event.id,
            service: event.service,
            message: event.message,
            ts: event.timestamp,
            ingested_at: event.ingested_at.unwrap_or(event.timestamp),
            user_id: event.user_id,
            metadata: RowMetadata::from_text(metadata),
            trace_id: event.trace_id,
        }
    }
}

/// The rows of one read, and whether it stopped at the response's byte bound.
struct Rows {
    rows: Vec<EventRow>,
    cut: bool,
}

/// Serves one Query call, noting its filter and row count in `details` (its audit row).
pub async fn query(
    reader: &Reader,
    caller: &Caller,
    request: QueryRequest,
    details: &mut Json,
) -> Result<QueryResponse, QueryError> {
    let _slot = reader.queries.take(&caller.principal)?;
    let mut filter = Filter::from_query(&request, &reader.config.validation)?;
    reader.restrict(&mut filter, caller)?;
    details["filters"] = filter.details();
    let oldest_first = request.order == Order::OldestFirst as i32;
    let show = caller.has_scope(Scope::Pii);
    let limit = match request.limit {
        0 => DEFAULT_PAGE,
        limit if limit > MAX_PAGE => {
            return Err(QueryError::invalid(
                "limit",
                format!("at most {MAX_PAGE} events per page"),
            ));
        }
        limit => limit,
    };
    let cursor = (!request.page_token.is_empty())
        .then(|| Cursor::decode(&request.page_token, &filter, oldest_first))
        .transpose()?;
    let page = tiered_page(reader, &filter, cursor, limit, oldest_first).await?;
    let next_page_token = page
        .next
        .map(|cursor| cursor.encode(&filter, oldest_first))
        .unwrap_or_default();
    details["rows"] = Json::from(page.rows.len());
    details["archived_rows"] = Json::from(page.archived);
    let privacy = reader.privacy.load();
    Ok(QueryResponse {
        archived_events: page.archived,
        events: page
            .rows
            .into_iter()
            .map(|row| row.into_event(&privacy, show))
            .collect::<Result<_, QueryError>>()?,
        next_page_token,
        scanned_until: page.scanned_until.map(to_timestamp),
    })
}

/// Rows after `cursor` (in the order asked), within `window` when given, at most
/// `limit + 1` (the extra one says whether there are more), and no more than `budget` bytes
/// of them (but at least one).
#[allow(clippy::too_many_arguments)]
async fn page_rows(
    reader: &Reader,
    filter: &Filter,
    cursor: Option<Cursor>,
    window: Option<Window>,
    lookup: Option<&str>,
    limit: u32,
    oldest_first: bool,
    budget: usize,
) -> Result<Rows, QueryError> {
    let mut builder = rows_query(
        filter,
        &reader.config.search,
        cursor,
        window,
        lookup,
        limit,
        oldest_first,
    );
    let rows = builder.build_query_as().fetch(&reader.store.read_pool);
    Ok(collect(rows, limit as usize + 1, budget).await?)
}

/// Takes rows as they stream in until `wanted` are in hand or the next would pass `budget`
/// bytes: memory holds one response's worth, whatever the rows hold.
async fn collect(
    mut rows: impl Stream<Item = Result<EventRow, sqlx::Error>> + Unpin,
    wanted: usize,
    budget: usize,
) -> Result<Rows, sqlx::Error> {
    let mut taken = Vec::new();
    let mut used = 0usize;
    while taken.len() < wanted {
        let Some(row) = rows.try_next().await? else {
            break;
        };
        let bytes = usize::try_from(row.bytes).unwrap_or(0);
        if !taken.is_empty() && used + bytes > budget {
            return Ok(Rows {
                rows: taken,
                cut: true,
            });
        }
        used += bytes;
        taken.push(row);
    }
    Ok(Rows {
        rows: taken,
        cut: false,
    })
}

/// [`page_rows`] under a statement timeout of `budget`: `None` when PostgreSQL cancelled the
/// step at the budget, so that a step whose plan turned out slower than the last one's ends
/// the call on time instead of late. Planned for the window's own bounds (a custom plan), so
/// that PostgreSQL reads only its partition, through that partition's indexes.
#[allow(clippy::too_many_arguments)]
async fn page_rows_within(
    reader: &Reader,
    filter: &Filter,
    cursor: Option<Cursor>,
    window: Window,
    lookup: Option<&str>,
    limit: u32,
    oldest_first: bool,
    budget: Duration,
    bytes: usize,
) -> Result<Option<Rows>, QueryError> {
    let mut builder = rows_query(
        filter,
        &reader.config.search,
        cursor,
        Some(window),
        lookup,
        limit,
        oldest_first,
    );
    let mut transaction = reader.store.read_pool.begin().await?;
    // Whole milliseconds, at least one: 0 would mean no timeout at all.
    let timeout_ms = budget.as_millis().clamp(1, i64::MAX as u128).to_string();
    sqlx::query(
        "SELECT set_config('statement_timeout', $1, true), \
         set_config('plan_cache_mode', 'force_custom_plan', true)",
    )
    .bind(timeout_ms)
    .execute(&mut *transaction)
    .await?;
    let rows = builder.build_query_as().fetch(&mut *transaction);
    let rows = match collect(rows, limit as usize + 1, bytes).await {
        Ok(rows) => rows,
        Err(error) if store::is_sqlstate(&error, sqlstates::QUERY_CANCELED) => {
            metrics::search_step_cancelled();
            return Ok(None);
        }
        Err(error) => return Err(error.into()),
    };
    transaction.commit().await?;
    Ok(Some(rows))
}

/// The SELECT of [`page_rows`], within a scan's window when given (read as that window's
/// step says, an indexed one looking up `lookup` in its trigram index).
fn rows_query(
    filter: &Filter,
    search: &SearchConfig,
    cursor: Option<Cursor>,
    window: Option<Window>,
    lookup: Option<&str>,
    limit: u32,
    oldest_first: bool,
) -> QueryBuilder<Postgres> {
    let mut builder = QueryBuilder::<Postgres>::new(
        "SELECT id, service, message, ts, ingested_at, user_id, metadata, trace_id FROM events",
    );
    let content = match window {
        Some(Window {
            step: Step::Indexed,
            ..
        }) => ContentIndexes::Closed { message: lookup },
        Some(Window {
            avoid_index: true, ..
        }) => ContentIndexes::Avoided,
        _ => ContentIndexes::Configured,
    };
    filter.push_where_for_step(&mut builder, search, content);
    let (comparison, direction) = if oldest_first {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    if let Some(cursor) = cursor {
        // The plain `ts` bound is implied by the row comparison; it lets the planner start
        // the index scan at the cursor.
        builder
            .push(format_args!(" AND ts {comparison}= "))
            .push_bind(cursor.ts);
        builder
            .push(format_args!(" AND (ts, id) {comparison} ("))
            .push_bind(cursor.ts);
        builder.push(", ").push_bind(cursor.id).push(")");
    }
    if let Some(Window { from, until, .. }) = window {
        builder.push(" AND ts >= ").push_bind(from);
        builder.push(" AND ts < ").push_bind(until);
    }
    builder
        .push(format_args!(
            " ORDER BY ts {direction}, id {direction} LIMIT "
        ))
        .push_bind(i64::from(limit) + 1);
    builder
}

/// A page of a search no index narrows: the steps of a [`ScanPlan`] from the cursor (or the
/// end of the range) towards the other end, until the page is full, the range is covered, or
/// the budget is spent.
async fn scan_page(
    reader: &Reader,
    filter: &Filter,
    cursor: Option<Cursor>,
    limit: u32,
    oldest_first: bool,
) -> Result<Page, QueryError> {
    let started = Instant::now();
    let oldest = match filter.start {
        Some(start) => Some(start),
        None => partitions::oldest_start(&reader.store.read_pool).await?,
    };
    let newest = filter.end.unwrap_or_else(|| {
        Utc::now() + reader.config.validation.max_future_skew + TimeDelta::seconds(1)
    });
    // The partitions whose closed-partition indexes serve this filter.
    let ranges = reader.store.closed_indexes.ranges();
    let indexed = ranges
        .iter()
        .filter(|range| filter.served_by(range.message, range.metadata))
        .map(|range| (range.start, range.end))
        .collect();
    let Some(mut plan) = oldest.and_then(|oldest| {
        ScanPlan::new(
            oldest,
            newest,
            cursor,
            oldest_first,
            &reader.config.search,
            indexed,
        )
    }) else {
        return Ok(Page::default());
    };
    let mut rows: Vec<EventRow> = Vec::new();
    let mut position = cursor;
    let mut bytes_left = reader.config.reads.max_response_bytes;
    while let Some(window) = plan.next_window() {
        let step = Instant::now();
        let batch = plan.batch(window, reader.config.search.concurrent_steps);
        let wanted = limit - rows.len() as u32;
        let mut reads = Vec::with_capacity(batch.len());
        for window in &batch {
            metrics::search_step(window.step.as_str());
            let bound = plan.begin_step(started.elapsed(), window);
            reads.push(read_step(
                reader,
                filter,
                position,
                *window,
                closed_lookup(&ranges, window, filter),
                wanted,
                oldest_first,
                bound,
                bytes_left,
            ));
        }
        let results = futures::future::join_all(reads).await;
        for (window, found) in batch.iter().zip(results) {
            // Cancelled at the budget: the call ends where the scan stood before the step.
            let Some(found) = found? else {
                plan.cancelled(window);
                return Ok(Page {
                    rows,
                    next: Some(plan.resume(position)),
                    scanned_until: Some(plan.scanned_until()),
                    archived: 0,
                });
            };
            let wanted = limit as usize - rows.len();
            let (taken, full) = fit(found, wanted, bytes_left, rows.is_empty());
            let used: i64 = taken.iter().map(|row| row.bytes).sum();
            bytes_left = bytes_left.saturating_sub(usize::try_from(used).unwrap_or(0));
            rows.extend(taken);
            // The page is full, in rows or in bytes: it ends at its last row.
            if full {
                let next = rows
                    .last()
                    .map(|last| plan.resume(Some(Cursor::at(last.ts, last.id))));
                return Ok(Page {
                    scanned_until: next.map(|next| next.ts),
                    rows,
                    next,
                    archived: 0,
                });
            }
            plan.covered(window, step.elapsed());
            position = Some(plan.edge());
        }
        if plan.should_stop(started.elapsed(), step.elapsed()) {
            return Ok(Page {
                rows,
                next: Some(plan.resume(position)),
                scanned_until: Some(plan.scanned_until()),
                archived: 0,
            });
        }
    }
    Ok(Page::default_with(rows))
}

/// One step of a scan: `None` when PostgreSQL cancelled it at its bound.
#[allow(clippy::too_many_arguments)]
async fn read_step(
    reader: &Reader,
    filter: &Filter,
    position: Option<Cursor>,
    window: Window,
    lookup: Option<&str>,
    wanted: u32,
    oldest_first: bool,
    bound: StepBound,
    bytes_left: usize,
) -> Result<Option<Rows>, QueryError> {
    match bound {
        StepBound::Unbounded => Ok(Some(
            page_rows(
                reader,
                filter,
                position,
                Some(window),
                lookup,
                wanted,
                oldest_first,
                bytes_left,
            )
            .await?,
        )),
        StepBound::Within(budget) => {
            page_rows_within(
                reader,
                filter,
                position,
                window,
                lookup,
                wanted,
                oldest_first,
                budget,
                bytes_left,
            )
            .await
        }
    }
}

/// For an indexed step, the part of the filter's needle its partition's trigram index looks
/// up ([`needle::trigram_lookup`]); None when there is no needle or no such index.
fn closed_lookup<'a>(
    ranges: &'a [IndexedRange],
    window: &Window,
    filter: &'a Filter,
) -> Option<&'a str> {
    if window.step != Step::Indexed {
        return None;
    }
    let needle = filter.trigram_needle()?;
    let range = ranges
        .iter()
        .find(|range| range.message && range.start <= window.from && window.until <= range.end)?;
    Some(needle::trigram_lookup(needle, &range.common_words))
}

/// The rows of a step that fit the page: at most `wanted`, within `bytes_left` (the page's
/// first row always fits), and whether the page ends with them (more rows were there).
fn fit(found: Rows, wanted: usize, bytes_left: usize, page_empty: bool) -> (Vec<EventRow>, bool) {
    let mut full = found.cut || found.rows.len() > wanted;
    let mut taken = Vec::with_capacity(found.rows.len().min(wanted));
    let mut used = 0usize;
    for row in found.rows {
        let bytes = usize::try_from(row.bytes).unwrap_or(0);
        let first = page_empty && taken.is_empty();
        if taken.len() == wanted || (!first && used + bytes > bytes_left) {
            full = true;
            break;
        }
        used += bytes;
        taken.push(row);
    }
    (taken, full)
}

impl Page {
    /// The last page of a scan: its rows, and no token.
    fn default_with(rows: Vec<EventRow>) -> Self {
        Self {
            rows,
            ..Self::default()
        }
    }
}
