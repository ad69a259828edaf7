//! Encoding of events in PostgreSQL's binary COPY format.
//!
//! Binary COPY skips text escaping on our side and text parsing of uuid, timestamptz and
//! jsonb on the server's. Layout: signature, flags, header extension length, then per row a
//! field count and length-prefixed fields, then a -1 trailer.

use bytes::{BufMut, BytesMut};

use crate::{
    event::{RejectReason, ValidEvent},
    store::jsonb_text::JSONB_VERSION,
};

/// The column list every COPY of events uses, in the order [`encode`] writes them.
pub const COLUMNS: &str = "id, service, message, ts, user_id, metadata, trace_id";

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const POSTGRES_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
const FIELD_COUNT: i16 = 7;
/// A trace id as text: 32 lowercase hex digits.
const TRACE_ID_HEX_BYTES: usize = 32;

/// The longest field PostgreSQL stores (1 GiB less one byte); a COPY field length is an i32.
pub const MAX_FIELD_BYTES: usize = (1 << 30) - 1;

/// A field longer than [`MAX_FIELD_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {position} of the batch: {reason}")]
pub struct FieldTooLong {
    /// The event's position in the encoded batch.
    pub position: usize,
    pub reason: RejectReason,
}

/// Whether every field of `event` fits a COPY field. Writers check before writing, so that an
/// event that cannot be stored is rejected alone instead of failing its batch.
pub fn check(event: &ValidEvent) -> Result<(), RejectReason> {
    let fields = [
        ("service", event.service.len()),
        ("message", event.message.len()),
        ("user_id", event.user_id.as_ref().map_or(0, String::len)),
        ("metadata", event.metadata_json.len() + 1),
    ];
    match fields
        .into_iter()
        .find(|(_, bytes)| *bytes > MAX_FIELD_BYTES)
    {
        Some((field, bytes)) => Err(RejectReason::FieldTooLong { field, bytes }),
        None => Ok(()),
    }
}

/// Encodes `events` as one complete binary COPY payload. Fails, writing no corrupt row, on an
/// event that [`check`] refuses.
pub fn encode<'a>(
    events: impl IntoIterator<Item = &'a ValidEvent>,
    out: &mut BytesMut,
) -> Result<(), FieldTooLong> {
    put_header(out);
    for (position, event) in events.into_iter().enumerate() {
        put_row(out, event).map_err(|reason| FieldTooLong { position, reason })?;
    }
    put_trailer(out);
    Ok(())
}

/// What a binary COPY payload starts with: the signature, no flags, no header extension.
pub fn put_header(out: &mut BytesMut) {
    out.put_slice(SIGNATURE);
    out.put_i32(0);
    out.put_i32(0);
}

/// One event as one row; nothing is written for an event that [`check`] refuses.
pub fn put_row(out: &mut BytesMut, event: &ValidEvent) -> Result<(), RejectReason> {
    check(event)?;
    out.put_i16(FIELD_COUNT);
    put_field(out, event.id.as_bytes());
    put_field(out, event.service.as_bytes());
    put_field(out, event.message.as_bytes());
    out.put_i32(8);
    out.put_i64(event.timestamp.timestamp_micros() - POSTGRES_EPOCH_OFFSET_MICROS);
    match &event.user_id {
        Some(user_id) => put_field(out, user_id.as_bytes()),
        None => out.put_i32(-1),
    }
    put_length(out, event.metadata_json.len() + 1);
    out.put_u8(JSONB_VERSION);
    out.put_slice(event.metadata_json.as_bytes());
    match event.trace_id {
        Some(trace_id) => {
            let mut hex = [0u8; TRACE_ID_HEX_BYTES];
            // 16 bytes always fit 32 hex digits.
            let _ = hex::encode_to_slice(trace_id.to_bytes(), &mut hex);
            put_field(out, &hex);
        }
        None => out.put_i32(-1),
    }
    Ok(())
}

/// What ends a binary COPY payload.
pub fn put_trailer(out: &mut BytesMut) {
    out.put_i16(-1);
}

fn put_field(out: &mut BytesMut, value: &[u8]) {
    put_length(out, value.len());
    out.put_slice(value);
}

/// A field length that [`check`] bounded by MAX_FIELD_BYTES, below i32::MAX.
fn put_length(out: &mut BytesMut, len: usize) {
    out.put_i32(len as i32);
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;
    use uuid::Uuid;

    use super::*;
    use crate::event::TraceId;

    #[test]
    fn a_row_is_encoded_with_header_fields_and_trailer() {
        let event = ValidEvent {
            trace_id: None,
            index: 0,
            id: Uuid::nil(),
            service: "svc".to_owned(),
            message: "hi".to_owned(),
            timestamp: DateTime::from_timestamp(946_684_800, 1_000).expect("date"),
            user_id: None,
            metadata_json: "{}".to_owned(),
        };
        let mut out = BytesMut::new();
        encode([&event], &mut out).expect("fits");
        assert_eq!(&out[..11], SIGNATURE);
        // Header 19; the row: count 2, seven lengths 28, id 16, "svc" 3, "hi" 2, time 8, the
        // jsonb version 1 and "{}" 2 (no user id, no trace: length -1 alone); trailer 2.
        assert_eq!(out.len(), 19 + 62 + 2);
        // The timestamp is 1 µs after PostgreSQL's epoch.
        let ts_at = 19 + 2 + 4 + 16 + 4 + 3 + 4 + 2 + 4;
        assert_eq!(&out[ts_at..ts_at + 8], &1i64.to_be_bytes());
        assert_eq!(&out[out.len() - 2..], &(-1i16).to_be_bytes());
    }

    #[test]
    fn a_trace_id_is_stored_as_its_32_hex_digits() {
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        let event = ValidEvent {
            trace_id: Some(trace_id),
            ..ValidEvent::sample(0)
        };
        let mut out = BytesMut::new();
        encode([&event], &mut out).expect("fits");
        let field = &out[out.len() - 2 - 32..out.len() - 2];
        assert_eq!(field, b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            &out[out.len() - 2 - 36..out.len() - 2 - 32],
            &32i32.to_be_bytes()
        );
    }

    #[test]
    fn an_event_with_a_field_too_long_for_postgresql_is_refused_not_clamped() {
        let fine = ValidEvent {
            trace_id: None,
            index: 0,
            id: Uuid::nil(),
            service: "svc".to_owned(),
            message: "ok".to_owned(),
            timestamp: DateTime::from_timestamp(946_684_800, 0).expect("date"),
            user_id: None,
            metadata_json: "{}".to_owned(),
        };
        let huge = ValidEvent {
            message: "x".repeat(MAX_FIELD_BYTES + 1),
            ..fine.clone()
        };
        assert_eq!(
            check(&huge),
            Err(RejectReason::FieldTooLong {
                field: "message",
                bytes: MAX_FIELD_BYTES + 1
            })
        );
        let mut out = BytesMut::new();
        let error = encode([&fine, &huge], &mut out).expect_err("refused");
        assert_eq!(error.position, 1);
        assert_eq!(error.reason.as_str(), "field_too_long");
    }
}
