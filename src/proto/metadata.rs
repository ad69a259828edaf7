//! `google.protobuf.Struct` as sluice decodes it: straight into a JSON object, one map entry at
//! a time, stopping at a size limit without building the tree of protobuf `Value`s.
//!
//! prost's own `Struct` keeps every key and value as a tree of heap objects, 40–60× the wire
//! size: one 16 MB request of 350,000 keys cost 665 MB. Here each entry is converted to JSON as
//! soon as it is read, the JSON length is counted exactly as `serde_json` would write it, and
//! once the object passes [`max_json_bytes`] the rest of the field is skipped, not kept: the
//! event is then rejected as too large. Nested objects and lists decode the same way, so no
//! level can grow past the limit either. prost's recursion limit (100 messages) still bounds
//! nesting; the configured depth is checked by validation on the (bounded) result.
//!
//! On the wire this is exactly `google.protobuf.Struct`: any client, grpcurl and reflection
//! see no difference.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BufMut};
use prost::{
    DecodeError, Message,
    encoding::{
        DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, message, skip_field,
    },
};
use serde_json::{Map, Number, Value as Json};

/// The largest JSON object a decoded Struct may hold; past it, decoding stops keeping
/// entries. Unlimited until the server sets it (clients decode what servers send).
static MAX_JSON_BYTES: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets the decode limit for every Struct decoded in this process (the server sets
/// `validation.max_metadata_bytes` at start).
pub fn set_max_json_bytes(limit: usize) {
    MAX_JSON_BYTES.store(limit, Ordering::Relaxed);
}

/// The decode limit in force.
pub fn max_json_bytes() -> usize {
    MAX_JSON_BYTES.load(Ordering::Relaxed)
}

/// Why a decoded Struct is not usable as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Its JSON passed the limit; decoding stopped keeping entries.
    TooLarge,
    /// A number was NaN or infinite, which JSON cannot hold.
    NonFiniteNumber,
}

/// A `google.protobuf.Struct` held as a JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    object: Map<String, Json>,
    /// Bytes of the entries as compact JSON (`"key":value`), without braces and commas.
    entries_len: usize,
    problem: Option<Problem>,
}

impl Metadata {
    /// The object; empty past a [`Problem::TooLarge`].
    pub fn as_object(&self) -> &Map<String, Json> {
        &self.object
    }

    pub fn into_object(self) -> Map<String, Json> {
        self.object
    }

    pub fn problem(&self) -> Option<Problem> {
        self.problem
    }

    /// The length of the object as compact JSON (at least this much, past a
    /// [`Problem::TooLarge`]).
    pub fn json_len(&self) -> usize {
        2 + self.entries_len + self.object.len().saturating_sub(1)
    }

    /// As prost's `Struct` (for clients that build or read one).
    pub fn to_struct(&self) -> prost_types::Struct {
        json_to_struct(self.object.clone())
    }

    fn insert(&mut self, key: String, value: Decoded, limit: usize) {
        if self.problem.is_some() {
            return;
        }
        if let Some(problem) = value.problem {
            self.fail(problem);
            return;
        }
        if let Some(old) = self.object.get(&key) {
            // A repeated key: the last one wins, as in prost's map.
            self.entries_len -= string_len(&key) + 1 + json_len(old);
        }
        self.entries_len += string_len(&key) + 1 + value.len;
        self.object.insert(key, value.json);
        if self.json_len() > limit {
            self.fail(Problem::TooLarge);
        }
    }

    fn fail(&mut self, problem: Problem) {
        self.problem = Some(problem);
        // Nothing of it will be stored: free it now.
        self.object = Map::new();
    }
}

impl From<Map<String, Json>> for Metadata {
    fn from(object: Map<String, Json>) -> Self {
        let entries_len = object
            .iter()
            .map(|(key, value)| string_len(key) + 1 + json_len(value))
            .sum();
        Self {
            object,
            entries_len,
            problem: None,
        }
    }
}

impl From<prost_types::Struct> for Metadata {
    fn from(fields: prost_types::Struct) -> Self {
        let mut metadata = Self::default();
        for (key, value) in fields.fields {
            metadata.insert(key, Decoded::from_prost(value), usize::MAX);
        }
        metadata
    }
}

/// A value converted to JSON, with its JSON length and any problem found in it.
struct Decoded {
    json: Json,
    len: usize,
    problem: Option<Problem>,
}

impl Decoded {
    fn scalar(json: Json) -> Self {
        let len = json_len(&json);
        Self {
            json,
            len,
            problem: None,
        }
    }

    fn number(number: f64) -> Self {
        match json_number(number) {
            Some(number) => Self::scalar(Json::Number(number)),
            None => Self {
                json: Json::Null,
                len: 4,
                problem: Some(Problem::NonFiniteNumber),
            },
        }
    }

    fn from_wire(value: Option<WireValue>) -> Self {
        match value.and_then(|value| value.kind) {
            None | Some(WireKind::Null(_)) => Self::scalar(Json::Null),
            Some(WireKind::Number(number)) => Self::number(number),
            Some(WireKind::Text(text)) => Self::scalar(Json::String(text)),
            Some(WireKind::Bool(flag)) => Self::scalar(Json::Bool(flag)),
            Some(WireKind::Object(object)) => Self {
                len: object.json_len(),
                problem: object.problem,
                json: Json::Object(object.object),
            },
            Some(WireKind::List(list)) => Self {
                len: list.json_len(),
                problem: list.problem,
                json: Json::Array(list.items),
            },
        }
    }

    fn from_prost(value: prost_types::Value) -> Self {
        use prost_types::value::Kind;
        match value.kind {
            None | Some(Kind::NullValue(_)) => Self::scalar(Json::Null),
            Some(Kind::NumberValue(number)) => Self::number(number),
            Some(Kind::StringValue(text)) => Self::scalar(Json::String(text)),
            Some(Kind::BoolValue(flag)) => Self::scalar(Json::Bool(flag)),
            Some(Kind::StructValue(fields)) => {
                let object = Metadata::from(fields);
                Self {
                    len: object.json_len(),
                    problem: object.problem,
                    json: Json::Object(object.object),
                }
            }
            Some(Kind::ListValue(list)) => {
                let mut items = JsonList::default();
                for item in list.values {
                    items.push(Self::from_prost(item), usize::MAX);
                }
                Self {
                    len: items.json_len(),
                    problem: items.problem,
                    json: Json::Array(items.items),
                }
            }
        }
    }
}

/// Whole numbers within f64's exact integer range are JSON integers; NaN and infinities have
/// no JSON form.
fn json_number(number: f64) -> Option<Number> {
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;
    if number.fract() == 0.0 && number.abs() < EXACT_INTEGER_LIMIT {
        return Some(Number::from(number as i64));
    }
    Number::from_f64(number)
}

/// The length of `value` as compact JSON, as `serde_json` writes it.
fn json_len(value: &Json) -> usize {
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
fn string_len(text: &str) -> usize {
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

fn json_to_value(value: Json) -> prost_types::Value {
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

/// One entry of `Struct.fields` on the wire.
#[derive(Clone, PartialEq, Message)]
struct WireEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<WireValue>,
}

/// `google.protobuf.Value` on the wire; nested objects and lists decode as JSON directly.
#[derive(Clone, PartialEq, Message)]
struct WireValue {
    #[prost(oneof = "WireKind", tags = "1, 2, 3, 4, 5, 6")]
    kind: Option<WireKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum WireKind {
    #[prost(int32, tag = "1")]
    Null(i32),
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    Text(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
    #[prost(message, tag = "5")]
    Object(Metadata),
    #[prost(message, tag = "6")]
    List(JsonList),
}

/// `google.protobuf.ListValue`, decoded straight into JSON within the limit.
#[derive(Debug, Clone, Default, PartialEq)]
struct JsonList {
    items: Vec<Json>,
    items_len: usize,
    problem: Option<Problem>,
}

impl JsonList {
    fn json_len(&self) -> usize {
        2 + self.items_len + self.items.len().saturating_sub(1)
    }

    fn push(&mut self, value: Decoded, limit: usize) {
        if self.problem.is_some() {
            return;
        }
        if let Some(problem) = value.problem {
            self.fail(problem);
            return;
        }
        self.items_len += value.len;
        self.items.push(value.json);
        if self.json_len() > limit {
            self.fail(Problem::TooLarge);
        }
    }

    fn fail(&mut self, problem: Problem) {
        self.problem = Some(problem);
        self.items = Vec::new();
    }
}

/// Struct field 1: `map<string, Value> fields`.
const FIELDS_TAG: u32 = 1;
/// ListValue field 1: `repeated Value values`.
const VALUES_TAG: u32 = 1;

impl Message for Metadata {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_object_body(&self.object, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != FIELDS_TAG || self.problem.is_some() {
            return skip_field(wire_type, tag, buf, ctx);
        }
        let mut entry = WireEntry::default();
        message::merge(wire_type, &mut entry, buf, ctx)?;
        self.insert(entry.key, Decoded::from_wire(entry.value), max_json_bytes());
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        object_len(&self.object)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Message for JsonList {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_list_body(&self.items, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != VALUES_TAG || self.problem.is_some() {
            return skip_field(wire_type, tag, buf, ctx);
        }
        let mut value = WireValue::default();
        message::merge(wire_type, &mut value, buf, ctx)?;
        self.push(Decoded::from_wire(Some(value)), max_json_bytes());
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        list_len(&self.items)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A one-byte key, a length, and `body` bytes.
fn length_delimited_len(body: usize) -> usize {
    1 + encoded_len_varint(body as u64) + body
}

/// The encoded length of a Struct entry message (`key`, `value`).
fn entry_len(key: &str, value: &Json) -> usize {
    length_delimited_len(key.len()) + length_delimited_len(value_len(value))
}

fn encode_entry(key: &str, value: &Json, buf: &mut impl BufMut) {
    encode_key(1, WireType::LengthDelimited, buf);
    encode_varint(key.len() as u64, buf);
    buf.put_slice(key.as_bytes());
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value_len(value) as u64, buf);
    encode_value(value, buf);
}

/// The encoded length of a `google.protobuf.Value` message holding `value`.
fn value_len(value: &Json) -> usize {
    match value {
        Json::Null | Json::Bool(_) => 2,
        Json::Number(_) => 9,
        Json::String(text) => length_delimited_len(text.len()),
        Json::Object(object) => length_delimited_len(object_len(object)),
        Json::Array(items) => length_delimited_len(list_len(items)),
    }
}

fn object_len(object: &Map<String, Json>) -> usize {
    object
        .iter()
        .map(|(key, value)| length_delimited_len(entry_len(key, value)))
        .sum()
}

fn list_len(items: &[Json]) -> usize {
    items
        .iter()
        .map(|item| length_delimited_len(value_len(item)))
        .sum()
}

fn encode_value(value: &Json, buf: &mut impl BufMut) {
    match value {
        Json::Null => {
            encode_key(1, WireType::Varint, buf);
            encode_varint(0, buf);
        }
        Json::Number(number) => {
            encode_key(2, WireType::SixtyFourBit, buf);
            buf.put_f64_le(number.as_f64().unwrap_or_default());
        }
        Json::String(text) => {
            encode_key(3, WireType::LengthDelimited, buf);
            encode_varint(text.len() as u64, buf);
            buf.put_slice(text.as_bytes());
        }
        Json::Bool(flag) => {
            encode_key(4, WireType::Varint, buf);
            encode_varint(u64::from(*flag), buf);
        }
        Json::Object(object) => {
            encode_key(5, WireType::LengthDelimited, buf);
            encode_varint(object_len(object) as u64, buf);
            encode_object_body(object, buf);
        }
        Json::Array(items) => {
            encode_key(6, WireType::LengthDelimited, buf);
            encode_varint(list_len(items) as u64, buf);
            encode_list_body(items, buf);
        }
    }
}

/// The fields of a `Struct` message holding `object`.
fn encode_object_body(object: &Map<String, Json>, buf: &mut impl BufMut) {
    for (key, value) in object {
        encode_key(FIELDS_TAG, WireType::LengthDelimited, buf);
        encode_varint(entry_len(key, value) as u64, buf);
        encode_entry(key, value, buf);
    }
}

/// The fields of a `ListValue` message holding `items`.
fn encode_list_body(items: &[Json], buf: &mut impl BufMut) {
    for item in items {
        encode_key(VALUES_TAG, WireType::LengthDelimited, buf);
        encode_varint(value_len(item) as u64, buf);
        encode_value(item, buf);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{ListValue, Struct, Value, value::Kind};

    use super::*;

    fn value(kind: Kind) -> Value {
        Value { kind: Some(kind) }
    }

    fn sample() -> Struct {
        Struct {
            fields: BTreeMap::from([
                ("n".to_owned(), value(Kind::NumberValue(42.0))),
                ("f".to_owned(), value(Kind::NumberValue(2.5))),
                (
                    "s".to_owned(),
                    value(Kind::StringValue("é \"q\"\n\u{1}".to_owned())),
                ),
                ("b".to_owned(), value(Kind::BoolValue(false))),
                ("z".to_owned(), value(Kind::NullValue(0))),
                (
                    "l".to_owned(),
                    value(Kind::ListValue(ListValue {
                        values: vec![
                            value(Kind::NumberValue(1.0)),
                            value(Kind::StructValue(Struct {
                                fields: BTreeMap::from([(
                                    "deep".to_owned(),
                                    value(Kind::BoolValue(true)),
                                )]),
                            })),
                        ],
                    })),
                ),
            ]),
        }
    }

    #[test]
    fn decodes_what_prost_encodes_and_encodes_what_prost_decodes() {
        let original = sample();
        let decoded = Metadata::decode(original.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.problem(), None);
        let json = Json::Object(decoded.as_object().clone()).to_string();
        assert_eq!(
            json,
            r#"{"b":false,"f":2.5,"l":[1,{"deep":true}],"n":42,"s":"é \"q\"\n\u0001","z":null}"#
        );
        assert_eq!(
            decoded.json_len(),
            json.len(),
            "lengths count as serde_json writes"
        );
        let again = Struct::decode(decoded.encode_to_vec().as_slice()).expect("prost decodes");
        assert_eq!(again, original);
        assert_eq!(decoded.encoded_len(), decoded.encode_to_vec().len());
    }

    #[test]
    fn non_finite_numbers_are_a_problem_not_an_error() {
        let fields = Struct {
            fields: BTreeMap::from([("x".to_owned(), value(Kind::NumberValue(f64::NAN)))]),
        };
        let decoded = Metadata::decode(fields.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.problem(), Some(Problem::NonFiniteNumber));
    }

    #[test]
    fn json_lengths_match_serde_json() {
        for text in [
            r#"{}"#,
            r#"[]"#,
            r#"{"a":[1,2.25,-3,null,true,false,"x\ty"],"b":{"c":{}}}"#,
            r#"{"big":1e300,"neg":-0.5,"ctl":"\u001f\u0000"}"#,
        ] {
            let value: Json = serde_json::from_str(text).expect("json");
            assert_eq!(json_len(&value), value.to_string().len(), "{text}");
        }
    }

    #[test]
    fn depth_counts_objects_and_lists() {
        let value: Json = serde_json::from_str(r#"{"a":[{"b":1}],"c":2}"#).expect("json");
        assert_eq!(depth(&value), 3);
        assert_eq!(depth(&Json::Object(Map::new())), 1);
    }

    #[test]
    fn decoding_stops_keeping_entries_past_the_limit() {
        // This process's limit (nextest runs each test in its own process).
        set_max_json_bytes(1_000);
        let wide = Struct {
            fields: (0..10_000)
                .map(|index| {
                    (
                        format!("key-{index}"),
                        value(Kind::NumberValue(index as f64)),
                    )
                })
                .collect(),
        };
        let decoded = Metadata::decode(wide.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.problem(), Some(Problem::TooLarge));
        assert!(decoded.as_object().is_empty(), "nothing kept");
        // Nested: the inner object stops too, and the outer one inherits the problem.
        let nested = Struct {
            fields: BTreeMap::from([("inner".to_owned(), value(Kind::StructValue(wide)))]),
        };
        let decoded = Metadata::decode(nested.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.problem(), Some(Problem::TooLarge));
        let small = Metadata::decode(sample().encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(small.problem(), None);
        set_max_json_bytes(usize::MAX);
    }
}
