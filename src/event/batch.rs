//! The versioned encoding of a batch of events, shared by the spool's records and the Redis
//! broker's entries: a version byte, then that version's encoding (version 1: a protobuf
//! `SpoolBatch`, documented in `proto/sluice/spool/v1/spool.proto`; version 2: that
//! `SpoolBatch` as one zstd frame, which says its decompressed size).

use bytes::{Buf, BufMut};
use chrono::{DateTime, Utc};
use prost::encoding::{
    DecodeContext, WireType, check_wire_type, decode_key, decode_varint, encode_key, encode_varint,
    encoded_len_varint, key_len, skip_field,
};
use uuid::Uuid;

use super::{TraceId, ValidEvent};

/// The generated `sluice.spool.v1` messages: the schema that the hand-written encoding and
/// decoding are tested against.
#[cfg(test)]
#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/sluice.spool.v1.rs");
}

/// The payload version written now.
const VERSION_PROTOBUF: u8 = 1;
/// A version-1 payload (without its version byte) compressed as one zstd frame, which
/// carries the decompressed size. Redis entries are written so by default.
const VERSION_ZSTD: u8 = 2;
/// The largest batch a compressed payload may decompress to: past it, the payload is damaged
/// (or hostile), not a batch. Batches are bounded far below it by `writer.batch_max_bytes`.
const MAX_DECOMPRESSED: u64 = 1 << 28;
/// The payload buffers a thread keeps between batches, at most: a larger one is freed after use.
const KEEP_PLAIN: usize = 8 << 20;

thread_local! {
    /// Each thread's zstd contexts and the plain payload a compression starts from, kept
    /// from one batch to the next (a context costs more to make than a batch to compress).
    static ZSTD: std::cell::RefCell<Zstd> = std::cell::RefCell::default();
}

#[derive(Default)]
struct Zstd {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// A version-1 payload: what is compressed, or what was decompressed.
    plain: Vec<u8>,
    /// A version-2 payload, at the start of a buffer as large as the largest yet.
    compressed: Vec<u8>,
}

/// Why a payload cannot be read as events.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("empty payload")]
    Empty,
    #[error("unknown record version {0} (written by a newer sluice?)")]
    UnknownVersion(u8),
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("event id is not 16 bytes")]
    InvalidId,
    #[error("event timestamp is out of range")]
    InvalidTimestamp,
    #[error("a field runs past the end of the record")]
    Truncated,
    #[error("a text field is not UTF-8")]
    NotUtf8,
    #[error(
        "a compressed payload does not say its size, or says more than {MAX_DECOMPRESSED} bytes"
    )]
    CompressedSize,
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// A batch of events, and when the first of them was admitted (None: not known).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub events: Vec<ValidEvent>,
    pub admitted_at: Option<DateTime<Utc>>,
}

/// When the first event of several batches was admitted: the earliest, or None when any is
/// not known (every recorded erasure then reaches them).
pub fn earliest(
    admitted: impl IntoIterator<Item = Option<DateTime<Utc>>>,
) -> Option<DateTime<Utc>> {
    let mut earliest: Option<DateTime<Utc>> = None;
    for at in admitted {
        let at = at?;
        earliest = Some(earliest.map_or(at, |earliest| earliest.min(at)));
    }
    earliest
}

/// Encodes a batch as a current-version payload: the `SpoolBatch` prost would encode, byte
/// for byte, written straight from the events. Building the generated message first cloned
/// every string of every event (four allocations and copies each) only to encode and drop them.
pub fn encode(events: &[&ValidEvent], admitted_at: Option<DateTime<Utc>>) -> Vec<u8> {
    let mut payload = Vec::with_capacity(encoded_len(events, admitted_at));
    encode_into(events, admitted_at, &mut payload);
    payload
}

/// The length of [`encode`]'s payload.
pub fn encoded_len(events: &[&ValidEvent], admitted_at: Option<DateTime<Utc>>) -> usize {
    1 + events
        .iter()
        .map(|event| message_field_len(EVENTS_TAG, event_len(event)))
        .sum::<usize>()
        + int64_field_len(ADMITTED_AT_TAG, micros(admitted_at))
}

/// [`encode`]'s payload written into `out` (a Redis command's argument, say, with no
/// payload of its own first).
pub fn encode_into(
    events: &[&ValidEvent],
    admitted_at: Option<DateTime<Utc>>,
    out: &mut impl BufMut,
) {
    out.put_u8(VERSION_PROTOBUF);
    for event in events {
        encode_key(EVENTS_TAG, WireType::LengthDelimited, out);
        encode_varint(event_len(event) as u64, out);
        put_event(event, out);
    }
    put_int64(ADMITTED_AT_TAG, micros(admitted_at), out);
}

/// [`with_compressed`]'s payload as a vector of its own (for tests).
#[cfg(test)]
fn encode_compressed(
    events: &[&ValidEvent],
    admitted_at: Option<DateTime<Utc>>,
    level: i32,
) -> Result<Vec<u8>, BatchError> {
    with_compressed(events, admitted_at, level, <[u8]>::to_vec)
}

/// Calls `use_payload` with [`encode`]'s payload compressed with zstd at `level` (a version-2
/// payload: a batch of logs takes a third to a fourth of the bytes, in Redis's memory, its AOF,
/// its replication and on every hop between the nodes), as it lies in this thread's buffers:
/// no memory of its own for each batch (fresh memory is paged in and cleared by the kernel,
/// for a payload Redis's command copies at once anyway).
pub fn with_compressed<T>(
    events: &[&ValidEvent],
    admitted_at: Option<DateTime<Utc>>,
    level: i32,
    use_payload: impl FnOnce(&[u8]) -> T,
) -> Result<T, BatchError> {
    ZSTD.with_borrow_mut(|zstd| {
        let Zstd {
            compressor,
            plain,
            compressed,
            ..
        } = zstd;
        plain.clear();
        plain.reserve(encoded_len(events, admitted_at));
        encode_into(events, admitted_at, plain);
        let compressor = match compressor {
            Some((current, compressor)) if *current == level => compressor,
            _ => {
                &mut compressor
                    .insert((level, zstd::bulk::Compressor::new(level)?))
                    .1
            }
        };
        let body = plain.get(1..).unwrap_or_default();
        let bound = 1 + zstd::zstd_safe::compress_bound(body.len());
        if compressed.len() < bound {
            compressed.resize(bound, 0);
        }
        compressed[0] = VERSION_ZSTD;
        let written = compressor.compress_to_buffer(body, &mut compressed[1..bound]);
        let used = written.map(|written| use_payload(&compressed[..1 + written]));
        release_if_large(plain);
        release_if_large(compressed);
        Ok(used?)
    })
}

/// Decompresses a version-2 payload's body and reads it as version 1.
fn decode_zstd(body: &[u8]) -> Result<Batch, BatchError> {
    let size = zstd::zstd_safe::get_frame_content_size(body)
        .ok()
        .flatten()
        .filter(|size| *size <= MAX_DECOMPRESSED)
        .ok_or(BatchError::CompressedSize)?;
    ZSTD.with_borrow_mut(|zstd| {
        let Zstd {
            decompressor,
            plain,
            ..
        } = zstd;
        let decompressor = match decompressor {
            Some(decompressor) => decompressor,
            None => decompressor.insert(zstd::bulk::Decompressor::new()?),
        };
        plain.clear();
        plain.reserve(size as usize);
        let batch = decompressor
            .decompress_to_buffer(body, plain)
            .map_err(BatchError::from)
            .and_then(|_| decode_protobuf(plain));
        release_if_large(plain);
        batch
    })
}

fn release_if_large(plain: &mut Vec<u8>) {
    if plain.capacity() > KEEP_PLAIN {
        *plain = Vec::new();
    }
}

/// An admission time as stored: 0 when not known.
fn micros(admitted_at: Option<DateTime<Utc>>) -> i64 {
    admitted_at.map_or(0, |at| at.timestamp_micros())
}

/// `SpoolBatch` and `SpoolEvent` field numbers (`proto/sluice/spool/v1/spool.proto`).
const EVENTS_TAG: u32 = 1;
const ADMITTED_AT_TAG: u32 = 2;
const ID_TAG: u32 = 1;
const SERVICE_TAG: u32 = 2;
const MESSAGE_TAG: u32 = 3;
const TIMESTAMP_TAG: u32 = 4;
const USER_ID_TAG: u32 = 5;
const METADATA_TAG: u32 = 6;
const TRACE_ID_TAG: u32 = 7;

/// An event's `SpoolEvent` encoding, fields in tag order, proto3's defaults left out (the
/// optional `user_id` is written whenever it is set), as prost writes them.
fn put_event(event: &ValidEvent, out: &mut impl BufMut) {
    put_bytes(ID_TAG, event.id.as_bytes(), out);
    put_bytes(SERVICE_TAG, event.service.as_bytes(), out);
    put_bytes(MESSAGE_TAG, event.message.as_bytes(), out);
    put_int64(TIMESTAMP_TAG, event.timestamp.timestamp_micros(), out);
    if let Some(user_id) = &event.user_id {
        encode_key(USER_ID_TAG, WireType::LengthDelimited, out);
        encode_varint(user_id.len() as u64, out);
        out.put_slice(user_id.as_bytes());
    }
    put_bytes(METADATA_TAG, event.metadata_json.as_bytes(), out);
    if let Some(trace_id) = event.trace_id {
        put_bytes(TRACE_ID_TAG, &trace_id.to_bytes(), out);
    }
}

fn event_len(event: &ValidEvent) -> usize {
    bytes_field_len(ID_TAG, event.id.as_bytes().len())
        + bytes_field_len(SERVICE_TAG, event.service.len())
        + bytes_field_len(MESSAGE_TAG, event.message.len())
        + int64_field_len(TIMESTAMP_TAG, event.timestamp.timestamp_micros())
        + event
            .user_id
            .as_ref()
            .map_or(0, |user_id| message_field_len(USER_ID_TAG, user_id.len()))
        + bytes_field_len(METADATA_TAG, event.metadata_json.len())
        + event.trace_id.map_or(0, |trace| {
            bytes_field_len(TRACE_ID_TAG, trace.to_bytes().len())
        })
}

/// A length-delimited field, left out when empty.
fn put_bytes(tag: u32, value: &[u8], out: &mut impl BufMut) {
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

/// An int64 field, left out when 0 (negative values take ten bytes, as in protobuf).
fn put_int64(tag: u32, value: i64, out: &mut impl BufMut) {
    if value == 0 {
        return;
    }
    encode_key(tag, WireType::Varint, out);
    encode_varint(value as u64, out);
}

fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    message_field_len(tag, len)
}

/// A length-delimited field written even when empty.
fn message_field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn int64_field_len(tag: u32, value: i64) -> usize {
    if value == 0 {
        return 0;
    }
    key_len(tag) + encoded_len_varint(value as u64)
}

/// Decodes a payload. Events are numbered by their place in the batch (the index of a
/// request is of no use once the request was acknowledged).
pub fn decode(payload: &[u8]) -> Result<Batch, BatchError> {
    match payload.split_first() {
        None => Err(BatchError::Empty),
        Some((&VERSION_PROTOBUF, rest)) => decode_protobuf(rest),
        Some((&VERSION_ZSTD, rest)) => decode_zstd(rest),
        Some((&version, _)) => Err(BatchError::UnknownVersion(version)),
    }
}

/// Reads a `SpoolBatch` as prost's generated code reads it (fields in any order, the last
/// of a repeated scalar winning, unknown fields skipped), but straight into the events: no
/// generated message in between, the vector sized once, each text copied once out of the
/// payload. A writer node decodes every entry it reads.
fn decode_protobuf(mut buf: &[u8]) -> Result<Batch, BatchError> {
    let mut events = Vec::with_capacity(count_events(buf));
    let mut admitted_at_micros = 0i64;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            EVENTS_TAG => {
                let event = take_delimited(&mut buf, wire_type)?;
                events.push(decode_event(event, events.len() as u64)?);
            }
            ADMITTED_AT_TAG => admitted_at_micros = take_int64(&mut buf, wire_type)?,
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())?,
        }
    }
    let admitted_at = match admitted_at_micros {
        0 => None,
        micros => {
            Some(DateTime::from_timestamp_micros(micros).ok_or(BatchError::InvalidTimestamp)?)
        }
    };
    Ok(Batch {
        events,
        admitted_at,
    })
}

/// The events of a `SpoolBatch`, counted from its keys alone (a damaged payload counts what
/// precedes the damage; the decoding reports it).
fn count_events(mut buf: &[u8]) -> usize {
    let mut count = 0;
    while buf.has_remaining() {
        let Ok((tag, wire_type)) = decode_key(&mut buf) else {
            break;
        };
        if tag == EVENTS_TAG {
            count += 1;
        }
        if skip_field(wire_type, tag, &mut buf, DecodeContext::default()).is_err() {
            break;
        }
    }
    count
}

fn decode_event(mut buf: &[u8], index: u64) -> Result<ValidEvent, BatchError> {
    let mut id: &[u8] = &[];
    let (mut service, mut message, mut metadata_json) =
        (String::new(), String::new(), String::new());
    let mut timestamp_micros = 0i64;
    let mut user_id = None;
    let mut trace_id: &[u8] = &[];
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            ID_TAG => id = take_delimited(&mut buf, wire_type)?,
            SERVICE_TAG => service = take_string(&mut buf, wire_type)?,
            MESSAGE_TAG => message = take_string(&mut buf, wire_type)?,
            TIMESTAMP_TAG => timestamp_micros = take_int64(&mut buf, wire_type)?,
            USER_ID_TAG => user_id = Some(take_string(&mut buf, wire_type)?),
            METADATA_TAG => metadata_json = take_string(&mut buf, wire_type)?,
            TRACE_ID_TAG => trace_id = take_delimited(&mut buf, wire_type)?,
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(ValidEvent {
        trace_id: <[u8; 16]>::try_from(trace_id).ok().map(TraceId::from_bytes),
        index,
        id: Uuid::from_slice(id).map_err(|_| BatchError::InvalidId)?,
        service,
        message,
        timestamp: DateTime::from_timestamp_micros(timestamp_micros)
            .ok_or(BatchError::InvalidTimestamp)?,
        user_id,
        metadata_json,
    })
}

/// A length-delimited field's bytes, borrowed from the payload.
fn take_delimited<'a>(buf: &mut &'a [u8], wire_type: WireType) -> Result<&'a [u8], BatchError> {
    check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = usize::try_from(decode_varint(buf)?).map_err(|_| BatchError::Truncated)?;
    if len > buf.len() {
        return Err(BatchError::Truncated);
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

fn take_string(buf: &mut &[u8], wire_type: WireType) -> Result<String, BatchError> {
    let bytes = take_delimited(buf, wire_type)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| BatchError::NotUtf8)
}

fn take_int64(buf: &mut &[u8], wire_type: WireType) -> Result<i64, BatchError> {
    check_wire_type(WireType::Varint, wire_type)?;
    // int64 is the varint's bits, as prost reads it.
    Ok(decode_varint(buf)? as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ValidEvent {
        ValidEvent {
            trace_id: None,
            index: 0,
            id: Uuid::now_v7(),
            service: "svc".to_owned(),
            message: "m \u{e9}".to_owned(),
            timestamp: DateTime::from_timestamp_micros(1_800_000_000_123_456).expect("ts"),
            user_id: Some("u".to_owned()),
            metadata_json: r#"{"k":[1,2]}"#.to_owned(),
        }
    }

    /// An event at `index` with a trace id and no user id.
    fn traced(index: u64) -> ValidEvent {
        ValidEvent {
            index,
            user_id: None,
            trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").ok(),
            ..event()
        }
    }

    #[test]
    fn a_batch_round_trips_through_the_current_version() {
        let events = vec![event(), traced(1)];
        let admitted_at = DateTime::from_timestamp_micros(1_800_000_000_654_321);
        let payload = encode(&events.iter().collect::<Vec<_>>(), admitted_at);
        assert_eq!(payload[0], VERSION_PROTOBUF);
        assert_eq!(
            decode(&payload).expect("decodes"),
            Batch {
                events,
                admitted_at,
            }
        );
        // A record written before admission times were kept says it does not know.
        let unknown = encode(&[&event()], None);
        assert_eq!(decode(&unknown).expect("decodes").admitted_at, None);
    }

    #[test]
    fn a_compressed_batch_reads_back_as_the_batch_and_takes_fewer_bytes() {
        let events: Vec<ValidEvent> = (0..200).map(traced).collect();
        let refs: Vec<&ValidEvent> = events.iter().collect();
        let admitted_at = DateTime::from_timestamp_micros(1_800_000_000_654_321);
        let plain = encode(&refs, admitted_at);
        for level in [-5, -1, 1, 3] {
            let compressed = encode_compressed(&refs, admitted_at, level).expect("compressed");
            assert_eq!(compressed[0], VERSION_ZSTD);
            assert!(
                compressed.len() * 2 < plain.len(),
                "level {level}: {} of {}",
                compressed.len(),
                plain.len()
            );
            assert_eq!(
                decode(&compressed).expect("decodes"),
                Batch {
                    events: events.clone(),
                    admitted_at,
                }
            );
        }
    }

    #[test]
    fn a_damaged_compressed_batch_is_an_error_not_a_panic_or_a_huge_allocation() {
        let events = [event(), traced(1)];
        let compressed =
            encode_compressed(&events.iter().collect::<Vec<_>>(), None, 1).expect("compressed");
        // Every cut of it.
        for end in 1..compressed.len() {
            assert!(decode(&compressed[..end]).is_err(), "cut at {end}");
        }
        // A frame whose header claims 1 TiB (magic, a single segment with an 8-byte size),
        // and a frame that does not say its size (streamed).
        let mut huge = vec![VERSION_ZSTD, 0x28, 0xB5, 0x2F, 0xFD, 0xE0];
        huge.extend((1u64 << 40).to_le_bytes());
        assert!(matches!(decode(&huge), Err(BatchError::CompressedSize)));
        let mut streamed = zstd::stream::Encoder::new(vec![VERSION_ZSTD], 1).expect("encoder");
        std::io::Write::write_all(&mut streamed, &encode(&[&event()], None)[1..]).expect("write");
        let streamed = streamed.finish().expect("finish");
        assert!(matches!(decode(&streamed), Err(BatchError::CompressedSize)));
    }

    /// The batch as the generated message encodes it: what [`encode`] writes without it.
    fn encoded_by_prost(events: &[&ValidEvent], admitted_at: Option<DateTime<Utc>>) -> Vec<u8> {
        let batch = pb::SpoolBatch {
            admitted_at_micros: admitted_at.map_or(0, |at| at.timestamp_micros()),
            events: events
                .iter()
                .map(|event| pb::SpoolEvent {
                    id: event.id.as_bytes().to_vec(),
                    service: event.service.clone(),
                    message: event.message.clone(),
                    timestamp_micros: event.timestamp.timestamp_micros(),
                    user_id: event.user_id.clone(),
                    metadata_json: event.metadata_json.clone(),
                    trace_id: event
                        .trace_id
                        .map(|trace| trace.to_bytes().to_vec())
                        .unwrap_or_default(),
                })
                .collect(),
        };
        let mut payload = vec![VERSION_PROTOBUF];
        payload.extend(prost::Message::encode_to_vec(&batch));
        payload
    }

    /// The batch as the generated message decodes it: what [`decode`] reads without it.
    fn decoded_by_prost(payload: &[u8]) -> Batch {
        let batch = <pb::SpoolBatch as prost::Message>::decode(&payload[1..]).expect("prost");
        Batch {
            admitted_at: DateTime::from_timestamp_micros(batch.admitted_at_micros)
                .filter(|_| batch.admitted_at_micros != 0),
            events: batch
                .events
                .into_iter()
                .enumerate()
                .map(|(index, event)| ValidEvent {
                    trace_id: <[u8; 16]>::try_from(event.trace_id.as_slice())
                        .ok()
                        .map(TraceId::from_bytes),
                    index: index as u64,
                    id: Uuid::from_slice(&event.id).expect("id"),
                    service: event.service,
                    message: event.message,
                    timestamp: DateTime::from_timestamp_micros(event.timestamp_micros)
                        .expect("timestamp"),
                    user_id: event.user_id,
                    metadata_json: event.metadata_json,
                })
                .collect(),
        }
    }

    #[test]
    fn a_batch_is_read_as_prost_reads_the_generated_message_and_damage_is_an_error() {
        let events = [
            event(),
            traced(1),
            ValidEvent {
                index: 2,
                user_id: Some(String::new()),
                metadata_json: String::new(),
                message: "\u{1f600}".repeat(100),
                ..event()
            },
        ];
        let refs: Vec<&ValidEvent> = events.iter().collect();
        let admitted_at = DateTime::from_timestamp_micros(1_800_000_000_654_321);
        let mut payload = encoded_by_prost(&refs, admitted_at);
        // A field a newer writer may add to the batch: skipped, as prost skips it.
        encode_key(15, WireType::Varint, &mut payload);
        encode_varint(7, &mut payload);
        let read = decode(&payload).expect("decodes");
        assert_eq!(read, decoded_by_prost(&payload));
        assert_eq!(read.events, events);
        assert_eq!(read.admitted_at, admitted_at);

        // Fields out of order and one unknown inside an event, the last of a repeated
        // field winning: as prost reads them.
        let mut event_bytes = Vec::new();
        put_bytes(SERVICE_TAG, b"first", &mut event_bytes);
        encode_key(9, WireType::LengthDelimited, &mut event_bytes);
        encode_varint(2, &mut event_bytes);
        event_bytes.extend_from_slice(b"??");
        put_int64(TIMESTAMP_TAG, 1_800_000_000_000_000, &mut event_bytes);
        put_bytes(ID_TAG, event().id.as_bytes(), &mut event_bytes);
        put_bytes(SERVICE_TAG, b"second", &mut event_bytes);
        let mut reordered = vec![VERSION_PROTOBUF];
        put_bytes(EVENTS_TAG, &event_bytes, &mut reordered);
        let read = decode(&reordered).expect("decodes");
        assert_eq!(read, decoded_by_prost(&reordered));
        assert_eq!(read.events[0].service, "second");

        // Cut anywhere: refused where prost refuses it, read as prost reads it elsewhere
        // (a cut between two events leaves a shorter batch, as protobuf has it).
        for cut in 1..payload.len() {
            let cut = &payload[..cut];
            match <pb::SpoolBatch as prost::Message>::decode(&cut[1..]) {
                Err(_) => assert!(decode(cut).is_err(), "{cut:?}"),
                Ok(_) => assert_eq!(decode(cut).expect("decodes"), decoded_by_prost(cut)),
            }
        }
        let mut bad_event = Vec::new();
        put_bytes(ID_TAG, event().id.as_bytes(), &mut bad_event);
        put_bytes(SERVICE_TAG, &[0xff, 0xfe], &mut bad_event);
        let mut not_utf8 = vec![VERSION_PROTOBUF];
        put_bytes(EVENTS_TAG, &bad_event, &mut not_utf8);
        assert!(matches!(decode(&not_utf8), Err(BatchError::NotUtf8)));
        let mut wrong_type = vec![VERSION_PROTOBUF];
        put_int64(EVENTS_TAG, 5, &mut wrong_type);
        assert!(matches!(decode(&wrong_type), Err(BatchError::Protobuf(_))));
    }

    #[test]
    fn a_batch_is_written_byte_for_byte_as_prost_writes_the_generated_message() {
        let long = "x".repeat(300);
        let events = [
            event(),
            traced(0),
            // An empty user id is still written (the field is optional); an empty metadata
            // text and the epoch itself are proto3 defaults, left out.
            ValidEvent {
                user_id: Some(String::new()),
                metadata_json: String::new(),
                timestamp: DateTime::from_timestamp_micros(0).expect("ts"),
                ..event()
            },
            // Before 1970: a negative varint, ten bytes; lengths past one varint byte.
            ValidEvent {
                timestamp: DateTime::from_timestamp_micros(-1_000_000).expect("ts"),
                message: long.clone(),
                metadata_json: format!(r#"{{"k":"{long}"}}"#),
                ..event()
            },
        ];
        let events: Vec<&ValidEvent> = events.iter().collect();
        for admitted_at in [None, DateTime::from_timestamp_micros(1_800_000_000_654_321)] {
            for batch in [&events[..], &events[..1], &[]] {
                let payload = encode(batch, admitted_at);
                assert_eq!(payload, encoded_by_prost(batch, admitted_at));
                assert_eq!(payload.len(), encoded_len(batch, admitted_at));
            }
        }
    }

    #[test]
    fn an_unknown_version_is_an_error_not_an_empty_batch() {
        let mut payload = encode(&[&event()], None);
        payload[0] = 9;
        assert!(matches!(
            decode(&payload),
            Err(BatchError::UnknownVersion(9))
        ));
    }
}
