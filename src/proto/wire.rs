//! Protobuf ↔ domain conversion, in one place: `Timestamp` ↔ `DateTime` (at the microseconds
//! PostgreSQL keeps), the service-name rule, and rejections as the client reads them. Struct
//! fields arrive as JSON already ([`crate::proto::metadata`]).

use chrono::{DateTime, SubsecRound, Utc};
use prost_types::Timestamp;

use crate::{
    event::{EventRejection, RejectReason},
    proto,
};

/// Longest service name.
const MAX_SERVICE_LEN: usize = 64;

/// Why a protobuf value has no domain equivalent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("service is required")]
    MissingService,
    #[error("service must match ^[a-z0-9][a-z0-9._-]{{0,63}}$")]
    InvalidService,
    #[error("timestamp is out of range")]
    TimestampOutOfRange,
}

impl From<WireError> for RejectReason {
    fn from(error: WireError) -> Self {
        match error {
            WireError::MissingService => Self::MissingService,
            WireError::InvalidService => Self::InvalidService,
            WireError::TimestampOutOfRange => Self::InvalidTimestamp,
        }
    }
}

/// A protobuf timestamp as a `DateTime`, truncated to microseconds: PostgreSQL keeps
/// microseconds, so the event (and every filter bound) compares as the stored row does.
pub fn to_datetime(timestamp: &Timestamp) -> Result<DateTime<Utc>, WireError> {
    u32::try_from(timestamp.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(timestamp.seconds, nanos))
        .map(|moment| moment.trunc_subsecs(6))
        .ok_or(WireError::TimestampOutOfRange)
}

/// A `DateTime` as a protobuf timestamp.
pub fn to_timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        // Always below 2·10⁹ (a leap second at most), so it fits.
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Checks a service name against `^[a-z0-9][a-z0-9._-]{0,63}$`.
pub fn check_service(service: &str) -> Result<(), WireError> {
    if service.is_empty() {
        return Err(WireError::MissingService);
    }
    let mut chars = service.chars();
    let first_ok = chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || service.len() > MAX_SERVICE_LEN {
        return Err(WireError::InvalidService);
    }
    Ok(())
}

impl From<EventRejection> for proto::Rejection {
    fn from(rejection: EventRejection) -> Self {
        Self {
            index: rejection.index,
            event_id: rejection.event_id,
            field: rejection.reason.field().to_owned(),
            reason: rejection.reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_microseconds_and_refuse_bad_nanos() {
        let at = to_datetime(&Timestamp {
            seconds: 1_800_000_000,
            nanos: 123_456_789,
        })
        .expect("valid");
        assert_eq!(at.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(to_timestamp(at).nanos, 123_456_000);
        for nanos in [-1, 1_000_000_000] {
            assert_eq!(
                to_datetime(&Timestamp { seconds: 0, nanos }),
                Err(WireError::TimestampOutOfRange)
            );
        }
        assert_eq!(
            to_datetime(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            }),
            Err(WireError::TimestampOutOfRange)
        );
    }
}
