//! QueryService: Query, Export, Delete and Stats over the stored events.

pub mod filter;
pub mod service;

use std::time::Duration;

pub use service::QueryHandler;

use crate::writer::spool::SpoolError;

/// Why a read-side call failed. Mapped to a status in [`crate::error`].
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("spool error: {0}")]
    Spool(#[from] SpoolError),
    #[error("events accepted before the call are not yet written; retry after {retry_after:?}")]
    Busy { retry_after: Duration },
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}
