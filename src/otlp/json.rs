//! OTLP values written straight as the JSON text sluice stores: an attribute list as an
//! object, an AnyValue as its JSON form, with the depth that validation checks counted on the
//! way. No JSON tree is built.

use base64::Engine;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// A JSON object's text, with its entries and depth.
#[derive(Debug, Default)]
pub(super) struct JsonObject {
    pub(super) text: Vec<u8>,
    pub(super) entries: usize,
    pub(super) depth: usize,
}

impl JsonObject {
    /// `attributes` as an object, less those whose key `skip` names; a repeated key is
    /// written twice, and the last one wins where the text is read (PostgreSQL's `jsonb`,
    /// serde_json).
    pub(super) fn of_attributes(attributes: &[KeyValue], skip: impl Fn(&str) -> bool) -> Self {
        let mut object = JsonObject::default();
        object.text.push(b'{');
        let mut deepest = 0;
        for KeyValue { key, value, .. } in attributes {
            if skip(key) {
                continue;
            }
            object.key(key);
            deepest = deepest.max(write_any(&mut object.text, value.as_ref()));
        }
        object.text.push(b'}');
        object.depth = 1 + deepest;
        object
    }

    /// Starts the entry `key` (its value is written next).
    pub(super) fn key(&mut self, key: &str) {
        if self.entries > 0 {
            self.text.push(b',');
        }
        self.entries += 1;
        write_string(&mut self.text, key);
        self.text.push(b':');
    }
}

/// The largest integer JSON readers take exactly (2^53).
const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// Writes an attribute's value (JSON `null` when it has none) and returns its depth.
pub(super) fn write_any(out: &mut Vec<u8>, value: Option<&AnyValue>) -> usize {
    match value.and_then(|value| value.value.as_ref()) {
        Some(value) => write_value(out, value),
        None => {
            out.extend_from_slice(b"null");
            0
        }
    }
}

/// Writes an AnyValue as JSON and returns its depth (0 for a scalar): bytes as base64,
/// integers past 2^53 as decimal text, doubles that JSON cannot hold (NaN, infinities) as
/// text, lists as arrays, key-value lists as objects.
pub(super) fn write_value(out: &mut Vec<u8>, value: &any_value::Value) -> usize {
    match value {
        any_value::Value::StringValue(text) => write_string(out, text),
        any_value::Value::BoolValue(flag) => {
            out.extend_from_slice(if *flag { b"true" } else { b"false" })
        }
        any_value::Value::IntValue(number) if number.unsigned_abs() <= MAX_EXACT_INTEGER => {
            write_display(out, number)
        }
        any_value::Value::IntValue(number) => write_string(out, &number.to_string()),
        any_value::Value::DoubleValue(number) if number.is_finite() => {
            let _ = serde_json::to_writer(&mut *out, number);
        }
        any_value::Value::DoubleValue(number) => write_string(out, &number.to_string()),
        any_value::Value::ArrayValue(array) => {
            out.push(b'[');
            let mut deepest = 0;
            for (index, item) in array.values.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                deepest = deepest.max(write_any(out, Some(item)));
            }
            out.push(b']');
            return 1 + deepest;
        }
        any_value::Value::KvlistValue(list) => {
            let object = JsonObject::of_attributes(&list.values, |_| false);
            out.extend_from_slice(&object.text);
            return object.depth;
        }
        any_value::Value::BytesValue(bytes) => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        // An index into a profiles dictionary, which logs do not have.
        any_value::Value::StringValueStrindex(_) => out.extend_from_slice(b"null"),
    }
    0
}

/// A JSON string, escaped as serde_json escapes it.
pub(super) fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

pub(super) fn write_display(out: &mut Vec<u8>, value: impl std::fmt::Display) {
    use std::io::Write;
    let _ = write!(out, "{value}");
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
    use serde_json::Value as Json;

    use super::*;

    fn attribute(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
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
                        values: vec![
                            AnyValue {
                                value: Some(any_value::Value::StringValue("x".to_owned())),
                            },
                            AnyValue { value: None },
                        ],
                    }),
                ),
                attribute("dup", any_value::Value::IntValue(1)),
                attribute("dup", any_value::Value::IntValue(2)),
            ],
        });
        let mut text = Vec::new();
        assert_eq!(
            write_value(&mut text, &value),
            2,
            "an object holding a list"
        );
        assert_eq!(
            serde_json::from_slice::<Json>(&text).expect("json"),
            serde_json::json!({
                "s": "text", "b": true, "i": -7, "big": "9223372036854775807", "d": 1.5,
                "nan": "NaN", "bytes": "AAEC/w==", "list": ["x", null], "dup": 2
            })
        );
    }
}
