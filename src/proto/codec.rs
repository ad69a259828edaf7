//! The gRPC codec of every sluice service: prost, except that a request that does not decode
//! (garbage bytes, truncation, wrong wire types, invalid UTF-8, nesting past prost's recursion
//! limit) is the client's fault and gets INVALID_ARGUMENT with a BadRequest that says what was
//! wrong, not prost's INTERNAL.

use std::{
    any::{Any, TypeId},
    marker::PhantomData,
};

use bytes::Buf;
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, decode_key, decode_varint, message},
};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use crate::proto::{
    Event, IngestRequest, TailResponse, otlp::EncodedLogsRequest, status::bad_request, tail,
};

/// The field a BadRequest names for a request that does not decode.
pub const MALFORMED_FIELD: &str = "request";

/// prost encoding, with decode failures mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct StrictProstCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictProstCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(encoder_settings::<T>())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictProstDecoder { _type: PhantomData }
    }
}

/// Decodes `U`, refusing malformed input as the client's error.
#[derive(Debug)]
pub struct StrictProstDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for StrictProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over one message in one contiguous buffer. Decoding from a plain slice
        // lets prost read varints and copy strings straight from it, instead of going through
        // `DecodeBuf`'s bounds bookkeeping for every byte it advances (BENCHMARKS.md, "Decoding
        // from a slice").
        let len = buf.remaining();
        let mut message = U::default();
        if let Some(request) = (&mut message as &mut dyn Any).downcast_mut::<EncodedLogsRequest>() {
            // Kept as it came (a slice of tonic's buffer, not a copy): OTLP maps the records
            // from the encoding, and a malformed one is refused there.
            *request = EncodedLogsRequest::new(buf.copy_to_bytes(len));
            return Ok(Some(message));
        }
        let chunk = buf.chunk();
        if chunk.len() != len {
            return U::decode(buf).map(Some).map_err(malformed);
        }
        let decoded = match (&mut message as &mut dyn Any).downcast_mut::<IngestRequest>() {
            Some(request) => merge_ingest_request(request, chunk),
            None => message.merge(chunk),
        };
        buf.advance(len);
        decoded.map(|()| Some(message)).map_err(malformed)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// How much a response stream's encoder gathers before yielding to HTTP/2: tonic's default,
/// except for Tail, whose streams are many, long-lived and often not read
/// ([`tail::MESSAGE_BYTES`]).
fn encoder_settings<T: 'static>() -> BufferSettings {
    if TypeId::of::<T>() == TypeId::of::<TailResponse>() {
        return BufferSettings::new(tail::MESSAGE_BYTES, tail::MESSAGE_BYTES);
    }
    BufferSettings::default()
}

/// The fewest encoded bytes per event that pre-sizing counts on: a request of smaller
/// (empty) events is sized for this many at most and grows as prost decodes it, so that a
/// request never reserves more than a few times its own size ahead.
const MIN_PRESIZED_EVENT_BYTES: usize = 32;

/// Decodes an `IngestRequest` as prost does, with two differences that its profile asked for.
/// The events are sized before decoding: prost grows the vector by doubling, copying every
/// decoded event at each step (hundreds of bytes per event for a 500-event request), and each
/// large reallocation faults in fresh pages (BENCHMARKS.md, "Events sized before decoding").
/// And each event is decoded in its place in the vector, where prost decodes it beside and
/// then moves it in (BENCHMARKS.md, "Events decoded in place").
fn merge_ingest_request(request: &mut IngestRequest, mut bytes: &[u8]) -> Result<(), DecodeError> {
    reserve_events(request, bytes);
    while !bytes.is_empty() {
        let (tag, wire_type) = decode_key(&mut bytes)?;
        if tag != EVENTS_TAG {
            request.merge_field(tag, wire_type, &mut bytes, DecodeContext::default())?;
            continue;
        }
        request.events.push(Event::default());
        if let Some(event) = request.events.last_mut() {
            message::merge(wire_type, event, &mut bytes, DecodeContext::default()).map_err(
                |mut error| {
                    error.push("IngestRequest", "events");
                    error
                },
            )?;
        }
    }
    Ok(())
}

/// Sizes an `IngestRequest`'s events for the events in `bytes`, within what its size allows.
fn reserve_events(request: &mut IngestRequest, bytes: &[u8]) {
    let events = count_events(bytes).min(bytes.len() / MIN_PRESIZED_EVENT_BYTES);
    request.events.reserve(events);
}

/// How many `events` fields (field 1) the top level of an encoded `IngestRequest` holds,
/// counted up to the first thing that does not parse (prost then reports it).
fn count_events(mut bytes: &[u8]) -> usize {
    let mut events = 0;
    while !bytes.is_empty() {
        let Ok((tag, wire_type)) = decode_key(&mut bytes) else {
            break;
        };
        let skipped = match wire_type {
            WireType::LengthDelimited => decode_varint(&mut bytes)
                .ok()
                .and_then(|len| usize::try_from(len).ok()),
            WireType::Varint => decode_varint(&mut bytes).ok().map(|_| 0),
            WireType::SixtyFourBit => Some(8),
            WireType::ThirtyTwoBit => Some(4),
            WireType::StartGroup | WireType::EndGroup => None,
        };
        let Some(rest) = skipped.and_then(|skip| bytes.get(skip..)) else {
            break;
        };
        if tag == EVENTS_TAG && wire_type == WireType::LengthDelimited {
            events += 1;
        }
        bytes = rest;
    }
    events
}

/// `IngestRequest.events`.
const EVENTS_TAG: u32 = 1;

/// INVALID_ARGUMENT + BadRequest for a message that does not decode.
pub fn malformed(error: impl std::fmt::Display) -> Status {
    bad_request(
        "request is not a valid protobuf message of this method".to_owned(),
        MALFORMED_FIELD,
        error.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tonic_types::StatusExt;

    use super::*;

    fn sample_request() -> IngestRequest {
        let event = crate::proto::Event {
            service: "billing".to_owned(),
            message: "a message long enough to count".to_owned(),
            user_id: "u-1".to_owned(),
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        IngestRequest {
            events: vec![event; 300],
            sequence: 7,
        }
    }

    #[test]
    fn an_ingest_request_is_sized_for_its_events_before_decoding() {
        let request = sample_request();
        let bytes = request.encode_to_vec();
        assert_eq!(count_events(&bytes), 300);
        let mut decoded = IngestRequest::default();
        reserve_events(&mut decoded, &bytes);
        assert!(decoded.events.capacity() >= 300);
        // Truncated input counts what parses; empty events reserve no more than the size
        // allows.
        assert_eq!(count_events(&bytes[..bytes.len() / 2]), 150);
        let empty = IngestRequest {
            events: vec![crate::proto::Event::default(); 1000],
            sequence: 0,
        }
        .encode_to_vec();
        let mut sized = IngestRequest::default();
        reserve_events(&mut sized, &empty);
        assert!(sized.events.capacity() <= empty.len() / MIN_PRESIZED_EVENT_BYTES);
    }

    #[test]
    fn an_ingest_request_decodes_in_place_as_prost_decodes_it() {
        let request = sample_request();
        let mut bytes = request.encode_to_vec();
        // An unknown field, and the sequence again (the last one wins), after the events.
        bytes.extend_from_slice(&[0xa0, 0x06, 0x2a, 0x10, 0x09]);
        let mut decoded = IngestRequest::default();
        merge_ingest_request(&mut decoded, &bytes).expect("decodes");
        let by_prost = IngestRequest::decode(bytes.as_slice()).expect("prost decodes");
        assert_eq!(decoded, by_prost);
        assert_eq!(decoded.events, request.events);
        assert_eq!(decoded.sequence, 9);
        // Every cut of the request is refused by both, or read alike by both.
        for end in (0..bytes.len()).step_by(7) {
            let mut cut = IngestRequest::default();
            match (
                merge_ingest_request(&mut cut, &bytes[..end]),
                IngestRequest::decode(&bytes[..end]),
            ) {
                (Ok(()), Ok(by_prost)) => assert_eq!(cut, by_prost, "cut at {end}"),
                (Err(_), Err(_)) => {}
                (ours, prost) => panic!("cut at {end}: {ours:?} against prost's {prost:?}"),
            }
        }
        // A field of the wrong wire type, and invalid UTF-8, are errors as in prost.
        let wrong_type = [0x08, 0x01];
        assert!(merge_ingest_request(&mut IngestRequest::default(), &wrong_type).is_err());
        let not_utf8 = [0x0a, 0x04, 0x12, 0x02, 0xff, 0xfe];
        assert!(IngestRequest::decode(&not_utf8[..]).is_err());
        assert!(merge_ingest_request(&mut IngestRequest::default(), &not_utf8).is_err());
    }

    #[test]
    fn garbage_is_invalid_argument_with_a_bad_request_naming_the_request() {
        let error = crate::proto::IngestRequest::decode(&b"\xff\xff\xff\xff"[..])
            .expect_err("garbage does not decode");
        let status = malformed(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("bad request").field_violations[0];
        assert_eq!(violation.field, MALFORMED_FIELD);
        assert!(!violation.description.is_empty());
        // A valid message still decodes.
        let mut bytes = BytesMut::new();
        crate::proto::IngestRequest::default()
            .encode(&mut bytes)
            .expect("encode");
        assert!(crate::proto::IngestRequest::decode(bytes).is_ok());
    }
}
