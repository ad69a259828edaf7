//! Domain-free helpers for gRPC statuses with google.rpc rich details (BadRequest, RetryInfo,
//! ErrorInfo), the progress trailers of client streams, and the layer that gives oversized
//! unary requests the same INVALID_ARGUMENT that streams get. Each module maps its own error
//! type to a status beside that type, through these helpers.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status, body::Body, codegen::http::Response};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of every sluice error.
pub const ERROR_DOMAIN: &str = "sluice.v1";
/// Trailer: events of the stream stored before the refusal.
pub const ACCEPTED_TRAILER: &str = "sluice-accepted";
/// Trailer: events of the stream rejected individually before the refusal.
pub const REJECTED_TRAILER: &str = "sluice-rejected";
/// Trailer: when to retry, in milliseconds. gRPC C-core (Python, Ruby, C++) and grpc-js retry
/// policies honour it; they do not read RetryInfo.
pub const RETRY_PUSHBACK_TRAILER: &str = "grpc-retry-pushback-ms";

/// Adds the retry-pushback trailer for `delay` (at least 1 ms).
pub fn with_pushback(mut status: Status, delay: Duration) -> Status {
    let pushback = delay.as_millis().max(1).to_string();
    if let Ok(value) = pushback.parse() {
        status.metadata_mut().insert(RETRY_PUSHBACK_TRAILER, value);
    }
    status
}

/// The canonical name of a gRPC code: the audit log stores it, and metrics label with it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A call refused as a whole: `code`, RetryInfo (when the client should come back) and
/// ErrorInfo with `reason` and `metadata`.
pub fn refusal(
    code: Code,
    message: String,
    reason: &str,
    retry_after: Option<Duration>,
    metadata: HashMap<String, String>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(retry_after);
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    let status = Status::with_error_details(code, message, details);
    match retry_after {
        Some(delay) => with_pushback(status, delay),
        None => status,
    }
}

/// INVALID_ARGUMENT with one BadRequest field violation.
pub fn bad_request(message: String, field: &str, description: String) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// A request field that cannot be used: INVALID_ARGUMENT with one BadRequest violation naming
/// it. The error of every check of request fields, whatever the RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidArgument {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidArgument {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

impl From<InvalidArgument> for Status {
    fn from(error: InvalidArgument) -> Self {
        let message = error.to_string();
        bad_request(message, error.field, error.reason)
    }
}

/// Adds the progress trailers to a status that ends a client stream, so the client knows how
/// many of its events (in order) were handled before it.
pub fn with_progress(mut status: Status, accepted: u64, rejected: u64) -> Status {
    let metadata = status.metadata_mut();
    metadata.insert(ACCEPTED_TRAILER, accepted.into());
    metadata.insert(REJECTED_TRAILER, rejected.into());
    status
}

/// True for tonic's own "message too large" decode failure, which sluice reports as
/// INVALID_ARGUMENT with BadRequest details instead of OUT_OF_RANGE.
pub fn is_oversized_message(status: &Status) -> bool {
    status.code() == Code::OutOfRange && status.message().contains("message length too large")
}

/// INVALID_ARGUMENT for a request larger than `grpc.max_message_bytes`.
pub fn oversized_request(detail: String) -> Status {
    bad_request(
        "request is larger than the server accepts".to_owned(),
        "request",
        detail,
    )
}

/// Rewrites tonic's OUT_OF_RANGE answer to an oversized unary request (decoded before any
/// handler runs) into the same INVALID_ARGUMENT + BadRequest that streaming calls get. Used as
/// a response layer around every service.
pub fn oversized_unary_to_invalid_argument(response: Response<Body>) -> Response<Body> {
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
    oversized_request(
        "the request message is larger than grpc.max_message_bytes; split it".to_owned(),
    )
    .into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_retry_info_and_error_info() {
        let status = refusal(
            Code::ResourceExhausted,
            "full".to_owned(),
            "BUFFER_FULL",
            Some(Duration::from_millis(1500)),
            HashMap::from([("accepted".to_owned(), "7".to_owned())]),
        );
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let retry = details.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1500)));
        let info = details.error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("BUFFER_FULL", ERROR_DOMAIN)
        );
        assert_eq!(info.metadata.get("accepted").map(String::as_str), Some("7"));
        // Stock gRPC retry policies read the pushback trailer, not RetryInfo.
        assert_eq!(
            status
                .metadata()
                .get(RETRY_PUSHBACK_TRAILER)
                .and_then(|value| value.to_str().ok()),
            Some("1500")
        );
    }

    #[test]
    fn progress_trailers_are_set() {
        let status = with_progress(Status::unavailable("x"), 7, 2);
        let trailer = |name| {
            status
                .metadata()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(trailer(ACCEPTED_TRAILER).as_deref(), Some("7"));
        assert_eq!(trailer(REJECTED_TRAILER).as_deref(), Some("2"));
    }

    #[test]
    fn only_tonic_oversized_answers_are_rewritten() {
        let oversized = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        )
        .into_http();
        let rewritten = oversized_unary_to_invalid_argument(oversized);
        let status = Status::from_header_map(rewritten.headers()).expect("a status");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("bad request").field_violations[0];
        assert_eq!(violation.field, "request");

        let other = Status::out_of_range("page past the end").into_http();
        let kept = oversized_unary_to_invalid_argument(other);
        let status = Status::from_header_map(kept.headers()).expect("a status");
        assert_eq!(status.code(), Code::OutOfRange);
    }
}
