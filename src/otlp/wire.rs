//! OTLP's protobuf read in place: the fields of a message as slices of the request, the
//! attribute lists and AnyValues of `common.v1` as borrowed views. It decodes as prost would
//! (the last of a repeated scalar wins, a message that comes twice is merged, unknown fields
//! are skipped, strings must be UTF-8, a known field with the wrong wire type is an error),
//! without building the request's tree of owned values.

use std::borrow::Cow;

use prost::encoding::decode_varint;
use tonic::Status;

use crate::proto::codec::malformed;

/// Why an encoded OTLP request is not a valid one. prost's own messages where prost would
/// fail it too, so that the answer reads the same as for any request that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Decode(#[from] prost::DecodeError),
    #[error("buffer underflow")]
    Underflow,
    #[error("unexpected group")]
    Group,
    #[error("invalid key value: {0}")]
    Key(u64),
    #[error("{message}.{tag}: invalid wire type")]
    WrongType { message: &'static str, tag: u32 },
    #[error("invalid string value: data is not UTF-8 encoded")]
    NotUtf8,
    #[error("recursion limit reached")]
    TooDeep,
}

/// A malformed request is the client's fault: INVALID_ARGUMENT, field `request`.
impl From<WireError> for Status {
    fn from(error: WireError) -> Self {
        malformed(error)
    }
}

/// How deep AnyValues may nest in one attribute (prost's recursion limit): deeper is a
/// malformed request, not a stack overflow.
const MAX_NESTING: usize = 100;

/// One field's value as it is on the wire.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// The fields of one encoded message, in order.
pub(super) struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    #[inline]
    fn read(&mut self) -> Result<(u32, Value<'a>), WireError> {
        let key = self.varint()?;
        let tag = u32::try_from(key)
            .ok()
            .map(|key| key >> 3)
            .filter(|tag| *tag > 0)
            .ok_or(WireError::Key(key))?;
        let value = match key & 0x07 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take()?)),
            5 => Value::Fixed32(u32::from_le_bytes(self.take()?)),
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= self.rest.len())
                    .ok_or_else(underflow)?;
                let (value, rest) = self.rest.split_at(len);
                self.rest = rest;
                Value::Bytes(value)
            }
            // OTLP defines no groups, and proto3 cannot declare one.
            3 | 4 => return Err(WireError::Group),
            _ => return Err(WireError::Key(key)),
        };
        Ok((tag, value))
    }

    /// A varint: one byte (keys, small lengths and numbers) read here, longer ones by prost.
    #[inline]
    fn varint(&mut self) -> Result<u64, WireError> {
        if let Some((&byte, rest)) = self.rest.split_first()
            && byte < 0x80
        {
            self.rest = rest;
            return Ok(u64::from(byte));
        }
        Ok(decode_varint(&mut self.rest)?)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or_else(underflow)?;
        self.rest = rest;
        Ok(*head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = self.read();
        if field.is_err() {
            self.rest = &[];
        }
        Some(field)
    }
}

fn underflow() -> WireError {
    WireError::Underflow
}

/// The error for a known field sent with another wire type than its own.
pub(super) fn wrong_type(message: &'static str, tag: u32) -> WireError {
    WireError::WrongType { message, tag }
}

/// A string field's text.
pub(super) fn utf8(bytes: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::NotUtf8)
}

/// A message field that may come more than once: the occurrences merged, which for protobuf
/// is reading their concatenation. Borrowed unless it really came twice.
pub(super) fn merge<'a>(before: Option<Cow<'a, [u8]>>, more: &'a [u8]) -> Cow<'a, [u8]> {
    match before {
        None => Cow::Borrowed(more),
        Some(before) => {
            let mut joined = before.into_owned();
            joined.extend_from_slice(more);
            Cow::Owned(joined)
        }
    }
}

/// Checks that the string fields `tags` of a message whose content sluice does not keep
/// (a schema URL's holder, a resource's entity references) are UTF-8, as prost would.
pub(super) fn check_strings(
    bytes: &[u8],
    message: &'static str,
    tags: &[u32],
) -> Result<(), WireError> {
    for field in Fields::new(bytes) {
        match field? {
            (tag, Value::Bytes(text)) if tags.contains(&tag) => {
                utf8(text)?;
            }
            (tag, _) if tags.contains(&tag) => return Err(wrong_type(message, tag)),
            _ => {}
        }
    }
    Ok(())
}

/// One `KeyValue`: its key, and its `AnyValue`'s encoding when it has one.
///
/// The key is checked as UTF-8 where it is used, not here: written into JSON (by
/// `json::write_key`, which checks and escapes in one pass), or found equal to one of the
/// keys sluice looks for (`service.name`, `log.record.uid`, the user id keys), which are text.
/// Every key of a request is one or the other, so a key that is not UTF-8 still fails the
/// request, as prost would fail it.
#[derive(Debug, Clone)]
pub(super) struct Attribute<'a> {
    pub(super) key: &'a [u8],
    pub(super) value: Option<Cow<'a, [u8]>>,
}

impl<'a> Attribute<'a> {
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        // What SDKs send: the key, then the value, each once and shorter than 128 bytes.
        if let [0x0a, key_len, rest @ ..] = bytes
            && let Some((key, [0x12, value_len, value @ ..])) =
                rest.split_at_checked(*key_len as usize)
            && *key_len < 0x80
            && usize::from(*value_len) == value.len()
            && *value_len < 0x80
        {
            return Ok(Self {
                key,
                value: Some(Cow::Borrowed(value)),
            });
        }
        let mut key: &[u8] = &[];
        let mut value = None;
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Bytes(text)) => key = text,
                (2, Value::Bytes(encoded)) => value = Some(merge(value, encoded)),
                // key_strindex: a profiles dictionary index, which logs do not have.
                (3, Value::Varint(_)) => {}
                (tag @ 1..=3, _) => return Err(wrong_type("KeyValue", tag)),
                _ => {}
            }
        }
        Ok(Self { key, value })
    }

    /// The attribute's value (`Empty` when it has none).
    pub(super) fn any(&self) -> Result<Any<'_>, WireError> {
        match &self.value {
            Some(encoded) => Any::parse(encoded),
            None => Ok(Any::Empty),
        }
    }
}

/// The attribute named `key` that wins (the last one), when it has a value.
pub(super) fn last_value<'b>(
    attributes: &'b [Attribute<'_>],
    key: &str,
) -> Result<Option<Any<'b>>, WireError> {
    let Some(attribute) = attributes
        .iter()
        .rev()
        .find(|attribute| attribute.key == key.as_bytes())
    else {
        return Ok(None);
    };
    Ok(match attribute.any()? {
        Any::Empty => None,
        value => Some(value),
    })
}

/// An `AnyValue`: the variant of its `oneof` that came last (lists and key-value lists
/// merged when theirs came more than once in a row, as prost merges them).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Any<'a> {
    Empty,
    String(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// An `ArrayValue`'s encoding.
    Array(Cow<'a, [u8]>),
    /// A `KeyValueList`'s encoding.
    Kvlist(Cow<'a, [u8]>),
    Bytes(&'a [u8]),
    /// An index into a profiles dictionary, which logs do not have.
    Strindex,
}

impl<'a> Any<'a> {
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        // What SDKs send: one short string, one integer, one double or one bool.
        match bytes {
            [0x0a, len, text @ ..] if usize::from(*len) == text.len() && *len < 0x80 => {
                return Ok(Any::String(utf8(text)?));
            }
            [0x21, bits @ ..] if let Ok(bits) = <[u8; 8]>::try_from(bits) => {
                return Ok(Any::Double(f64::from_bits(u64::from_le_bytes(bits))));
            }
            [0x10, flag] if *flag < 0x80 => return Ok(Any::Bool(*flag != 0)),
            [0x18, number @ ..]
                if number.last().is_some_and(|byte| *byte < 0x80)
                    && number[..number.len() - 1].iter().all(|byte| *byte >= 0x80)
                    && number.len() <= 10 =>
            {
                return Ok(Any::Int(decode_varint(&mut &number[..])? as i64));
            }
            _ => {}
        }
        let mut value = Any::Empty;
        for field in Fields::new(bytes) {
            value = match (field?, value) {
                ((1, Value::Bytes(text)), _) => Any::String(utf8(text)?),
                ((2, Value::Varint(flag)), _) => Any::Bool(flag != 0),
                ((3, Value::Varint(number)), _) => Any::Int(number as i64),
                ((4, Value::Fixed64(bits)), _) => Any::Double(f64::from_bits(bits)),
                ((5, Value::Bytes(list)), Any::Array(before)) => {
                    Any::Array(merge(Some(before), list))
                }
                ((5, Value::Bytes(list)), _) => Any::Array(Cow::Borrowed(list)),
                ((6, Value::Bytes(list)), Any::Kvlist(before)) => {
                    Any::Kvlist(merge(Some(before), list))
                }
                ((6, Value::Bytes(list)), _) => Any::Kvlist(Cow::Borrowed(list)),
                ((7, Value::Bytes(bytes)), _) => Any::Bytes(bytes),
                ((8, Value::Varint(_)), _) => Any::Strindex,
                ((tag @ 1..=8, _), _) => return Err(wrong_type("AnyValue", tag)),
                (_, value) => value,
            };
        }
        Ok(value)
    }
}

/// The items of an `ArrayValue` (each an `AnyValue`'s encoding), or the entries of a
/// `KeyValueList` (each a `KeyValue`'s): field 1 of either.
pub(super) fn items<'a>(
    list: &'a [u8],
    message: &'static str,
) -> impl Iterator<Item = Result<&'a [u8], WireError>> {
    Fields::new(list).filter_map(move |field| match field {
        Ok((1, Value::Bytes(item))) => Some(Ok(item)),
        Ok((1, _)) => Some(Err(wrong_type(message, 1))),
        Ok(_) => None,
        Err(error) => Some(Err(error)),
    })
}

/// How many more levels of AnyValue may nest below this one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Nesting(usize);

impl Default for Nesting {
    fn default() -> Self {
        Self(MAX_NESTING)
    }
}

impl Nesting {
    /// One level down, or the error for a request nested too deep.
    pub(super) fn enter(self) -> Result<Self, WireError> {
        self.0.checked_sub(1).map(Self).ok_or(WireError::TooDeep)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, KeyValueList, any_value};
    use prost::Message;

    use super::*;

    fn string(text: &str) -> AnyValue {
        AnyValue {
            value: Some(any_value::Value::StringValue(text.to_owned())),
        }
    }

    #[test]
    fn an_any_value_reads_as_prost_decodes_it_the_last_variant_winning() {
        let list = |key: &str| AnyValue {
            value: Some(any_value::Value::KvlistValue(KeyValueList {
                values: vec![KeyValue {
                    key: key.to_owned(),
                    value: Some(string("v")),
                    ..Default::default()
                }],
            })),
        };
        // Two encodings concatenated are the two messages merged.
        let mut twice = list("a").encode_to_vec();
        twice.extend(list("b").encode_to_vec());
        let merged = AnyValue::decode(twice.as_slice()).expect("prost");
        let Some(any_value::Value::KvlistValue(prost_list)) = merged.value else {
            panic!("prost merges the lists: {merged:?}");
        };
        let Any::Kvlist(ours) = Any::parse(&twice).expect("parses") else {
            panic!("a key-value list");
        };
        assert_eq!(ours.as_ref(), prost_list.encode_to_vec());
        // A string after the list replaces it.
        let mut replaced = list("a").encode_to_vec();
        replaced.extend(string("last").encode_to_vec());
        assert_eq!(Any::parse(&replaced).expect("parses"), Any::String("last"));
        assert_eq!(Any::parse(&[]).expect("parses"), Any::Empty);
    }

    #[test]
    fn the_short_paths_for_what_sdks_send_read_as_the_general_one() {
        let values = [
            any_value::Value::StringValue("eu-west-1".to_owned()),
            any_value::Value::StringValue("x".repeat(200)),
            any_value::Value::IntValue(0),
            any_value::Value::IntValue(200),
            any_value::Value::IntValue(-1),
            any_value::Value::IntValue(i64::MAX),
            any_value::Value::BoolValue(true),
            any_value::Value::DoubleValue(1.5),
        ];
        for value in values {
            let attribute = KeyValue {
                key: "key".to_owned(),
                value: Some(AnyValue { value: Some(value) }),
                ..Default::default()
            };
            let canonical = attribute.encode_to_vec();
            // An unknown field after it takes the general path.
            let mut general = canonical.clone();
            general.extend([0x48, 0x00]);
            let fast = Attribute::parse(&canonical).expect("parses");
            let slow = Attribute::parse(&general).expect("parses");
            assert_eq!(fast.key, slow.key);
            assert_eq!(fast.any().expect("any"), slow.any().expect("any"));
            let encoded = fast.value.clone().expect("a value").into_owned();
            let mut any_general = encoded.clone();
            any_general.extend([0x48, 0x00]);
            assert_eq!(
                Any::parse(&encoded).expect("parses"),
                Any::parse(&any_general).expect("parses"),
                "{attribute:?}"
            );
        }
        // A key that is not UTF-8 is read as its bytes: it fails where it is written.
        assert_eq!(
            Attribute::parse(&[0x0a, 0x01, 0xff, 0x12, 0x00])
                .expect("parses")
                .key,
            [0xff]
        );
        assert!(Any::parse(&[0x0a, 0x01, 0xff]).is_err());
    }

    #[test]
    fn truncation_wrong_wire_types_bad_utf8_and_groups_are_errors() {
        for (case, bytes) in [
            ("truncated length", vec![0x0a, 0x05, b'a']),
            ("string as a varint", vec![0x08, 0x01]),
            ("bool as bytes", vec![0x12, 0x00]),
            ("invalid utf-8", vec![0x0a, 0x01, 0xff]),
            ("a group", vec![0x0b, 0x0c]),
            ("truncated double", vec![0x21, 0x00, 0x00]),
            ("garbage", vec![0xff; 16]),
        ] {
            assert!(Any::parse(&bytes).is_err(), "{case}");
        }
        // Unknown fields are skipped, as prost skips them.
        assert_eq!(
            Any::parse(&[0x48, 0x01, 0x0a, 0x01, b'x']).expect("parses"),
            Any::String("x")
        );
    }

    #[test]
    fn nesting_stops_at_the_recursion_limit() {
        let mut nesting = Nesting::default();
        for _ in 0..MAX_NESTING {
            nesting = nesting.enter().expect("within the limit");
        }
        assert!(nesting.enter().is_err());
    }
}
