//! What the records of one resource and one scope share, and one record mapped against
//! them: its fields read from the wire, its metadata written as JSON text, its id and user.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, xxh3_128, xxh3_128_with_seed};

use super::{
    NO_BODY, RECEIVED, RECORD_UID, SERVICE_NAME, UNKNOWN_SERVICE, keys, normalize_service,
    timestamp_of,
};
use crate::{
    event::TraceId,
    otlp::{
        json::{AttributesWriter, JsonObject, write_integer, write_string, write_value},
        wire::{
            Any, Attribute, Fields, Nesting, Value, WireError, check_strings, last_value, merge,
            utf8, wrong_type,
        },
    },
    proto::{Event, metadata::Metadata},
};

/// What the records of one resource share.
pub(super) struct ResourceContext {
    service: String,
    /// The resource's attributes as JSON (less the user id attribute when it came from
    /// there, with its dropped count); None when it has none.
    attributes: Option<JsonObject>,
    user_id: Option<String>,
    /// The resource as sent, hashed: the seed of its scopes' hashes ([`record_id`]).
    seed: u64,
}

impl ResourceContext {
    /// A `Resource` from its encoding: 1 attributes, 2 dropped_attributes_count,
    /// 3 entity_refs.
    pub(super) fn new(encoded: &[u8], user_id_attributes: &[String]) -> Result<Self, WireError> {
        let mut attributes = Vec::new();
        let mut dropped = 0;
        for field in Fields::new(encoded) {
            match field? {
                (1, Value::Bytes(attribute)) => attributes.push(Attribute::parse(attribute)?),
                (2, Value::Varint(count)) => dropped = count as u32,
                (3, Value::Bytes(entity)) => check_strings(entity, "EntityRef", &[1, 2, 3, 4])?,
                (tag @ 1..=3, _) => return Err(wrong_type("Resource", tag)),
                _ => {}
            }
        }
        let service = match last_value(&attributes, SERVICE_NAME)? {
            Some(Any::String(name)) => normalize_service(name),
            _ => UNKNOWN_SERVICE.to_owned(),
        };
        let user = user_id_of(&attributes, user_id_attributes)?;
        let user_key = user.as_ref().map(|(key, _)| key.as_bytes());
        let mut json = JsonObject::of_attributes(&attributes, |key| Some(key) == user_key)?;
        if dropped > 0 {
            json.text.pop();
            json.key(keys::DROPPED_ATTRIBUTES);
            write_integer(&mut json.text, dropped);
            json.text.push(b'}');
        }
        Ok(Self {
            service,
            attributes: (json.entries > 0).then_some(json),
            user_id: user.map(|(_, id)| id),
            seed: xxh3_64(encoded),
        })
    }
}

/// What the records of one scope share: the resource's part, the scope's JSON, and the
/// scope and resource as sent, hashed: the seed of each record's id ([`record_id`]).
pub(super) struct ScopeContext<'r> {
    resource: &'r ResourceContext,
    scope: Option<JsonObject>,
    seed: u64,
}

/// One `LogRecord`'s fields, as slices of the request (its attributes are handed on one by
/// one as they are read).
#[derive(Default)]
struct Record<'a> {
    time_unix_nano: u64,
    observed_time_unix_nano: u64,
    severity_number: i32,
    severity_text: &'a str,
    body: Option<Cow<'a, [u8]>>,
    dropped_attributes_count: u32,
    flags: u32,
    trace_id: &'a [u8],
    span_id: &'a [u8],
    event_name: &'a str,
}

impl<'a> Record<'a> {
    fn parse(
        encoded: &'a [u8],
        mut attribute: impl FnMut(Attribute<'a>) -> Result<(), WireError>,
    ) -> Result<Self, WireError> {
        let mut record = Record::default();
        for field in Fields::new(encoded) {
            match field? {
                (1, Value::Fixed64(nanos)) => record.time_unix_nano = nanos,
                (2, Value::Varint(number)) => record.severity_number = number as i32,
                (3, Value::Bytes(text)) => record.severity_text = utf8(text)?,
                (5, Value::Bytes(body)) => record.body = Some(merge(record.body.take(), body)),
                (6, Value::Bytes(encoded)) => attribute(Attribute::parse(encoded)?)?,
                (7, Value::Varint(count)) => record.dropped_attributes_count = count as u32,
                (8, Value::Fixed32(flags)) => record.flags = flags,
                (9, Value::Bytes(trace_id)) => record.trace_id = trace_id,
                (10, Value::Bytes(span_id)) => record.span_id = span_id,
                (11, Value::Fixed64(nanos)) => record.observed_time_unix_nano = nanos,
                (12, Value::Bytes(name)) => record.event_name = utf8(name)?,
                (tag @ (1..=3 | 5..=12), _) => return Err(wrong_type("LogRecord", tag)),
                _ => {}
            }
        }
        Ok(record)
    }
}

impl<'r> ScopeContext<'r> {
    /// An `InstrumentationScope` from its encoding: 1 name, 2 version, 3 attributes,
    /// 4 dropped_attributes_count (not kept).
    pub(super) fn new(resource: &'r ResourceContext, encoded: &[u8]) -> Result<Self, WireError> {
        let mut name = "";
        let mut version = "";
        let mut attributes = Vec::new();
        for field in Fields::new(encoded) {
            match field? {
                (1, Value::Bytes(text)) => name = utf8(text)?,
                (2, Value::Bytes(text)) => version = utf8(text)?,
                (3, Value::Bytes(attribute)) => attributes.push(Attribute::parse(attribute)?),
                (4, Value::Varint(_)) => {}
                (tag @ 1..=4, _) => return Err(wrong_type("InstrumentationScope", tag)),
                _ => {}
            }
        }
        let seed = xxh3_64_with_seed(encoded, resource.seed);
        let mut json = JsonObject::default();
        json.text.push(b'{');
        if !name.is_empty() {
            json.key("name");
            write_string(&mut json.text, name);
        }
        if !version.is_empty() {
            json.key("version");
            write_string(&mut json.text, version);
        }
        let mut depth = 1;
        if !attributes.is_empty() {
            let attributes = JsonObject::of_attributes(&attributes, |_| false)?;
            json.key(keys::ATTRIBUTES);
            json.text.extend_from_slice(&attributes.text);
            depth += attributes.depth;
        }
        json.text.push(b'}');
        json.depth = depth;
        Ok(Self {
            resource,
            scope: (json.entries > 0).then_some(json),
            seed,
        })
    }

    /// Maps one record. Its attributes are written into the metadata's `attributes` object
    /// as they are read, but for `log.record.uid` and the user id keys: those are set aside
    /// in `set_aside` (a list the caller keeps, so that one allocation serves every record),
    /// since which of them leaves the metadata is known only once all are read.
    pub(super) fn map<'a>(
        &self,
        encoded: &'a [u8],
        user_id_attributes: &[String],
        received: DateTime<Utc>,
        set_aside: &mut Vec<Attribute<'a>>,
    ) -> Result<(Event, Uuid, Option<TraceId>), WireError> {
        let mut metadata = JsonObject::default();
        // Room for all of it: the record's own fields take less as JSON than as protobuf,
        // but for their keys and quotes.
        metadata.text.reserve(
            encoded.len()
                + 128
                + self
                    .resource
                    .attributes
                    .as_ref()
                    .map_or(0, |json| json.text.len())
                + self.scope.as_ref().map_or(0, |json| json.text.len()),
        );
        metadata.text.push(b'{');
        metadata.key(keys::ATTRIBUTES);
        let mut attributes = AttributesWriter::open(&mut metadata.text);
        set_aside.clear();
        let record = Record::parse(encoded, |attribute| {
            if attribute.key == RECORD_UID.as_bytes()
                || user_id_attributes
                    .iter()
                    .any(|key| key.as_bytes() == attribute.key)
            {
                set_aside.push(attribute);
                return Ok(());
            }
            attributes.entry(&mut metadata.text, &attribute)
        })?;
        let (timestamp, source) = timestamp_of(
            record.time_unix_nano,
            record.observed_time_unix_nano,
            received,
        );
        let id = match last_value(set_aside, RECORD_UID)? {
            Some(Any::String(uid)) => {
                Uuid::try_parse(uid).unwrap_or_else(|_| hashed_uuid(uid.as_bytes()))
            }
            Some(other) => {
                let mut text = Vec::new();
                write_value(&mut text, &other, Nesting::default())?;
                hashed_uuid(&text)
            }
            // The receive time is not the record's: a retry would get another id.
            None if source == Some(RECEIVED) => record_id(encoded, self.seed, None),
            None => record_id(encoded, self.seed, Some(&timestamp)),
        };
        let user = user_id_of(set_aside, user_id_attributes)?;
        let user_key = user.as_ref().map(|(key, _)| key.as_bytes());
        // The user id leaves the metadata, so that privacy sees it once; the other user id
        // keys stay. The value the user id came from was read whole already.
        let user_at = user_key.and_then(|user_key| {
            set_aside
                .iter()
                .rposition(|attribute| attribute.key == user_key)
        });
        for (index, attribute) in set_aside.iter().enumerate() {
            if Some(index) == user_at {
                continue;
            }
            if attribute.key == RECORD_UID.as_bytes() || Some(attribute.key) == user_key {
                AttributesWriter::check(&mut metadata.text, attribute)?;
            } else {
                attributes.entry(&mut metadata.text, attribute)?;
            }
        }
        let written = attributes.close(&mut metadata.text);
        let mut depth = 1;
        if written.entries == 0 {
            // No attributes: the object is `{` again, with no entry.
            metadata.text.truncate(1);
            metadata.entries = 0;
        } else {
            depth = 1 + written.depth;
        }
        if let Some(source) = source {
            metadata.key(keys::TIME_SOURCE);
            write_string(&mut metadata.text, source);
        }
        if !record.severity_text.is_empty() {
            metadata.key(keys::SEVERITY_TEXT);
            write_string(&mut metadata.text, record.severity_text);
        }
        if record.severity_number != 0 {
            metadata.key(keys::SEVERITY_NUMBER);
            write_integer(&mut metadata.text, record.severity_number);
        }
        if !record.span_id.is_empty() {
            metadata.key(keys::SPAN_ID);
            write_hex(&mut metadata.text, record.span_id);
        }
        if record.flags != 0 {
            metadata.key(keys::TRACE_FLAGS);
            write_integer(&mut metadata.text, record.flags);
        }
        if !record.event_name.is_empty() {
            metadata.key(keys::EVENT_NAME);
            write_string(&mut metadata.text, record.event_name);
        }
        if record.dropped_attributes_count > 0 {
            metadata.key(keys::DROPPED_ATTRIBUTES);
            write_integer(&mut metadata.text, record.dropped_attributes_count);
        }
        if let Some(resource) = &self.resource.attributes {
            metadata.key(keys::RESOURCE);
            metadata.text.extend_from_slice(&resource.text);
            depth = depth.max(1 + resource.depth);
        }
        if let Some(scope) = &self.scope {
            metadata.key(keys::SCOPE);
            metadata.text.extend_from_slice(&scope.text);
            depth = depth.max(1 + scope.depth);
        }
        metadata.text.push(b'}');

        let body = match &record.body {
            Some(body) => Any::parse(body)?,
            None => Any::Empty,
        };
        let message = match body {
            Any::String(text) => text.to_owned(),
            Any::Empty if !record.event_name.is_empty() => record.event_name.to_owned(),
            Any::Empty => NO_BODY.to_owned(),
            other => {
                let mut text = Vec::new();
                write_value(&mut text, &other, Nesting::default())?;
                String::from_utf8_lossy(&text).into_owned()
            }
        };
        let trace_id = <[u8; 16]>::try_from(record.trace_id)
            .ok()
            .map(TraceId::from_bytes)
            .filter(|trace| *trace != TraceId::INVALID);
        let user_id = match user {
            Some((_, id)) => id,
            None => self.resource.user_id.clone().unwrap_or_default(),
        };
        Ok((
            Event {
                service: self.resource.service.clone(),
                message,
                timestamp: Some(timestamp),
                user_id,
                metadata: (metadata.entries > 0)
                    .then(|| Metadata::from_object_text(metadata.text, metadata.entries, depth)),
                ..Default::default()
            },
            id,
            trace_id,
        ))
    }
}

/// The first of `keys` whose value in `attributes` is a usable user id (a non-empty string,
/// or an integer as its decimal text): the key and the id.
fn user_id_of<'k>(
    attributes: &[Attribute<'_>],
    keys: &'k [String],
) -> Result<Option<(&'k str, String)>, WireError> {
    for key in keys {
        let id = match last_value(attributes, key)? {
            Some(Any::String(text)) if !text.is_empty() => text.to_owned(),
            Some(Any::Int(number)) => number.to_string(),
            _ => continue,
        };
        return Ok(Some((key, id)));
    }
    Ok(None)
}

/// Bytes as a JSON string of lower-case hex.
fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2 + 2);
    out.push(b'"');
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)]);
        out.push(DIGITS[usize::from(byte & 0x0f)]);
    }
    out.push(b'"');
}

/// A record's id when it carries none: a version-8 (custom) UUID from the 128-bit xxh3 of
/// the record as sent, seeded by the hash of its scope, itself seeded by its resource's. The
/// same record resent (an SDK's retry after a timeout) has the same id, and so is stored
/// once; records that differ in a byte, or in their scope or resource, differ in id (bar a
/// collision of the 64-bit seeds of two scopes, about one chance in 2^64). Not a secret nor a
/// defence: a client that knows a record can name its id outright
/// (`log.record.uid`, or the native API's `id`), so a fast hash costs nothing in safety.
///
/// With the record's own time, the id is laid out as a UUIDv7 is: its first 48 bits are that
/// time in Unix milliseconds, the hash fills the rest (74 bits once the version and variant
/// are set). Ids then grow with time, as the native path's v7 ids do, so the primary key's
/// B-tree takes each batch near its right edge instead of at random pages all over it (random
/// ids cost 7% of ingest at half a million rows, BENCHMARKS.md, and more as the index
/// outgrows memory). Two records of the same millisecond still differ in 74 bits of hash.
fn record_id(encoded: &[u8], seed: u64, time: Option<&prost_types::Timestamp>) -> Uuid {
    let hash = xxh3_128_with_seed(encoded, seed);
    let Some(time) = time else {
        return uuid_of(hash);
    };
    let millis = time.seconds.saturating_mul(1000) + i64::from(time.nanos / 1_000_000);
    // Times before 1970 (negative) or past 10889 (beyond 48 bits) keep the hash alone.
    let Some(millis) = u64::try_from(millis).ok().filter(|ms| *ms < 1 << 48) else {
        return uuid_of(hash);
    };
    uuid_of((u128::from(millis) << 80) | (hash >> 48))
}

/// A `log.record.uid` that is not a UUID (a ULID, say) as one.
fn hashed_uuid(bytes: &[u8]) -> Uuid {
    uuid_of(xxh3_128(bytes))
}

fn uuid_of(hash: u128) -> Uuid {
    uuid::Builder::from_custom_bytes(hash.to_be_bytes()).into_uuid()
}
