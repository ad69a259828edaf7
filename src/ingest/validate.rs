//! Per-event validation. An invalid event becomes an [`EventRejection`]; it never fails the
//! request it came in.

use chrono::{DateTime, SubsecRound, Utc};
use prost_types::{Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};
use uuid::Uuid;

use crate::{
    config::ValidationConfig,
    event::{EventRejection, ValidEvent},
    proto::Event,
};

const MAX_SERVICE_LEN: usize = 64;

/// Validates events against the configured limits, relative to one "now".
pub struct Validator<'a> {
    limits: &'a ValidationConfig,
    now: DateTime<Utc>,
}

impl<'a> Validator<'a> {
    pub fn new(limits: &'a ValidationConfig, now: DateTime<Utc>) -> Self {
        Self { limits, now }
    }

    /// Validates one event found at `index`.
    pub fn validate(&self, index: u64, event: Event) -> Result<ValidEvent, EventRejection> {
        let reject =
            |field: &'static str, metric_reason: &'static str, reason: String| EventRejection {
                index,
                event_id: echoed_id(&event.id),
                field,
                reason,
                metric_reason,
            };
        let id = if event.id.is_empty() {
            Uuid::now_v7()
        } else {
            match Uuid::try_parse(&event.id) {
                Ok(id) => id,
                Err(_) => return Err(reject("id", "invalid_id", "id must be a UUID".to_owned())),
            }
        };
        if let Err(reason) = check_service(&event.service) {
            return Err(reject("service", "invalid_service", reason));
        }
        if event.message.is_empty() {
            return Err(reject(
                "message",
                "missing_message",
                "message is required".to_owned(),
            ));
        }
        if event.message.len() > self.limits.max_message_bytes {
            let reason = format!(
                "message is {} bytes, the limit is {}",
                event.message.len(),
                self.limits.max_message_bytes
            );
            return Err(reject("message", "message_too_large", reason));
        }
        let timestamp = match self.check_timestamp(event.timestamp.as_ref()) {
            Ok(timestamp) => timestamp,
            Err((metric_reason, reason)) => return Err(reject("timestamp", metric_reason, reason)),
        };
        let metadata = match event
            .metadata
            .as_ref()
            .map(|fields| struct_to_json(fields, self.limits.max_metadata_depth))
            .transpose()
        {
            Ok(metadata) => metadata.unwrap_or_default(),
            Err((metric_reason, reason)) => return Err(reject("metadata", metric_reason, reason)),
        };
        let metadata_json = Json::Object(metadata).to_string();
        if metadata_json.len() > self.limits.max_metadata_bytes {
            let reason = format!(
                "metadata is {} bytes as JSON, the limit is {}",
                metadata_json.len(),
                self.limits.max_metadata_bytes
            );
            return Err(reject("metadata", "metadata_too_large", reason));
        }
        let user_id = if event.user_id.is_empty() {
            user_id_from_metadata(event.metadata.as_ref())
        } else {
            Some(event.user_id)
        };
        if let Some(user_id) = &user_id
            && user_id.len() > self.limits.max_user_id_bytes
        {
            let reason = format!(
                "user_id is {} bytes, the limit is {}",
                user_id.len(),
                self.limits.max_user_id_bytes
            );
            return Err(reject("user_id", "user_id_too_large", reason));
        }
        Ok(ValidEvent {
            index,
            id,
            service: event.service,
            message: event.message,
            timestamp,
            user_id,
            metadata_json,
        })
    }

    fn check_timestamp(
        &self,
        timestamp: Option<&prost_types::Timestamp>,
    ) -> Result<DateTime<Utc>, (&'static str, String)> {
        let Some(timestamp) = timestamp else {
            return Err(("missing_timestamp", "timestamp is required".to_owned()));
        };
        let nanos = u32::try_from(timestamp.nanos)
            .ok()
            .filter(|nanos| *nanos < 1_000_000_000);
        let Some(parsed) =
            nanos.and_then(|nanos| DateTime::from_timestamp(timestamp.seconds, nanos))
        else {
            return Err(("invalid_timestamp", "timestamp is out of range".to_owned()));
        };
        let oldest = self.now - self.limits.retention;
        if parsed < oldest {
            let reason = format!(
                "timestamp {parsed} is older than the retention window (oldest accepted: {oldest})"
            );
            return Err(("timestamp_too_old", reason));
        }
        let newest = self.now + self.limits.max_future_skew;
        if parsed > newest {
            let reason = format!("timestamp {parsed} is in the future (newest accepted: {newest})");
            return Err(("timestamp_in_future", reason));
        }
        // PostgreSQL keeps microseconds; so does the event from here on, so that the stored
        // (id, ts) key equals the one in memory.
        Ok(parsed.trunc_subsecs(6))
    }
}

/// Converts a protobuf Struct to a JSON object, refusing nesting deeper than `max_depth` (the
/// top-level object is depth 1) and non-finite numbers.
pub fn struct_to_json(
    fields: &Struct,
    max_depth: usize,
) -> Result<Map<String, Json>, (&'static str, String)> {
    object_to_json(fields, 1, max_depth)
}

fn too_deep(max_depth: usize) -> (&'static str, String) {
    (
        "metadata_too_deep",
        format!("metadata is nested deeper than {max_depth} levels"),
    )
}

fn object_to_json(
    fields: &Struct,
    depth: usize,
    max_depth: usize,
) -> Result<Map<String, Json>, (&'static str, String)> {
    if depth > max_depth {
        return Err(too_deep(max_depth));
    }
    fields
        .fields
        .iter()
        .map(|(key, value)| Ok((key.clone(), value_to_json(value, depth, max_depth)?)))
        .collect()
}

fn value_to_json(
    value: &Value,
    depth: usize,
    max_depth: usize,
) -> Result<Json, (&'static str, String)> {
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
                return Err(too_deep(max_depth));
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
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        Json::Object(object) => Kind::StructValue(json_to_struct(object)),
    };
    Value { kind: Some(kind) }
}

/// Longest event id echoed back in a rejection (a UUID is 36 characters; anything longer is
/// cut so that rejections stay small whatever the client sent).
const MAX_ECHOED_ID: usize = 64;

fn echoed_id(id: &str) -> String {
    let mut end = id.len().min(MAX_ECHOED_ID);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].to_owned()
}

/// Whole numbers within f64's exact integer range are stored as JSON integers.
fn json_number(number: f64) -> Result<Number, (&'static str, String)> {
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;
    if number.fract() == 0.0 && number.abs() < EXACT_INTEGER_LIMIT {
        return Ok(Number::from(number as i64));
    }
    Number::from_f64(number).ok_or((
        "invalid_metadata",
        "metadata numbers must be finite".to_owned(),
    ))
}

/// Checks a service name against `^[a-z0-9][a-z0-9._-]{0,63}$`.
pub fn check_service(service: &str) -> Result<(), String> {
    if service.is_empty() {
        return Err("service is required".to_owned());
    }
    let mut chars = service.chars();
    let first_ok = chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || service.len() > MAX_SERVICE_LEN {
        return Err("service must match ^[a-z0-9][a-z0-9._-]{0,63}$".to_owned());
    }
    Ok(())
}

fn user_id_from_metadata(metadata: Option<&Struct>) -> Option<String> {
    match metadata?.fields.get("userId")?.kind.as_ref()? {
        Kind::StringValue(user_id) if !user_id.is_empty() => Some(user_id.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn limits() -> ValidationConfig {
        ValidationConfig::default()
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("valid")
    }

    fn event() -> Event {
        Event {
            id: String::new(),
            service: "billing".to_owned(),
            message: "invoice paid".to_owned(),
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_800_000_000 - 60,
                nanos: 0,
            }),
            user_id: String::new(),
            metadata: None,
            ingested_at: None,
        }
    }

    fn string_value(text: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(text.to_owned())),
        }
    }

    fn nested(depth: usize) -> Struct {
        let mut current = Struct {
            fields: BTreeMap::from([("leaf".to_owned(), string_value("x"))]),
        };
        for _ in 1..depth {
            current = Struct {
                fields: BTreeMap::from([(
                    "child".to_owned(),
                    Value {
                        kind: Some(Kind::StructValue(current)),
                    },
                )]),
            };
        }
        current
    }

    fn field_of(result: Result<ValidEvent, EventRejection>) -> &'static str {
        result.expect_err("rejected").field
    }

    #[test]
    fn a_complete_event_passes_and_gets_a_v7_id() {
        let limits = limits();
        let valid = Validator::new(&limits, now())
            .validate(0, event())
            .expect("valid");
        assert_eq!(valid.id.get_version_num(), 7);
        assert_eq!(valid.metadata_json, "{}");
        assert_eq!(valid.user_id, None);
    }

    #[test]
    fn service_names_follow_the_documented_pattern() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        for good in ["a", "billing", "api-gw.v2_eu", "0svc"] {
            let candidate = Event {
                service: good.to_owned(),
                ..event()
            };
            assert!(validator.validate(0, candidate).is_ok(), "{good} is valid");
        }
        let too_long = "a".repeat(65);
        for bad in [
            "",
            "Billing",
            "-svc",
            ".svc",
            "svc!",
            "sv c",
            too_long.as_str(),
        ] {
            let candidate = Event {
                service: bad.to_owned(),
                ..event()
            };
            assert_eq!(
                field_of(validator.validate(0, candidate)),
                "service",
                "{bad:?} is invalid"
            );
        }
    }

    #[test]
    fn id_must_be_a_uuid_when_given() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        let given = "0190f0d2-7c1e-7000-8000-000000000001";
        let valid = validator
            .validate(
                0,
                Event {
                    id: given.to_owned(),
                    ..event()
                },
            )
            .expect("valid");
        assert_eq!(valid.id.to_string(), given);
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    id: "nope".to_owned(),
                    ..event()
                }
            )),
            "id"
        );
    }

    #[test]
    fn message_is_required_and_bounded() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    message: String::new(),
                    ..event()
                }
            )),
            "message"
        );
        let at_limit = Event {
            message: "x".repeat(8192),
            ..event()
        };
        assert!(validator.validate(0, at_limit).is_ok());
        let over = Event {
            message: "x".repeat(8193),
            ..event()
        };
        assert_eq!(field_of(validator.validate(0, over)), "message");
    }

    #[test]
    fn timestamp_must_fall_inside_the_retention_window_and_skew() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        let at = |seconds: i64| Event {
            timestamp: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..event()
        };
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    timestamp: None,
                    ..event()
                }
            )),
            "timestamp"
        );
        assert_eq!(
            field_of(validator.validate(0, at(1_800_000_000 - 31 * 86_400))),
            "timestamp"
        );
        assert!(
            validator
                .validate(0, at(1_800_000_000 - 29 * 86_400))
                .is_ok()
        );
        assert!(validator.validate(0, at(1_800_000_000 + 240)).is_ok());
        assert_eq!(
            field_of(validator.validate(0, at(1_800_000_000 + 600))),
            "timestamp"
        );
        let bad_nanos = Event {
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: -1,
            }),
            ..event()
        };
        assert_eq!(field_of(validator.validate(0, bad_nanos)), "timestamp");
    }

    #[test]
    fn metadata_depth_and_size_are_bounded() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        assert!(
            validator
                .validate(
                    0,
                    Event {
                        metadata: Some(nested(16)),
                        ..event()
                    }
                )
                .is_ok()
        );
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    metadata: Some(nested(17)),
                    ..event()
                }
            )),
            "metadata"
        );
        let big = Struct {
            fields: BTreeMap::from([("blob".to_owned(), string_value(&"x".repeat(17_000)))]),
        };
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    metadata: Some(big),
                    ..event()
                }
            )),
            "metadata"
        );
        let nan = Struct {
            fields: BTreeMap::from([(
                "n".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]),
        };
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    metadata: Some(nan),
                    ..event()
                }
            )),
            "metadata"
        );
    }

    #[test]
    fn user_id_is_bounded_and_echoed_ids_are_cut() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        let long_user = Event {
            user_id: "u".repeat(257),
            ..event()
        };
        assert_eq!(field_of(validator.validate(0, long_user)), "user_id");
        let garbage_id = Event {
            id: "x".repeat(10_000),
            ..event()
        };
        let rejection = validator.validate(0, garbage_id).expect_err("bad id");
        assert_eq!(rejection.event_id.len(), 64);
    }

    #[test]
    fn user_id_falls_back_to_metadata_user_id_and_numbers_stay_integers() {
        let limits = limits();
        let metadata = Struct {
            fields: BTreeMap::from([
                ("userId".to_owned(), string_value("u-42")),
                (
                    "count".to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(3.0)),
                    },
                ),
            ]),
        };
        let valid = Validator::new(&limits, now())
            .validate(
                4,
                Event {
                    metadata: Some(metadata),
                    ..event()
                },
            )
            .expect("valid");
        assert_eq!(valid.user_id.as_deref(), Some("u-42"));
        assert_eq!(valid.index, 4);
        assert_eq!(valid.metadata_json, r#"{"count":3,"userId":"u-42"}"#);
    }
}
