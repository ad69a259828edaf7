//! Delete (right to be forgotten): a user's events, or some services' events, optionally in a
//! time range, from every partition, `dead_letters`, the disk spool and the archive, after the
//! events accepted before the call are written. Rows go in batches of [`DELETE_BATCH`] so
//! that ingest is never blocked; the audit row commits with the last step.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use tonic::{Code, Status};
use tracing::Instrument;

use super::{Erasure, ErasureError, push_written_before};
use crate::{
    archive::Removal,
    audit::Audit,
    backup::journal::Change,
    filter::Filter,
    proto::{DeleteRequest, DeleteResponse},
    rpc::{Admission, Call},
    store::{self, sqlstates},
    writer,
};

/// Rows deleted per transaction, so large deletes never hold long locks.
const DELETE_BATCH: i64 = 5_000;

/// Serves a Delete in a task of its own: a client that goes away mid-delete must not stop the
/// deletion before its audit row is written.
pub async fn serve(
    erasure: Arc<Erasure>,
    admission: Arc<Admission>,
    call: Call,
    request: DeleteRequest,
) -> Result<DeleteResponse, Status> {
    let deletion = tokio::spawn(
        async move {
            let mut details = Json::Object(Default::default());
            match delete(&erasure, &admission, &call, request, &mut details).await {
                // The audit row committed with the deletion.
                Ok(response) => Ok(response),
                Err(error) => admission.audited(&call, details, Err(error)).await,
            }
        }
        .in_current_span(),
    );
    deletion
        .await
        .map_err(|_| Status::internal("the delete task failed; see server logs"))?
}

/// Deletes, and writes the audit row in the transaction of its last step.
async fn delete(
    erasure: &Erasure,
    admission: &Admission,
    call: &Call,
    request: DeleteRequest,
    details: &mut Json,
) -> Result<DeleteResponse, ErasureError> {
    let mut filter = Filter::from_delete(&request, &erasure.config.validation)?;
    erasure.restrict(&mut filter, &call.caller)?;
    details["filters"] = filter.details();
    details["dry_run"] = Json::Bool(request.dry_run);
    let dry_run = request.dry_run;
    let _turn = erasure.take_turn().await?;
    let recorded = (!dry_run).then(|| {
        let erasure = writer::erasures::Erasure {
            kind: writer::erasures::Kind::Delete,
            user_id: filter.user_id.clone(),
            services: filter.services.clone(),
            service_globs: call.caller.service_globs(),
            start: filter.start,
            end: filter.end,
        };
        let change = Change::Delete {
            filter: filter.clone(),
        };
        (erasure, change)
    });
    erasure
        .recorded(
            recorded,
            &call.caller,
            erase(erasure, admission, call, &filter, dry_run, details),
        )
        .await
}

/// The deletion itself, everywhere this node reaches.
async fn erase(
    erasure: &Erasure,
    admission: &Admission,
    call: &Call,
    filter: &Filter,
    dry_run: bool,
    details: &mut Json,
) -> Result<DeleteResponse, ErasureError> {
    let filter = filter.clone();
    let spooled_deleted = match &erasure.spool {
        Some(spool) => {
            let doomed = filter.clone();
            let caller = call.caller.clone();
            spool
                .purge(
                    move |event| doomed.matches_for_delete(event) && caller.may_use(&event.service),
                    dry_run,
                )
                .await?
        }
        None => 0,
    };
    let pool = &erasure.store.pool;
    let archive_pool = &erasure.store.maintenance_pool;
    let mut deleted = if dry_run {
        count_events(pool, &filter).await?
    } else {
        delete_events(pool, &filter, None).await?
    };
    // Rows a concurrent lifecycle run was archiving are in the objects this finds: it reads
    // the catalog under the archive lock.
    let selection = filter.archive_selection();
    let (archived_deleted, archive_objects_rewritten) = if dry_run {
        let objects = erasure
            .archive
            .select_settled(archive_pool, &selection)
            .await?;
        let counts = filter.count_archived(&erasure.archive, &objects).await?;
        (counts.iter().sum(), 0)
    } else {
        let done = erasure
            .archive
            .take_all(
                archive_pool,
                &selection,
                filter.archived_matcher(),
                Removal::Delete,
                |_| std::ops::ControlFlow::Continue(()),
            )
            .await?;
        // A Restore may have moved matching lines back into the table before this took
        // their object: once the archive holds none, delete what the table holds again.
        deleted += delete_events(pool, &filter, None).await?;
        (done.events, done.objects_changed)
    };
    let mut transaction = pool.begin().await?;
    let dead_letters_deleted =
        delete_dead_letters(&mut transaction, &filter, dry_run, None).await?;
    details["rows"] = Json::from(deleted);
    details["archived"] = Json::from(archived_deleted);
    details["archive_objects_rewritten"] = Json::from(archive_objects_rewritten);
    details["dead_letters"] = Json::from(dead_letters_deleted);
    details["spooled"] = Json::from(spooled_deleted);
    let quarantined_segments = erasure.quarantined_segments().await;
    details["quarantined_segments"] = Json::from(quarantined_segments);
    let entry = admission.entry(call, details.clone(), Code::Ok);
    Audit::record_in(&mut transaction, &entry).await?;
    transaction.commit().await?;
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
        quarantined_segments,
    })
}

async fn count_events(pool: &PgPool, filter: &Filter) -> Result<u64, ErasureError> {
    let mut builder = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events");
    filter.push_where(&mut builder);
    let count: i64 = builder.build_query_scalar().fetch_one(pool).await?;
    Ok(count.max(0) as u64)
}

/// Deletes in batches of [`DELETE_BATCH`] rows, each in its own transaction, keeping the
/// rollup in step. Retries a batch that lost a deadlock against a writer. With
/// `written_before`, only rows written by then.
pub(super) async fn delete_events(
    pool: &PgPool,
    filter: &Filter,
    written_before: Option<DateTime<Utc>>,
) -> Result<u64, ErasureError> {
    let mut deleted = 0u64;
    loop {
        let mut builder =
            QueryBuilder::<Postgres>::new("WITH doomed AS (SELECT id, ts FROM events");
        filter.push_where(&mut builder);
        push_written_before(&mut builder, "ingested_at", written_before);
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
            Err(error) if store::is_sqlstate(&error, sqlstates::DEADLOCK_DETECTED) => continue,
            Err(error) => return Err(error.into()),
        };
        deleted += batch.max(0) as u64;
        // Only an empty batch ends it: rows archived meanwhile can make a batch come short
        // while more rows still match.
        if batch == 0 {
            return Ok(deleted);
        }
    }
}

/// Dead letters match on the same user, services and event time range as the events.
pub(super) async fn delete_dead_letters(
    connection: &mut PgConnection,
    filter: &Filter,
    dry_run: bool,
    written_before: Option<DateTime<Utc>>,
) -> Result<u64, ErasureError> {
    let mut builder = QueryBuilder::<Postgres>::new(if dry_run {
        "SELECT count(*) FROM dead_letters"
    } else {
        "WITH removed AS (DELETE FROM dead_letters"
    });
    // dead_letters has the service, ts and user_id columns a Delete filter uses.
    filter.push_where(&mut builder);
    push_written_before(&mut builder, "failed_at", written_before);
    if !dry_run {
        builder.push(" RETURNING 1) SELECT count(*) FROM removed");
    }
    let count: i64 = builder.build_query_scalar().fetch_one(connection).await?;
    Ok(count.max(0) as u64)
}
