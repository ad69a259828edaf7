//! QueryService: Query, Export, Delete and Stats over the stored events, and the one mapping
//! of their errors to gRPC statuses.

pub mod filter;
pub mod service;

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};

pub use service::QueryHandler;

use crate::{
    spool::SpoolError,
    status::{bad_request, refusal},
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

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let message = error.to_string();
        match error {
            QueryError::InvalidArgument { field, reason } => bad_request(message, field, reason),
            QueryError::Database(database_error) => {
                let sqlstate = store::sqlstate(&database_error);
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
            QueryError::Spool(spool_error) => {
                tracing::error!(error = %spool_error, "spool error during a query");
                Status::internal("spool error; see server logs")
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
    fn lost_connections_are_unavailable_not_internal() {
        let status = Status::from(QueryError::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
