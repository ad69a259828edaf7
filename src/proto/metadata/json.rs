//! JSON helpers of the Struct form: lengths as `serde_json` writes them, depth, and the
//! conversion to prost's `Struct`.

use super::*;

/// Whole numbers within f64's exact integer range are JSON integers; NaN and infinities have
/// no JSON form.
pub(super) fn json_number(number: f64) -> Option<Number> {
    match crate::json_text::exact_integer(number) {
        Some(integer) => Some(Number::from(integer)),
        None => Number::from_f64(number),
    }
}

/// The length of `value` as compact JSON, as `serde_json` writes it.
pub(super) fn json_len(value: &Json) -> usize {
    match value {
        Json::Null => 4,
        Json::Bool(true) => 4,
        Json::Bool(false) => 5,
        Json::Number(number) => number.to_string().len(),
        Json::String(text) => string_len(text),
        Json::Array(items) => {
            2 + items.iter().map(json_len).sum::<usize>() + items.len().saturating_sub(1)
        }
        Json::Object(object) => {
            2 + object
                .iter()
                .map(|(key, value)| string_len(key) + 1 + json_len(value))
                .sum::<usize>()
                + object.len().saturating_sub(1)
        }
    }
}

/// The length of `text` as a JSON string, quotes and escapes included.
pub(super) fn string_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\x08' | b'\x0c' | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The depth of a JSON value: an object or list is one level more than its deepest member.
pub fn depth(value: &Json) -> usize {
    match value {
        Json::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Json::Object(object) => 1 + object.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A JSON object as prost's `Struct`.
pub fn json_to_struct(object: Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .into_iter()
            .map(|(key, value)| (key, json_to_value(value)))
            .collect(),
    }
}

pub(super) fn json_to_value(value: Json) -> prost_types::Value {
    use prost_types::value::Kind;
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
    prost_types::Value { kind: Some(kind) }
}
