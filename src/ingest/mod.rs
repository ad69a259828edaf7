//! IngestService: the RPC handlers that validate events and admit them to the buffer, and the
//! one mapping of their errors to gRPC statuses.

pub mod service;
pub mod validate;

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};

pub use service::IngestHandler;

use crate::proto::status::{bad_request, oversized_request, refusal, with_progress};

/// What a streaming call had done before it was refused, so a client resends only the rest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub accepted: u64,
    pub rejected: u64,
}

impl Progress {
    /// Adds the progress trailers to a status that ends a client stream.
    pub fn trail(self, status: Status) -> Status {
        with_progress(status, self.accepted, self.rejected)
    }

    fn error_info(self) -> HashMap<String, String> {
        HashMap::from([
            ("accepted".to_owned(), self.accepted.to_string()),
            ("rejected".to_owned(), self.rejected.to_string()),
        ])
    }
}

/// Why an ingest call failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("buffer is full, retry after {retry_after:?}")]
    BufferFull {
        retry_after: Duration,
        progress: Progress,
    },
    #[error(
        "the buffer is under pressure and this principal holds its fair share ({held} of {share} events); retry after {retry_after:?}"
    )]
    OverShare {
        retry_after: Duration,
        held: usize,
        share: usize,
        progress: Progress,
    },
    #[error("server is shutting down, retry on another node or later")]
    ShuttingDown { progress: Progress },
    #[error("events were admitted but not committed before the server stopped; resend them")]
    NotDurable { progress: Progress },
    #[error("request has {events} events, more than the limit of {limit}")]
    TooManyEvents { events: usize, limit: usize },
    #[error(
        "request of {events} events and {bytes} bytes can never fit the buffer ({max_events} events, {max_bytes} bytes); split it"
    )]
    LargerThanBuffer {
        events: usize,
        bytes: usize,
        max_events: usize,
        max_bytes: usize,
    },
    #[error("request is larger than the server accepts")]
    MessageTooLarge { detail: String },
    #[error("stream failed: {0}")]
    Stream(Status),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

/// The retry advice of refusals that do not depend on the buffer's drain rate.
const RETRY_SOON: Duration = Duration::from_secs(1);

impl From<IngestError> for Status {
    fn from(error: IngestError) -> Self {
        let message = error.to_string();
        let refused = |code, reason, retry_after, progress: Progress| {
            progress.trail(refusal(
                code,
                message.clone(),
                reason,
                Some(retry_after),
                progress.error_info(),
            ))
        };
        match error {
            IngestError::BufferFull {
                retry_after,
                progress,
            } => refused(
                Code::ResourceExhausted,
                "BUFFER_FULL",
                retry_after,
                progress,
            ),
            IngestError::OverShare {
                retry_after,
                progress,
                ..
            } => refused(Code::ResourceExhausted, "OVER_SHARE", retry_after, progress),
            IngestError::ShuttingDown { progress } => {
                refused(Code::Unavailable, "SHUTTING_DOWN", RETRY_SOON, progress)
            }
            IngestError::NotDurable { progress } => {
                refused(Code::Unavailable, "NOT_DURABLE", RETRY_SOON, progress)
            }
            IngestError::TooManyEvents { events, limit } => bad_request(
                message,
                "events",
                format!("{events} events in one request, the limit is {limit}; split the request"),
            ),
            IngestError::LargerThanBuffer { .. } => bad_request(message.clone(), "events", message),
            IngestError::MessageTooLarge { detail } => oversized_request(detail),
            IngestError::Stream(status) => status,
            IngestError::Auth(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;
    use crate::proto::status::{ACCEPTED_TRAILER, REJECTED_TRAILER};

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
    fn shutting_down_and_not_durable_are_unavailable_with_retry_info() {
        for error in [
            IngestError::ShuttingDown {
                progress: Progress::default(),
            },
            IngestError::NotDurable {
                progress: Progress::default(),
            },
        ] {
            let status = Status::from(error);
            assert_eq!(status.code(), Code::Unavailable);
            assert!(status.get_error_details().retry_info().is_some());
        }
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
