//! The read side's reach into the archive: counting archived matches (Export, dry runs) and
//! Restore.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tonic::Status;

use super::{QueryError, filter::Filter};
use crate::{
    archive::{
        Archive, Removal,
        catalog::{self, ArchivedObject},
    },
    proto::RestoreProgress,
    proto::wire::to_timestamp,
};

/// How many events of each object match `filter`: from the catalog when it tells, else by
/// reading the object.
pub async fn count_matches(
    archive: &Archive,
    filter: &Filter,
    objects: &[ArchivedObject],
) -> Result<Vec<u64>, QueryError> {
    let matcher = filter.archived_matcher();
    let mut counts = Vec::with_capacity(objects.len());
    for object in objects {
        let count = match filter.archived_matches_known(object) {
            Some(count) => count,
            None => archive.matching_lines(object, matcher.clone()).await?.len() as u64,
        };
        counts.push(count);
    }
    Ok(counts)
}

/// What a Restore did, for its final message and audit row.
pub struct Restored {
    pub objects: u64,
    pub events: u64,
    pub inserted: u64,
}

/// Moves the archived events of `filter` (a time range, maybe some services) back into
/// `events`, holding the range there until `hold_until`, and reports progress per object.
pub async fn restore(
    pool: &PgPool,
    archive: &Archive,
    filter: &Filter,
    hold_until: DateTime<Utc>,
    progress: &mpsc::UnboundedSender<Result<RestoreProgress, Status>>,
) -> Result<Restored, QueryError> {
    let (Some(start), Some(end)) = (filter.start, filter.end) else {
        return Err(QueryError::invalid(
            "start_time",
            "a range to restore is required",
        ));
    };
    // First the hold: from now on the lifecycle job leaves the range in PostgreSQL.
    let services = (!filter.services.is_empty()).then_some(filter.services.as_slice());
    catalog::hold(pool, services, start, end, hold_until).await?;
    let selection = filter.archive_selection();
    let hold_until = Some(to_timestamp(hold_until));
    let done = archive
        .take_all(
            pool,
            &selection,
            filter.archived_matcher(),
            Removal::Restore,
            |state| {
                // The client may have gone: the restore still finishes (and is audited).
                let _ = progress.send(Ok(RestoreProgress {
                    objects_done: state.objects_done,
                    objects_total: state.objects_total,
                    events_restored: state.events,
                    events_already_present: state.events - state.inserted,
                    hold_until,
                    last: false,
                }));
            },
        )
        .await?;
    let _ = progress.send(Ok(RestoreProgress {
        objects_done: done.objects_done,
        objects_total: done.objects_total,
        events_restored: done.events,
        events_already_present: done.events - done.inserted,
        hold_until,
        last: true,
    }));
    Ok(Restored {
        objects: done.objects_changed,
        events: done.events,
        inserted: done.inserted,
    })
}
