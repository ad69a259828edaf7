//! Export: every matching event as NDJSON, archived events first (one object at a time), then
//! rows, from one consistent (REPEATABLE READ) snapshot of the rows and of the archive
//! catalog, streamed in chunks of about [`EXPORT_CHUNK_BYTES`] so that memory stays flat.

use std::{borrow::Cow, pin::Pin, sync::Arc};

use futures::{Stream, TryStreamExt};
use serde_json::Value as Json;
use sqlx::{PgPool, Postgres, QueryBuilder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use super::{QueryError, Reader};
use crate::{
    archive::{Archive, ArchiveError, catalog},
    config::Scope,
    filter::Filter,
    privacy::{ENCRYPTED_PREFIX, Privacy, PrivacyError},
    proto::{ExportChunk, ExportRequest},
    rpc::{Admission, Call},
    store,
};

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
    admission: &Admission,
    call: Call,
    request: ExportRequest,
) -> Result<ExportStream, Status> {
    let filter = Filter::from_export(request, &reader.config.validation).and_then(|mut filter| {
        reader.restrict(&mut filter, &call.caller)?;
        Ok(filter)
    });
    let details = serde_json::json!({
        "filters": filter.as_ref().map(Filter::details).unwrap_or(Json::Null),
    });
    let filter = admission.audited(&call, details, filter).await?;
    let (chunks, receiver) = mpsc::channel(EXPORT_QUEUE);
    let pool = reader.store.read_pool.clone();
    let archive = reader.archive.clone();
    let privacy = reader.privacy.load_full();
    let show = call.caller.has_scope(Scope::Pii);
    tokio::spawn(
        async move {
            if let Err(error) = export(pool, archive, privacy, show, filter, &chunks).await {
                let _ = chunks.send(Err(error.into())).await;
            }
        }
        .in_current_span(),
    );
    Ok(Box::pin(ReceiverStream::new(receiver)))
}

/// Streams the export from one REPEATABLE READ snapshot (of the rows and of the archive
/// catalog: each event is in exactly one of them): the counts first, then the archived lines,
/// one object at a time, then NDJSON lines built by PostgreSQL, fetched row by row.
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
    let snapshot = loop {
        attempts += 1;
        match Snapshot::take(&pool, &archive, &filter).await {
            Err(QueryError::Archive(ArchiveError::Gone { .. })) if attempts < EXPORT_ATTEMPTS => {
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

/// The export's snapshot: its transaction, how many rows match, the archived objects that may
/// hold matches, and how many each holds.
struct Snapshot {
    transaction: sqlx::Transaction<'static, Postgres>,
    hot: u64,
    objects: Vec<catalog::ArchivedObject>,
    archived_counts: Vec<u64>,
}

impl Snapshot {
    async fn take(pool: &PgPool, archive: &Archive, filter: &Filter) -> Result<Self, QueryError> {
        let mut transaction = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *transaction)
            .await?;
        // An export streams for as long as its client reads: the read pool's statement
        // timeout is for queries, not for this.
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
        let archived_counts = filter.count_archived(archive, &objects).await?;
        Ok(Self {
            transaction,
            hot: hot.max(0) as u64,
            objects,
            archived_counts,
        })
    }
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
