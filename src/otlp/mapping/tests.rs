//! The mapping's tests: records built with the generated OTLP types, encoded, mapped.

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
};
use prost::Message;

use serde_json::{Map, Value as Json};

use uuid::Uuid;

use super::*;
use crate::proto::metadata::Metadata;

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

/// One record mapped, as the tests look at it.
#[derive(Debug, PartialEq)]
struct Mapped {
    event: Event,
    id: Uuid,
    trace_id: Option<TraceId>,
}

fn records(mapped: MappedRequest) -> Vec<Mapped> {
    mapped
        .events
        .into_iter()
        .zip(mapped.ids)
        .zip(mapped.trace_ids)
        .map(|((event, id), trace_id)| Mapped {
            event,
            id,
            trace_id,
        })
        .collect()
}

fn map_bytes(request: &[u8]) -> Result<MappedRequest, WireError> {
    map_request(request, count_records(request), &users(), received())
}

fn map(request: &ExportLogsServiceRequest) -> Vec<Mapped> {
    records(map_bytes(&request.encode_to_vec()).expect("maps"))
}

fn map_one(service: Option<&str>, record: LogRecord) -> Mapped {
    let mut mapped = map(&request(service, vec![record]));
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
fn the_metadata_written_as_text_knows_its_depth_as_validation_counts_it() {
    let nested = any_value::Value::KvlistValue(KeyValueList {
        values: vec![attribute(
            "inner",
            any_value::Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(any_value::Value::KvlistValue(KeyValueList {
                        values: vec![attribute("leaf", any_value::Value::IntValue(1))],
                    })),
                }],
            }),
        )],
    });
    let mapped = map_one(
        Some("a"),
        LogRecord {
            attributes: vec![attribute("outer", nested)],
            ..Default::default()
        },
    );
    let written = mapped.event.metadata.clone().expect("metadata");
    let parsed = Json::Object(metadata(&mapped));
    assert_eq!(written.depth(), crate::proto::metadata::depth(&parsed));
    assert_eq!(
        written.depth(),
        5,
        "metadata, attributes, outer, the list, {{leaf}}"
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
    assert_eq!(first.id, again.id);
    let other_service = map_one(Some("b"), record.clone());
    assert_ne!(first.id, other_service.id);
    let other_body = map_one(
        Some("a"),
        LogRecord {
            body: Some(string("twice")),
            ..record
        },
    );
    assert_ne!(first.id, other_body.id);
    // Handed over as a UUID, not as text for validation to parse again.
    assert!(first.event.id.is_empty());
    let id = first.id;
    assert_eq!(id.get_version_num(), 8);
}

#[test]
fn ids_grow_with_the_records_time_and_a_record_without_one_keeps_its_id_on_a_retry() {
    let at = |nanos: u64, observed: u64, body: &str| LogRecord {
        time_unix_nano: nanos,
        observed_time_unix_nano: observed,
        body: Some(string(body)),
        ..Default::default()
    };
    let id = |record: LogRecord, received: DateTime<Utc>| {
        let encoded = request(Some("a"), vec![record]).encode_to_vec();
        let mapped = map_request(&encoded, 1, &users(), received).expect("maps");
        mapped.ids[0]
    };
    let second = 1_000_000_000;
    // Later records get greater ids, whatever their hash: the key's B-tree appends.
    let ids: Vec<Uuid> = (0..50)
        .map(|n| {
            id(
                at(
                    1_800_000_000 * second + n * 1_000_000,
                    0,
                    &format!("r{}", 50 - n),
                ),
                received(),
            )
        })
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    for (n, id) in ids.iter().enumerate() {
        let millis = u128::from_be_bytes(*id.as_bytes()) >> 80;
        assert_eq!(
            millis,
            1_800_000_000_000 + n as u128,
            "the first 48 bits are the time in ms"
        );
        assert_eq!(id.get_version_num(), 8);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
    }
    // Records of the same millisecond differ by their hash.
    assert_ne!(
        id(at(1_800_000_000 * second, 0, "x"), received()),
        id(at(1_800_000_000 * second + 1, 0, "x"), received())
    );
    // The observed time orders a record without its own time.
    let observed = id(at(0, 1_800_000_000 * second, "o"), received());
    assert_eq!(&observed.as_bytes()[..6], &ids[0].as_bytes()[..6]);
    // Without either, the receive time is no part of the id: a retry has the same one.
    let later = received() + chrono::Duration::seconds(30);
    assert_eq!(id(at(0, 0, "n"), received()), id(at(0, 0, "n"), later));
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
    assert_eq!(given.id.to_string(), uuid);
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
    let mapped = map(&request);
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
fn the_user_id_key_that_wins_leaves_the_attributes_and_the_other_keys_stay() {
    let text = |text: &str| any_value::Value::StringValue(text.to_owned());
    let mapped = map_one(
        Some("a"),
        LogRecord {
            attributes: vec![
                attribute("user.id", any_value::Value::IntValue(7)),
                attribute("region", text("eu")),
                attribute("enduser.id", text("first")),
                attribute(RECORD_UID, text("01HZX3Y8J0Q4V7W9K2M5N6P8R0")),
                attribute("enduser.id", text("u-42")),
                attribute("region", text("us")),
            ],
            ..Default::default()
        },
    );
    assert_eq!(
        mapped.event.user_id, "u-42",
        "the last value of the first key"
    );
    assert_eq!(
        metadata(&mapped)[keys::ATTRIBUTES],
        serde_json::json!({"region": "us", "user.id": 7}),
        "the winning key and the record uid leave, the other user key stays, the last region wins"
    );
}

#[test]
fn a_request_reads_as_prost_decodes_it_merged_fields_and_unknown_ones_included() {
    let record = LogRecord {
        time_unix_nano: 1_800_000_000_000_000_000,
        body: Some(string("first")),
        attributes: vec![attribute("k", any_value::Value::IntValue(1))],
        ..Default::default()
    };
    let mut encoded = record.encode_to_vec();
    // A second body merges into the first (a string replaces a string), a second
    // time_unix_nano wins, an unknown field (tag 40) is skipped.
    encoded.extend(
        LogRecord {
            time_unix_nano: 1_800_000_002_000_000_000,
            body: Some(string("second")),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    encoded.extend([0xc0, 0x02, 0x07]);
    let decoded = LogRecord::decode(encoded.as_slice()).expect("prost decodes it");
    let ours = map(&request(Some("a"), vec![decoded]));
    let mut scope_logs =
        request(Some("a"), Vec::new()).resource_logs[0].scope_logs[0].encode_to_vec();
    scope_logs.push(0x12);
    prost::encoding::encode_varint(encoded.len() as u64, &mut scope_logs);
    scope_logs.extend(&encoded);
    let mut resource_logs = request(Some("a"), Vec::new()).resource_logs[0].clone();
    resource_logs.scope_logs.clear();
    let mut resource_logs = resource_logs.encode_to_vec();
    resource_logs.push(0x12);
    prost::encoding::encode_varint(scope_logs.len() as u64, &mut resource_logs);
    resource_logs.extend(&scope_logs);
    let mut sent = vec![0x0a];
    prost::encoding::encode_varint(resource_logs.len() as u64, &mut sent);
    sent.extend(&resource_logs);
    let mapped = records(map_bytes(&sent).expect("maps"));
    assert_eq!(count_records(&sent), 1);
    assert_eq!(mapped.len(), 1);
    assert_eq!(mapped[0].event.message, "second");
    assert_eq!(mapped[0].event.message, ours[0].event.message);
    assert_eq!(mapped[0].event.timestamp, ours[0].event.timestamp);
    assert_eq!(metadata(&mapped[0]), metadata(&ours[0]));
}

#[test]
fn a_malformed_request_is_an_error_not_a_partial_mapping() {
    let good = request(Some("a"), vec![LogRecord::default()]).encode_to_vec();
    let mut bad_utf8 = request(
        Some("a"),
        vec![LogRecord {
            severity_text: "x".to_owned(),
            ..Default::default()
        }],
    )
    .encode_to_vec();
    let at = bad_utf8
        .iter()
        .rposition(|byte| *byte == b'x')
        .expect("the text");
    bad_utf8[at] = 0xff;
    let mut truncated = good.clone();
    truncated.pop();
    // Attribute keys are checked where they are written: in a record, in a list nested
    // in one, and in the resource.
    let bad_key = |record: LogRecord, resource_key: &str| {
        let mut request = request(Some("a"), vec![record]);
        if let Some(resource) = request.resource_logs[0].resource.as_mut() {
            resource.attributes.push(attribute(
                resource_key,
                any_value::Value::StringValue("v".to_owned()),
            ));
        }
        let mut bytes = request.encode_to_vec();
        let at = bytes
            .windows(4)
            .rposition(|window| window == b"k\xc3\xa9y")
            .expect("the key");
        bytes[at + 1] = 0xff;
        bytes
    };
    let with_key = |key: &str| LogRecord {
        attributes: vec![attribute(key, any_value::Value::IntValue(1))],
        ..Default::default()
    };
    let nested = LogRecord {
        attributes: vec![attribute(
            "list",
            any_value::Value::KvlistValue(KeyValueList {
                values: vec![attribute("kéy", any_value::Value::IntValue(1))],
            }),
        )],
        ..Default::default()
    };
    for (case, bytes) in [
        ("a record's key", bad_key(with_key("kéy"), "r")),
        ("a nested key", bad_key(nested, "r")),
        ("a resource's key", bad_key(with_key("k"), "kéy")),
    ] {
        assert!(
            map_bytes(&bytes).is_err(),
            "a key that is not utf-8: {case}"
        );
    }
    for (case, bytes) in [
        ("garbage", vec![0xff; 16]),
        ("truncated", truncated),
        ("invalid utf-8 in a record", bad_utf8),
        ("resource_logs as a varint", vec![0x08, 0x01]),
    ] {
        assert!(map_bytes(&bytes).is_err(), "{case}");
    }
    assert_eq!(map_bytes(&good).expect("maps").events.len(), 1);
    assert_eq!(map_bytes(&[]).expect("maps"), MappedRequest::default());
}

#[test]
fn records_are_counted_across_resources_and_scopes() {
    let mut request = request(Some("a"), vec![LogRecord::default(); 3]);
    let resource = request.resource_logs[0].clone();
    request.resource_logs.push(resource);
    request.resource_logs[1].scope_logs.push(ScopeLogs {
        log_records: vec![LogRecord::default(); 2],
        ..Default::default()
    });
    assert_eq!(count_records(&request.encode_to_vec()), 8);
    assert_eq!(map(&request).len(), 8);
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
