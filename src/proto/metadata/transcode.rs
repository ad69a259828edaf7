//! The Struct's wire form written straight from JSON text: one pass of `serde_json`'s parser
//! over the text, each key and value encoded as it is read, with no tree of JSON values or
//! prost `Value`s in between. The read side's events come out of PostgreSQL as `jsonb` text,
//! and this is what they cost to send (BENCHMARKS.md, "Query pages encoded from the stored
//! text").
//!
//! Protobuf writes a nested message's length before its body, and a body's length is known
//! only once it is written: each body is written after a one-byte length, which is widened in
//! place when the body passes 127 bytes (most entries do not).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::*;

/// `google.protobuf.Value` fields.
const NULL_VALUE: u32 = 1;
const NUMBER_VALUE: u32 = 2;
const STRING_VALUE: u32 = 3;
const BOOL_VALUE: u32 = 4;
const STRUCT_VALUE: u32 = 5;
const LIST_VALUE: u32 = 6;
/// Struct entry (`map<string, Value>` entry) fields.
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;

/// A JSON object's text as the body of a `google.protobuf.Struct`, with what [`Metadata`]
/// notes of it.
pub(super) struct Transcoded {
    pub(super) wire: Vec<u8>,
    pub(super) entries: usize,
    pub(super) depth: usize,
    /// The top-level `userId` entry: `Some(None)` when it holds no user id (null, or an empty
    /// string), `Some(Some(id))` for a non-empty string.
    pub(super) user_id: Option<Option<String>>,
    /// The top-level `userId` entry holds a number, a bool, an object or a list, whose user id
    /// is its compact JSON text ([`crate::event::user_id_of`]).
    pub(super) user_id_not_a_string: bool,
}

/// Encodes the JSON object `text` as a Struct's body; an error when `text` is not one JSON
/// object.
pub(super) fn transcode(text: &[u8]) -> Result<Transcoded, serde_json::Error> {
    let mut transcoded = Transcoded {
        // Protobuf of JSON runs close to the text's own size.
        wire: Vec::with_capacity(text.len() + text.len() / 8),
        entries: 0,
        depth: 1,
        user_id: None,
        user_id_not_a_string: false,
    };
    // One check of the whole text rather than one per string (serde_json's slice reader).
    let text = std::str::from_utf8(text)
        .map_err(|_| <serde_json::Error as serde::de::Error>::custom("text is not utf-8"))?;
    let mut parser = serde_json::Deserializer::from_str(text);
    parser.deserialize_map(Object {
        out: &mut transcoded,
        level: 1,
    })?;
    parser.end()?;
    Ok(transcoded)
}

/// Starts a length-delimited field; its body follows, then [`close`] with the mark returned.
fn open(out: &mut Vec<u8>, tag: u32) -> usize {
    encode_key(tag, WireType::LengthDelimited, out);
    out.push(0);
    out.len()
}

/// Writes the length of the body written since `mark`, widening the length in place when it
/// takes more than one byte.
fn close(out: &mut Vec<u8>, mark: usize) {
    let length = out.len() - mark;
    if length < 0x80 {
        out[mark - 1] = length as u8;
        return;
    }
    let mut prefix = Vec::with_capacity(4);
    encode_varint(length as u64, &mut prefix);
    out.splice(mark - 1..mark, prefix);
}

/// The entries of an object, written into `out.wire` as Struct fields.
struct Object<'a> {
    out: &'a mut Transcoded,
    level: usize,
}

impl<'de> DeserializeSeed<'de> for Object<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Object<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        out.depth = out.depth.max(self.level);
        loop {
            let entry = open(&mut out.wire, FIELDS_TAG);
            let Some(user_id_key) = map.next_key_seed(Key { out: &mut out.wire })? else {
                // No entry after all: take back the field just started.
                out.wire.truncate(entry - 2);
                return Ok(());
            };
            let value = open(&mut out.wire, ENTRY_VALUE);
            let user_id_entry = user_id_key && self.level == 1;
            map.next_value_seed(Value {
                out: &mut *out,
                level: self.level,
                user_id_entry,
            })?;
            close(&mut out.wire, value);
            close(&mut out.wire, entry);
            if self.level == 1 {
                out.entries += 1;
            }
        }
    }
}

/// An entry's key, written as its field 1; true when it is `userId`.
struct Key<'a> {
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = bool;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        encode_key(ENTRY_KEY, WireType::LengthDelimited, self.out);
        encode_varint(key.len() as u64, self.out);
        self.out.extend_from_slice(key.as_bytes());
        Ok(key == USER_ID_KEY)
    }
}

/// One JSON value as the body of a `google.protobuf.Value`, at `level` (the object or list
/// holding it is at `level`).
struct Value<'a> {
    out: &'a mut Transcoded,
    level: usize,
    user_id_entry: bool,
}

impl Value<'_> {
    fn scalar_user_id(&mut self, user_id: Option<String>) {
        if self.user_id_entry {
            self.out.user_id = Some(user_id);
            self.out.user_id_not_a_string = false;
        }
    }

    fn not_a_string(&mut self) {
        if self.user_id_entry {
            self.out.user_id = None;
            self.out.user_id_not_a_string = true;
        }
    }

    fn number(mut self, number: f64) {
        self.not_a_string();
        encode_key(NUMBER_VALUE, WireType::SixtyFourBit, &mut self.out.wire);
        self.out.wire.put_f64_le(number);
    }
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(mut self) -> Result<(), E> {
        self.scalar_user_id(None);
        encode_key(NULL_VALUE, WireType::Varint, &mut self.out.wire);
        encode_varint(0, &mut self.out.wire);
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(mut self, flag: bool) -> Result<(), E> {
        self.not_a_string();
        encode_key(BOOL_VALUE, WireType::Varint, &mut self.out.wire);
        encode_varint(u64::from(flag), &mut self.out.wire);
        Ok(())
    }

    // Numbers as `serde_json::Number::as_f64` gives them: a Struct holds doubles.
    fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<(), E> {
        self.number(number as f64);
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<(), E> {
        self.number(number as f64);
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, number: f64) -> Result<(), E> {
        if !number.is_finite() {
            return Err(E::custom("a number JSON cannot hold"));
        }
        self.number(number);
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(mut self, text: &str) -> Result<(), E> {
        self.scalar_user_id((!text.is_empty()).then(|| text.to_owned()));
        encode_key(STRING_VALUE, WireType::LengthDelimited, &mut self.out.wire);
        encode_varint(text.len() as u64, &mut self.out.wire);
        self.out.wire.extend_from_slice(text.as_bytes());
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        self.not_a_string();
        let mark = open(&mut self.out.wire, STRUCT_VALUE);
        Object {
            out: &mut *self.out,
            level: self.level + 1,
        }
        .visit_map(map)?;
        close(&mut self.out.wire, mark);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        self.not_a_string();
        let level = self.level + 1;
        self.out.depth = self.out.depth.max(level);
        let list = open(&mut self.out.wire, LIST_VALUE);
        loop {
            let item = open(&mut self.out.wire, VALUES_TAG);
            let seed = Value {
                out: &mut *self.out,
                level,
                user_id_entry: false,
            };
            if items.next_element_seed(seed)?.is_none() {
                self.out.wire.truncate(item - 2);
                break;
            }
            close(&mut self.out.wire, item);
        }
        close(&mut self.out.wire, list);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    /// What prost reads from the wire written for `text`, and what it reads from the wire
    /// written from the object's tree (the encoding every other path uses).
    fn both_ways(text: &str) -> (prost_types::Struct, prost_types::Struct) {
        let transcoded = transcode(text.as_bytes()).expect("an object");
        let from_text =
            prost_types::Struct::decode(transcoded.wire.as_slice()).expect("prost decodes it");
        let object: Map<String, Json> = serde_json::from_str(text).expect("json");
        (from_text, json_to_struct(object))
    }

    #[test]
    fn the_wire_written_from_text_is_the_struct_of_its_object() {
        for text in [
            "{}",
            r#"{"a": 1, "b": -2.5, "c": "x", "d": true, "e": false, "f": null}"#,
            r#"{"nested": {"deeper": {"list": [1, "two", null, {"k": []}, [[]]]}}, "empty": {}}"#,
            r#"{"escapes": "q\"b\\s\/n\nt\tu\u0001é\ud83d\ude00", "k\u00e9y": "v"}"#,
            r#"{"big": 123456789012345678901234567890, "tiny": 1e-300, "neg": -9223372036854775808}"#,
            r#"{"exact": 0.1000000000000000055511151231257827, "max": 18446744073709551615}"#,
            r#"{"a":1,"b":[true,false]}"#,
        ] {
            let (from_text, from_tree) = both_ways(text);
            assert_eq!(from_text, from_tree, "{text}");
        }
    }

    #[test]
    fn lengths_past_one_byte_are_widened_in_place() {
        for size in [126, 127, 128, 200, 16_383, 16_384, 70_000] {
            let long = "x".repeat(size);
            let text = format!(
                r#"{{"s": "{long}", "list": ["{long}", ["{long}"]], "o": {{"s": "{long}"}}, "after": 1}}"#
            );
            let (from_text, from_tree) = both_ways(&text);
            assert_eq!(from_text, from_tree, "strings of {size} bytes");
        }
    }

    #[test]
    fn entries_depth_and_user_id_are_noted_as_decoding_notes_them() {
        for text in [
            r#"{"userId": "u-1", "a": {"b": [1, {"c": 2}]}}"#,
            r#"{"userId": ""}"#,
            r#"{"userId": null, "x": []}"#,
            r#"{"userId": 42}"#,
            r#"{"userId": {"nested": "no"}, "a": 1}"#,
            r#"{"inner": {"userId": "not top-level"}}"#,
        ] {
            let stored = Metadata::from_stored_text(text.as_bytes().to_vec()).expect("an object");
            let object: Map<String, Json> = serde_json::from_str(text).expect("json");
            let built = Metadata::from(object);
            assert_eq!(stored.entries, built.entries, "{text}");
            assert_eq!(stored.depth(), built.depth(), "{text}");
            assert_eq!(stored.user_id(), built.user_id(), "{text}");
            assert_eq!(stored, built, "{text}");
            assert_eq!(stored.encoded_len(), stored.encode_to_vec().len());
        }
    }

    #[test]
    fn text_that_is_not_one_object_is_an_error() {
        for text in [
            "",
            "[]",
            "1",
            "\"s\"",
            "{",
            r#"{"a": }"#,
            "{} {}",
            r#"{"a": 1} x"#,
        ] {
            assert!(transcode(text.as_bytes()).is_err(), "{text:?}");
        }
        assert!(transcode(b"{\"a\": \"\xff\"}").is_err(), "not utf-8");
    }

    fn json_value() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<f64>()
                .prop_filter("finite", |number| number.is_finite())
                .prop_map(Json::from),
            any::<String>().prop_map(Json::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Json::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|entries| Json::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_object_encodes_as_from_its_tree(
            entries in proptest::collection::btree_map(any::<String>(), json_value(), 0..12),
            pretty in any::<bool>(),
        ) {
            let object: Map<String, Json> = entries.into_iter().collect();
            let text = if pretty {
                serde_json::to_string_pretty(&object)
            } else {
                serde_json::to_string(&object)
            }
            .expect("serializes");
            let (from_text, from_tree) = both_ways(&text);
            prop_assert_eq!(from_text, from_tree);
        }
    }
}
