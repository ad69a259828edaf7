//! The versioned encoding of a batch of events, shared by the spool's records and the Redis
//! broker's entries: a version byte, then that version's encoding (version 1: a protobuf
//! `SpoolBatch`, documented in `proto/sluice/spool/v1/spool.proto`).

use bytes::BufMut;
use chrono::{DateTime, Utc};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};
use uuid::Uuid;

use super::{TraceId, ValidEvent};

/// The generated `sluice.spool.v1` messages.
#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/sluice.spool.v1.rs");
}

/// The payload version written now.
const VERSION_PROTOBUF: u8 = 1;

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
        Some((&version, _)) => Err(BatchError::UnknownVersion(version)),
    }
}

fn decode_protobuf(bytes: &[u8]) -> Result<Batch, BatchError> {
    let batch = pb::SpoolBatch::decode(bytes)?;
    let admitted_at = match batch.admitted_at_micros {
        0 => None,
        micros => {
            Some(DateTime::from_timestamp_micros(micros).ok_or(BatchError::InvalidTimestamp)?)
        }
    };
    let mut events = Vec::with_capacity(batch.events.len());
    for (index, event) in batch.events.into_iter().enumerate() {
        events.push(ValidEvent {
            trace_id: <[u8; 16]>::try_from(event.trace_id.as_slice())
                .ok()
                .map(TraceId::from_bytes),
            index: index as u64,
            id: Uuid::from_slice(&event.id).map_err(|_| BatchError::InvalidId)?,
            service: event.service,
            message: event.message,
            timestamp: DateTime::from_timestamp_micros(event.timestamp_micros)
                .ok_or(BatchError::InvalidTimestamp)?,
            user_id: event.user_id,
            metadata_json: event.metadata_json,
        });
    }
    Ok(Batch {
        events,
        admitted_at,
    })
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

    #[test]
    fn a_batch_round_trips_through_the_current_version() {
        let events = vec![
            event(),
            ValidEvent {
                index: 1,
                user_id: None,
                trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").ok(),
                ..event()
            },
        ];
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
        payload.extend(batch.encode_to_vec());
        payload
    }

    #[test]
    fn a_batch_is_written_byte_for_byte_as_prost_writes_the_generated_message() {
        let long = "x".repeat(300);
        let events = [
            event(),
            ValidEvent {
                user_id: None,
                trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").ok(),
                ..event()
            },
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
