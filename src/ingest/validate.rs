//! Per-event validation. An invalid event becomes an [`EventRejection`] with a typed
//! [`RejectReason`]; it never fails the request it came in.

use std::{cell::Cell, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    config::ValidationConfig,
    event::{EventRejection, RejectReason, ValidEvent},
    lifecycle::policy::RetentionPolicy,
    proto::wire,
    proto::{
        Event,
        metadata::{self, Problem},
    },
};

/// Validates events against the configured limits, relative to one "now".
pub struct Validator<'a> {
    limits: &'a ValidationConfig,
    retention: Option<&'a RetentionPolicy>,
    now: DateTime<Utc>,
    /// The newest timestamp accepted: `now` plus the allowed skew.
    newest: DateTime<Utc>,
    /// The oldest timestamp accepted under the last retention looked up, for the next event
    /// (a request's events nearly always share their retention).
    last_oldest: Cell<Option<(Duration, DateTime<Utc>)>>,
}

/// The retention of a validator given none: `retention.default`'s default.
static DEFAULT_RETENTION: std::sync::LazyLock<RetentionPolicy> =
    std::sync::LazyLock::new(RetentionPolicy::default);

impl<'a> Validator<'a> {
    pub fn new(limits: &'a ValidationConfig, now: DateTime<Utc>) -> Self {
        Self {
            limits,
            retention: None,
            now,
            newest: now + limits.max_future_skew,
            last_oldest: Cell::new(None),
        }
    }

    /// Refuses events older than their service's retention under `policy`.
    pub fn with_retention(mut self, policy: &'a RetentionPolicy) -> Self {
        self.retention = Some(policy);
        self
    }

    /// Validates one event found at `index`.
    pub fn validate(&self, index: u64, event: Event) -> Result<ValidEvent, EventRejection> {
        self.validate_with(index, event, None)
    }

    /// Validates one event whose id is already known as a UUID (`event.id` is then not read):
    /// another protocol's mapping computed it, and writing it out as text only for it to be
    /// parsed again would be work for nothing (OTLP, [`crate::otlp`]).
    pub fn validate_known_id(
        &self,
        index: u64,
        event: Event,
        id: Uuid,
    ) -> Result<ValidEvent, EventRejection> {
        self.validate_with(index, event, Some(id))
    }

    /// The checks, in the order a client reads about them. A refusal carries the event's id
    /// as sent (cut to a bounded length) and the reason.
    fn validate_with(
        &self,
        index: u64,
        event: Event,
        known_id: Option<Uuid>,
    ) -> Result<ValidEvent, EventRejection> {
        let reject = |reason: RejectReason| EventRejection {
            index,
            event_id: match known_id {
                Some(id) => id.to_string(),
                None => echoed_id(&event.id),
            },
            service: echoed_id(&event.service),
            reason,
        };
        let id = match known_id {
            Some(id) => id,
            None if event.id.is_empty() => Uuid::now_v7(),
            // Any form the uuid crate reads (hyphenated, simple, braced, urn:uuid:, either
            // case) is stored and echoed in canonical form.
            None => Uuid::try_parse(&event.id).map_err(|_| reject(RejectReason::InvalidId))?,
        };
        // The nil UUID is a client bug.
        if id.is_nil() {
            return Err(reject(RejectReason::NilId));
        }
        wire::check_service(&event.service).map_err(|error| reject(error.into()))?;
        if event.message.is_empty() {
            return Err(reject(RejectReason::MissingMessage));
        }
        if event.message.len() > self.limits.max_message_bytes {
            return Err(reject(RejectReason::MessageTooLarge {
                bytes: event.message.len(),
                limit: self.limits.max_message_bytes,
            }));
        }
        let timestamp = self
            .check_timestamp(&event.service, event.timestamp.as_ref())
            .map_err(reject)?;
        let metadata = self
            .check_metadata(event.metadata.unwrap_or_default())
            .map_err(reject)?;
        let user_id = if event.user_id.is_empty() {
            metadata.user_id().map(str::to_owned)
        } else {
            Some(event.user_id)
        };
        let metadata_json = metadata.into_json();
        if let Some(user_id) = &user_id
            && user_id.len() > self.limits.max_user_id_bytes
        {
            return Err(reject(RejectReason::UserIdTooLarge {
                bytes: user_id.len(),
                limit: self.limits.max_user_id_bytes,
            }));
        }
        Ok(ValidEvent {
            trace_id: None,
            index,
            id,
            service: event.service,
            message: event.message,
            timestamp,
            user_id,
            metadata_json,
        })
    }

    /// The metadata object, within the size and depth limits. Decoding already stopped at the
    /// size limit (see [`metadata`]); the exact checks here hold whatever the decoder was told.
    fn check_metadata(
        &self,
        metadata: metadata::Metadata,
    ) -> Result<metadata::Metadata, RejectReason> {
        let limit = self.limits.max_metadata_bytes;
        let too_large = |bytes| RejectReason::MetadataTooLarge { bytes, limit };
        match metadata.problem() {
            Some(Problem::TooLarge) => return Err(too_large(metadata.json_len())),
            Some(Problem::NonFiniteNumber) => return Err(RejectReason::InvalidMetadata),
            None => {}
        }
        if metadata.json_len() > limit {
            return Err(too_large(metadata.json_len()));
        }
        if metadata.depth() > self.limits.max_metadata_depth {
            return Err(RejectReason::MetadataTooDeep {
                max: self.limits.max_metadata_depth,
            });
        }
        Ok(metadata)
    }

    fn check_timestamp(
        &self,
        service: &str,
        timestamp: Option<&prost_types::Timestamp>,
    ) -> Result<DateTime<Utc>, RejectReason> {
        let timestamp = timestamp.ok_or(RejectReason::MissingTimestamp)?;
        let at = wire::to_datetime(timestamp)?;
        let keep = self
            .retention
            .unwrap_or(&DEFAULT_RETENTION)
            .keep_for(service);
        let oldest = match self.last_oldest.get() {
            Some((kept, oldest)) if kept == keep.keep => oldest,
            _ => {
                let oldest = self.now - keep.keep;
                self.last_oldest.set(Some((keep.keep, oldest)));
                oldest
            }
        };
        if at < oldest {
            return Err(RejectReason::TimestampTooOld {
                at,
                oldest,
                rule: keep.rule.to_owned(),
            });
        }
        if at > self.newest {
            return Err(RejectReason::TimestampInFuture {
                at,
                newest: self.newest,
            });
        }
        Ok(at)
    }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{Struct, Value, value::Kind};

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
            trace_id: String::new(),
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
        result.expect_err("rejected").reason.field()
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
    fn a_known_id_is_taken_as_it_is_refused_when_nil_and_echoed_in_refusals() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        let known = Uuid::parse_str("0190f0d2-7c1e-8000-8000-000000000001").expect("uuid");
        // The event's own id text is not read.
        let ignored = Event {
            id: "not read".to_owned(),
            ..event()
        };
        let valid = validator
            .validate_known_id(0, ignored, known)
            .expect("valid");
        assert_eq!(valid.id, known);
        let nil = validator
            .validate_known_id(0, event(), Uuid::nil())
            .expect_err("nil");
        assert_eq!(nil.reason, RejectReason::NilId);
        let refused = validator
            .validate_known_id(
                3,
                Event {
                    message: String::new(),
                    ..event()
                },
                known,
            )
            .expect_err("no message");
        assert_eq!(refused.event_id, known.to_string());
        assert_eq!(refused.index, 3);
    }

    #[test]
    fn other_uuid_forms_are_stored_canonical_and_the_nil_uuid_is_refused() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        let canonical = "0190f0d2-7c1e-7000-8000-00000000abcd";
        for form in [
            "0190F0D2-7C1E-7000-8000-00000000ABCD",
            "{0190f0d2-7c1e-7000-8000-00000000abcd}",
            "urn:uuid:0190f0d2-7c1e-7000-8000-00000000abcd",
            "0190f0d27c1e7000800000000000abcd",
        ] {
            let valid = validator
                .validate(
                    0,
                    Event {
                        id: form.to_owned(),
                        ..event()
                    },
                )
                .expect(form);
            assert_eq!(valid.id.to_string(), canonical, "{form}");
        }
        let nil = validator
            .validate(
                0,
                Event {
                    id: "00000000-0000-0000-0000-000000000000".to_owned(),
                    ..event()
                },
            )
            .expect_err("nil");
        assert_eq!(nil.reason, RejectReason::NilId);
        assert_eq!(
            (nil.reason.field(), nil.reason.as_str()),
            ("id", "invalid_id")
        );
    }

    #[test]
    fn each_reason_names_its_field_and_metric_label() {
        let limits = limits();
        let validator = Validator::new(&limits, now());
        let old = validator
            .validate(
                3,
                Event {
                    timestamp: Some(prost_types::Timestamp {
                        seconds: 1_800_000_000 - 40 * 86_400,
                        nanos: 0,
                    }),
                    ..event()
                },
            )
            .expect_err("too old");
        assert_eq!(old.index, 3);
        assert!(matches!(old.reason, RejectReason::TimestampTooOld { .. }));
        assert_eq!(old.reason.as_str(), "timestamp_too_old");
        assert!(old.reason.to_string().contains("retention.default"));
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
                        metadata: Some(nested(16).into()),
                        ..event()
                    }
                )
                .is_ok()
        );
        assert_eq!(
            field_of(validator.validate(
                0,
                Event {
                    metadata: Some(nested(17).into()),
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
                    metadata: Some(big.into()),
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
                    metadata: Some(nan.into()),
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
                    metadata: Some(metadata.into()),
                    ..event()
                },
            )
            .expect("valid");
        assert_eq!(valid.user_id.as_deref(), Some("u-42"));
        assert_eq!(valid.index, 4);
        assert_eq!(valid.metadata_json, r#"{"count":3,"userId":"u-42"}"#);
    }
}
