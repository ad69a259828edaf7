//! IngestService: the RPC handlers that validate events and admit them to the buffer.

pub mod service;
pub mod validate;

use std::time::Duration;

pub use service::IngestHandler;

use crate::error::Progress;

/// Why an ingest call failed as a whole. Mapped to a status in [`crate::error`].
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("buffer is full, retry after {retry_after:?}")]
    BufferFull {
        retry_after: Duration,
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
    Stream(tonic::Status),
}
