//! The one place where errors become gRPC statuses, with google.rpc rich details
//! (BadRequest, RetryInfo, ErrorInfo). Every variant is mapped explicitly.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{ingest::IngestError, query::QueryError};

/// The ErrorInfo domain of every sluice error.
pub const ERROR_DOMAIN: &str = "sluice.v1";
/// Trailer: events of the stream stored before the refusal.
pub const ACCEPTED_TRAILER: &str = "sluice-accepted";
/// Trailer: events of the stream rejected individually before the refusal.
pub const REJECTED_TRAILER: &str = "sluice-rejected";

impl From<IngestError> for Status {
    fn from(error: IngestError) -> Self {
        let message = error.to_string();
        match error {
            IngestError::BufferFull {
                retry_after,
                progress,
            } => refusal(
                Code::ResourceExhausted,
                message,
                "BUFFER_FULL",
                Some(retry_after),
                progress,
            ),
            IngestError::ShuttingDown { progress } => refusal(
                Code::Unavailable,
                message,
                "SHUTTING_DOWN",
                Some(Duration::from_secs(1)),
                progress,
            ),
            IngestError::NotDurable { progress } => refusal(
                Code::Unavailable,
                message,
                "NOT_DURABLE",
                Some(Duration::from_secs(1)),
                progress,
            ),
            IngestError::TooManyEvents { events, limit } => bad_request(
                message,
                "events",
                format!("{events} events in one request, the limit is {limit}; split the request"),
            ),
            IngestError::LargerThanBuffer { .. } => bad_request(message.clone(), "events", message),
            IngestError::MessageTooLarge { detail } => bad_request(message, "request", detail),
            IngestError::Stream(status) => status,
        }
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let message = error.to_string();
        match error {
            QueryError::InvalidArgument { field, reason } => bad_request(message, field, reason),
            QueryError::Database(database_error) => {
                let sqlstate = database_error
                    .as_database_error()
                    .and_then(|error| error.code())
                    .map(|code| code.into_owned());
                let code = match sqlstate
                    .as_deref()
                    .map(|state| state.get(..2).unwrap_or_default())
                {
                    // Data exceptions: a filter value PostgreSQL cannot take.
                    Some("22") => {
                        return Status::invalid_argument(format!(
                            "invalid filter value: {database_error}"
                        ));
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
            QueryError::Busy { retry_after } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info("WRITES_PENDING", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::Unavailable, message, details)
            }
        }
    }
}

/// What a streaming call had done before it was refused, so a client resends only the rest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub accepted: u64,
    pub rejected: u64,
}

fn refusal(
    code: Code,
    message: String,
    reason: &str,
    retry_after: Option<Duration>,
    progress: Progress,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(retry_after);
    let info = HashMap::from([
        ("accepted".to_owned(), progress.accepted.to_string()),
        ("rejected".to_owned(), progress.rejected.to_string()),
    ]);
    details.set_error_info(reason, ERROR_DOMAIN, info);
    with_progress(Status::with_error_details(code, message, details), progress)
}

/// Adds the progress trailers to a status that ends a client stream, so the client knows how
/// many of its events (in order) were handled before it.
pub fn with_progress(mut status: Status, progress: Progress) -> Status {
    status
        .metadata_mut()
        .insert(ACCEPTED_TRAILER, progress.accepted.into());
    status
        .metadata_mut()
        .insert(REJECTED_TRAILER, progress.rejected.into());
    status
}

fn bad_request(message: String, field: &str, description: String) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// True for tonic's own "message too large" decode failure, which sluice reports as
/// INVALID_ARGUMENT with BadRequest details instead of OUT_OF_RANGE.
pub fn is_oversized_message(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains("message length too large")
}

/// Rewrites tonic's OUT_OF_RANGE answer to an oversized unary request (decoded before any
/// handler runs) into the same INVALID_ARGUMENT + BadRequest that streaming calls get. Used as
/// a response layer around every service.
pub fn oversized_unary_to_invalid_argument(
    response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let headers = response.headers();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let message = headers
        .get("grpc-message")
        .and_then(|message| message.to_str().ok())
        .unwrap_or_default();
    let oversized =
        message.contains("length too large") || message.contains("length%20too%20large");
    if !(out_of_range && oversized) {
        return response;
    }
    let detail = "the request message is larger than grpc.max_message_bytes; split it".to_owned();
    Status::from(IngestError::MessageTooLarge { detail }).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_full_carries_retry_info_error_info_and_progress_trailers() {
        let progress = Progress {
            accepted: 7,
            rejected: 2,
        };
        let status = Status::from(IngestError::BufferFull {
            retry_after: Duration::from_millis(1500),
            progress,
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let retry = details.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1500)));
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "BUFFER_FULL");
        assert_eq!(info.metadata.get("accepted").map(String::as_str), Some("7"));
        assert_eq!(
            status
                .metadata()
                .get(ACCEPTED_TRAILER)
                .and_then(|value| value.to_str().ok()),
            Some("7")
        );
        assert_eq!(
            status
                .metadata()
                .get(REJECTED_TRAILER)
                .and_then(|value| value.to_str().ok()),
            Some("2")
        );
    }

    #[test]
    fn oversized_requests_are_invalid_argument_with_bad_request() {
        let status = Status::from(IngestError::TooManyEvents {
            events: 20_000,
            limit: 10_000,
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("bad request").field_violations;
        assert_eq!(violations[0].field, "events");
    }
}
