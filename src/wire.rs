//! Protobuf ↔ domain conversion, in one place: `Struct` ↔ JSON, `Timestamp` ↔ `DateTime` (at
//! the microseconds PostgreSQL keeps), the service-name rule, and rejections as the client
//! reads them.

use chrono::{DateTime, SubsecRound, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

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
    #[error("nested deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("numbers must be finite")]
    NonFiniteNumber,
}

impl From<WireError> for RejectReason {
    fn from(error: WireError) -> Self {
        match error {
            WireError::MissingService => Self::MissingService,
            WireError::InvalidService => Self::InvalidService,
            WireError::TimestampOutOfRange => Self::InvalidTimestamp,
            WireError::TooDeep { max } => Self::MetadataTooDeep { max },
            WireError::NonFiniteNumber => Self::InvalidMetadata,
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

/// Converts a protobuf Struct to a JSON object, refusing nesting deeper than `max_depth` (the
/// top-level object is depth 1) and non-finite numbers.
pub fn struct_to_json(fields: &Struct, max_depth: usize) -> Result<Map<String, Json>, WireError> {
    object_to_json(fields, 1, max_depth)
}

fn object_to_json(
    fields: &Struct,
    depth: usize,
    max_depth: usize,
) -> Result<Map<String, Json>, WireError> {
    if depth > max_depth {
        return Err(WireError::TooDeep { max: max_depth });
    }
    fields
        .fields
        .iter()
        .map(|(key, value)| Ok((key.clone(), value_to_json(value, depth, max_depth)?)))
        .collect()
}

fn value_to_json(value: &Value, depth: usize, max_depth: usize) -> Result<Json, WireError> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(flag)) => Json::Bool(*flag),
        Some(Kind::StringValue(text)) => Json::String(text.clone()),
        Some(Kind::NumberValue(number)) => Json::Number(json_number(*number)?),
        Some(Kind::StructValue(nested)) => {
            Json::Object(object_to_json(nested, depth + 1, max_depth)?)
        }
        Some(Kind::ListValue(list)) => {
            if depth + 1 > max_depth {
                return Err(WireError::TooDeep { max: max_depth });
            }
            let items: Result<Vec<Json>, _> = list
                .values
                .iter()
                .map(|item| value_to_json(item, depth + 1, max_depth))
                .collect();
            Json::Array(items?)
        }
    })
}

/// Whole numbers within f64's exact integer range are stored as JSON integers.
fn json_number(number: f64) -> Result<Number, WireError> {
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;
    if number.fract() == 0.0 && number.abs() < EXACT_INTEGER_LIMIT {
        return Ok(Number::from(number as i64));
    }
    Number::from_f64(number).ok_or(WireError::NonFiniteNumber)
}

/// Converts a JSON object back to a protobuf Struct (for events read from storage).
pub fn json_to_struct(object: Map<String, Json>) -> Struct {
    Struct {
        fields: object
            .into_iter()
            .map(|(key, value)| (key, json_to_value(value)))
            .collect(),
    }
}

fn json_to_value(value: Json) -> Value {
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(flag) => Kind::BoolValue(flag),
        Json::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or_default()),
        Json::String(text) => Kind::StringValue(text),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        Json::Object(object) => Kind::StructValue(json_to_struct(object)),
    };
    Value { kind: Some(kind) }
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
    use std::collections::BTreeMap;

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

    #[test]
    fn struct_and_json_round_trip_with_integers_kept_whole() {
        let original = Struct {
            fields: BTreeMap::from([
                (
                    "n".to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(42.0)),
                    },
                ),
                (
                    "f".to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(2.5)),
                    },
                ),
                (
                    "s".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue("x".to_owned())),
                    },
                ),
            ]),
        };
        let json = struct_to_json(&original, 4).expect("converts");
        assert_eq!(
            Json::Object(json.clone()).to_string(),
            r#"{"f":2.5,"n":42,"s":"x"}"#
        );
        assert_eq!(json_to_struct(json), original);
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        let fields = Struct {
            fields: BTreeMap::from([(
                "x".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]),
        };
        assert_eq!(struct_to_json(&fields, 4), Err(WireError::NonFiniteNumber));
    }
}
