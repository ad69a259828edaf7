//! The QueryService handlers.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use futures::{Stream, TryStreamExt};
use serde_json::Value as Json;
use sqlx::{PgPool, Postgres, QueryBuilder};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use super::{
    QueryError, anonymize, archived,
    filter::{Cursor, DEFAULT_PAGE, Filter, MAX_PAGE},
};
use crate::{
    archive::{Archive, ArchiveError, Removal, catalog},
    audit::{self, Audit, Entry},
    auth::{Authorizer, Caller},
    broker::{Backlog, Broker, BrokerError},
    buffer::Buffer,
    config::{Config, Scope},
    event::ValidEvent,
    feed::TailFeed,
    metrics::{self, Counters},
    privacy::{
        self, ENCRYPTED_PREFIX, Privacy, PrivacyError, SharedPrivacy,
        optouts::{OptInError, OptOuts},
    },
    proto::wire::to_timestamp,
    proto::{
        AnonymizeRequest, AnonymizeResponse, AuditEntry, AuditRequest, AuditResponse, BufferStats,
        DeleteRequest, DeleteResponse, Event, ExportChunk, ExportRequest, HourCount,
        IngestCounters, OptInRequest, OptInResponse, OptOutRequest, OptOutResponse, Order,
        QueryRequest, QueryResponse, RestoreProgress, RestoreRequest, ServiceCount, StatsRequest,
        StatsResponse, TailRequest, TailResponse, WriterStats, query_service_server::QueryService,
    },
    spool::Spool,
    store::{self, Store, partitions},
    writer::breaker::Breaker,
};

/// Target size of one export chunk.
const EXPORT_CHUNK_BYTES: usize = 256 * 1024;
/// Export chunks produced ahead of the client.
const EXPORT_QUEUE: usize = 4;
/// Rows deleted per transaction, so large deletes never hold long locks.
const DELETE_BATCH: i64 = 5_000;
/// How long Delete waits for events accepted before it to be written.
const DELETE_BARRIER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_TOP_N: usize = 10;
const DEFAULT_TREND_HOURS: i64 = 24;
const MAX_TREND_HOURS: i64 = 48;

#[derive(Clone)]
pub struct QueryHandler {
    store: Arc<Store>,
    buffer: Arc<Buffer>,
    breaker: Arc<Breaker>,
    spool: Option<Spool>,
    config: Arc<Config>,
    counters: Arc<Counters>,
    auth: Arc<Authorizer>,
    audit: Arc<Audit>,
    archive: Arc<Archive>,
    privacy: SharedPrivacy,
    optouts: Arc<OptOuts>,
    tail: Arc<TailFeed>,
    /// True once the server stops: Tail streams end.
    stopping: watch::Receiver<bool>,
    /// Redis mode: Delete waits for the streams to deliver what was accepted before it.
    streams: Option<Broker>,
    /// Deletes run one at a time: they use the write pool, which the writers need.
    deletes: Arc<tokio::sync::Semaphore>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: Uuid,
    service: String,
    message: String,
    ts: DateTime<Utc>,
    ingested_at: DateTime<Utc>,
    user_id: Option<String>,
    metadata: sqlx::types::Json<serde_json::Value>,
    trace_id: Option<String>,
}

impl From<EventRow> for Event {
    fn from(row: EventRow) -> Self {
        let metadata = match row.metadata.0 {
            serde_json::Value::Object(object) => Some(object.into()),
            _ => None,
        };
        Event {
            id: row.id.to_string(),
            service: row.service,
            message: row.message,
            timestamp: Some(to_timestamp(row.ts)),
            user_id: row.user_id.unwrap_or_default(),
            metadata,
            ingested_at: Some(to_timestamp(row.ingested_at)),
            trace_id: row.trace_id.unwrap_or_default(),
        }
    }
}

/// What the read side needs from the rest of the server.
pub struct QueryDeps {
    pub store: Arc<Store>,
    pub buffer: Arc<Buffer>,
    pub breaker: Arc<Breaker>,
    pub spool: Option<Spool>,
    pub config: Arc<Config>,
    pub counters: Arc<Counters>,
    pub auth: Arc<Authorizer>,
    pub audit: Arc<Audit>,
    pub archive: Arc<Archive>,
    pub privacy: SharedPrivacy,
    pub optouts: Arc<OptOuts>,
    pub tail: Arc<TailFeed>,
    pub stopping: watch::Receiver<bool>,
    pub streams: Option<Broker>,
}

impl QueryHandler {
    pub fn new(deps: QueryDeps) -> Self {
        Self {
            store: deps.store,
            buffer: deps.buffer,
            breaker: deps.breaker,
            spool: deps.spool,
            config: deps.config,
            counters: deps.counters,
            auth: deps.auth,
            audit: deps.audit,
            archive: deps.archive,
            privacy: deps.privacy,
            optouts: deps.optouts,
            tail: deps.tail,
            stopping: deps.stopping,
            streams: deps.streams,
            deletes: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Who sent `request`, refused (and audited) unless it has `scope` and may read every
    /// service it names.
    async fn caller<T>(
        &self,
        request: &Request<T>,
        call: &Call,
        scope: Scope,
        services: &[String],
    ) -> Result<Caller, Status> {
        let caller = match self.auth.authenticate(request) {
            Ok(caller) => caller,
            Err(error) => {
                let status = Status::from(error);
                metrics::rpc_finished(call.rpc, status.code(), call.started.elapsed());
                self.audit
                    .refused("(unknown)", call.rpc, call.peer, &status);
                return Err(status);
            }
        };
        tracing::Span::current().record("principal", caller.principal.as_str());
        let allowed = caller
            .require(scope)
            .and_then(|()| caller.check_services(services));
        if let Err(error) = allowed {
            let status = Status::from(error);
            metrics::rpc_finished(call.rpc, status.code(), call.started.elapsed());
            self.audit
                .refused(&caller.principal, call.rpc, call.peer, &status);
            return Err(status);
        }
        Ok(caller)
    }

    /// A read naming no service covers only the services the caller may read, and a user id
    /// is looked up in its stored (maybe pseudonymized) form.
    fn restrict(&self, filter: &mut Filter, caller: &Caller) -> Result<(), QueryError> {
        if filter.services.is_empty() {
            filter.allowed_services = caller.service_patterns();
        }
        let privacy = self.privacy.load();
        if let Some(user_id) = filter.user_id.as_mut() {
            *user_id = privacy.user_id(user_id);
        }
        // In the stored form too: hashed keys search by their hash, and neither the filter's
        // plain values nor a search on dropped or encrypted keys reach the audit log.
        if let Some(metadata) = filter.metadata_contains.as_mut() {
            privacy.search_form(metadata).map_err(|key| {
                QueryError::invalid(
                    "metadata_contains",
                    format!("{key} is redacted or encrypted (privacy.*) and cannot be searched"),
                )
            })?;
        }
        Ok(())
    }

    /// Writes the audit row of a call that got past authorization.
    async fn audited<T>(
        &self,
        caller: &Caller,
        call: &Call,
        details: Json,
        result: Result<T, QueryError>,
    ) -> Result<T, Status> {
        match result {
            Ok(value) => {
                self.record(caller, call, details, tonic::Code::Ok).await;
                Ok(value)
            }
            Err(error) => Err(self.refused(caller, call, details, error).await),
        }
    }

    /// Writes the audit row of a call that failed after authorization; returns its status.
    async fn refused(
        &self,
        caller: &Caller,
        call: &Call,
        details: Json,
        error: QueryError,
    ) -> Status {
        let status = Status::from(error);
        self.record(caller, call, details, status.code()).await;
        status
    }

    async fn record(&self, caller: &Caller, call: &Call, details: Json, code: tonic::Code) {
        metrics::rpc_finished(call.rpc, code, call.started.elapsed());
        let entry = Entry::new(
            &caller.principal,
            call.rpc,
            code,
            call.peer,
            &call.request_id,
            details,
        );
        // Reads do not wait for their row's WAL flush; calls that change anything do.
        if matches!(call.rpc, "Query" | "Export" | "Tail" | "Stats" | "Audit") {
            self.audit.record_read(entry).await;
        } else {
            self.audit.record(entry).await;
        }
    }

    async fn query_page(
        &self,
        caller: &Caller,
        request: QueryRequest,
        details: &mut Json,
    ) -> Result<QueryResponse, QueryError> {
        let mut filter = Filter::from_query(&request, &self.config.validation)?;
        self.restrict(&mut filter, caller)?;
        details["filters"] = filter_details(&filter);
        let oldest_first = request.order == Order::OldestFirst as i32;
        let show = caller.has_scope(Scope::Pii);
        let privacy = self.privacy.load();
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
        let page = if filter.needs_scan() {
            self.scan_page(&filter, cursor, limit, oldest_first).await?
        } else {
            let mut rows = self
                .page_rows(&filter, cursor, None, limit, oldest_first)
                .await?;
            let more = rows.len() > limit as usize;
            rows.truncate(limit as usize);
            let next = more
                .then(|| rows.last().map(|last| Cursor::at(last.ts, last.id)))
                .flatten();
            Page {
                rows,
                next,
                scanned_until: None,
            }
        };
        let Page {
            rows,
            next,
            scanned_until,
        } = page;
        let next_page_token = next
            .map(|cursor| cursor.encode(&filter, oldest_first))
            .unwrap_or_default();
        details["rows"] = Json::from(rows.len());
        Ok(QueryResponse {
            events: rows
                .into_iter()
                .map(|mut row| {
                    privacy.reveal(row.id, &mut row.metadata.0, show)?;
                    Ok(Event::from(row))
                })
                .collect::<Result<_, QueryError>>()?,
            next_page_token,
            scanned_until: scanned_until.map(to_timestamp),
        })
    }

    /// Rows after `cursor` (in the order asked), within `window` when given, at most
    /// `limit + 1` (the extra one says whether there are more).
    async fn page_rows(
        &self,
        filter: &Filter,
        cursor: Option<Cursor>,
        window: Option<(DateTime<Utc>, DateTime<Utc>)>,
        limit: u32,
        oldest_first: bool,
    ) -> Result<Vec<EventRow>, QueryError> {
        let mut builder = Self::rows_query(
            filter,
            &self.config.search,
            cursor,
            window,
            limit,
            oldest_first,
        );
        Ok(builder
            .build_query_as()
            .fetch_all(&self.store.read_pool)
            .await?)
    }

    /// [`Self::page_rows`] under a statement timeout of `budget`: `None` when PostgreSQL
    /// cancelled the step at the budget (SQLSTATE 57014), so that a step whose plan turned out
    /// slower than the last one's ends the call on time instead of late.
    async fn page_rows_within(
        &self,
        filter: &Filter,
        cursor: Option<Cursor>,
        window: (DateTime<Utc>, DateTime<Utc>),
        limit: u32,
        oldest_first: bool,
        budget: Duration,
    ) -> Result<Option<Vec<EventRow>>, QueryError> {
        let mut builder = Self::rows_query(
            filter,
            &self.config.search,
            cursor,
            Some(window),
            limit,
            oldest_first,
        );
        let mut transaction = self.store.read_pool.begin().await?;
        // Whole milliseconds, at least one: 0 would mean no timeout at all.
        let timeout_ms = budget.as_millis().clamp(1, i64::MAX as u128).to_string();
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(timeout_ms)
            .execute(&mut *transaction)
            .await?;
        let rows = match builder.build_query_as().fetch_all(&mut *transaction).await {
            Ok(rows) => rows,
            Err(error) if store::sqlstate(&error).as_deref() == Some("57014") => {
                metrics::search_step_cancelled();
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        transaction.commit().await?;
        Ok(Some(rows))
    }

    /// The SELECT of [`Self::page_rows`].
    fn rows_query(
        filter: &Filter,
        search: &crate::config::SearchConfig,
        cursor: Option<Cursor>,
        window: Option<(DateTime<Utc>, DateTime<Utc>)>,
        limit: u32,
        oldest_first: bool,
    ) -> QueryBuilder<Postgres> {
        let mut builder = QueryBuilder::<Postgres>::new(
            "SELECT id, service, message, ts, ingested_at, user_id, metadata, trace_id FROM events",
        );
        filter.push_where(&mut builder);
        filter.push_index_hints(&mut builder, search);
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
        if let Some((from, until)) = window {
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

    /// A page of a search no index narrows: time slices from the cursor (or the end of the
    /// range) towards the other end, until the page is full, the range is covered, or
    /// `search.max_scan_time` is spent. Slices halve when a step is slow and double when it is
    /// fast; the BRIN index on `ts` keeps each step to its slice's blocks.
    async fn scan_page(
        &self,
        filter: &Filter,
        cursor: Option<Cursor>,
        limit: u32,
        oldest_first: bool,
    ) -> Result<Page, QueryError> {
        let search = &self.config.search;
        let started = Instant::now();
        let oldest = match filter.start {
            Some(start) => Some(start),
            None => partitions::oldest_start(&self.store.read_pool).await?,
        };
        let newest = filter.end.unwrap_or_else(|| {
            Utc::now() + self.config.validation.max_future_skew + TimeDelta::seconds(1)
        });
        let Some(oldest) = oldest.filter(|oldest| *oldest < newest) else {
            return Ok(Page::default());
        };
        // The part of the range still to scan, [low, high).
        let (mut low, mut high) = match (cursor, oldest_first) {
            (Some(cursor), false) => (oldest, (cursor.ts + TimeDelta::microseconds(1)).min(newest)),
            (Some(cursor), true) => (cursor.ts.max(oldest), newest),
            (None, _) => (oldest, newest),
        };
        let first_slice = TimeDelta::from_std(search.slice).unwrap_or(TimeDelta::hours(1));
        // Shrinking stops at 1/64 of the configured slice: below that a step's cost is its
        // fixed overhead, and more steps would only add calls.
        let min_slice = (first_slice / MIN_SLICE_DIVISOR).max(TimeDelta::seconds(1));
        // A token carries the slice the last call ended with.
        let mut slice = cursor
            .and_then(|cursor| cursor.slice)
            .map_or(first_slice, |slice| slice.clamp(min_slice, MAX_SLICE));
        let mut rows: Vec<EventRow> = Vec::new();
        let mut position = cursor;
        let mut first_step = true;
        while low < high {
            let window = if oldest_first {
                (low, (low + slice).min(high))
            } else {
                ((high - slice).max(low), high)
            };
            let step = Instant::now();
            let wanted = limit - rows.len() as u32;
            // Every step runs under a statement timeout of what is left of the budget (the
            // whole of it for the first), except a first step at the smallest slice, which
            // runs to its end so that paging always moves on. A cancelled step ends the call
            // where the scan stood before it; a cancelled first step also hands the next call
            // a slice an eighth as long.
            let first = std::mem::take(&mut first_step);
            let mut found = if first && slice <= min_slice {
                self.page_rows(filter, position, Some(window), wanted, oldest_first)
                    .await?
            } else {
                let budget = search.max_scan_time.saturating_sub(started.elapsed());
                let Some(found) = self
                    .page_rows_within(filter, position, window, wanted, oldest_first, budget)
                    .await?
                else {
                    if first {
                        slice = (slice / FIRST_STEP_SHRINK).max(min_slice);
                    }
                    let edge = position.unwrap_or_else(|| scan_edge(low, high, oldest_first));
                    return Ok(Page {
                        rows,
                        next: Some(Cursor {
                            slice: Some(slice),
                            ..edge
                        }),
                        scanned_until: Some(if oldest_first { low } else { high }),
                    });
                };
                found
            };
            if found.len() > wanted as usize {
                found.truncate(wanted as usize);
                rows.extend(found);
                let next = rows.last().map(|last| Cursor {
                    slice: Some(slice),
                    ..Cursor::at(last.ts, last.id)
                });
                return Ok(Page {
                    scanned_until: next.map(|next| next.ts),
                    rows,
                    next,
                });
            }
            rows.extend(found);
            // The window is covered: go on from its far edge.
            if oldest_first {
                low = window.1;
            } else {
                high = window.0;
            }
            position = Some(scan_edge(low, high, oldest_first));
            let took = step.elapsed();
            if took > search.max_scan_time / 2 {
                slice = (slice / 2).max(min_slice);
            } else if took < search.max_scan_time / 10 {
                slice = (slice * 2).min(MAX_SLICE);
            }
            // Stop before a step that would likely end past the budget: one like the last,
            // with room for its variance (steps of one slice size vary by about half).
            if low < high && started.elapsed() + took + took / 2 >= search.max_scan_time {
                return Ok(Page {
                    rows,
                    next: position.map(|edge| Cursor {
                        slice: Some(slice),
                        ..edge
                    }),
                    scanned_until: Some(if oldest_first { low } else { high }),
                });
            }
        }
        Ok(Page {
            rows,
            next: None,
            scanned_until: None,
        })
    }

    /// Deletes, and writes its audit row in the transaction of its last step.
    async fn delete_matching(
        &self,
        caller: &Caller,
        call: &Call,
        request: DeleteRequest,
        details: &mut Json,
    ) -> Result<DeleteResponse, QueryError> {
        let mut filter = Filter::from_delete(&request, &self.config.validation)?;
        self.restrict(&mut filter, caller)?;
        details["filters"] = filter_details(&filter);
        details["dry_run"] = Json::Bool(request.dry_run);
        let dry_run = request.dry_run;
        let _one_at_a_time = self.deletes.acquire().await.map_err(|_| QueryError::Busy {
            retry_after: Duration::from_secs(1),
        })?;
        // Events accepted before this call must be covered: wait until they are written to
        // PostgreSQL or the spool.
        self.wait_for_accepted().await?;
        let spooled_deleted = match &self.spool {
            Some(spool) => {
                let doomed = filter.clone();
                let caller = caller.clone();
                spool
                    .purge(
                        move |event| {
                            doomed.matches_for_delete(event) && caller.may_use(&event.service)
                        },
                        dry_run,
                    )
                    .await?
            }
            None => 0,
        };
        let pool = &self.store.pool;
        let archive_pool = &self.store.maintenance_pool;
        let mut deleted = if dry_run {
            count_events(pool, &filter).await?
        } else {
            delete_events(pool, &filter).await?
        };
        // Rows a concurrent lifecycle run was archiving are in the objects this finds: it
        // reads the catalog under the archive lock.
        let selection = filter.archive_selection();
        let (archived_deleted, archive_objects_rewritten) = if dry_run {
            let objects = self
                .archive
                .select_settled(archive_pool, &selection)
                .await?;
            let counts = archived::count_matches(&self.archive, &filter, &objects).await?;
            (counts.iter().sum(), 0)
        } else {
            let done = self
                .archive
                .take_all(
                    archive_pool,
                    &selection,
                    filter.archived_matcher(),
                    Removal::Delete,
                    |_| {},
                )
                .await?;
            // A Restore may have moved matching lines back into the table before this took
            // their object: once the archive holds none, delete what the table holds again.
            deleted += delete_events(pool, &filter).await?;
            (done.events, done.objects_changed)
        };
        let mut transaction = pool.begin().await?;
        let dead_letters_deleted = delete_dead_letters(&mut transaction, &filter, dry_run).await?;
        details["rows"] = Json::from(deleted);
        details["archived"] = Json::from(archived_deleted);
        details["archive_objects_rewritten"] = Json::from(archive_objects_rewritten);
        details["dead_letters"] = Json::from(dead_letters_deleted);
        details["spooled"] = Json::from(spooled_deleted);
        let entry = Entry::new(
            &caller.principal,
            call.rpc,
            tonic::Code::Ok,
            call.peer,
            &call.request_id,
            details.clone(),
        );
        Audit::record_in(&mut transaction, &entry).await?;
        transaction.commit().await?;
        metrics::rpc_finished(call.rpc, tonic::Code::Ok, call.started.elapsed());
        tracing::info!(
            target: "audit",
            dry_run,
            by_user = filter.user_id.is_some(),
            services = ?filter.services,
            deleted,
            archived_deleted,
            archive_objects_rewritten,
            dead_letters_deleted,
            spooled_deleted,
            "delete request served"
        );
        Ok(DeleteResponse {
            deleted,
            dead_letters_deleted,
            spooled_deleted,
            dry_run,
            archived_deleted,
            archive_objects_rewritten,
        })
    }

    /// The keyed hash an opt-out is recorded under, from a checked plain user id. The key must
    /// outlive this process and be every node's: made persistent (the key file, fingerprints
    /// recorded) on the first opt-out of a server whose privacy settings are all off.
    async fn persistent_opt_out_key(&self, user_id: &str) -> Result<String, QueryError> {
        if self.privacy.load().is_ephemeral() {
            let persistent = privacy::fingerprints::open_persistent(&self.config, &self.store.pool)
                .await
                .map_err(|error| QueryError::Keys(error.to_string()))?;
            self.privacy.store(Arc::new(persistent));
        }
        self.opt_out_key(user_id)
    }

    /// Checks an OptOut or OptIn (services named by their rule, every service only for an
    /// unrestricted caller) and gives the key the user is recorded under, noted in `details`.
    async fn opt_out_target(
        &self,
        caller: &Caller,
        user_id: &str,
        services: &[String],
        details: &mut Json,
    ) -> Result<String, QueryError> {
        check_services(services)?;
        every_service_needs_an_unrestricted_caller(caller, services)?;
        let key = self.persistent_opt_out_key(user_id).await?;
        details["user_key"] = Json::from(key.clone());
        Ok(key)
    }

    /// The keyed hash of a checked plain user id.
    fn opt_out_key(&self, user_id: &str) -> Result<String, QueryError> {
        if user_id.is_empty() {
            return Err(QueryError::invalid("user_id", "required: the user"));
        }
        if user_id.len() > self.config.validation.max_user_id_bytes || user_id.contains('\0') {
            return Err(QueryError::invalid(
                "user_id",
                "not a user id events can carry (too long, or NUL)",
            ));
        }
        Ok(self.privacy.load().hash(user_id))
    }

    async fn anonymize_user(
        &self,
        caller: &Caller,
        request: AnonymizeRequest,
        details: &mut Json,
    ) -> Result<AnonymizeResponse, QueryError> {
        self.opt_out_key(&request.user_id)?;
        let mut filter = Filter {
            user_id: Some(request.user_id),
            ..Filter::default()
        };
        self.restrict(&mut filter, caller)?;
        details["filters"] = filter_details(&filter);
        details["dry_run"] = Json::Bool(request.dry_run);
        // One at a time with Deletes (they share the write pool), and after the events
        // accepted before the call are written.
        let _one_at_a_time = self.deletes.acquire().await.map_err(|_| QueryError::Busy {
            retry_after: Duration::from_secs(1),
        })?;
        self.wait_for_accepted().await?;
        let may_use = {
            let caller = caller.clone();
            Arc::new(move |service: &str| caller.may_use(service))
        };
        let done = anonymize::anonymize(
            anonymize::Scope {
                pool: &self.store.pool,
                archive_pool: &self.store.maintenance_pool,
                archive: &self.archive,
                spool: self.spool.as_ref(),
                privacy: self.privacy.load_full(),
                filter: &filter,
                may_use,
            },
            request.dry_run,
        )
        .await?;
        details["rows"] = Json::from(done.events);
        details["dead_letters"] = Json::from(done.dead_letters);
        details["spooled"] = Json::from(done.spooled);
        details["archived"] = Json::from(done.archived);
        Ok(AnonymizeResponse {
            anonymized: done.events,
            dead_letters_anonymized: done.dead_letters,
            spooled_anonymized: done.spooled,
            archived_anonymized: done.archived,
            dry_run: request.dry_run,
        })
    }

    async fn stats(
        &self,
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
        let pool = &self.store.read_pool;
        let per_service: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT service, sum(events)::bigint, coalesce(sum(events) FILTER (WHERE hour >= $1), 0)::bigint \
             FROM event_counts WHERE ($2::text[] IS NULL OR service LIKE ANY($2)) \
             GROUP BY service HAVING sum(events) > 0 ORDER BY 2 DESC, 1",
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
            .map(|(service, total, last_24h)| ServiceCount {
                service,
                total: total as u64,
                last_24h: last_24h as u64,
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
                    events: hourly.get(&hour).copied().unwrap_or(0) as u64,
                }
            })
            .collect();
        // Node-wide figures cover every service: only for admins.
        if !caller.has_scope(Scope::Admin) {
            return Ok(StatsResponse {
                total_events: services.iter().map(|service| service.total).sum(),
                services,
                hourly,
                top_services,
                ..StatsResponse::default()
            });
        }
        let usage = self.buffer.usage();
        let totals = self.counters.totals();
        let backlog = match &self.streams {
            Some(streams) => streams.backlog().await.unwrap_or_default(),
            None => Backlog::default(),
        };
        Ok(StatsResponse {
            total_events: services.iter().map(|service| service.total).sum(),
            services,
            hourly,
            top_services,
            buffer: Some(BufferStats {
                events: usage.events as u64,
                bytes: usage.bytes as u64,
                max_events: usage.max_events as u64,
                max_bytes: usage.max_bytes as u64,
            }),
            writer: Some(WriterStats {
                workers: self.config.writer.workers as u32,
                circuit: self.breaker.state().as_str().to_owned(),
                database_up: self.store.is_reachable(Duration::from_millis(500)).await,
                spool_bytes: self.spool.as_ref().map_or(0, |spool| spool.bytes()),
                stream_backlog_events: backlog.events,
                stream_backlog_bytes: backlog.bytes,
                mode: match &self.streams {
                    None => "direct".to_owned(),
                    Some(_) => format!("{:?}", self.config.role).to_lowercase(),
                },
            }),
            ingest: Some(IngestCounters {
                received: totals.received,
                stored: totals.stored,
                duplicates: totals.duplicates,
                rejected: totals.rejected.values().sum(),
                rejected_by_reason: totals
                    .rejected
                    .iter()
                    .map(|(reason, count)| ((*reason).to_owned(), *count))
                    .collect(),
                refused: totals.refused.values().sum(),
                refused_by_reason: totals
                    .refused
                    .iter()
                    .map(|(reason, count)| ((*reason).to_owned(), *count))
                    .collect(),
                spooled: totals.spooled,
            }),
        })
    }
}

async fn count_events(pool: &PgPool, filter: &Filter) -> Result<u64, QueryError> {
    let mut builder = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events");
    filter.push_where(&mut builder);
    let count: i64 = builder.build_query_scalar().fetch_one(pool).await?;
    Ok(count as u64)
}

/// Deletes in batches of `DELETE_BATCH` rows, each in its own transaction, keeping the rollup
/// in step. Retries a batch that lost a deadlock against a writer.
async fn delete_events(pool: &PgPool, filter: &Filter) -> Result<u64, QueryError> {
    let mut deleted = 0u64;
    loop {
        let mut builder =
            QueryBuilder::<Postgres>::new("WITH doomed AS (SELECT id, ts FROM events");
        filter.push_where(&mut builder);
        builder.push(" LIMIT ").push_bind(DELETE_BATCH);
        builder.push(
            "), removed AS (DELETE FROM events e USING doomed d WHERE e.id = d.id AND e.ts = d.ts \
             RETURNING e.service, date_trunc('hour', e.ts, 'UTC') AS hour), \
             counts AS (SELECT service, hour, count(*) AS n FROM removed GROUP BY service, hour), \
             rollup AS (INSERT INTO event_counts (service, hour, shard, events) \
             SELECT service, hour, -1, -n FROM counts \
             ON CONFLICT (service, hour, shard) DO UPDATE SET events = event_counts.events + excluded.events) \
             SELECT count(*) FROM removed",
        );
        let batch: i64 = match builder.build_query_scalar().fetch_one(pool).await {
            Ok(batch) => batch,
            // Lost a deadlock against a writer: retry the batch.
            Err(error) if store::sqlstate(&error).as_deref() == Some("40P01") => {
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        deleted += batch as u64;
        // Only an empty batch ends it: rows archived meanwhile can make a batch come short
        // while more rows still match.
        if batch == 0 {
            return Ok(deleted);
        }
    }
}

/// Dead letters match on the same user, services and event time range as the events.
async fn delete_dead_letters(
    connection: &mut sqlx::PgConnection,
    filter: &Filter,
    dry_run: bool,
) -> Result<u64, QueryError> {
    let mut builder = QueryBuilder::<Postgres>::new(if dry_run {
        "SELECT count(*) FROM dead_letters"
    } else {
        "WITH removed AS (DELETE FROM dead_letters"
    });
    // dead_letters has the service, ts and user_id columns a Delete filter uses.
    filter.push_where(&mut builder);
    if !dry_run {
        builder.push(" RETURNING 1) SELECT count(*) FROM removed");
    }
    let count: i64 = builder.build_query_scalar().fetch_one(connection).await?;
    Ok(count as u64)
}

/// Broker the export from one REPEATABLE READ snapshot (of the rows and of the archive
/// catalog: each event is in exactly one of them): the counts first, then the archived lines,
/// one object at a time, then NDJSON lines built by PostgreSQL, fetched row by row (memory
/// stays flat), in chunks of ~256 KiB.
async fn export(
    pool: PgPool,
    archive: Arc<Archive>,
    privacy: Arc<Privacy>,
    show: bool,
    filter: Filter,
    chunks: &mpsc::Sender<Result<ExportChunk, Status>>,
) -> Result<(), QueryError> {
    // An object replaced or expired between the snapshot and its reading: take a fresh
    // snapshot, as long as nothing was sent yet.
    let mut attempts = 0;
    let (mut transaction, hot, objects, archived_counts) = loop {
        attempts += 1;
        match export_snapshot(&pool, &archive, &filter).await {
            Err(QueryError::Archive(ArchiveError::Gone { .. })) if attempts < EXPORT_ATTEMPTS => {
                continue;
            }
            outcome => break outcome?,
        }
    };
    let archived: u64 = archived_counts.iter().sum();
    let total = hot as u64 + archived;
    let first = ExportChunk {
        total_events: total,
        archived_events: archived,
        last: total == 0,
        ..ExportChunk::default()
    };
    if chunks.send(Ok(first)).await.is_err() || total == 0 {
        return Ok(());
    }
    let mut chunk = ExportChunk::default();
    let matcher = filter.archived_matcher();
    for (object, count) in objects.iter().zip(archived_counts) {
        if count == 0 {
            continue;
        }
        for line in archive.matching_lines(object, matcher.clone()).await? {
            let line = reveal_line(&privacy, &line, show)?;
            if !append_line(&mut chunk, &line, chunks).await {
                return Ok(());
            }
        }
    }
    let mut lines =
        QueryBuilder::<Postgres>::new(format!("SELECT {} FROM events", store::EVENT_JSON));
    filter.push_where(&mut lines);
    lines.push(" ORDER BY ts, id");
    let mut rows = lines
        .build_query_scalar::<String>()
        .fetch(&mut *transaction);
    while let Some(line) = rows.try_next().await? {
        let line = reveal_line(&privacy, &line, show)?;
        if !append_line(&mut chunk, &line, chunks).await {
            return Ok(());
        }
    }
    drop(rows);
    chunk.last = true;
    let _ = chunks.send(Ok(chunk)).await;
    transaction.commit().await?;
    Ok(())
}

/// An opt-out (or opt-in) of every service changes other teams' services too: only a caller
/// that may use every service may make one.
fn every_service_needs_an_unrestricted_caller(
    caller: &Caller,
    services: &[String],
) -> Result<(), QueryError> {
    if services.is_empty() && caller.service_patterns().is_some() {
        return Err(QueryError::invalid(
            "services",
            "name the services: this principal may not use every service",
        ));
    }
    Ok(())
}

/// Service names of an opt-out: the same rule as events'.
fn check_services(services: &[String]) -> Result<(), QueryError> {
    services.iter().try_for_each(|service| {
        crate::proto::wire::check_service(service)
            .map_err(|error| QueryError::invalid("services", error.to_string()))
    })
}

/// Tail responses queued per subscriber before it skips batches.
const TAIL_QUEUE: usize = 8;

/// A stored event as Tail shows it: encrypted values opened for `pii` only.
fn tailed_event(privacy: &Privacy, event: &ValidEvent, show: bool) -> Result<Event, QueryError> {
    let mut metadata: Json =
        serde_json::from_str(&event.metadata_json).map_err(|_| PrivacyError::Malformed)?;
    privacy.reveal(event.id, &mut metadata, show)?;
    Ok(Event {
        id: event.id.to_string(),
        service: event.service.clone(),
        message: event.message.clone(),
        timestamp: Some(to_timestamp(event.timestamp)),
        user_id: event.user_id.clone().unwrap_or_default(),
        metadata: match metadata {
            Json::Object(object) => Some(object.into()),
            _ => None,
        },
        ingested_at: Some(to_timestamp(Utc::now())),
        trace_id: event
            .trace_id
            .map(|trace_id| trace_id.to_string())
            .unwrap_or_default(),
    })
}

impl QueryHandler {
    /// Events accepted before now must be covered by a Delete or Anonymize: waits until the
    /// buffer has handed them on and, in Redis mode, until the streams have delivered every
    /// entry appended so far to PostgreSQL. Busy (retry later) past the barrier timeout.
    async fn wait_for_accepted(&self) -> Result<(), QueryError> {
        let busy = QueryError::Busy {
            retry_after: Duration::from_secs(5),
        };
        let deadline = tokio::time::Instant::now() + DELETE_BARRIER_TIMEOUT;
        if !self.buffer.wait_for_admitted(DELETE_BARRIER_TIMEOUT).await {
            return Err(busy);
        }
        let Some(streams) = &self.streams else {
            return Ok(());
        };
        let unavailable = |error: BrokerError| QueryError::Broker(error.to_string());
        let mark = streams.mark().await.map_err(unavailable)?;
        while !streams.delivered_up_to(&mark).await.map_err(unavailable)? {
            if tokio::time::Instant::now() >= deadline {
                return Err(busy);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// The cursor of a scan that has covered everything on one side of `low` (oldest first) or
/// `high` (newest first), and nothing beyond.
fn scan_edge(low: DateTime<Utc>, high: DateTime<Utc>, oldest_first: bool) -> Cursor {
    if oldest_first {
        Cursor::at(low - TimeDelta::microseconds(1), Uuid::max())
    } else {
        Cursor::at(high, Uuid::nil())
    }
}

/// The largest slice a scan grows to.
const MAX_SLICE: TimeDelta = TimeDelta::days(31);
/// How much a first step cancelled at the budget shrinks the next call's slice.
const FIRST_STEP_SHRINK: i32 = 8;

/// How far below `search.slice` a scan's slices may shrink.
const MIN_SLICE_DIVISOR: i32 = 64;

/// One page of Query: its rows, where the next one starts, and how far a scan reached.
#[derive(Default)]
struct Page {
    rows: Vec<EventRow>,
    next: Option<Cursor>,
    scanned_until: Option<DateTime<Utc>>,
}

/// Snapshots tried before an Export gives up on objects changing under it.
const EXPORT_ATTEMPTS: u32 = 3;

/// The export's snapshot: its transaction, the matching rows, the archived objects that may
/// hold matches, and how many each holds.
async fn export_snapshot(
    pool: &PgPool,
    archive: &Archive,
    filter: &Filter,
) -> Result<
    (
        sqlx::Transaction<'static, Postgres>,
        i64,
        Vec<catalog::ArchivedObject>,
        Vec<u64>,
    ),
    QueryError,
> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *transaction)
        .await?;
    // An export streams for as long as its client reads: the read pool's statement timeout is
    // for queries, not for this.
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *transaction)
        .await?;
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *transaction)
        .await?;
    let mut count = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events");
    filter.push_where(&mut count);
    let hot: i64 = count
        .build_query_scalar()
        .fetch_one(&mut *transaction)
        .await?;
    let objects = catalog::select(&mut transaction, &filter.archive_selection()).await?;
    let counts = archived::count_matches(archive, filter, &objects).await?;
    Ok((transaction, hot, objects, counts))
}

/// Adds one NDJSON line to the chunk being filled, sending it once full. False when the
/// client has gone.
async fn append_line(
    chunk: &mut ExportChunk,
    line: &str,
    chunks: &mpsc::Sender<Result<ExportChunk, Status>>,
) -> bool {
    chunk.ndjson.extend_from_slice(line.as_bytes());
    chunk.ndjson.push(b'\n');
    chunk.events += 1;
    chunk.ndjson.len() < EXPORT_CHUNK_BYTES || chunks.send(Ok(std::mem::take(chunk))).await.is_ok()
}

/// One call, as the audit log names it.
struct Call {
    rpc: &'static str,
    peer: Option<std::net::SocketAddr>,
    request_id: String,
    /// For `sluice_rpc_duration_seconds` (streams: until their first message).
    started: std::time::Instant,
}

impl Call {
    fn of<T>(request: &Request<T>, rpc: &'static str) -> Self {
        Self {
            rpc,
            peer: request.remote_addr(),
            request_id: audit::request_id(request.metadata()),
            started: std::time::Instant::now(),
        }
    }
}

/// A filter as the audit log records it.
fn filter_details(filter: &Filter) -> Json {
    serde_json::to_value(filter).unwrap_or(Json::Null)
}

/// An NDJSON line as the caller may see it: encrypted metadata values opened for scope `pii`,
/// masked for everyone else. Lines without encrypted values pass through byte for byte.
fn reveal_line<'a>(
    privacy: &Privacy,
    line: &'a str,
    show: bool,
) -> Result<std::borrow::Cow<'a, str>, QueryError> {
    if !line.contains(ENCRYPTED_PREFIX) {
        return Ok(std::borrow::Cow::Borrowed(line));
    }
    let mut event: Json = serde_json::from_str(line).map_err(|_| PrivacyError::Malformed)?;
    let id = event["id"]
        .as_str()
        .and_then(|id| Uuid::try_parse(id).ok())
        .ok_or(PrivacyError::Malformed)?;
    privacy.reveal(id, &mut event["metadata"], show)?;
    Ok(std::borrow::Cow::Owned(event.to_string()))
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportChunk, Status>> + Send + 'static>>;
type TailStream = Pin<Box<dyn Stream<Item = Result<TailResponse, Status>> + Send + 'static>>;
type RestoreStream = Pin<Box<dyn Stream<Item = Result<RestoreProgress, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl QueryService for QueryHandler {
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let call = Call::of(&request, "Query");
        let caller = self
            .caller(&request, &call, Scope::Query, &request.get_ref().services)
            .await?;
        let mut details = Json::Object(Default::default());
        let result = self
            .query_page(&caller, request.into_inner(), &mut details)
            .await;
        Ok(Response::new(
            self.audited(&caller, &call, details, result).await?,
        ))
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let call = Call::of(&request, "Export");
        let caller = self
            .caller(&request, &call, Scope::Export, &request.get_ref().services)
            .await?;
        let filter = Filter::from_export(request.into_inner(), &self.config.validation).and_then(
            |mut filter| {
                self.restrict(&mut filter, &caller)?;
                Ok(filter)
            },
        );
        let details = serde_json::json!({
            "filters": filter.as_ref().map(filter_details).unwrap_or(Json::Null),
        });
        let filter = self.audited(&caller, &call, details, filter).await?;
        let (chunks, receiver) = mpsc::channel(EXPORT_QUEUE);
        let pool = self.store.read_pool.clone();
        let archive = self.archive.clone();
        let privacy = self.privacy.load_full();
        let show = caller.has_scope(Scope::Pii);
        tokio::spawn(
            async move {
                if let Err(error) = export(pool, archive, privacy, show, filter, &chunks).await {
                    let _ = chunks.send(Err(error.into())).await;
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let call = Call::of(&request, "Delete");
        let caller = self
            .caller(&request, &call, Scope::Delete, &request.get_ref().services)
            .await?;
        // Its own task: a client that goes away mid-delete must not stop the deletion before
        // its audit row is written.
        let handler = self.clone();
        let request = request.into_inner();
        let deletion = tokio::spawn(
            async move {
                let mut details = Json::Object(Default::default());
                match handler
                    .delete_matching(&caller, &call, request, &mut details)
                    .await
                {
                    // The audit row committed with the deletion.
                    Ok(response) => Ok(response),
                    Err(error) => handler.audited(&caller, &call, details, Err(error)).await,
                }
            }
            .in_current_span(),
        );
        deletion
            .await
            .map_err(|_| Status::internal("the delete task failed; see server logs"))?
            .map(Response::new)
    }

    async fn opt_out(
        &self,
        request: Request<OptOutRequest>,
    ) -> Result<Response<OptOutResponse>, Status> {
        let call = Call::of(&request, "OptOut");
        let caller = self
            .caller(&request, &call, Scope::Delete, &request.get_ref().services)
            .await?;
        let request = request.into_inner();
        let mut details = serde_json::json!({ "services": request.services });
        let result = async {
            let key = self
                .opt_out_target(&caller, &request.user_id, &request.services, &mut details)
                .await?;
            let mut connection = self.store.pool.acquire().await?;
            self.optouts
                .opt_out(&mut connection, &key, &request.services)
                .await?;
            Ok(OptOutResponse {})
        }
        .await;
        self.audited(&caller, &call, details, result)
            .await
            .map(Response::new)
    }

    async fn opt_in(
        &self,
        request: Request<OptInRequest>,
    ) -> Result<Response<OptInResponse>, Status> {
        let call = Call::of(&request, "OptIn");
        let caller = self
            .caller(&request, &call, Scope::Delete, &request.get_ref().services)
            .await?;
        let request = request.into_inner();
        let mut details = serde_json::json!({ "services": request.services });
        let result = async {
            let key = self
                .opt_out_target(&caller, &request.user_id, &request.services, &mut details)
                .await?;
            let was_opted_out = self
                .optouts
                .opt_in(&self.store.pool, &key, &request.services)
                .await
                .map_err(|error| match error {
                    OptInError::EveryService => QueryError::invalid("services", error.to_string()),
                    OptInError::Database(error) => QueryError::Database(error),
                })?;
            Ok(OptInResponse { was_opted_out })
        }
        .await;
        self.audited(&caller, &call, details, result)
            .await
            .map(Response::new)
    }

    async fn anonymize(
        &self,
        request: Request<AnonymizeRequest>,
    ) -> Result<Response<AnonymizeResponse>, Status> {
        let call = Call::of(&request, "Anonymize");
        let caller = self.caller(&request, &call, Scope::Delete, &[]).await?;
        // Its own task: a client that goes away does not stop it before its audit row.
        let handler = self.clone();
        let request = request.into_inner();
        let task = tokio::spawn(
            async move {
                let mut details = Json::Object(Default::default());
                let result = handler.anonymize_user(&caller, request, &mut details).await;
                handler.audited(&caller, &call, details, result).await
            }
            .in_current_span(),
        );
        task.await
            .map_err(|_| Status::internal("the anonymize task failed; see server logs"))?
            .map(Response::new)
    }

    type TailStream = TailStream;

    async fn tail(
        &self,
        request: Request<TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let call = Call::of(&request, "Tail");
        let caller = self
            .caller(&request, &call, Scope::Query, &request.get_ref().services)
            .await?;
        let request = request.into_inner();
        let checked = check_services(&request.services).and_then(|()| {
            if request.user_id.len() > self.config.validation.max_user_id_bytes {
                return Err(QueryError::invalid("user_id", "longer than any event's"));
            }
            Ok(())
        });
        let details = serde_json::json!({ "services": request.services });
        self.audited(&caller, &call, details, checked).await?;
        let user =
            (!request.user_id.is_empty()).then(|| self.privacy.load().user_id(&request.user_id));
        let privacy = self.privacy.clone();
        let auth = self.auth.clone();
        let mut batches = self.tail.subscribe();
        let mut stopping = self.stopping.clone();
        let (responses, receiver) = mpsc::channel(TAIL_QUEUE);
        tokio::spawn(
            async move {
                let mut caller = caller;
                loop {
                    let received = tokio::select! {
                        received = batches.recv() => received,
                        _ = stopping.wait_for(|stopping| *stopping) => return,
                    };
                    // A long-lived stream: the caller is looked up again under the policy in
                    // force, so a reload or an expired token applies from the next batch on.
                    caller = match auth.refresh(&caller).and_then(|caller| {
                        caller.require(Scope::Query)?;
                        Ok(caller)
                    }) {
                        Ok(caller) => caller,
                        Err(error) => {
                            let _ = responses.send(Err(Status::from(error))).await;
                            return;
                        }
                    };
                    let show = caller.has_scope(Scope::Pii);
                    let wanted = |event: &ValidEvent| {
                        caller.may_use(&event.service)
                            && (request.services.is_empty()
                                || request.services.contains(&event.service))
                            && user
                                .as_ref()
                                .is_none_or(|user| event.user_id.as_ref() == Some(user))
                    };
                    let response = match received {
                        Ok(batch) => {
                            let privacy = privacy.load();
                            let events: Result<Vec<Event>, QueryError> = batch
                                .iter()
                                .filter(|event| wanted(event))
                                .map(|event| tailed_event(&privacy, event, show))
                                .collect();
                            match events {
                                Ok(events) if events.is_empty() => continue,
                                Ok(events) => Ok(TailResponse {
                                    events,
                                    missed_batches: 0,
                                }),
                                Err(error) => Err(Status::from(error)),
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => Ok(TailResponse {
                            events: Vec::new(),
                            missed_batches: missed,
                        }),
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    // A client that stops reading must not hold up shutdown.
                    tokio::select! {
                        sent = responses.send(response) => {
                            if sent.is_err() {
                                // The client went away: stop following.
                                return;
                            }
                        }
                        _ = stopping.wait_for(|stopping| *stopping) => return,
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type RestoreStream = RestoreStream;

    async fn restore(
        &self,
        request: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let call = Call::of(&request, "Restore");
        let caller = self
            .caller(&request, &call, Scope::Admin, &request.get_ref().services)
            .await?;
        let filter = Filter::from_restore(request.get_ref(), &self.config.validation).and_then(
            |mut filter| {
                self.restrict(&mut filter, &caller)?;
                Ok(filter)
            },
        );
        let mut details = serde_json::json!({
            "filters": filter.as_ref().map(filter_details).unwrap_or(Json::Null),
        });
        let filter = match filter {
            Ok(filter) => filter,
            Err(error) => return Err(self.refused(&caller, &call, details, error).await),
        };
        let (progress, receiver) = mpsc::unbounded_channel();
        let handler = self.clone();
        // Its own task: a client that goes away does not stop a restore halfway.
        tokio::spawn(
            async move {
                let hold_until = Utc::now()
                    + TimeDelta::from_std(handler.archive.restore_hold)
                        .unwrap_or(TimeDelta::days(7));
                let result = archived::restore(
                    &handler.store.maintenance_pool,
                    &handler.archive,
                    &filter,
                    hold_until,
                    &progress,
                )
                .await
                .map(|restored| {
                    details["objects"] = Json::from(restored.objects);
                    details["rows"] = Json::from(restored.events);
                    details["inserted"] = Json::from(restored.inserted);
                    details["hold_until"] = Json::from(hold_until.to_rfc3339());
                });
                if let Err(status) = handler.audited(&caller, &call, details, result).await {
                    let _ = progress.send(Err(status));
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            receiver,
        ))))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let call = Call::of(&request, "Stats");
        let caller = self.caller(&request, &call, Scope::Query, &[]).await?;
        let result = self.stats(&caller, request.into_inner()).await;
        let details = serde_json::json!({ "services": caller.service_patterns() });
        Ok(Response::new(
            self.audited(&caller, &call, details, result).await?,
        ))
    }

    async fn audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditResponse>, Status> {
        let call = Call::of(&request, "Audit");
        let caller = self.caller(&request, &call, Scope::Admin, &[]).await?;
        let request = request.into_inner();
        let details = serde_json::json!({
            "principal": request.principal,
            "rpc": request.rpc,
        });
        // Refusals counted since the last flush are part of the answer.
        self.audit.flush().await;
        let result = audit_page(self.audit.pool(), request).await;
        self.audited(&caller, &call, details, result)
            .await
            .map(Response::new)
    }
}

/// Audit rows per page, by default and at most.
const DEFAULT_AUDIT_PAGE: u32 = 100;
const MAX_AUDIT_PAGE: u32 = 1_000;

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: DateTime<Utc>,
    principal: String,
    rpc: String,
    code: String,
    details: sqlx::types::Json<serde_json::Value>,
}

/// One page of the audit log, newest first, from the primary (where it is written).
async fn audit_page(pool: &PgPool, request: AuditRequest) -> Result<AuditResponse, QueryError> {
    let limit = match request.limit {
        0 => DEFAULT_AUDIT_PAGE,
        limit if limit > MAX_AUDIT_PAGE => {
            return Err(QueryError::invalid(
                "limit",
                format!("at most {MAX_AUDIT_PAGE} rows per page"),
            ));
        }
        limit => limit,
    };
    let before_id = match request.page_token.as_str() {
        "" => None,
        token => Some(
            token
                .strip_prefix("a.")
                .and_then(|id| id.parse::<i64>().ok())
                .ok_or_else(|| QueryError::invalid("page_token", "not an audit page token"))?,
        ),
    };
    let bound = |field: &'static str, value: Option<&prost_types::Timestamp>| {
        value
            .map(crate::proto::wire::to_datetime)
            .transpose()
            .map_err(|error| QueryError::invalid(field, error.to_string()))
    };
    let start = bound("start_time", request.start_time.as_ref())?;
    let end = bound("end_time", request.end_time.as_ref())?;
    let mut rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT id, at, principal, rpc, code, details FROM audit_log \
         WHERE ($1::text IS NULL OR principal = $1) AND ($2::text IS NULL OR rpc = $2) \
         AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4) \
         AND ($5::bigint IS NULL OR id < $5) ORDER BY id DESC LIMIT $6",
    )
    .bind((!request.principal.is_empty()).then_some(request.principal))
    .bind((!request.rpc.is_empty()).then_some(request.rpc))
    .bind(start)
    .bind(end)
    .bind(before_id)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let next_page_token = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .map(|row| format!("a.{}", row.id))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(AuditResponse {
        entries: rows
            .into_iter()
            .map(|row| AuditEntry {
                id: row.id,
                at: Some(to_timestamp(row.at)),
                principal: row.principal,
                rpc: row.rpc,
                code: row.code,
                details: match row.details.0 {
                    serde_json::Value::Object(object) => Some(object.into()),
                    _ => None,
                },
            })
            .collect(),
        next_page_token,
    })
}
