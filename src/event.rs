//! The domain event: what validation produces and what the writers store.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An event that passed validation, ready to be written (and, during a database outage,
/// spooled to disk as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ValidEvent {
    /// Position of the event in its request (or stream), echoed in rejections.
    pub index: u64,
    pub id: Uuid,
    pub service: String,
    pub message: String,
    pub timestamp: DateTime<Utc>,
    pub user_id: Option<String>,
    /// `metadata` as compact JSON text (an object).
    pub metadata_json: String,
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

/// Why one event was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRejection {
    pub index: u64,
    pub event_id: String,
    pub field: &'static str,
    pub reason: String,
    /// Stable label for the rejection metric.
    pub metric_reason: &'static str,
}

impl From<EventRejection> for crate::proto::Rejection {
    fn from(rejection: EventRejection) -> Self {
        Self {
            index: rejection.index,
            event_id: rejection.event_id,
            field: rejection.field.to_owned(),
            reason: rejection.reason,
        }
    }
}
