//! What a lifecycle run did, and why one failed.

use crate::archive::ArchiveError;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// False when another node held the lock: nothing was done.
    pub ran: bool,
    pub rows_deleted: u64,
    /// Rows moved from `events` into archived objects.
    pub rows_archived: u64,
    /// Rows deleted without archiving because an object already held their id (resent).
    pub rows_already_archived: u64,
    pub objects_written: u64,
    /// Archived objects removed at the end of their service's retention.
    pub objects_deleted: u64,
    pub partitions_dropped: Vec<String>,
    pub counts_deleted: u64,
    pub dead_letters_deleted: u64,
    /// Erasures forgotten: ended longer ago than the longest retention.
    pub erasures_expired: u64,
    pub seconds: f64,
}
