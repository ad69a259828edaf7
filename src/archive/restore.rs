//! Restore: moves the archived events of a time range (maybe some services) back into
//! `events`, where Query sees them, and holds the range there (the lifecycle job leaves it
//! alone) until a given time. Idempotent by `(id, ts)`; reports progress per object. The
//! caller is authorized again after every object: an expired token or a reload that took
//! the scope away stops the restore there (what was restored stays, held).

use std::{ops::ControlFlow, pin::Pin, sync::Arc};

use chrono::{DateTime, TimeDelta, Utc};
use futures::Stream;
use serde_json::Value as Json;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::{
    Archive, ArchiveError, Matcher, Removal,
    catalog::{self, Selection},
};
use crate::{
    config::ValidationConfig,
    filter::Filter,
    privacy::Privacy,
    proto::{RestoreProgress, RestoreRequest, status::InvalidArgument, wire::to_timestamp},
    rpc::{Admission, Call},
};

pub type RestoreStream =
    Pin<Box<dyn Stream<Item = Result<RestoreProgress, Status>> + Send + 'static>>;

/// The Restore RPC: checks and audits the request, then restores in a task of its own (a
/// client that goes away does not stop a restore halfway), streaming its progress.
pub async fn serve(
    pool: PgPool,
    archive: Arc<Archive>,
    admission: Arc<Admission>,
    call: Call,
    request: RestoreRequest,
    limits: &ValidationConfig,
    privacy: &Privacy,
) -> Result<RestoreStream, Status> {
    let filter = Filter::from_restore(&request, limits).and_then(|mut filter| {
        filter.restrict(&call.caller, privacy)?;
        Ok(filter)
    });
    let mut details = serde_json::json!({
        "filters": filter.as_ref().map(Filter::details).unwrap_or(Json::Null),
    });
    let filter = match filter {
        Ok(filter) => filter,
        Err(error) => return Err(admission.refused(&call, details, error).await),
    };
    // `from_restore` refuses a request without both ends.
    let (Some(start), Some(end)) = (filter.start, filter.end) else {
        let error = InvalidArgument::new("start_time", "a range to restore is required");
        return Err(admission.refused(&call, details, error).await);
    };
    let (progress, receiver) = mpsc::unbounded_channel();
    tokio::spawn(
        async move {
            let hold_until = Utc::now()
                + TimeDelta::from_std(archive.restore_hold).unwrap_or(TimeDelta::days(7));
            let range = Range {
                services: &filter.services,
                start,
                end,
                selection: filter.archive_selection(),
                matcher: filter.archived_matcher(),
            };
            let sender = progress.clone();
            let (refresh, refreshed) = (admission.clone(), call.clone());
            let result = restore(&pool, &archive, range, hold_until, &move |step| {
                if let Err(error) = refresh.refresh(&refreshed) {
                    let _ = sender.send(Err(error.into()));
                    return ControlFlow::Break(());
                }
                // The client may have gone: the restore still finishes (and is audited).
                let _ = sender.send(Ok(step));
                ControlFlow::Continue(())
            })
            .await
            .map(|restored| {
                details["stopped"] = Json::Bool(restored.stopped);
                details["objects"] = Json::from(restored.objects);
                details["rows"] = Json::from(restored.events);
                details["inserted"] = Json::from(restored.inserted);
                details["hold_until"] = Json::from(hold_until.to_rfc3339());
            });
            if let Err(status) = admission.audited(&call, details, result).await {
                let _ = progress.send(Err(status));
            }
        }
        .in_current_span(),
    );
    Ok(Box::pin(UnboundedReceiverStream::new(receiver)))
}

/// The range to bring back.
pub struct Range<'a> {
    /// Only these services; all when empty.
    pub services: &'a [String],
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// The archived objects that may hold the range's events...
    pub selection: Selection,
    /// ...and which of their lines belong to it.
    pub matcher: Matcher,
}

/// What a Restore did, for its final message and audit row.
pub struct Restored {
    pub objects: u64,
    pub events: u64,
    pub inserted: u64,
    /// Stopped before its end (the caller lost its right to it).
    pub stopped: bool,
}

/// Brings `range` back, holding it in PostgreSQL until `hold_until`; `progress` hears of
/// every object and, last, of the whole, and stops the restore when it answers `Break` (a
/// client that went away does not stop it).
pub async fn restore(
    pool: &PgPool,
    archive: &Archive,
    range: Range<'_>,
    hold_until: DateTime<Utc>,
    progress: &(dyn Fn(RestoreProgress) -> ControlFlow<()> + Send + Sync),
) -> Result<Restored, ArchiveError> {
    // First the hold: from now on the lifecycle job leaves the range in PostgreSQL.
    let services = (!range.services.is_empty()).then_some(range.services);
    catalog::hold(pool, services, range.start, range.end, hold_until).await?;
    let hold_until = Some(to_timestamp(hold_until));
    let report = |done: &super::TakeProgress, last: bool| RestoreProgress {
        objects_done: done.objects_done,
        objects_total: done.objects_total,
        events_restored: done.events,
        events_already_present: done.events - done.inserted,
        hold_until,
        last,
    };
    let done = archive
        .take_all(
            pool,
            &range.selection,
            range.matcher,
            Removal::Restore,
            |state| progress(report(state, false)),
        )
        .await?;
    if !done.stopped {
        let _ = progress(report(&done, true));
    }
    Ok(Restored {
        objects: done.objects_changed,
        events: done.events,
        inserted: done.inserted,
        stopped: done.stopped,
    })
}
