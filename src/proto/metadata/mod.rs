//! `google.protobuf.Struct` as sluice decodes it: straight into the compact JSON text that is
//! stored, one map entry at a time, stopping at a size limit without building the tree of
//! protobuf `Value`s or a JSON map.
//!
//! prost's own `Struct` keeps every key and value as a tree of heap objects, 40–60× the wire
//! size: one 16 MB request of 350,000 keys cost 665 MB. Here each entry is written as JSON as
//! soon as it is read, from the request's bytes (strings escaped as `serde_json` escapes them),
//! and once the text passes [`max_json_bytes`] the rest of the field is skipped, not kept: the
//! event is then rejected as too large. Nested objects and lists are written the same way, so
//! no level can grow past the limit either. Depth and the top-level `userId` are noted on the
//! way; the configured depth is checked by validation.
//!
//! The fast path takes the encoding every protobuf library writes. Anything else (a value
//! before its key, unknown fields, nesting past [`FAST_PATH_LEVELS`]) and every malformed
//! entry goes through prost's decoding instead, so its errors and its recursion limit (100
//! messages) apply unchanged. The object form is parsed from the text only when asked for
//! (queries, clients). Per event this is one buffer instead of dozens of allocations
//! (BENCHMARKS.md, "Performance").
//!
//! On the wire this is exactly `google.protobuf.Struct`: any client, grpcurl and reflection
//! see no difference.
//!
//! Sending is the same in reverse: the wire form is written from the text in one pass of
//! serde_json's parser ([`transcode`]), without a tree, and the read side hands it the text
//! PostgreSQL stored.
//!
//! Here: the [`Metadata`] type, its limits and conversions; [`fast`] is the fast decoding
//! path, [`wire`] prost's path and the lists' encoding, [`transcode`] the encoding from text,
//! [`json`] the JSON lengths and depth.

use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use bytes::{Buf, BufMut};
use prost::{
    DecodeError, Message,
    encoding::{
        DecodeContext, WireType, decode_key, decode_varint, encode_key, encode_varint,
        encoded_len_varint, message, skip_field,
    },
};
use serde_json::{Map, Number, Value as Json};

mod fast;
mod json;
mod transcode;
mod wire;

use fast::*;
use json::*;
pub use json::{depth, json_to_struct};
use transcode::*;
use wire::*;

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

/// A `google.protobuf.Struct` held as compact JSON text, the form it is stored in.
///
/// Decoded, it is the text and nothing else: no map, no tree of values, one buffer. The object
/// form ([`Self::as_object`]) is parsed from the text on first use and kept (the read side and
/// clients use it); built from an object, it keeps both.
///
/// A key repeated on the wire is written twice into the text, as PostgreSQL's `jsonb` input
/// accepts it: the last value wins there and in [`Self::as_object`], as in prost's map, and
/// [`Self::json_len`] counts both (the size limit errs on the safe side).
#[derive(Clone)]
pub struct Metadata {
    /// JSON of an object, always valid UTF-8 and always closed (`{…}`): compact when decoded
    /// or built here, as PostgreSQL's `jsonb` writes it when read from the store.
    text: Vec<u8>,
    entries: usize,
    /// The deepest nesting: 1 for an object of scalars.
    depth: usize,
    /// The last top-level `userId` entry, when it is a non-empty string.
    user_id: Option<String>,
    problem: Option<Problem>,
    /// Past a [`Problem::TooLarge`]: the length reached when decoding stopped.
    stopped_at: usize,
    object: OnceLock<Map<String, Json>>,
    /// The Struct's body on the wire, written from the text when first encoded.
    wire: OnceLock<Vec<u8>>,
}

impl Default for Metadata {
    fn default() -> Self {
        Self {
            text: b"{}".to_vec(),
            entries: 0,
            depth: 1,
            user_id: None,
            problem: None,
            stopped_at: 0,
            object: OnceLock::new(),
            wire: OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Metadata")
            .field("json", &String::from_utf8_lossy(&self.text))
            .field("problem", &self.problem)
            .finish()
    }
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Self) -> bool {
        self.problem == other.problem && self.as_object() == other.as_object()
    }
}

impl Metadata {
    /// The object; empty past a [`Problem`].
    /// Metadata from compact JSON text written elsewhere (an object of `entries` entries,
    /// `depth` deep, no top-level `userId`): neither parsed nor copied. The OTLP mapping writes
    /// its records' metadata this way.
    pub(crate) fn from_object_text(text: Vec<u8>, entries: usize, depth: usize) -> Self {
        // Every field named: `..Self::default()` would allocate the default's text, only to
        // drop it (once per OTLP record).
        Self {
            text,
            entries,
            depth,
            user_id: None,
            problem: None,
            stopped_at: 0,
            object: OnceLock::new(),
            wire: OnceLock::new(),
        }
    }

    /// Metadata read back from the store: the text of a JSON object as PostgreSQL's `jsonb`
    /// writes it (`", "` and `": "` between entries), neither copied nor parsed into a tree.
    /// Its wire form is written in the pass that checks it ([`transcode`]); an error when the
    /// text is not one JSON object.
    pub fn from_stored_text(text: Vec<u8>) -> Result<Self, serde_json::Error> {
        let transcoded = transcode(&text)?;
        let mut metadata = Self {
            text,
            entries: transcoded.entries,
            depth: transcoded.depth,
            user_id: transcoded.user_id.flatten(),
            problem: None,
            stopped_at: 0,
            object: OnceLock::new(),
            wire: OnceLock::from(transcoded.wire),
        };
        if transcoded.user_id_not_a_string {
            metadata.user_id = metadata
                .as_object()
                .get(USER_ID_KEY)
                .and_then(crate::event::user_id_of);
        }
        Ok(metadata)
    }

    /// The Struct's body on the wire.
    fn wire(&self) -> &[u8] {
        self.wire.get_or_init(|| {
            // The text is always one JSON object (written here, or checked when read from
            // the store); a failure would be a bug, never input.
            transcode(&self.text)
                .map(|transcoded| transcoded.wire)
                .unwrap_or_default()
        })
    }

    pub fn as_object(&self) -> &Map<String, Json> {
        self.object.get_or_init(|| self.parse())
    }

    pub fn into_object(mut self) -> Map<String, Json> {
        match self.object.take() {
            Some(object) => object,
            None => self.parse(),
        }
    }

    /// The object as compact JSON text (`{}` past a [`Problem`]).
    pub fn into_json(self) -> String {
        // Only whole UTF-8 strings and ASCII are ever written into the text.
        String::from_utf8(self.text)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
    }

    pub fn problem(&self) -> Option<Problem> {
        self.problem
    }

    /// The length of the object as compact JSON (at least this much, past a
    /// [`Problem::TooLarge`]); read from the store, the length of its stored text.
    pub fn json_len(&self) -> usize {
        match self.problem {
            Some(Problem::TooLarge) => self.stopped_at,
            _ => self.text.len(),
        }
    }

    /// How deeply objects and lists nest: 1 for an object of scalars (see [`depth`]).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The top-level `userId` entry, when it is a non-empty string.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// As prost's `Struct` (for clients that build or read one).
    pub fn to_struct(&self) -> prost_types::Struct {
        json_to_struct(self.as_object().clone())
    }

    fn parse(&self) -> Map<String, Json> {
        if self.problem.is_some() {
            return Map::new();
        }
        // The text was written as JSON here; a failure would be a bug, never input.
        serde_json::from_slice(&self.text).unwrap_or_default()
    }

    /// Reopens the object for one more entry: drops the closing brace, adds a comma.
    fn open_entry(&mut self) -> usize {
        self.text.pop();
        if self.entries > 0 {
            self.text.push(b',');
        }
        self.text.len()
    }

    /// Closes the object after an entry written from `mark` on, or stops at a problem or past
    /// the size limit (keeping nothing: nothing of it will be stored).
    fn close_entry(&mut self, problem: Option<Problem>, limit: usize) {
        self.text.push(b'}');
        self.entries += 1;
        let problem = problem.or((self.text.len() > limit).then_some(Problem::TooLarge));
        if let Some(problem) = problem {
            self.fail(problem);
        }
    }

    fn fail(&mut self, problem: Problem) {
        self.stopped_at = self.text.len();
        self.problem = Some(problem);
        self.text = b"{}".to_vec();
        self.entries = 0;
        self.user_id = None;
        self.object = OnceLock::new();
        self.wire = OnceLock::new();
    }

    /// One entry the fast path could not take (see [`FastEntry`]), decoded by prost.
    fn push_decoded(&mut self, key: String, value: Decoded, limit: usize) {
        if let Some(problem) = value.problem {
            self.fail(problem);
            return;
        }
        if key == USER_ID_KEY {
            self.user_id = crate::event::user_id_of(&value.json);
        }
        self.depth = self.depth.max(1 + depth(&value.json));
        self.open_entry();
        write_json(&mut self.text, &Json::String(key));
        self.text.push(b':');
        write_json(&mut self.text, &value.json);
        self.close_entry(None, limit);
    }

    /// Decodes the entry at the head of `buf` with the fast path; false (nothing consumed,
    /// nothing kept) when it is not one the fast path takes.
    fn merge_entry_fast(&mut self, buf: &mut impl Buf, limit: usize) -> bool {
        let chunk = buf.chunk();
        let mut input = chunk;
        let Ok(entry) = read_length_delimited(&mut input) else {
            return false;
        };
        let consumed = chunk.len() - input.len();
        // The JSON of an entry is about its wire size; metadata entries tend to be alike, so
        // the first one sizes the text for a few more (one allocation for most events), never
        // past the limit (a larger text is dropped anyway).
        let entries_ahead = if self.entries == 0 { 4 } else { 1 };
        let wanted = entry.len().saturating_mul(entries_ahead).saturating_add(2);
        self.text
            .reserve(wanted.min(limit.saturating_add(2).saturating_sub(self.text.len())));
        let mark = self.open_entry();
        let mut writer = FastEntry {
            out: &mut self.text,
            limit,
            depth: 1,
            problem: None,
        };
        match writer.write_entry(entry, 1) {
            Ok(user_id) => {
                let (depth, problem) = (writer.depth, writer.problem);
                if let Some(user_id) = user_id {
                    self.user_id = user_id;
                }
                self.depth = self.depth.max(depth);
                self.close_entry(problem, limit);
                buf.advance(consumed);
                true
            }
            Err(Irregular) => {
                self.text.truncate(mark);
                if self.entries > 0 {
                    self.text.pop();
                }
                self.text.push(b'}');
                false
            }
        }
    }
}

impl From<Map<String, Json>> for Metadata {
    fn from(object: Map<String, Json>) -> Self {
        let mut text = Vec::new();
        write_json(&mut text, &object);
        let user_id = object.get(USER_ID_KEY).and_then(crate::event::user_id_of);
        Self {
            text,
            entries: object.len(),
            depth: 1 + object.values().map(depth).max().unwrap_or(0),
            user_id,
            problem: None,
            stopped_at: 0,
            object: OnceLock::from(object),
            wire: OnceLock::new(),
        }
    }
}

impl From<prost_types::Struct> for Metadata {
    fn from(fields: prost_types::Struct) -> Self {
        let mut object = Map::new();
        for (key, value) in fields.fields {
            let decoded = Decoded::from_prost(value);
            if let Some(problem) = decoded.problem {
                let mut metadata = Self::default();
                metadata.fail(problem);
                return metadata;
            }
            object.insert(key, decoded.json);
        }
        Self::from(object)
    }
}

/// The key whose string value is the event's user id when `user_id` is empty.
const USER_ID_KEY: &str = "userId";

/// Appends `value` as compact JSON.
fn write_json(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    // Writing into a Vec cannot fail, and a `Value` always serializes.
    let _ = serde_json::to_writer(out, value);
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

    /// A Struct entry written by hand: `fields` are (tag, wire bytes) in the order given.
    fn raw_entry(fields: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut entry = Vec::new();
        for (tag, body) in fields {
            encode_key(*tag, WireType::LengthDelimited, &mut entry);
            encode_varint(body.len() as u64, &mut entry);
            entry.extend_from_slice(body);
        }
        let mut out = Vec::new();
        encode_key(FIELDS_TAG, WireType::LengthDelimited, &mut out);
        encode_varint(entry.len() as u64, &mut out);
        out.extend_from_slice(&entry);
        out
    }

    fn text(kind: Kind) -> Vec<u8> {
        value(kind).encode_to_vec()
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = (0u8..0x80)
            .map(|byte| char::from(byte).to_string())
            .collect();
        cases.extend(
            [
                "",
                "plain-ascii_1.2/3",
                "tab\there",
                "a\"b\\c",
                "\u{7f}del",
                "é",
                "日本",
                "x\u{2028}y",
            ]
            .map(str::to_owned),
        );
        for case in cases {
            let mut out = Vec::new();
            assert!(write_json_text(&mut out, case.as_bytes()).is_ok());
            assert_eq!(
                out,
                serde_json::to_vec(&case).expect("serializes"),
                "{case:?}"
            );
        }
        assert!(write_json_text(&mut Vec::new(), b"bad \xff utf-8").is_err());
    }

    #[test]
    fn decoding_writes_compact_json_text_with_depth_and_the_user_id() {
        let mut fields = sample();
        fields.fields.insert(
            "userId".to_owned(),
            value(Kind::StringValue("u-1".to_owned())),
        );
        let decoded = Metadata::decode(fields.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.user_id(), Some("u-1"));
        assert_eq!(decoded.depth(), 3, "an object in a list in the object");
        let json = decoded.clone().into_json();
        assert_eq!(
            json,
            r#"{"b":false,"f":2.5,"l":[1,{"deep":true}],"n":42,"s":"é \"q\"\n\u0001","userId":"u-1","z":null}"#
        );
        assert_eq!(decoded.json_len(), json.len());
        // The one rule of user ids (`event::user_id_of`), on the fast path and on prost's: a
        // number is its decimal text, any other value its compact JSON; "" and null are none.
        let nested = Kind::StructValue(Struct {
            fields: BTreeMap::from([("id".to_owned(), value(Kind::NumberValue(5.0)))]),
        });
        for (kind, wanted) in [
            (Kind::NumberValue(12345.0), Some("12345")),
            (Kind::NumberValue(2.5), Some("2.5")),
            (Kind::BoolValue(true), Some("true")),
            (nested, Some(r#"{"id":5}"#)),
            (Kind::StringValue(String::new()), None),
            (Kind::NullValue(0), None),
        ] {
            let fields = Struct {
                fields: BTreeMap::from([("userId".to_owned(), value(kind))]),
            };
            let decoded = Metadata::decode(fields.encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(decoded.user_id(), wanted);
            assert_eq!(Metadata::from(fields).user_id(), wanted, "prost's path");
        }
    }

    #[test]
    fn encodings_the_fast_path_does_not_take_decode_as_prost_reads_them() {
        let key = |name: &str| name.as_bytes().to_vec();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "value before key",
                raw_entry(&[(2, text(Kind::BoolValue(true))), (1, key("k"))]),
                r#"{"k":true}"#,
            ),
            (
                "empty key, omitted",
                raw_entry(&[(2, text(Kind::NumberValue(1.0)))]),
                r#"{"":1}"#,
            ),
            (
                "an unknown field in the entry",
                raw_entry(&[(1, key("k")), (2, text(Kind::NullValue(0))), (9, key("x"))]),
                r#"{"k":null}"#,
            ),
            (
                "the key twice: the last one",
                raw_entry(&[
                    (1, key("a")),
                    (1, key("k")),
                    (2, text(Kind::BoolValue(false))),
                ]),
                r#"{"k":false}"#,
            ),
        ];
        for (case, wire, expected) in cases {
            let decoded = Metadata::decode(wire.as_slice()).expect(case);
            assert_eq!(decoded.clone().into_json(), expected, "{case}");
            assert_eq!(decoded.json_len(), expected.len(), "{case}");
        }
        // Fast and prost paths in one object, in wire order.
        let mut wire = raw_entry(&[(1, key("a")), (2, text(Kind::NumberValue(1.0)))]);
        wire.extend(raw_entry(&[
            (2, text(Kind::NumberValue(2.0))),
            (1, key("b")),
        ]));
        wire.extend(raw_entry(&[
            (1, key("c")),
            (2, text(Kind::NumberValue(3.0))),
        ]));
        let decoded = Metadata::decode(wire.as_slice()).expect("decodes");
        assert_eq!(decoded.into_json(), r#"{"a":1,"b":2,"c":3}"#);
    }

    #[test]
    fn a_repeated_key_is_written_twice_and_the_last_value_wins() {
        let key = |name: &str| name.as_bytes().to_vec();
        let mut wire = raw_entry(&[(1, key("k")), (2, text(Kind::NumberValue(1.0)))]);
        wire.extend(raw_entry(&[
            (1, key("k")),
            (2, text(Kind::NumberValue(2.0))),
        ]));
        let decoded = Metadata::decode(wire.as_slice()).expect("decodes");
        assert_eq!(decoded.as_object().get("k"), Some(&Json::from(2)));
        // PostgreSQL's jsonb input keeps the last value of a repeated key too.
        assert_eq!(decoded.into_json(), r#"{"k":1,"k":2}"#);
    }

    #[test]
    fn malformed_entries_fail_as_prost_fails_them() {
        let key = |name: &[u8]| name.to_vec();
        for wire in [
            raw_entry(&[(1, key(b"\xff")), (2, text(Kind::NullValue(0)))]),
            raw_entry(&[(1, key(b"k")), (2, vec![0x1a, 0x01, 0xff])]),
            raw_entry(&[(1, key(b"k")), (2, vec![0x1a, 0x05, b'a'])]),
        ] {
            let ours = Metadata::decode(wire.as_slice()).expect_err("refused");
            let prost = Struct::decode(wire.as_slice()).expect_err("prost refuses it too");
            // The same cause (the message names on the way there differ).
            let cause =
                |error: &DecodeError| error.to_string().rsplit(": ").next().map(str::to_owned);
            assert_eq!(cause(&ours), cause(&prost), "{ours} / {prost}");
        }
    }

    #[test]
    fn nesting_past_the_fast_path_decodes_and_past_the_recursion_limit_fails() {
        let nested = |levels: usize| {
            let mut current = Struct::default();
            for _ in 0..levels {
                current = Struct {
                    fields: BTreeMap::from([("k".to_owned(), value(Kind::StructValue(current)))]),
                };
            }
            current
        };
        let deep = nested(FAST_PATH_LEVELS + 8);
        let decoded = Metadata::decode(deep.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.depth(), FAST_PATH_LEVELS + 9);
        assert_eq!(decoded.as_object(), Metadata::from(deep).as_object());
        assert!(Metadata::decode(nested(120).encode_to_vec().as_slice()).is_err());
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
