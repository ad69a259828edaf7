//! The read side of `QueryService`, one file per RPC: [`search`] (Query, over the
//! [`scan`] plan of a time-sliced search, the [`needle`] a closed day's index looks up and
//! the [`nearest_day`] an ordered walk of services reads first,
//! merged with the [`archived`] tier), [`export`], [`stats`], [`tail`] and [`audit_log`],
//! behind the thin trait impl of [`service`]. The RPCs that change data live elsewhere:
//! Delete, Anonymize and OptOut/OptIn in `erasure`, Restore beside the archive it reads.

mod archived;
mod audit_log;
mod cursor;
mod export;
mod nearest_day;
mod needle;
mod reader;
pub mod scan;
mod search;
pub mod service;
pub mod slots;
mod stats;
mod tail;

use tonic::Status;

pub use reader::Reader;
pub use service::QueryHandler;
pub use slots::Slots;

use crate::{archive::ArchiveError, privacy::PrivacyError, proto::status::InvalidArgument};

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Invalid(#[from] InvalidArgument),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("archive error: {0}")]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error(transparent)]
    Line(#[from] crate::store::line::LineError),
    #[error("stored metadata is not one json object: {0}")]
    StoredMetadata(#[source] serde_json::Error),
    #[error("this principal has {limit} {kind} running, the most it may; retry once one ends")]
    TooMany { kind: &'static str, limit: usize },
    #[error(transparent)]
    NotRecorded(#[from] crate::audit::NotRecorded),
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid(InvalidArgument::new(field, reason))
    }
}

/// Each source maps its own errors; this only picks the source.
impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let error_message = error.to_string();
        match error {
            QueryError::Invalid(invalid) => invalid.into(),
            QueryError::Database(database) => crate::store::database_status(&database),
            QueryError::Archive(archive) => archive.into(),
            QueryError::Privacy(privacy) => privacy.into(),
            QueryError::Line(line) => line.into(),
            QueryError::StoredMetadata(_) => Status::internal(error_message),
            QueryError::TooMany { .. } => crate::proto::status::refusal(
                tonic::Code::ResourceExhausted,
                error_message,
                "TOO_MANY_CALLS",
                Some(std::time::Duration::from_secs(1)),
                std::collections::HashMap::new(),
            ),
            QueryError::NotRecorded(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn invalid_arguments_name_their_field() {
        let status = Status::from(QueryError::invalid("limit", "at most 10000"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("bad request").field_violations[0];
        assert_eq!(violation.field, "limit");
    }

    #[test]
    fn archive_objects_changed_under_a_call_are_aborted_and_corrupt_ones_data_loss() {
        let gone = Status::from(QueryError::Archive(ArchiveError::Gone {
            path: "service=a/date=2026-01-01/part-1.ndjson.zst".to_owned(),
        }));
        assert_eq!(gone.code(), Code::Aborted);
        let corrupt = Status::from(QueryError::Archive(ArchiveError::Corrupt {
            path: "p".to_owned(),
            reason: "sha256".to_owned(),
        }));
        assert_eq!(corrupt.code(), Code::DataLoss);
        let database = Status::from(QueryError::Archive(ArchiveError::Database(
            sqlx::Error::PoolTimedOut,
        )));
        assert_eq!(database.code(), Code::Unavailable);
    }

    #[test]
    fn lost_connections_are_unavailable_not_internal() {
        let status = Status::from(QueryError::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
