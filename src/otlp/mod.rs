//! OpenTelemetry logs in: OTLP's `LogsService/Export`, a second ingest protocol over the same
//! envelope (mTLS, principals, tokens, the `ingest` scope, per-service rights, rate limits),
//! the same validation, privacy and buffer as the native RPCs, and the same promise: OK means
//! every record is committed (or in the fsync'd spool).
//!
//! OTLP's rules for answers differ from sluice's native ones, and are followed here:
//! - records refused for good (invalid, over a limit, opted out, a service the caller may not
//!   write) are counted in `partial_success`, which the client must not retry;
//! - transient conditions (buffer full, over the fair share, rate limited, draining, not yet
//!   durable) refuse the **whole** request with `UNAVAILABLE` and `RetryInfo`, which exporters
//!   retry. A prefix of a request is never taken: a partial success cannot be retried, so the
//!   rest would be lost.
//!
//! [`mapping`] turns a record into an event, reading the request in place with [`wire`] and
//! writing its metadata as JSON text with [`json`]; [`service`] is the RPC; [`http`] serves
//! the same export as OTLP/HTTP.

pub mod http;
mod json;
pub mod mapping;
pub mod service;
mod wire;

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};

pub use service::OtlpLogsHandler;

use crate::{
    auth::AuthError,
    ingest::IngestError,
    proto::status::{bad_request, refusal},
};

/// Why an OTLP export failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// Transient: the client retries the whole request after `retry_after`.
    #[error("{message}")]
    Retry {
        message: String,
        reason: &'static str,
        retry_after: Duration,
    },
    /// The request can never be taken as it is.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Auth(AuthError),
}

/// The retry advice of refusals that do not depend on the buffer's drain rate.
const RETRY_SOON: Duration = Duration::from_secs(1);

impl From<IngestError> for OtlpError {
    fn from(error: IngestError) -> Self {
        let message = error.to_string();
        match error {
            IngestError::BufferFull { retry_after, .. } => Self::Retry {
                message,
                reason: "BUFFER_FULL",
                retry_after,
            },
            IngestError::OverShare { retry_after, .. } => Self::Retry {
                message,
                reason: "OVER_SHARE",
                retry_after,
            },
            IngestError::ShuttingDown { .. } => Self::Retry {
                message,
                reason: "SHUTTING_DOWN",
                retry_after: RETRY_SOON,
            },
            IngestError::NotDurable { .. } => Self::Retry {
                message,
                reason: "NOT_DURABLE",
                retry_after: RETRY_SOON,
            },
            IngestError::Auth(AuthError::RateLimited { limited, .. }) => Self::Retry {
                message,
                reason: "RATE_LIMITED",
                retry_after: limited.retry_after,
            },
            IngestError::Auth(error) => Self::Auth(error),
            IngestError::TooManyEvents { .. }
            | IngestError::LargerThanBuffer { .. }
            | IngestError::MessageTooLarge { .. } => Self::Invalid {
                field: "resource_logs",
                message,
            },
            IngestError::Stream(status) => Self::Retry {
                message: status.message().to_owned(),
                reason: "STREAM",
                retry_after: RETRY_SOON,
            },
        }
    }
}

impl From<OtlpError> for Status {
    fn from(error: OtlpError) -> Self {
        match error {
            OtlpError::Retry {
                message,
                reason,
                retry_after,
            } => refusal(
                Code::Unavailable,
                message,
                reason,
                Some(retry_after),
                HashMap::new(),
            ),
            OtlpError::Invalid { field, message } => bad_request(message.clone(), field, message),
            OtlpError::Auth(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn transient_refusals_are_unavailable_with_retry_info_as_otlp_exporters_retry() {
        for error in [
            OtlpError::from(IngestError::BufferFull {
                retry_after: Duration::from_millis(300),
                progress: Default::default(),
            }),
            OtlpError::from(IngestError::OverShare {
                retry_after: Duration::from_millis(300),
                held: 10,
                share: 5,
                progress: Default::default(),
            }),
            OtlpError::from(IngestError::NotDurable {
                progress: Default::default(),
            }),
        ] {
            let status = Status::from(error);
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.get_error_details().retry_info().is_some());
        }
    }

    #[test]
    fn a_request_that_can_never_fit_is_invalid_argument() {
        let status = Status::from(OtlpError::from(IngestError::LargerThanBuffer {
            events: 10,
            bytes: 10,
            max_events: 5,
            max_bytes: 5,
        }));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.get_error_details().bad_request().is_some());
    }
}
