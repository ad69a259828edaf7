//! The Struct's wire form: `Message` for [`Metadata`] (decoding through the fast path or
//! prost's, encoding the wire [`super::transcode`] wrote from the text), and for the lists
//! prost's path decodes, whose JSON values are encoded as `google.protobuf.Value`s without
//! building prost's tree.

use super::*;

/// One entry of `Struct.fields` on the wire.
#[derive(Clone, PartialEq, Message)]
pub(super) struct WireEntry {
    #[prost(string, tag = "1")]
    pub(super) key: String,
    #[prost(message, optional, tag = "2")]
    pub(super) value: Option<WireValue>,
}

/// `google.protobuf.Value` on the wire; nested objects and lists decode as JSON directly.
#[derive(Clone, PartialEq, Message)]
pub(super) struct WireValue {
    #[prost(oneof = "WireKind", tags = "1, 2, 3, 4, 5, 6")]
    pub(super) kind: Option<WireKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum WireKind {
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
pub(super) struct JsonList {
    pub(super) items: Vec<Json>,
    pub(super) items_len: usize,
    pub(super) problem: Option<Problem>,
}

impl JsonList {
    pub(super) fn json_len(&self) -> usize {
        2 + self.items_len + self.items.len().saturating_sub(1)
    }

    pub(super) fn push(&mut self, value: Decoded, limit: usize) {
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

    pub(super) fn fail(&mut self, problem: Problem) {
        self.problem = Some(problem);
        self.items = Vec::new();
    }
}

/// Struct field 1: `map<string, Value> fields`.
pub(super) const FIELDS_TAG: u32 = 1;
/// ListValue field 1: `repeated Value values`.
pub(super) const VALUES_TAG: u32 = 1;

impl Message for Metadata {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.wire());
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
        let limit = max_json_bytes();
        if wire_type == WireType::LengthDelimited && self.merge_entry_fast(buf, limit) {
            return Ok(());
        }
        // prost's path: encodings the fast path does not take, and every error.
        let mut entry = WireEntry::default();
        message::merge(wire_type, &mut entry, buf, ctx)?;
        self.push_decoded(entry.key, Decoded::from_wire(entry.value), limit);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.wire().len()
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
pub(super) fn length_delimited_len(body: usize) -> usize {
    1 + encoded_len_varint(body as u64) + body
}

/// The encoded length of a Struct entry message (`key`, `value`).
pub(super) fn entry_len(key: &str, value: &Json) -> usize {
    length_delimited_len(key.len()) + length_delimited_len(value_len(value))
}

pub(super) fn encode_entry(key: &str, value: &Json, buf: &mut impl BufMut) {
    encode_key(1, WireType::LengthDelimited, buf);
    encode_varint(key.len() as u64, buf);
    buf.put_slice(key.as_bytes());
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value_len(value) as u64, buf);
    encode_value(value, buf);
}

/// The encoded length of a `google.protobuf.Value` message holding `value`.
pub(super) fn value_len(value: &Json) -> usize {
    match value {
        Json::Null | Json::Bool(_) => 2,
        Json::Number(_) => 9,
        Json::String(text) => length_delimited_len(text.len()),
        Json::Object(object) => length_delimited_len(object_len(object)),
        Json::Array(items) => length_delimited_len(list_len(items)),
    }
}

pub(super) fn object_len(object: &Map<String, Json>) -> usize {
    object
        .iter()
        .map(|(key, value)| length_delimited_len(entry_len(key, value)))
        .sum()
}

pub(super) fn list_len(items: &[Json]) -> usize {
    items
        .iter()
        .map(|item| length_delimited_len(value_len(item)))
        .sum()
}

pub(super) fn encode_value(value: &Json, buf: &mut impl BufMut) {
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
pub(super) fn encode_object_body(object: &Map<String, Json>, buf: &mut impl BufMut) {
    for (key, value) in object {
        encode_key(FIELDS_TAG, WireType::LengthDelimited, buf);
        encode_varint(entry_len(key, value) as u64, buf);
        encode_entry(key, value, buf);
    }
}

/// The fields of a `ListValue` message holding `items`.
pub(super) fn encode_list_body(items: &[Json], buf: &mut impl BufMut) {
    for item in items {
        encode_key(VALUES_TAG, WireType::LengthDelimited, buf);
        encode_varint(value_len(item) as u64, buf);
        encode_value(item, buf);
    }
}
