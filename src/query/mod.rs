//! QueryService: Query, Export, Delete and Stats over the stored events, and the one mapping
//! of their errors to gRPC statuses.

mod anonymize;
mod archived;
pub mod filter;
pub mod service;

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};

pub use service::QueryHandler;

use crate::{
    archive::ArchiveError,
    privacy::PrivacyError,
    proto::status::{bad_request, refusal},
    spool::SpoolError,
    store,
};

/// Why a read-side call failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("spool error: {0}")]
    Spool(#[from] SpoolError),
    #[error("archive error: {0}")]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    #[error("privacy keys: {0}")]
    Keys(String),
    #[error("events accepted before the call are not yet written; retry after {retry_after:?}")]
    Busy { retry_after: Duration },
    #[error("redis streams: {0}")]
    Broker(String),
}

impl QueryError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let message = error.to_string();
        match error {
            QueryError::InvalidArgument { field, reason } => bad_request(message, field, reason),
            QueryError::Database(database_error) => {
                let sqlstate = store::sqlstate(&database_error);
                // The read statement timeout: the filter needs narrowing, not a retry.
                if sqlstate.as_deref() == Some("57014") {
                    tracing::warn!(error = %database_error, "a read ran past database.read_statement_timeout");
                    return Status::deadline_exceeded(
                        "the query ran past database.read_statement_timeout; narrow it with services, user_id or a time range",
                    );
                }
                let code = match sqlstate.as_deref().and_then(|state| state.get(..2)) {
                    // Data exceptions: a filter value PostgreSQL cannot take. Filters are checked
                    // before they reach the database, so this is a gap in those checks: say so
                    // without the database's words, and log them.
                    Some("22") => {
                        tracing::warn!(error = %database_error, sqlstate = sqlstate.as_deref(), "a filter value passed the checks but PostgreSQL refused it");
                        return bad_request(
                            "invalid filter value".to_owned(),
                            "filter",
                            "PostgreSQL cannot compare a value of this filter".to_owned(),
                        );
                    }
                    // Connection, resources, operator intervention, serialization: retryable.
                    None | Some("08" | "40" | "53" | "57") => Code::Unavailable,
                    Some(_) => Code::Internal,
                };
                tracing::error!(error = %database_error, sqlstate = sqlstate.as_deref(), "query failed in the database");
                Status::new(code, "database error; see server logs")
            }
            QueryError::Archive(ArchiveError::Database(database_error)) => {
                Status::from(QueryError::Database(database_error))
            }
            QueryError::Archive(archive_error) => archive_status(archive_error),
            // Fails closed: a value that does not open is never shown, and said loudly.
            QueryError::Privacy(privacy_error) => {
                tracing::error!(error = %privacy_error, "an encrypted metadata value cannot be opened");
                Status::data_loss(privacy_error.to_string())
            }
            QueryError::Keys(reason) => {
                tracing::error!(%reason, "privacy keys cannot be made persistent");
                Status::failed_precondition("the privacy key file cannot be used; see server logs")
            }
            QueryError::Spool(spool_error) => {
                tracing::error!(error = %spool_error, "spool error during a query");
                Status::internal("spool error; see server logs")
            }
            QueryError::Broker(reason) => {
                tracing::error!(%reason, "redis error during a call");
                Status::unavailable("redis error; see server logs")
            }
            QueryError::Busy { retry_after } => refusal(
                Code::Unavailable,
                message,
                "WRITES_PENDING",
                Some(retry_after),
                HashMap::new(),
            ),
        }
    }
}

/// Archive failures: a store that cannot be reached is retryable, and so is an object that
/// changed under the call; a corrupt object is data loss, said loudly.
fn archive_status(error: ArchiveError) -> Status {
    match error {
        ArchiveError::Gone { .. } => Status::aborted(error.to_string()),
        ArchiveError::Store(store_error) => {
            tracing::error!(error = %store_error, "archive store error during a call");
            Status::unavailable("archive store error; see server logs")
        }
        ArchiveError::Corrupt {
            ref path,
            ref reason,
        } => {
            tracing::error!(path, reason, "an archived object is corrupt");
            Status::data_loss(error.to_string())
        }
        other => {
            tracing::error!(error = %other, "archive error during a call");
            Status::internal("archive error; see server logs")
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn busy_is_unavailable_with_retry_info() {
        let status = Status::from(QueryError::Busy {
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
