//! Export: every matching event as NDJSON, archived events first (one object at a time), then
//! rows, from one consistent (REPEATABLE READ) snapshot of the rows and of the archive
//! catalog, streamed in chunks of about [`EXPORT_CHUNK_BYTES`] so that memory stays flat.
//!
//! An export holds a read connection and a snapshot for as long as it runs, so it is bounded:
//! a principal runs at most `reads.max_exports_per_principal` at once, a client that takes no
//! chunk for `reads.export_idle_timeout` ends its export (DEADLINE_EXCEEDED, its connection
//! freed; PostgreSQL's `idle_in_transaction_session_timeout` backs that up), and the caller is
//! authorized again before every chunk, so an expired token or a reload that took the scope
//! away ends it too.

use std::{borrow::Cow, pin::Pin, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use futures::{Stream, StreamExt};
use serde_json::Value as Json;
use sqlx::{PgPool, Postgres, QueryBuilder, postgres::PgRow};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

mod windows;

use super::{QueryError, Reader, slots::Slot};
use crate::{
    archive::{Archive, ArchiveError, catalog},
    config::Scope,
    filter::Filter,
    privacy::{ENCRYPTED_PREFIX, Privacy, PrivacyError},
    proto::{ExportChunk, ExportRequest},
    rpc::{Admission, Call},
    store::{
        line::EventColumns,
        partitions::{self, Partition},
    },
};
use windows::{ExportTransaction, Windows};

/// Target size of one export chunk.
const EXPORT_CHUNK_BYTES: usize = 256 * 1024;
/// Export chunks produced ahead of the client.
const EXPORT_QUEUE: usize = 4;
/// Snapshots tried before an Export gives up on objects changing under it.
const EXPORT_ATTEMPTS: u32 = 3;

pub type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportChunk, Status>> + Send + 'static>>;

/// Checks and audits the request, then streams the export from a task of its own.
pub async fn serve(
    reader: &Reader,
    admission: &Arc<Admission>,
    call: Call,
    request: ExportRequest,
) -> Result<ExportStream, Status> {
    let filter = Filter::from_export(request, &reader.config.validation)
        .map_err(QueryError::from)
        .and_then(|mut filter| {
            reader.restrict(&mut filter, &call.caller)?;
            Ok(filter)
        });
    let details = serde_json::json!({
        "filters": filter.as_ref().map(Filter::details).unwrap_or(Json::Null),
    });
    let started =
        filter.and_then(|filter| Ok((filter, reader.exports.take(&call.caller.principal)?)));
    let (filter, slot) = admission.audited(&call, details, started).await?;
    let (chunks, receiver) = mpsc::channel(EXPORT_QUEUE);
    // Why the export ended early, sent after the chunks already queued.
    let (ended, end) = oneshot::channel();
    let export = Exporting {
        pool: reader.store.read_pool.clone(),
        archive: reader.archive.clone(),
        privacy: reader.privacy.load_full(),
        show: call.caller.has_scope(Scope::Pii),
        admission: admission.clone(),
        call,
        idle: reader.config.reads.export_idle_timeout,
        chunks,
        span: tracing::Span::current(),
        _slot: slot,
    };
    tokio::spawn(async move {
        if let Err(status) = export.run(filter).await {
            let _ = ended.send(status);
        }
    });
    let end = futures::stream::once(end).filter_map(|ended| async move { ended.ok().map(Err) });
    Ok(Box::pin(ReceiverStream::new(receiver).chain(end)))
}

/// One export under way.
struct Exporting {
    pool: PgPool,
    archive: Arc<Archive>,
    privacy: Arc<Privacy>,
    show: bool,
    admission: Arc<Admission>,
    call: Call,
    idle: Duration,
    chunks: mpsc::Sender<Result<ExportChunk, Status>>,
    /// The RPC's span, parent of what the export logs. The task is not instrumented with it:
    /// entering a span on each of its polls (one or more per chunk of rows) cost 9% of
    /// Export's CPU, so only the steps that may log run inside it.
    span: tracing::Span,
    /// Held while the export runs.
    _slot: Slot,
}

/// How handing a chunk on went.
enum Sent {
    Taken,
    /// The client went away: nothing more to do.
    Gone,
}

impl Exporting {
    /// Streams the export; the status it ended with early, if any.
    async fn run(&self, filter: Filter) -> Result<(), Status> {
        match self.export(filter).await {
            Ok(()) => Ok(()),
            Err(Ended::Refused(status)) => Err(status),
            Err(Ended::Failed(error)) => Err(error.into()),
        }
    }

    /// Hands a chunk to the client within the idle timeout, after authorizing the caller
    /// again.
    async fn send(&self, chunk: ExportChunk) -> Result<Sent, Ended> {
        self.admission
            .refresh(&self.call)
            .map_err(|error| Ended::Refused(error.into()))?;
        match self.chunks.send_timeout(Ok(chunk), self.idle).await {
            Ok(()) => Ok(Sent::Taken),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Ok(Sent::Gone),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!(parent: &self.span, idle = ?self.idle, "an export's client took no chunk within reads.export_idle_timeout; ending it");
                Err(Ended::Refused(Status::deadline_exceeded(
                    "the client took no chunk within reads.export_idle_timeout; the export ended",
                )))
            }
        }
    }
}

/// Why an export ended before its last chunk.
enum Ended {
    Refused(Status),
    Failed(QueryError),
}

impl From<QueryError> for Ended {
    fn from(error: QueryError) -> Self {
        Self::Failed(error)
    }
}

impl From<sqlx::Error> for Ended {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(error.into())
    }
}

impl From<ArchiveError> for Ended {
    fn from(error: ArchiveError) -> Self {
        Self::Failed(error.into())
    }
}

impl Exporting {
    /// Streams the export from one REPEATABLE READ snapshot (of the rows and of the archive
    /// catalog: each event is in exactly one of them): the counts first, then the archived
    /// lines, one object at a time, then the rows, partition by partition ([`time_windows`],
    /// read ahead on two connections in the snapshot: [`Windows`]), fetched as their binary
    /// columns and written as NDJSON lines by sluice
    /// ([`crate::store::line`]).
    async fn export(&self, filter: Filter) -> Result<(), Ended> {
        // An object replaced or expired between the snapshot and its reading: take a fresh
        // snapshot, as long as nothing was sent yet.
        let mut attempts = 0;
        let snapshot = loop {
            attempts += 1;
            match Snapshot::take(&self.pool, &self.archive, &filter, self.idle)
                .instrument(self.span.clone())
                .await
            {
                Err(QueryError::Archive(ArchiveError::Gone { .. }))
                    if attempts < EXPORT_ATTEMPTS =>
                {
                    continue;
                }
                outcome => break outcome?,
            }
        };
        let Snapshot {
            mut transaction,
            hot,
            objects,
            archived_counts,
        } = snapshot;
        let archived: u64 = archived_counts.iter().sum();
        let total = hot + archived;
        let first = ExportChunk {
            total_events: total,
            archived_events: archived,
            last: total == 0,
            ..ExportChunk::default()
        };
        if matches!(self.send(first).await?, Sent::Gone) || total == 0 {
            return Ok(());
        }
        let mut chunk = ExportChunk::default();
        let matcher = filter.archived_matcher();
        for (object, count) in objects.iter().zip(archived_counts) {
            if count == 0 {
                continue;
            }
            let lines = self
                .archive
                .matching_lines(object, matcher.clone())
                .instrument(self.span.clone())
                .await?;
            for line in lines {
                let line = reveal_line(&self.privacy, &line, self.show)?;
                if matches!(self.append_line(&mut chunk, &line).await?, Sent::Gone) {
                    return Ok(());
                }
            }
        }
        let windows = match partitions::all_known(&mut *transaction).await? {
            Some(partitions) => time_windows(filter.start, filter.end, &partitions),
            None => vec![(filter.start, filter.end)],
        };
        let windows = windows
            .into_iter()
            .map(|(start, end)| Filter {
                start,
                end,
                ..filter.clone()
            })
            .collect();
        let mut windows = Windows::start(&self.pool, transaction, windows, self.idle)
            .instrument(self.span.clone())
            .await?;
        while let Some(rows) = windows.next_rows().await? {
            if matches!(self.rows(&rows, &mut chunk).await?, Sent::Gone) {
                return Ok(());
            }
        }
        chunk.last = true;
        self.send(chunk).await?;
        windows.finish().await?;
        Ok(())
    }

    /// Writes `rows` as lines into chunks, handing each on once full.
    async fn rows(&self, rows: &[PgRow], chunk: &mut ExportChunk) -> Result<Sent, Ended> {
        for row in rows {
            let columns = EventColumns::from_row(row).map_err(QueryError::from)?;
            // Metadata that is not UTF-8 (never stored by PostgreSQL) takes the checked path.
            let encrypted = std::str::from_utf8(columns.metadata())
                .map_or(true, |metadata| metadata.contains(ENCRYPTED_PREFIX));
            let sent = if encrypted {
                let mut line = Vec::new();
                columns.write_line(&mut line);
                let line = String::from_utf8(line)
                    .map_err(|_| PrivacyError::Malformed)
                    .map_err(QueryError::from)?;
                let line = reveal_line(&self.privacy, &line, self.show)?;
                self.append_line(chunk, &line).await?
            } else {
                columns.write_line(&mut chunk.ndjson);
                self.line_appended(chunk).await?
            };
            if matches!(sent, Sent::Gone) {
                return Ok(Sent::Gone);
            }
        }
        Ok(Sent::Taken)
    }

    /// Adds one NDJSON line to the chunk being filled, handing it on once full.
    async fn append_line(&self, chunk: &mut ExportChunk, line: &str) -> Result<Sent, Ended> {
        chunk.ndjson.extend_from_slice(line.as_bytes());
        self.line_appended(chunk).await
    }

    /// Ends the line just written into the chunk, handing the chunk on once full.
    async fn line_appended(&self, chunk: &mut ExportChunk) -> Result<Sent, Ended> {
        chunk.ndjson.push(b'\n');
        chunk.events += 1;
        if chunk.ndjson.len() < EXPORT_CHUNK_BYTES {
            return Ok(Sent::Taken);
        }
        self.send(std::mem::take(chunk)).await
    }
}

/// The export's snapshot: its transaction, how many rows match, the archived objects that may
/// hold matches, and how many each holds.
struct Snapshot {
    transaction: ExportTransaction,
    hot: u64,
    objects: Vec<catalog::ArchivedObject>,
    archived_counts: Vec<u64>,
}

impl Snapshot {
    async fn take(
        pool: &PgPool,
        archive: &Archive,
        filter: &Filter,
        idle: Duration,
    ) -> Result<Self, QueryError> {
        let mut transaction = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *transaction)
            .await?;
        settings(&mut transaction, idle).await?;
        let mut count = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events");
        filter.push_where(&mut count);
        let hot: i64 = count
            .build_query_scalar()
            .fetch_one(&mut *transaction)
            .await?;
        let objects = catalog::select(&mut transaction, &filter.archive_selection()).await?;
        let archived_counts = filter.count_archived(archive, &objects).await?;
        Ok(Self {
            transaction,
            hot: hot.max(0) as u64,
            objects,
            archived_counts,
        })
    }
}

/// An export transaction's settings, after its isolation level (and snapshot).
async fn settings(transaction: &mut ExportTransaction, idle: Duration) -> Result<(), sqlx::Error> {
    // An export streams for as long as its client reads: the read pool's statement timeout
    // is for queries, not for this.
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut **transaction)
        .await?;
    // A client that stops reading leaves the transaction idle: PostgreSQL ends it past the
    // idle timeout (and a margin), should the export task not have.
    let idle_ms = (idle + Duration::from_secs(10)).as_millis().to_string();
    sqlx::query("SELECT set_config('idle_in_transaction_session_timeout', $1, true)")
        .bind(idle_ms)
        .execute(&mut **transaction)
        .await?;
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// A time range `[start, end)`, either end open when `None`.
type TimeWindow = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The time windows an export reads one after the other, oldest first: the part of
/// `[start, end)` in each partition. Each query then sorts one partition's matches (small
/// enough to sort in memory) and streams them, where one query over every partition sorts
/// every match before its first row leaves (BENCHMARKS.md, "Export read partition by
/// partition"). Rows can only be in a partition, and partitions do not overlap.
fn time_windows(
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    partitions: &[Partition],
) -> Vec<TimeWindow> {
    partitions
        .iter()
        .filter(|partition| {
            start.is_none_or(|start| start < partition.end)
                && end.is_none_or(|end| partition.start < end)
        })
        .map(|partition| {
            (
                Some(start.map_or(partition.start, |start| start.max(partition.start))),
                Some(end.map_or(partition.end, |end| end.min(partition.end))),
            )
        })
        .collect()
}

/// An NDJSON line as the caller may see it: encrypted metadata values opened for scope `pii`,
/// masked for everyone else. Lines without encrypted values pass through byte for byte.
fn reveal_line<'a>(
    privacy: &Privacy,
    line: &'a str,
    show: bool,
) -> Result<Cow<'a, str>, QueryError> {
    if !line.contains(ENCRYPTED_PREFIX) {
        return Ok(Cow::Borrowed(line));
    }
    let mut event: Json = serde_json::from_str(line).map_err(|_| PrivacyError::Malformed)?;
    let id = event["id"]
        .as_str()
        .and_then(|id| Uuid::try_parse(id).ok())
        .ok_or(PrivacyError::Malformed)?;
    privacy.reveal(id, &mut event["metadata"], show)?;
    Ok(Cow::Owned(event.to_string()))
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;

    fn day(day: u32) -> Partition {
        Partition::day(NaiveDate::from_ymd_opt(2026, 12, day).expect("a day"))
    }

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(2026, 12, day)
            .and_then(|date| date.and_hms_opt(hour, 0, 0))
            .expect("a time")
            .and_utc()
    }

    #[test]
    fn an_export_reads_each_partition_its_range_touches_in_order() {
        let partitions = [day(1), day(2), day(3), day(4)];
        let windows = time_windows(Some(at(2, 6)), Some(at(3, 18)), &partitions);
        assert_eq!(
            windows,
            vec![
                (Some(at(2, 6)), Some(at(3, 0))),
                (Some(at(3, 0)), Some(at(3, 18))),
            ]
        );
    }

    #[test]
    fn an_export_without_a_range_reads_every_partition_whole() {
        let partitions = [day(1), day(2)];
        let windows = time_windows(None, None, &partitions);
        assert_eq!(
            windows,
            vec![
                (Some(at(1, 0)), Some(at(2, 0))),
                (Some(at(2, 0)), Some(at(3, 0)))
            ]
        );
        assert!(time_windows(None, None, &[]).is_empty());
    }

    #[test]
    fn a_range_that_ends_where_a_partition_starts_leaves_that_partition_out() {
        let partitions = [day(1), day(2)];
        let windows = time_windows(None, Some(at(2, 0)), &partitions);
        assert_eq!(windows, vec![(Some(at(1, 0)), Some(at(2, 0)))]);
        let windows = time_windows(Some(at(2, 0)), None, &partitions);
        assert_eq!(windows, vec![(Some(at(2, 0)), Some(at(3, 0)))]);
    }
}
