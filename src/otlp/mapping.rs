//! One OTLP log record as one sluice event: the README's table "Send OpenTelemetry logs: the
//! mapping", in code. Pure: no I/O, no clock but the receive time it is handed.
//!
//! - `service` ← resource attribute `service.name`, normalized to sluice's service rule
//!   ([`normalize_service`]); the original stays in `metadata.resource`.
//! - `message` ← `body`: a string verbatim, any other value as compact JSON; no body → the
//!   record's `event_name`, else `-`.
//! - `timestamp` ← `time_unix_nano`, else `observed_time_unix_nano`, else the receive time
//!   (`metadata.time_source` says which, when it is not the first).
//! - `id` ← attribute `log.record.uid` (a UUID as it is, any other text hashed into one), else a
//!   UUID hashed from the record, its scope and its resource: an SDK's retry after a timeout
//!   is the same event, stored once.
//! - `trace_id` ← the record's trace id; span id, flags, severity, event name, scope, resource
//!   and record attributes go into `metadata` under the keys of [`keys`].
//! - `user_id` ← the first present of the configured attribute keys, record attributes first,
//!   then the resource's; the attribute leaves `metadata`, so privacy sees the id once.

use base64::Engine;
use chrono::{DateTime, Utc};
use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::LogRecord,
    resource::v1::Resource,
};
use prost::Message;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    event::TraceId,
    proto::{Event, metadata::Metadata},
};

/// The metadata keys an OTLP record's fields are stored under.
pub mod keys {
    pub const SEVERITY_TEXT: &str = "severity_text";
    pub const SEVERITY_NUMBER: &str = "severity_number";
    pub const SPAN_ID: &str = "span_id";
    pub const TRACE_FLAGS: &str = "trace_flags";
    pub const EVENT_NAME: &str = "event_name";
    pub const ATTRIBUTES: &str = "attributes";
    pub const RESOURCE: &str = "resource";
    pub const SCOPE: &str = "scope";
    pub const TIME_SOURCE: &str = "time_source";
    pub const DROPPED_ATTRIBUTES: &str = "dropped_attributes_count";
}

/// The resource attribute that names the service.
const SERVICE_NAME: &str = "service.name";
/// The attribute that carries a record's own id (OpenTelemetry semantic conventions).
const RECORD_UID: &str = "log.record.uid";
/// The service of records whose resource names none.
const UNKNOWN_SERVICE: &str = "unknown_service";
/// Longest service name sluice stores.
const MAX_SERVICE_LEN: usize = 64;
/// The message of a record with neither body nor event name.
const NO_BODY: &str = "-";

/// A record mapped: the event as a native client would have sent it, and its trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub event: Event,
    pub trace_id: Option<TraceId>,
}

/// Maps every record of `request` in order (resource by resource, scope by scope), taking
/// user ids from `user_id_attributes`, with `received` for records that carry no time.
pub fn map_request(
    request: ExportLogsServiceRequest,
    user_id_attributes: &[String],
    received: DateTime<Utc>,
) -> Vec<Mapped> {
    let records = request
        .resource_logs
        .iter()
        .flat_map(|resource| &resource.scope_logs)
        .map(|scope| scope.log_records.len())
        .sum();
    let mut mapped = Vec::with_capacity(records);
    for resource_logs in request.resource_logs {
        let resource = ResourceContext::new(resource_logs.resource, user_id_attributes);
        for scope_logs in resource_logs.scope_logs {
            let scope = ScopeContext::new(&resource, scope_logs.scope);
            for record in scope_logs.log_records {
                mapped.push(scope.map(record, user_id_attributes, received));
            }
        }
    }
    mapped
}

/// What the records of one resource share.
struct ResourceContext {
    service: String,
    /// The resource's attributes, less the user id attribute when it came from there.
    attributes: Map<String, Json>,
    user_id: Option<(String, String)>,
    /// The resource as sent, for record ids.
    encoded: Vec<u8>,
}

impl ResourceContext {
    fn new(resource: Option<Resource>, user_id_attributes: &[String]) -> Self {
        let resource = resource.unwrap_or_default();
        let encoded = resource.encode_to_vec();
        let mut attributes = attributes_json(resource.attributes);
        if resource.dropped_attributes_count > 0 {
            attributes.insert(
                keys::DROPPED_ATTRIBUTES.to_owned(),
                resource.dropped_attributes_count.into(),
            );
        }
        let service = match attributes.get(SERVICE_NAME) {
            Some(Json::String(name)) => normalize_service(name),
            _ => UNKNOWN_SERVICE.to_owned(),
        };
        let user_id = take_user_id(&mut attributes, user_id_attributes);
        Self {
            service,
            attributes,
            user_id,
            encoded,
        }
    }
}

/// What the records of one scope share: the resource's part, the scope's JSON, and a digest
/// already fed with both (each record's id digest starts from a copy).
struct ScopeContext<'a> {
    resource: &'a ResourceContext,
    scope: Option<Json>,
    digest: Sha256,
}

impl<'a> ScopeContext<'a> {
    fn new(resource: &'a ResourceContext, scope: Option<InstrumentationScope>) -> Self {
        let scope = scope.unwrap_or_default();
        let mut digest = Sha256::new();
        digest_part(&mut digest, &resource.encoded);
        digest_part(&mut digest, &scope.encode_to_vec());
        let mut json = Map::new();
        if !scope.name.is_empty() {
            json.insert("name".to_owned(), scope.name.into());
        }
        if !scope.version.is_empty() {
            json.insert("version".to_owned(), scope.version.into());
        }
        if !scope.attributes.is_empty() {
            json.insert(
                keys::ATTRIBUTES.to_owned(),
                Json::Object(attributes_json(scope.attributes)),
            );
        }
        Self {
            resource,
            scope: (!json.is_empty()).then_some(Json::Object(json)),
            digest,
        }
    }

    fn map(
        &self,
        record: LogRecord,
        user_id_attributes: &[String],
        received: DateTime<Utc>,
    ) -> Mapped {
        let mut digest = self.digest.clone();
        digest_part(&mut digest, &record.encode_to_vec());
        let mut attributes = attributes_json(record.attributes);
        let id = match attributes.remove(RECORD_UID) {
            Some(Json::String(uid)) => {
                Uuid::try_parse(&uid).unwrap_or_else(|_| hashed_uuid(Sha256::new(), uid.as_bytes()))
            }
            Some(other) => hashed_uuid(Sha256::new(), other.to_string().as_bytes()),
            None => uuid_of(digest),
        };
        let user_id = take_user_id(&mut attributes, user_id_attributes)
            .or_else(|| self.resource.user_id.clone())
            .map(|(_, id)| id);

        let mut metadata = Map::new();
        let (timestamp, source) = timestamp_of(
            record.time_unix_nano,
            record.observed_time_unix_nano,
            received,
        );
        if let Some(source) = source {
            metadata.insert(keys::TIME_SOURCE.to_owned(), source.into());
        }
        if !record.severity_text.is_empty() {
            metadata.insert(keys::SEVERITY_TEXT.to_owned(), record.severity_text.into());
        }
        if record.severity_number != 0 {
            metadata.insert(
                keys::SEVERITY_NUMBER.to_owned(),
                record.severity_number.into(),
            );
        }
        if !record.span_id.is_empty() {
            metadata.insert(
                keys::SPAN_ID.to_owned(),
                hex::encode(&record.span_id).into(),
            );
        }
        if record.flags != 0 {
            metadata.insert(keys::TRACE_FLAGS.to_owned(), record.flags.into());
        }
        if !record.event_name.is_empty() {
            metadata.insert(
                keys::EVENT_NAME.to_owned(),
                record.event_name.clone().into(),
            );
        }
        if record.dropped_attributes_count > 0 {
            metadata.insert(
                keys::DROPPED_ATTRIBUTES.to_owned(),
                record.dropped_attributes_count.into(),
            );
        }
        if !attributes.is_empty() {
            metadata.insert(keys::ATTRIBUTES.to_owned(), Json::Object(attributes));
        }
        if !self.resource.attributes.is_empty() {
            metadata.insert(
                keys::RESOURCE.to_owned(),
                Json::Object(self.resource.attributes.clone()),
            );
        }
        if let Some(scope) = &self.scope {
            metadata.insert(keys::SCOPE.to_owned(), scope.clone());
        }

        let message = match record.body.and_then(|body| body.value) {
            Some(any_value::Value::StringValue(text)) => text,
            Some(other) => any_value_json(other).to_string(),
            None if !record.event_name.is_empty() => record.event_name,
            None => NO_BODY.to_owned(),
        };
        let trace_id = <[u8; 16]>::try_from(record.trace_id.as_slice())
            .ok()
            .map(TraceId::from_bytes)
            .filter(|trace| *trace != TraceId::INVALID);
        Mapped {
            event: Event {
                id: id.to_string(),
                service: self.resource.service.clone(),
                message,
                timestamp: Some(prost_types::Timestamp {
                    seconds: timestamp.timestamp(),
                    nanos: timestamp.timestamp_subsec_nanos() as i32,
                }),
                user_id: user_id.unwrap_or_default(),
                metadata: (!metadata.is_empty()).then(|| Metadata::from(metadata)),
                ..Default::default()
            },
            trace_id,
        }
    }
}

/// A service name as sluice's rule takes it (`^[a-z0-9][a-z0-9._-]{0,63}$`): lower-cased,
/// every other character `-`, leading characters that cannot start a name dropped, cut to 64
/// bytes; `unknown_service` when nothing is left. `unknown_service:python3` (an SDK's default)
/// becomes `unknown_service-python3`.
pub fn normalize_service(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|character| {
            let character = character.to_ascii_lowercase();
            if character.is_ascii_lowercase()
                || character.is_ascii_digit()
                || matches!(character, '.' | '_' | '-')
            {
                character
            } else {
                '-'
            }
        })
        .collect();
    let mut service = mapped
        .trim_start_matches(|character: char| !character.is_ascii_alphanumeric())
        .to_owned();
    service.truncate(MAX_SERVICE_LEN);
    if service.is_empty() {
        return UNKNOWN_SERVICE.to_owned();
    }
    service
}

/// The event's time, and what it came from when not the record's own `time_unix_nano`.
fn timestamp_of(
    time: u64,
    observed: u64,
    received: DateTime<Utc>,
) -> (DateTime<Utc>, Option<&'static str>) {
    let from_nanos = |nanos: u64| {
        i64::try_from(nanos)
            .ok()
            .map(DateTime::from_timestamp_nanos)
    };
    if time != 0
        && let Some(at) = from_nanos(time)
    {
        return (at, None);
    }
    if observed != 0
        && let Some(at) = from_nanos(observed)
    {
        return (at, Some("observed_time_unix_nano"));
    }
    (received, Some("received"))
}

/// Removes the first of `keys` that holds a usable user id (a non-empty string, or an
/// integer as its decimal text) from `attributes`: the key and the id.
fn take_user_id(attributes: &mut Map<String, Json>, keys: &[String]) -> Option<(String, String)> {
    for key in keys {
        let id = match attributes.get(key) {
            Some(Json::String(text)) if !text.is_empty() => text.clone(),
            Some(Json::Number(number)) if number.is_i64() || number.is_u64() => number.to_string(),
            _ => continue,
        };
        attributes.remove(key);
        return Some((key.clone(), id));
    }
    None
}

/// OTLP attributes as a JSON object; a repeated key keeps its last value.
pub fn attributes_json(attributes: Vec<KeyValue>) -> Map<String, Json> {
    let mut object = Map::with_capacity(attributes.len());
    // `key_strindex` refers to a profiles dictionary: logs carry none.
    for KeyValue { key, value, .. } in attributes {
        let value = value
            .and_then(|AnyValue { value }| value)
            .map_or(Json::Null, any_value_json);
        object.insert(key, value);
    }
    object
}

/// The largest integer JSON readers take exactly (2^53).
const MAX_EXACT_INTEGER: i64 = 1 << 53;

/// An AnyValue as JSON: bytes as base64, integers past 2^53 as decimal text, doubles that JSON
/// cannot hold (NaN, infinities) as text, lists as arrays, key-value lists as objects.
pub fn any_value_json(value: any_value::Value) -> Json {
    match value {
        any_value::Value::StringValue(text) => Json::String(text),
        any_value::Value::BoolValue(flag) => Json::Bool(flag),
        any_value::Value::IntValue(number) if number.unsigned_abs() <= MAX_EXACT_INTEGER as u64 => {
            Json::from(number)
        }
        any_value::Value::IntValue(number) => Json::String(number.to_string()),
        any_value::Value::DoubleValue(number) => serde_json::Number::from_f64(number)
            .map_or_else(|| Json::String(number.to_string()), Json::Number),
        any_value::Value::ArrayValue(array) => Json::Array(
            array
                .values
                .into_iter()
                .map(|AnyValue { value }| value.map_or(Json::Null, any_value_json))
                .collect(),
        ),
        any_value::Value::KvlistValue(list) => Json::Object(attributes_json(list.values)),
        any_value::Value::BytesValue(bytes) => {
            Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        // An index into a profiles dictionary, which logs do not have.
        any_value::Value::StringValueStrindex(_) => Json::Null,
    }
}

/// Feeds one length-prefixed part to a digest, so that parts cannot run into each other.
fn digest_part(digest: &mut Sha256, part: &[u8]) {
    digest.update((part.len() as u64).to_le_bytes());
    digest.update(part);
}

fn hashed_uuid(mut digest: Sha256, bytes: &[u8]) -> Uuid {
    digest.update(bytes);
    uuid_of(digest)
}

/// A version-8 (custom) UUID from a digest's first 16 bytes.
fn uuid_of(digest: Sha256) -> Uuid {
    let hash = digest.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::{ArrayValue, KeyValueList},
        logs::v1::{ResourceLogs, ScopeLogs},
    };

    use super::*;

    fn string(text: &str) -> AnyValue {
        AnyValue {
            value: Some(any_value::Value::StringValue(text.to_owned())),
        }
    }

    fn attribute(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn request(service: Option<&str>, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: service
                        .map(|name| {
                            vec![attribute(
                                SERVICE_NAME,
                                any_value::Value::StringValue(name.to_owned()),
                            )]
                        })
                        .unwrap_or_default(),
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "checkout.payments".to_owned(),
                        version: "1.2.0".to_owned(),
                        ..Default::default()
                    }),
                    log_records: records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn users() -> Vec<String> {
        vec!["enduser.id".to_owned(), "user.id".to_owned()]
    }

    fn received() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("time")
    }

    fn map_one(service: Option<&str>, record: LogRecord) -> Mapped {
        let mut mapped = map_request(request(service, vec![record]), &users(), received());
        assert_eq!(mapped.len(), 1);
        mapped.remove(0)
    }

    fn metadata(mapped: &Mapped) -> Map<String, Json> {
        mapped
            .event
            .metadata
            .clone()
            .map(Metadata::into_object)
            .unwrap_or_default()
    }

    #[test]
    fn a_record_becomes_an_event_with_its_fields_in_metadata() {
        let record = LogRecord {
            time_unix_nano: 1_800_000_000_123_456_789,
            severity_number: 17,
            severity_text: "ERROR".to_owned(),
            body: Some(string("payment declined")),
            attributes: vec![
                attribute(
                    "enduser.id",
                    any_value::Value::StringValue("u-42".to_owned()),
                ),
                attribute("http.status_code", any_value::Value::IntValue(402)),
            ],
            trace_id: vec![0xab; 16],
            span_id: vec![0xcd; 8],
            flags: 1,
            event_name: "payment.declined".to_owned(),
            ..Default::default()
        };
        let mapped = map_one(Some("checkout"), record);
        assert_eq!(mapped.event.service, "checkout");
        assert_eq!(mapped.event.message, "payment declined");
        assert_eq!(mapped.event.user_id, "u-42");
        assert_eq!(
            mapped.event.timestamp,
            Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 123_456_789
            })
        );
        assert_eq!(mapped.trace_id, Some(TraceId::from_bytes([0xab; 16])));
        let metadata = metadata(&mapped);
        assert_eq!(metadata[keys::SEVERITY_TEXT], "ERROR");
        assert_eq!(metadata[keys::SEVERITY_NUMBER], 17);
        assert_eq!(metadata[keys::SPAN_ID], "cdcdcdcdcdcdcdcd");
        assert_eq!(metadata[keys::TRACE_FLAGS], 1);
        assert_eq!(metadata[keys::EVENT_NAME], "payment.declined");
        assert_eq!(
            metadata[keys::ATTRIBUTES],
            serde_json::json!({"http.status_code": 402}),
            "the user id leaves the attributes: privacy sees it once"
        );
        assert_eq!(
            metadata[keys::RESOURCE],
            serde_json::json!({"service.name": "checkout"})
        );
        assert_eq!(
            metadata[keys::SCOPE],
            serde_json::json!({"name": "checkout.payments", "version": "1.2.0"})
        );
        assert!(!metadata.contains_key(keys::TIME_SOURCE));
    }

    #[test]
    fn service_names_are_normalized_never_refused() {
        assert_eq!(
            normalize_service("unknown_service:python3"),
            "unknown_service-python3"
        );
        assert_eq!(normalize_service("Checkout API"), "checkout-api");
        assert_eq!(normalize_service("__svc"), "svc");
        assert_eq!(normalize_service("日本"), UNKNOWN_SERVICE);
        assert_eq!(normalize_service(""), UNKNOWN_SERVICE);
        assert_eq!(normalize_service(&"a".repeat(100)).len(), MAX_SERVICE_LEN);
        for name in [
            "unknown_service:python3",
            "Checkout API",
            "__svc",
            "日本",
            "",
        ] {
            crate::proto::wire::check_service(&normalize_service(name)).expect(name);
        }
        let mapped = map_one(None, LogRecord::default());
        assert_eq!(mapped.event.service, UNKNOWN_SERVICE);
        let mapped = map_one(Some("My Service"), LogRecord::default());
        assert_eq!(mapped.event.service, "my-service");
        assert_eq!(
            metadata(&mapped)[keys::RESOURCE][SERVICE_NAME],
            "My Service",
            "the original name is kept"
        );
    }

    #[test]
    fn the_time_falls_back_to_observed_then_received_and_says_so() {
        let observed = map_one(
            Some("a"),
            LogRecord {
                observed_time_unix_nano: 1_800_000_001_000_000_000,
                ..Default::default()
            },
        );
        assert_eq!(
            observed.event.timestamp.map(|time| time.seconds),
            Some(1_800_000_001)
        );
        assert_eq!(
            metadata(&observed)[keys::TIME_SOURCE],
            "observed_time_unix_nano"
        );
        let unknown = map_one(Some("a"), LogRecord::default());
        assert_eq!(
            unknown.event.timestamp.map(|time| time.seconds),
            Some(received().timestamp())
        );
        assert_eq!(metadata(&unknown)[keys::TIME_SOURCE], "received");
    }

    #[test]
    fn every_any_value_kind_has_a_json_form() {
        let value = any_value::Value::KvlistValue(KeyValueList {
            values: vec![
                attribute("s", any_value::Value::StringValue("text".to_owned())),
                attribute("b", any_value::Value::BoolValue(true)),
                attribute("i", any_value::Value::IntValue(-7)),
                attribute("big", any_value::Value::IntValue(i64::MAX)),
                attribute("d", any_value::Value::DoubleValue(1.5)),
                attribute("nan", any_value::Value::DoubleValue(f64::NAN)),
                attribute("bytes", any_value::Value::BytesValue(vec![0, 1, 2, 255])),
                attribute(
                    "list",
                    any_value::Value::ArrayValue(ArrayValue {
                        values: vec![string("x"), AnyValue { value: None }],
                    }),
                ),
                attribute("dup", any_value::Value::IntValue(1)),
                attribute("dup", any_value::Value::IntValue(2)),
            ],
        });
        assert_eq!(
            any_value_json(value),
            serde_json::json!({
                "s": "text", "b": true, "i": -7, "big": "9223372036854775807", "d": 1.5,
                "nan": "NaN", "bytes": "AAEC/w==", "list": ["x", null], "dup": 2
            })
        );
    }

    #[test]
    fn bodies_that_are_not_strings_are_stored_as_json_and_a_missing_one_as_the_event_name() {
        let structured = map_one(
            Some("a"),
            LogRecord {
                body: Some(AnyValue {
                    value: Some(any_value::Value::KvlistValue(KeyValueList {
                        values: vec![attribute("k", any_value::Value::IntValue(1))],
                    })),
                }),
                ..Default::default()
            },
        );
        assert_eq!(structured.event.message, r#"{"k":1}"#);
        let named = map_one(
            Some("a"),
            LogRecord {
                event_name: "cart.emptied".to_owned(),
                ..Default::default()
            },
        );
        assert_eq!(named.event.message, "cart.emptied");
        assert_eq!(
            map_one(Some("a"), LogRecord::default()).event.message,
            NO_BODY
        );
    }

    #[test]
    fn the_same_record_resent_gets_the_same_id_and_another_record_another() {
        let record = LogRecord {
            time_unix_nano: 1_800_000_000_000_000_000,
            body: Some(string("once")),
            ..Default::default()
        };
        let first = map_one(Some("a"), record.clone());
        let again = map_one(Some("a"), record.clone());
        assert_eq!(first.event.id, again.event.id);
        let other_service = map_one(Some("b"), record.clone());
        assert_ne!(first.event.id, other_service.event.id);
        let other_body = map_one(
            Some("a"),
            LogRecord {
                body: Some(string("twice")),
                ..record
            },
        );
        assert_ne!(first.event.id, other_body.event.id);
        let id = Uuid::try_parse(&first.event.id).expect("uuid");
        assert_eq!(id.get_version_num(), 8);
    }

    #[test]
    fn a_record_uid_is_the_id() {
        let uuid = "0191e4b2-7c1a-7b3e-9f00-1234567890ab";
        let given = map_one(
            Some("a"),
            LogRecord {
                attributes: vec![attribute(
                    RECORD_UID,
                    any_value::Value::StringValue(uuid.to_owned()),
                )],
                ..Default::default()
            },
        );
        assert_eq!(given.event.id, uuid);
        assert!(!metadata(&given).contains_key(keys::ATTRIBUTES));
        let ulid = |text: &str| {
            map_one(
                Some("a"),
                LogRecord {
                    attributes: vec![attribute(
                        RECORD_UID,
                        any_value::Value::StringValue(text.to_owned()),
                    )],
                    ..Default::default()
                },
            )
            .event
            .id
        };
        assert_eq!(
            ulid("01HZX3Y8J0Q4V7W9K2M5N6P8R0"),
            ulid("01HZX3Y8J0Q4V7W9K2M5N6P8R0")
        );
        assert_ne!(
            ulid("01HZX3Y8J0Q4V7W9K2M5N6P8R0"),
            ulid("01HZX3Y8J0Q4V7W9K2M5N6P8R1")
        );
    }

    #[test]
    fn the_user_id_comes_from_the_first_configured_key_record_before_resource() {
        let mut request = request(
            Some("a"),
            vec![
                LogRecord {
                    attributes: vec![attribute("user.id", any_value::Value::IntValue(12_345))],
                    ..Default::default()
                },
                LogRecord::default(),
            ],
        );
        if let Some(resource) = request.resource_logs[0].resource.as_mut() {
            resource.attributes.push(attribute(
                "enduser.id",
                any_value::Value::StringValue("from-resource".to_owned()),
            ));
        }
        let mapped = map_request(request, &users(), received());
        assert_eq!(mapped[0].event.user_id, "12345");
        assert_eq!(mapped[1].event.user_id, "from-resource");
        assert!(
            !metadata(&mapped[1])[keys::RESOURCE]
                .as_object()
                .is_some_and(|resource| resource.contains_key("enduser.id")),
            "the resource's user id leaves its attributes too"
        );
    }

    #[test]
    fn a_trace_id_of_zeros_or_the_wrong_length_is_no_trace() {
        for trace_id in [vec![0; 16], vec![1; 8], Vec::new()] {
            let mapped = map_one(
                Some("a"),
                LogRecord {
                    trace_id,
                    ..Default::default()
                },
            );
            assert_eq!(mapped.trace_id, None);
        }
    }
}
