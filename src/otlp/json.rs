//! OTLP values written straight as the JSON text sluice stores: an attribute list as an
//! object, an AnyValue as its JSON form, with the depth that validation checks counted on the
//! way. No JSON tree is built.

use base64::Engine;

use super::wire::{Any, Attribute, Nesting, WireError, items, utf8};
use crate::json_text::{exact_integer, is_plain_ascii, needs_escape};

/// A JSON object's text, with its entries and depth.
#[derive(Debug, Default)]
pub(super) struct JsonObject {
    pub(super) text: Vec<u8>,
    pub(super) entries: usize,
    pub(super) depth: usize,
}

impl JsonObject {
    /// `attributes` as an object, less those whose key `skip` names (their values are still
    /// checked, as a decoder would); a repeated key is written twice, and the last one wins
    /// where the text is read (PostgreSQL's `jsonb`, serde_json).
    pub(super) fn of_attributes(
        attributes: &[Attribute<'_>],
        skip: impl Fn(&[u8]) -> bool,
    ) -> Result<Self, WireError> {
        let mut object = JsonObject::default();
        let written = write_attributes(&mut object.text, attributes, skip)?;
        object.entries = written.entries;
        object.depth = written.depth;
        Ok(object)
    }

    /// Starts the entry `key`, one of sluice's own keys (its value is written next). Those
    /// need no escape, so none is looked for.
    pub(super) fn key(&mut self, key: &'static str) {
        debug_assert!(!needs_escape(key.as_bytes()), "{key}");
        if self.entries > 0 {
            self.text.push(b',');
        }
        self.entries += 1;
        self.text.reserve(key.len() + 3);
        self.text.push(b'"');
        self.text.extend_from_slice(key.as_bytes());
        self.text.extend_from_slice(b"\":");
    }
}

/// What an [`AttributesWriter`] wrote: how many entries, and the object's depth.
pub(super) struct Written {
    pub(super) entries: usize,
    pub(super) depth: usize,
}

/// An attribute list written as a JSON object as its attributes are read, one at a time: a
/// repeated key is written twice, and the last one wins where the text is read
/// (PostgreSQL's `jsonb`, serde_json).
pub(super) struct AttributesWriter {
    entries: usize,
    deepest: usize,
}

impl AttributesWriter {
    /// Opens the object at the end of `out`.
    pub(super) fn open(out: &mut Vec<u8>) -> Self {
        out.push(b'{');
        Self {
            entries: 0,
            deepest: 0,
        }
    }

    /// Writes one attribute as the object's next entry.
    pub(super) fn entry(
        &mut self,
        out: &mut Vec<u8>,
        attribute: &Attribute<'_>,
    ) -> Result<(), WireError> {
        if self.entries > 0 {
            out.push(b',');
        }
        self.entries += 1;
        write_key(out, attribute.key)?;
        if let Some(value) = attribute.value.as_deref()
            && write_common_scalar(out, value)
        {
            return Ok(());
        }
        let depth = write_attribute_value(out, attribute, Nesting::default())?;
        self.deepest = self.deepest.max(depth);
        Ok(())
    }

    /// Checks an attribute that is left out of the object as a decoder would check it, by
    /// writing its value where the text goes and taking it back: no buffer of its own.
    pub(super) fn check(out: &mut Vec<u8>, attribute: &Attribute<'_>) -> Result<(), WireError> {
        let mark = out.len();
        write_attribute_value(out, attribute, Nesting::default())?;
        out.truncate(mark);
        Ok(())
    }

    /// Closes the object.
    pub(super) fn close(self, out: &mut Vec<u8>) -> Written {
        out.push(b'}');
        Written {
            entries: self.entries,
            depth: 1 + self.deepest,
        }
    }
}

/// Writes the AnyValues SDKs send most, without the general reader: a short string that JSON
/// takes as it is (checked and copied in one pass), or a double. False, with nothing
/// written, for any other value.
#[inline]
fn write_common_scalar(out: &mut Vec<u8>, encoded: &[u8]) -> bool {
    match encoded {
        [0x0a, len, text @ ..]
            if *len < 0x80 && usize::from(*len) == text.len() && is_plain_ascii(text) =>
        {
            out.reserve(text.len() + 2);
            out.push(b'"');
            out.extend_from_slice(text);
            out.push(b'"');
            true
        }
        [0x21, bits @ ..] if let Ok(bits) = <[u8; 8]>::try_from(bits) => {
            write_number(out, f64::from_bits(u64::from_le_bytes(bits)))
        }
        _ => false,
    }
}

/// Writes `attributes` as a JSON object, less those `skip` names (whose values are checked
/// all the same).
fn write_attributes(
    out: &mut Vec<u8>,
    attributes: &[Attribute<'_>],
    skip: impl Fn(&[u8]) -> bool,
) -> Result<Written, WireError> {
    let mut object = AttributesWriter::open(out);
    for attribute in attributes {
        if skip(attribute.key) {
            AttributesWriter::check(out, attribute)?;
        } else {
            object.entry(out, attribute)?;
        }
    }
    Ok(object.close(out))
}

/// The largest integer JSON readers take exactly (2^53).
const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// Writes an attribute's value (JSON `null` when it has none) and returns its depth.
fn write_attribute_value(
    out: &mut Vec<u8>,
    attribute: &Attribute<'_>,
    nesting: Nesting,
) -> Result<usize, WireError> {
    write_any(out, attribute.value.as_deref(), nesting)
}

/// Writes an encoded AnyValue (JSON `null` for none, or one with no value) and returns its
/// depth.
fn write_any(
    out: &mut Vec<u8>,
    encoded: Option<&[u8]>,
    nesting: Nesting,
) -> Result<usize, WireError> {
    let nesting = nesting.enter()?;
    match encoded {
        Some(encoded) => write_value(out, &Any::parse(encoded)?, nesting),
        None => {
            out.extend_from_slice(b"null");
            Ok(0)
        }
    }
}

/// Writes an AnyValue as JSON and returns its depth (0 for a scalar): bytes as base64,
/// integers past 2^53 as decimal text, doubles that JSON cannot hold (NaN, infinities) as
/// text, lists as arrays, key-value lists as objects.
pub(super) fn write_value(
    out: &mut Vec<u8>,
    value: &Any<'_>,
    nesting: Nesting,
) -> Result<usize, WireError> {
    match value {
        Any::String(text) => write_string(out, text),
        Any::Bool(flag) => out.extend_from_slice(if *flag { b"true" } else { b"false" }),
        Any::Int(number) if number.unsigned_abs() <= MAX_EXACT_INTEGER => {
            write_integer(out, *number)
        }
        Any::Int(number) => write_string(out, &number.to_string()),
        Any::Double(number) => {
            if !write_number(out, *number) {
                write_string(out, &number.to_string());
            }
        }
        Any::Array(list) => {
            out.push(b'[');
            let mut deepest = 0;
            for (index, item) in items(list, "ArrayValue").enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                deepest = deepest.max(write_any(out, Some(item?), nesting)?);
            }
            out.push(b']');
            return Ok(1 + deepest);
        }
        Any::Kvlist(list) => {
            out.push(b'{');
            let mut deepest = 0;
            for (index, entry) in items(list, "KeyValueList").enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                let attribute = Attribute::parse(entry?)?;
                write_key(out, attribute.key)?;
                deepest = deepest.max(write_attribute_value(out, &attribute, nesting)?);
            }
            out.push(b'}');
            return Ok(1 + deepest);
        }
        Any::Bytes(bytes) => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        Any::Empty | Any::Strindex => out.extend_from_slice(b"null"),
    }
    Ok(0)
}

/// A double as a JSON number: an integer without its fraction when it holds one, as the
/// native path writes it. False, with nothing written, for NaN and the infinities, which JSON
/// has no number for.
fn write_number(out: &mut Vec<u8>, number: f64) -> bool {
    match exact_integer(number) {
        Some(integer) => write_integer(out, integer),
        None if number.is_finite() => {
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &number);
        }
        None => return false,
    }
    true
}

/// An attribute's key and the colon after it: plain ASCII copied as it is (checked in the
/// same pass), anything else checked as UTF-8 and escaped. A key that is not UTF-8 fails the
/// request here, as prost fails it.
fn write_key(out: &mut Vec<u8>, key: &[u8]) -> Result<(), WireError> {
    if is_plain_ascii(key) {
        out.reserve(key.len() + 3);
        out.push(b'"');
        out.extend_from_slice(key);
        out.extend_from_slice(b"\":");
    } else {
        write_string(out, utf8(key)?);
        out.push(b':');
    }
    Ok(())
}

/// A JSON string, escaped as serde_json escapes it.
pub(super) fn write_string(out: &mut Vec<u8>, text: &str) {
    // Most keys and values need no escape: copied as they are.
    if !needs_escape(text.as_bytes()) {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// An integer as JSON: its decimal digits.
pub(super) fn write_integer(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, KeyValue, KeyValueList, any_value,
    };
    use prost::Message;
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
        let value = AnyValue {
            value: Some(any_value::Value::KvlistValue(KeyValueList {
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
                    KeyValue {
                        key: "none".to_owned(),
                        ..Default::default()
                    },
                    attribute("dup", any_value::Value::IntValue(1)),
                    attribute("dup", any_value::Value::IntValue(2)),
                ],
            })),
        }
        .encode_to_vec();
        let mut text = Vec::new();
        let parsed = Any::parse(&value).expect("parses");
        assert_eq!(
            write_value(&mut text, &parsed, Nesting::default()).expect("writes"),
            2,
            "an object holding a list"
        );
        assert_eq!(
            serde_json::from_slice::<Json>(&text).expect("json"),
            serde_json::json!({
                "s": "text", "b": true, "i": -7, "big": "9223372036854775807", "d": 1.5,
                "nan": "NaN", "bytes": "AAEC/w==", "list": ["x", null], "none": null, "dup": 2
            })
        );
    }

    #[test]
    fn the_short_paths_write_what_the_general_writer_writes() {
        let values = [
            any_value::Value::StringValue("eu-west-1".to_owned()),
            any_value::Value::StringValue("quote \" and tab \t".to_owned()),
            any_value::Value::StringValue("café ☕".to_owned()),
            any_value::Value::StringValue("x".repeat(200)),
            any_value::Value::DoubleValue(200.0),
            any_value::Value::DoubleValue(-0.0),
            any_value::Value::DoubleValue(1.5),
            any_value::Value::DoubleValue(9_007_199_254_740_992.0),
            any_value::Value::DoubleValue(f64::NAN),
            any_value::Value::DoubleValue(f64::NEG_INFINITY),
            any_value::Value::IntValue(-7),
            any_value::Value::BoolValue(false),
        ];
        for value in values {
            let encoded = attribute("k", value.clone()).encode_to_vec();
            let parsed = Attribute::parse(&encoded).expect("parses");
            let mut short = Vec::new();
            let mut object = AttributesWriter::open(&mut short);
            object.entry(&mut short, &parsed).expect("writes");
            object.close(&mut short);
            let mut general = b"{\"k\":".to_vec();
            write_value(
                &mut general,
                &parsed.any().expect("any"),
                Nesting::default(),
            )
            .expect("writes");
            general.push(b'}');
            assert_eq!(
                String::from_utf8_lossy(&short),
                String::from_utf8_lossy(&general),
                "{value:?}"
            );
        }
        let mut text = Vec::new();
        assert!(write_number(&mut text, 200.0));
        assert_eq!(
            text, b"200",
            "an integral double as the native path writes it"
        );
    }

    proptest::proptest! {
        #[test]
        fn strings_are_written_as_serde_json_writes_them(text in "\\PC*|[ -~\\x00-\\x1f\"\\\\]{0,40}") {
            let mut ours = Vec::new();
            write_string(&mut ours, &text);
            proptest::prop_assert_eq!(ours, serde_json::to_vec(&text).expect("json"));
        }
    }

    #[test]
    fn escapes_are_found_wherever_they_are_in_a_word() {
        for escape in ['"', '\\', '\n', '\u{1}', '\u{1f}'] {
            for at in 0..20 {
                let mut chars: Vec<char> = "abcdéfghijklmnopqrstu".chars().collect();
                chars.insert(at, escape);
                let text = String::from_iter(chars);
                assert!(needs_escape(text.as_bytes()), "{text:?}");
            }
        }
        assert!(!needs_escape(
            "plain text, ünïcödé, ~ and 0x7f \u{7f}".as_bytes()
        ));
        assert!(!needs_escape(b""));
    }

    #[test]
    fn a_value_nested_past_the_recursion_limit_is_malformed_not_a_stack_overflow() {
        let mut value = AnyValue {
            value: Some(any_value::Value::IntValue(1)),
        };
        for _ in 0..200 {
            value = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue {
                    values: vec![value],
                })),
            };
        }
        let encoded = value.encode_to_vec();
        let parsed = Any::parse(&encoded).expect("the top level parses");
        assert!(write_value(&mut Vec::new(), &parsed, Nesting::default()).is_err());
    }
}
