//! The domain event: what validation produces, what the writers store, and why an event was
//! refused. Pure data: no protobuf, no database, no metrics.

pub mod batch;

/// The one rule of what a user id is, applied alike by validation (`metadata.userId` when
/// `user_id` is empty), privacy (pseudonymizing it), OptOut, Delete and Anonymize: a string
/// is itself, any other value (a number, say) its compact JSON text; null and "" are none.
pub fn user_id_of(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) if text.is_empty() => None,
        serde_json::Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use opentelemetry::trace::TraceId;

/// An event that passed validation, ready to be written (or spooled during a database outage,
/// in the versioned format of [`crate::spool`], never as this in-memory layout).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    /// Position of the event in its request (or stream), echoed in rejections.
    pub index: u64,
    pub id: Uuid,
    pub service: String,
    pub message: String,
    /// Truncated to microseconds, as PostgreSQL keeps it, so that the stored `(id, ts)` key
    /// equals the one in memory.
    pub timestamp: DateTime<Utc>,
    pub user_id: Option<String>,
    /// `metadata` as compact JSON text (an object), as decoded from the request. A key the
    /// client repeated appears twice; PostgreSQL's `jsonb` keeps its last value.
    pub metadata_json: String,
    /// The trace of the request that brought the event (see [`crate::telemetry`]).
    pub trace_id: Option<TraceId>,
}

/// Per-event bookkeeping overhead counted against the buffer's byte budget, on top of the
/// variable-length fields.
const EVENT_OVERHEAD_BYTES: usize = 128;

impl ValidEvent {
    /// The bytes this event holds in memory, as counted by the buffer.
    pub fn weight(&self) -> usize {
        EVENT_OVERHEAD_BYTES
            + self.service.len()
            + self.message.len()
            + self.user_id.as_ref().map_or(0, String::len)
            + self.metadata_json.len()
    }
}

#[cfg(test)]
impl ValidEvent {
    /// A valid event of service `svc`, stamped now (at microseconds), for unit tests.
    pub(crate) fn sample(index: u64) -> Self {
        let now = Utc::now();
        Self {
            trace_id: None,
            index,
            id: Uuid::now_v7(),
            service: "svc".to_owned(),
            message: "m".to_owned(),
            timestamp: DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now),
            user_id: None,
            metadata_json: "{}".to_owned(),
        }
    }
}

/// Why one event was refused. Each reason names the field it is about ([`Self::field`]), the
/// stable label of the rejection metric ([`Self::as_str`]), and the words the client reads
/// (`Display`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("id must be a UUID")]
    InvalidId,
    #[error("id must not be the nil UUID")]
    NilId,
    #[error("service is required")]
    MissingService,
    #[error("service must match ^[a-z0-9][a-z0-9._-]{{0,63}}$")]
    InvalidService,
    #[error("message is required")]
    MissingMessage,
    #[error("message is {bytes} bytes, the limit is {limit}")]
    MessageTooLarge { bytes: usize, limit: usize },
    #[error("timestamp is required")]
    MissingTimestamp,
    #[error("timestamp is out of range")]
    InvalidTimestamp,
    #[error("timestamp {at} is older than the {rule} allows (oldest accepted: {oldest})")]
    TimestampTooOld {
        at: DateTime<Utc>,
        oldest: DateTime<Utc>,
        rule: String,
    },
    #[error("timestamp {at} is in the future (newest accepted: {newest})")]
    TimestampInFuture {
        at: DateTime<Utc>,
        newest: DateTime<Utc>,
    },
    #[error("metadata is nested deeper than {max} levels")]
    MetadataTooDeep { max: usize },
    #[error("metadata numbers must be finite")]
    InvalidMetadata,
    /// `bytes` is at least the size: decoding stops counting once past the limit.
    #[error("metadata is at least {bytes} bytes as JSON, the limit is {limit}")]
    MetadataTooLarge { bytes: usize, limit: usize },
    #[error("user_id is {bytes} bytes, the limit is {limit}")]
    UserIdTooLarge { bytes: usize, limit: usize },
    /// A field longer than a PostgreSQL row field may be (1 GiB); only reachable with limits
    /// configured far above their defaults.
    #[error("{field} is {bytes} bytes, more than PostgreSQL can store in one field")]
    FieldTooLong { field: &'static str, bytes: usize },
    /// The user opted out of tracking (for this service).
    #[error("user opted out")]
    OptedOut,
    /// Privacy settings could not be applied (for example a value that mimics an encrypted
    /// one).
    #[error("{0}")]
    Privacy(String),
    /// The caller may not write this service (its `auth.principals` services).
    #[error("{principal} may not write service {service} (not among its auth.principals services)")]
    ServiceForbidden { principal: String, service: String },
    /// PostgreSQL refused the row (the event went to `dead_letters`).
    #[error("{0}")]
    DatabaseRefused(String),
}

impl RejectReason {
    /// The request field the reason is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::InvalidId | Self::NilId => "id",
            Self::MissingService | Self::InvalidService | Self::ServiceForbidden { .. } => {
                "service"
            }
            Self::MissingMessage | Self::MessageTooLarge { .. } => "message",
            Self::MissingTimestamp
            | Self::InvalidTimestamp
            | Self::TimestampTooOld { .. }
            | Self::TimestampInFuture { .. } => "timestamp",
            Self::MetadataTooDeep { .. }
            | Self::InvalidMetadata
            | Self::MetadataTooLarge { .. } => "metadata",
            Self::UserIdTooLarge { .. } => "user_id",
            Self::FieldTooLong { field, .. } => field,
            Self::Privacy(_) => "metadata",
            Self::OptedOut => "user_id",
            Self::DatabaseRefused(_) => "event",
        }
    }

    /// Every `reason` label of `sluice_events_rejected_total`: [`Self::as_str`] of each
    /// variant, and `undeliverable` (a broker entry no writer could decode).
    pub const LABELS: [&'static str; 18] = [
        "invalid_id",
        "invalid_service",
        "missing_message",
        "message_too_large",
        "missing_timestamp",
        "invalid_timestamp",
        "timestamp_too_old",
        "timestamp_in_future",
        "metadata_too_deep",
        "invalid_metadata",
        "metadata_too_large",
        "user_id_too_large",
        "field_too_long",
        "privacy",
        "user_opted_out",
        "service_forbidden",
        "database_refused",
        "undeliverable",
    ];

    /// The `reason` label of `sluice_events_rejected_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::InvalidId | Self::NilId => "invalid_id",
            Self::MissingService | Self::InvalidService => "invalid_service",
            Self::MissingMessage => "missing_message",
            Self::MessageTooLarge { .. } => "message_too_large",
            Self::MissingTimestamp => "missing_timestamp",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TimestampTooOld { .. } => "timestamp_too_old",
            Self::TimestampInFuture { .. } => "timestamp_in_future",
            Self::MetadataTooDeep { .. } => "metadata_too_deep",
            Self::InvalidMetadata => "invalid_metadata",
            Self::MetadataTooLarge { .. } => "metadata_too_large",
            Self::UserIdTooLarge { .. } => "user_id_too_large",
            Self::FieldTooLong { .. } => "field_too_long",
            Self::Privacy(_) => "privacy",
            Self::OptedOut => "user_opted_out",
            Self::ServiceForbidden { .. } => "service_forbidden",
            Self::DatabaseRefused(_) => "database_refused",
        }
    }
}

/// One refused event: where it was in its request, the id it came with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRejection {
    pub index: u64,
    pub event_id: String,
    /// The event's service as sent (cut to a bounded length), for the business figures.
    pub service: String,
    pub reason: RejectReason,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_reason_label_is_listed_for_the_series_at_zero() {
        let now = Utc::now();
        let every = [
            RejectReason::InvalidId,
            RejectReason::NilId,
            RejectReason::MissingService,
            RejectReason::InvalidService,
            RejectReason::MissingMessage,
            RejectReason::MessageTooLarge { bytes: 0, limit: 0 },
            RejectReason::MissingTimestamp,
            RejectReason::InvalidTimestamp,
            RejectReason::TimestampTooOld {
                at: now,
                oldest: now,
                rule: String::new(),
            },
            RejectReason::TimestampInFuture {
                at: now,
                newest: now,
            },
            RejectReason::MetadataTooDeep { max: 0 },
            RejectReason::InvalidMetadata,
            RejectReason::MetadataTooLarge { bytes: 0, limit: 0 },
            RejectReason::UserIdTooLarge { bytes: 0, limit: 0 },
            RejectReason::FieldTooLong {
                field: "message",
                bytes: 0,
            },
            RejectReason::OptedOut,
            RejectReason::Privacy(String::new()),
            RejectReason::ServiceForbidden {
                principal: String::new(),
                service: String::new(),
            },
            RejectReason::DatabaseRefused(String::new()),
        ];
        for reason in &every {
            assert!(
                RejectReason::LABELS.contains(&reason.as_str()),
                "{} is not in RejectReason::LABELS",
                reason.as_str()
            );
        }
    }
}
