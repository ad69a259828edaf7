//! Erasure: the RPCs that take personal data away, each in its own file: [`delete`] (right to
//! be forgotten), [`anonymize`] (keep the events, break the link to the person) and
//! [`optout`] (refuse a user's events at ingest). Each reaches every place the events are:
//! the table's partitions, dead letters, this node's spool and the archive, after the
//! [`barrier`] that covers events accepted before the call. Other nodes' spools and the
//! broker are reached at write time: the erasure is recorded, and every writer applies it
//! (`writer::erasures`).

pub mod anonymize;
pub mod barrier;
pub mod delete;
pub mod optout;
pub mod reapply;

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder};
use tokio::sync::Semaphore;
use tonic::{Code, Status};

use crate::{
    archive::{Archive, ArchiveError},
    auth::Caller,
    backup::{
        BackupError,
        journal::{self, Change, Journal},
    },
    broker::{Broker, BrokerError},
    buffer::Buffer,
    config::Config,
    filter::Filter,
    privacy::{PrivacyError, SharedPrivacy, fingerprints::PrivacyStartError, optouts::OptOuts},
    proto::status::{InvalidArgument, refusal},
    spool::{Spool, SpoolError},
    store::Store,
    writer,
};

/// Where a user's events may be, and what erasure waits for.
pub struct Erasure {
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub archive: Arc<Archive>,
    pub privacy: SharedPrivacy,
    pub optouts: Arc<OptOuts>,
    pub spool: Option<Spool>,
    /// The barrier: events accepted before a call are in the buffer...
    pub buffer: Arc<Buffer>,
    /// ...or, in Redis mode, in the broker's streams.
    pub broker: Option<Broker>,
    /// With backups, every erasure is journaled in their repository first: a restore to
    /// before it applies it again ([`reapply`]).
    pub journal: Option<Journal>,
    /// Deletes and Anonymizes run one at a time: they use the write pool, which the writers
    /// need.
    one_at_a_time: Semaphore,
}

impl Erasure {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        config: Arc<Config>,
        archive: Arc<Archive>,
        privacy: SharedPrivacy,
        optouts: Arc<OptOuts>,
        spool: Option<Spool>,
        buffer: Arc<Buffer>,
        broker: Option<Broker>,
        journal: Option<Journal>,
    ) -> Self {
        Self {
            store,
            config,
            archive,
            privacy,
            optouts,
            spool,
            buffer,
            broker,
            journal,
            one_at_a_time: Semaphore::new(1),
        }
    }

    /// `filter` restricted to what `caller` may change, in stored form.
    fn restrict(&self, filter: &mut Filter, caller: &Caller) -> Result<(), InvalidArgument> {
        filter.restrict(caller, &self.privacy.load())
    }

    /// Runs `work` as the erasure `erasure` (None: a dry run, which changes nothing):
    /// journaled and recorded before it starts, so that every writer on every node applies it
    /// to what it writes from then on, and marked finished once it ends, however it ends.
    async fn recorded<T>(
        &self,
        erasure: Option<(writer::erasures::Erasure, Change)>,
        caller: &Caller,
        work: impl Future<Output = Result<T, ErasureError>>,
    ) -> Result<T, ErasureError> {
        let Some((erasure, change)) = erasure else {
            return work.await;
        };
        let journaled = self.journal_start(change, caller).await?;
        let id = erasure.record(&self.store.pool).await?;
        let outcome = work.await;
        if let Err(error) = writer::erasures::finish(&self.store.pool, id).await {
            // Unfinished, it goes on erasing the user's new events; the lifecycle job closes
            // it after a day.
            tracing::error!(%error, erasure = id, "cannot mark an erasure finished");
        }
        self.journal_finish(journaled).await;
        outcome
    }

    /// Writes `change` to the backup repository's journal before it is made: a restore to
    /// before it then applies it again. Without backups, there is no journal.
    async fn journal_start(
        &self,
        change: Change,
        caller: &Caller,
    ) -> Result<Option<journal::Entry>, ErasureError> {
        let Some(journal) = &self.journal else {
            return Ok(None);
        };
        let entry = journal::Entry::new(change, caller.service_globs(), &caller.principal);
        journal.write(&entry).await.map_err(ErasureError::Journal)?;
        Ok(Some(entry))
    }

    /// Marks a journaled change made. Unmarked, a restore applies it to the events of a day
    /// after its start: logged.
    async fn journal_finish(&self, entry: Option<journal::Entry>) {
        let (Some(journal), Some(mut entry)) = (&self.journal, entry) else {
            return;
        };
        entry.finished_at = Some(Utc::now());
        if let Err(error) = journal.write(&entry).await {
            tracing::error!(%error, journal_id = %entry.id, "cannot mark an erasure finished in the backup journal");
        }
    }

    /// Spool segments in quarantine, which an erasure cannot search: said in its answer and
    /// its audit row, and warned of.
    async fn quarantined_segments(&self) -> u64 {
        let Some(spool) = &self.spool else {
            return 0;
        };
        let segments = spool.quarantined().await as u64;
        if segments > 0 {
            tracing::warn!(
                segments,
                "an erasure could not search spool segments in quarantine; inspect or remove them (README, Personal data)"
            );
        }
        segments
    }

    /// Waits for the other Delete or Anonymize under way, then for the events accepted
    /// before now ([`barrier`]); the permit holds the turn until dropped.
    async fn take_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ErasureError> {
        let turn = self
            .one_at_a_time
            .acquire()
            .await
            .map_err(|_| ErasureError::Busy {
                retry_after: Duration::from_secs(1),
            })?;
        barrier::wait_for_accepted(&self.buffer, self.broker.as_ref()).await?;
        Ok(turn)
    }
}

/// Narrows a statement to the rows written by `bound`, when set (`column`: the table's time
/// of writing).
fn push_written_before(
    builder: &mut QueryBuilder<Postgres>,
    column: &'static str,
    bound: Option<DateTime<Utc>>,
) {
    if let Some(bound) = bound {
        builder.push(format!(" AND {column} <= ")).push_bind(bound);
    }
}

/// Why an erasure call failed.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error(transparent)]
    Invalid(#[from] InvalidArgument),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("spool error: {0}")]
    Spool(#[from] SpoolError),
    #[error("archive error: {0}")]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error("privacy keys: {0}")]
    Keys(#[from] PrivacyStartError),
    #[error("redis: {0}")]
    Broker(#[from] BrokerError),
    #[error("the erasure journal in backup.url: {0}")]
    Journal(BackupError),
    #[error("events accepted before the call are not yet written; retry after {retry_after:?}")]
    Busy { retry_after: Duration },
}

impl ErasureError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid(InvalidArgument::new(field, reason))
    }
}

/// Each source maps its own errors; a barrier that did not close in time is UNAVAILABLE with
/// RetryInfo (`WRITES_PENDING`).
impl From<ErasureError> for Status {
    fn from(error: ErasureError) -> Self {
        let message = error.to_string();
        match error {
            ErasureError::Invalid(invalid) => invalid.into(),
            ErasureError::Database(database) => crate::store::database_status(&database),
            ErasureError::Spool(spool) => spool.into(),
            ErasureError::Archive(archive) => archive.into(),
            ErasureError::Privacy(privacy) => privacy.into(),
            ErasureError::Keys(keys) => keys.into(),
            ErasureError::Broker(broker) => broker.into(),
            // Nothing was changed: the journal comes first.
            ErasureError::Journal(_) => refusal(
                Code::Unavailable,
                message,
                "JOURNAL_UNAVAILABLE",
                Some(Duration::from_secs(5)),
                HashMap::new(),
            ),
            ErasureError::Busy { retry_after } => refusal(
                Code::Unavailable,
                message,
                "WRITES_PENDING",
                Some(retry_after),
                HashMap::new(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn busy_is_unavailable_with_retry_info() {
        let status = Status::from(ErasureError::Busy {
            retry_after: Duration::from_secs(5),
        });
        assert_eq!(status.code(), Code::Unavailable);
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|retry| retry.retry_delay),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            details.error_info().map(|info| info.reason.as_str()),
            Some("WRITES_PENDING")
        );
    }
}
