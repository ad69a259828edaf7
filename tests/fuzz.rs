//! Fuzz-style tests of everything that reads bytes from a peer or from disk: the request
//! decoders (with the streaming Struct decoder), validation, and the spool record format.
//! Arbitrary and mutated inputs must be refused cleanly; nothing may panic.

use chrono::Utc;
use proptest::prelude::*;
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use sluice::{
    config::ValidationConfig,
    ingest::validate::Validator,
    proto::{DeleteRequest, Event, ExportRequest, IngestRequest, Metadata, QueryRequest},
    spool::format::{SegmentFormat, decode_batch, read_frame},
};

/// A valid request with nested metadata, to mutate.
fn seed_request() -> Vec<u8> {
    let now = Utc::now();
    let metadata = Struct {
        fields: [
            (
                "userId".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("u-1".to_owned())),
                },
            ),
            (
                "list".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![
                            Value {
                                kind: Some(Kind::NumberValue(1.5)),
                            },
                            Value {
                                kind: Some(Kind::BoolValue(true)),
                            },
                        ],
                    })),
                },
            ),
        ]
        .into(),
    };
    IngestRequest {
        events: vec![Event {
            id: uuid::Uuid::now_v7().to_string(),
            service: "fuzz".to_owned(),
            message: "seed".to_owned(),
            timestamp: Some(prost_types::Timestamp {
                seconds: now.timestamp(),
                nanos: 0,
            }),
            user_id: String::new(),
            metadata: Some(metadata.into()),
            ingested_at: None,
            trace_id: String::new(),
        }],
        sequence: 7,
    }
    .encode_to_vec()
}

fn validate_all(bytes: &[u8]) {
    if let Ok(request) = IngestRequest::decode(bytes) {
        let limits = ValidationConfig::default();
        let validator = Validator::new(&limits, Utc::now());
        for (index, event) in request.events.into_iter().enumerate() {
            let _ = validator.validate(index as u64, event);
        }
    }
}

/// Arbitrary JSON-like Struct trees, a few levels deep.
fn value_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<f64>().prop_map(Kind::NumberValue),
        ".{0,12}".prop_map(Kind::StringValue),
        any::<bool>().prop_map(Kind::BoolValue),
    ]
    .prop_map(|kind| Value { kind: Some(kind) });
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|values| Value {
                kind: Some(Kind::ListValue(ListValue { values }))
            }),
            prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|fields| Value {
                kind: Some(Kind::StructValue(Struct { fields }))
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_the_request_decoders(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        validate_all(&bytes);
        let _ = QueryRequest::decode(bytes.as_slice());
        let _ = ExportRequest::decode(bytes.as_slice());
        let _ = DeleteRequest::decode(bytes.as_slice());
        let _ = Metadata::decode(bytes.as_slice());
    }

    #[test]
    fn mutated_valid_requests_never_panic_decoding_or_validation(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = seed_request();
        for (at, byte) in edits {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        validate_all(&bytes);
        let cut = cut.index(bytes.len() + 1);
        validate_all(&bytes[..cut]);
    }

    #[test]
    fn struct_metadata_round_trips_through_the_streaming_decoder(
        fields in prop::collection::btree_map(".{0,8}", value_strategy(), 0..6),
    ) {
        let original = Struct { fields };
        let decoded = Metadata::decode(original.encode_to_vec().as_slice())
            .expect("a valid Struct decodes");
        let from_tree = Metadata::from(original.clone());
        prop_assert_eq!(decoded.problem(), from_tree.problem());
        if decoded.problem().is_none() {
            prop_assert_eq!(decoded.as_object(), from_tree.as_object());
            prop_assert_eq!(
                decoded.json_len(),
                serde_json::Value::Object(decoded.as_object().clone()).to_string().len()
            );
            // Re-encoded, it is a Struct that prost reads back to the same JSON.
            let again = Metadata::from(
                Struct::decode(decoded.encode_to_vec().as_slice()).expect("prost decodes")
            );
            prop_assert_eq!(again.as_object(), decoded.as_object());
        }
    }

    #[test]
    fn arbitrary_spool_records_never_panic_the_spool_reader(
        payload in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        for format in [SegmentFormat::Versioned, SegmentFormat::LegacyJson] {
            let _ = decode_batch(format, &payload);
        }
        let _ = read_frame(&mut payload.as_slice());
    }
}
