//! The fast path of decoding a Struct: each entry read from the request's bytes and written
//! straight into the JSON text, for the encoding every protobuf library writes.

use super::*;

/// The fast path gave up on an entry: prost's path decodes it instead (and reports any error
/// in it exactly as prost does).
pub(super) struct Irregular;

/// Nesting the fast path follows; deeper values take prost's path and its recursion limit.
pub(super) const FAST_PATH_LEVELS: usize = 32;

/// Writes one Struct entry, read from a contiguous slice of the request, straight into the
/// JSON text: no key or value is copied anywhere else. It takes the encoding every protobuf
/// library writes (key then value, each field once, no unknown fields, valid UTF-8); anything
/// else is [`Irregular`].
pub(super) struct FastEntry<'a> {
    pub(super) out: &'a mut Vec<u8>,
    pub(super) limit: usize,
    pub(super) depth: usize,
    pub(super) problem: Option<Problem>,
}

impl FastEntry<'_> {
    /// `"key":value`. At the top level, what it says of the user id: `Some(Some(id))` for a
    /// `userId` entry holding one (a non-empty string, or any other value as its compact JSON
    /// text: [`crate::event::user_id_of`]), `Some(None)` for a `userId` entry holding none.
    pub(super) fn write_entry(
        &mut self,
        mut entry: &[u8],
        level: usize,
    ) -> Result<Option<Option<String>>, Irregular> {
        expect_key(&mut entry, 1, WireType::LengthDelimited)?;
        let key = read_length_delimited(&mut entry)?;
        write_json_text(self.out, key)?;
        self.out.push(b':');
        let user_id_entry = level == 1 && key == USER_ID_KEY.as_bytes();
        if entry.is_empty() {
            self.out.extend_from_slice(b"null");
            return Ok(user_id_entry.then_some(None));
        }
        expect_key(&mut entry, 2, WireType::LengthDelimited)?;
        let value = read_length_delimited(&mut entry)?;
        if !entry.is_empty() {
            return Err(Irregular);
        }
        let start = self.out.len();
        let text = self.write_value(value, level)?;
        if !user_id_entry {
            return Ok(None);
        }
        let user_id = match text {
            // Already checked as UTF-8 when written.
            Some(string) => Some(utf8(string)?).filter(|id| !id.is_empty()),
            // Any other value: the JSON text just written, as a user id (none for null).
            None => match &self.out[start..] {
                b"null" => None,
                written => Some(utf8(written)?),
            },
        };
        Ok(Some(user_id.map(str::to_owned)))
    }

    /// A `google.protobuf.Value`; returns the string (UTF-8) when it is one.
    pub(super) fn write_value<'v>(
        &mut self,
        mut value: &'v [u8],
        level: usize,
    ) -> Result<Option<&'v [u8]>, Irregular> {
        if value.is_empty() {
            self.out.extend_from_slice(b"null");
            return Ok(None);
        }
        let (tag, wire_type) = decode_key(&mut value).map_err(|_| Irregular)?;
        let mut text = None;
        match (tag, wire_type) {
            (1, WireType::Varint) => {
                decode_varint(&mut value).map_err(|_| Irregular)?;
                self.out.extend_from_slice(b"null");
            }
            (2, WireType::SixtyFourBit) => {
                let (bytes, rest) = value.split_first_chunk::<8>().ok_or(Irregular)?;
                value = rest;
                match json_number(f64::from_le_bytes(*bytes)) {
                    Some(number) => {
                        // Writing into a Vec cannot fail.
                        let _ = serde_json::to_writer(&mut *self.out, &number);
                    }
                    None => {
                        self.problem = Some(Problem::NonFiniteNumber);
                        self.out.extend_from_slice(b"null");
                    }
                }
            }
            (3, WireType::LengthDelimited) => {
                let string = read_length_delimited(&mut value)?;
                write_json_text(self.out, string)?;
                text = Some(string);
            }
            (4, WireType::Varint) => {
                let flag = decode_varint(&mut value).map_err(|_| Irregular)? != 0;
                self.out
                    .extend_from_slice(if flag { b"true" } else { b"false" });
            }
            (5, WireType::LengthDelimited) => {
                let body = read_length_delimited(&mut value)?;
                self.write_object(body, level + 1)?;
            }
            (6, WireType::LengthDelimited) => {
                let body = read_length_delimited(&mut value)?;
                self.write_list(body, level + 1)?;
            }
            _ => return Err(Irregular),
        }
        if !value.is_empty() {
            return Err(Irregular);
        }
        Ok(text)
    }

    /// A nested `Struct`'s `{…}`. Stops (unclosed) at a problem or past the limit: the whole
    /// metadata is then dropped.
    pub(super) fn write_object(&mut self, mut body: &[u8], level: usize) -> Result<(), Irregular> {
        self.enter(level)?;
        self.out.push(b'{');
        let mut first = true;
        while !body.is_empty() {
            expect_key(&mut body, FIELDS_TAG, WireType::LengthDelimited)?;
            let entry = read_length_delimited(&mut body)?;
            if !std::mem::take(&mut first) {
                self.out.push(b',');
            }
            self.write_entry(entry, level)?;
            if self.stopped() {
                return Ok(());
            }
        }
        self.out.push(b'}');
        Ok(())
    }

    /// A `ListValue`'s `[…]`, stopping as [`Self::write_object`] does.
    pub(super) fn write_list(&mut self, mut body: &[u8], level: usize) -> Result<(), Irregular> {
        self.enter(level)?;
        self.out.push(b'[');
        let mut first = true;
        while !body.is_empty() {
            expect_key(&mut body, VALUES_TAG, WireType::LengthDelimited)?;
            let item = read_length_delimited(&mut body)?;
            if !std::mem::take(&mut first) {
                self.out.push(b',');
            }
            self.write_value(item, level)?;
            if self.stopped() {
                return Ok(());
            }
        }
        self.out.push(b']');
        Ok(())
    }

    pub(super) fn enter(&mut self, level: usize) -> Result<(), Irregular> {
        if level > FAST_PATH_LEVELS {
            return Err(Irregular);
        }
        self.depth = self.depth.max(level);
        Ok(())
    }

    /// Whether a problem was found or the text passed the limit (then marked too large).
    pub(super) fn stopped(&mut self) -> bool {
        if self.problem.is_none() && self.out.len() > self.limit {
            self.problem = Some(Problem::TooLarge);
        }
        self.problem.is_some()
    }
}

/// Reads a field key, which must be `tag` with `wire_type`.
pub(super) fn expect_key(
    input: &mut &[u8],
    tag: u32,
    wire_type: WireType,
) -> Result<(), Irregular> {
    match decode_key(input) {
        Ok(key) if key == (tag, wire_type) => Ok(()),
        _ => Err(Irregular),
    }
}

/// A length-delimited field's body.
pub(super) fn read_length_delimited<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], Irregular> {
    let len = decode_varint(input).map_err(|_| Irregular)?;
    let len = usize::try_from(len).map_err(|_| Irregular)?;
    if len > input.len() {
        return Err(Irregular);
    }
    let (body, rest) = input.split_at(len);
    *input = rest;
    Ok(body)
}

pub(super) fn utf8(bytes: &[u8]) -> Result<&str, Irregular> {
    std::str::from_utf8(bytes).map_err(|_| Irregular)
}

/// Appends a protobuf `string` as a JSON string, escaped as `serde_json` escapes it;
/// [`Irregular`] when it is not UTF-8.
///
/// Keys and values are nearly always ASCII with nothing to escape. Those are checked in one
/// branch-free pass and copied as they are, where validating UTF-8 and then escaping would read
/// every byte twice (BENCHMARKS.md, "Plain ASCII metadata strings").
pub(super) fn write_json_text(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), Irregular> {
    if bytes
        .iter()
        .fold(true, |plain, &byte| plain & needs_no_escape(byte))
    {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return Ok(());
    }
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, utf8(bytes)?);
    Ok(())
}

/// An ASCII byte that JSON strings hold as it is: not a control character, a quote or a
/// backslash (what `serde_json` escapes, which leaves DEL as it is).
pub(super) const fn needs_no_escape(byte: u8) -> bool {
    byte >= 0x20 && byte < 0x80 && byte != b'"' && byte != b'\\'
}

/// A value converted to JSON, with its JSON length and any problem found in it.
pub(super) struct Decoded {
    pub(super) json: Json,
    pub(super) len: usize,
    pub(super) problem: Option<Problem>,
}

impl Decoded {
    pub(super) fn scalar(json: Json) -> Self {
        let len = json_len(&json);
        Self {
            json,
            len,
            problem: None,
        }
    }

    pub(super) fn number(number: f64) -> Self {
        match json_number(number) {
            Some(number) => Self::scalar(Json::Number(number)),
            None => Self {
                json: Json::Null,
                len: 4,
                problem: Some(Problem::NonFiniteNumber),
            },
        }
    }

    pub(super) fn from_wire(value: Option<WireValue>) -> Self {
        match value.and_then(|value| value.kind) {
            None | Some(WireKind::Null(_)) => Self::scalar(Json::Null),
            Some(WireKind::Number(number)) => Self::number(number),
            Some(WireKind::Text(text)) => Self::scalar(Json::String(text)),
            Some(WireKind::Bool(flag)) => Self::scalar(Json::Bool(flag)),
            Some(WireKind::Object(object)) => Self {
                len: object.json_len(),
                problem: object.problem,
                json: Json::Object(object.into_object()),
            },
            Some(WireKind::List(list)) => Self {
                len: list.json_len(),
                problem: list.problem,
                json: Json::Array(list.items),
            },
        }
    }

    pub(super) fn from_prost(value: prost_types::Value) -> Self {
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
                    json: Json::Object(object.into_object()),
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
