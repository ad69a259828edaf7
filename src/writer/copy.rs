//! Encoding of events in PostgreSQL's binary COPY format.
//!
//! Binary COPY skips text escaping on our side and text parsing of uuid, timestamptz and
//! jsonb on the server's. Layout: signature, flags, header extension length, then per row a
//! field count and length-prefixed fields, then a -1 trailer.

use bytes::{BufMut, BytesMut};

use crate::event::ValidEvent;

/// The column list every COPY of events uses, in the order [`encode`] writes them.
pub const COLUMNS: &str = "id, service, message, ts, user_id, metadata";

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const POSTGRES_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
const JSONB_VERSION: u8 = 1;
const FIELD_COUNT: i16 = 6;

/// Encodes `events` as one complete binary COPY payload.
pub fn encode<'a>(events: impl IntoIterator<Item = &'a ValidEvent>, out: &mut BytesMut) {
    out.put_slice(SIGNATURE);
    out.put_i32(0);
    out.put_i32(0);
    for event in events {
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
        out.put_i32(len_i32(event.metadata_json.len() + 1));
        out.put_u8(JSONB_VERSION);
        out.put_slice(event.metadata_json.as_bytes());
    }
    out.put_i16(-1);
}

/// The encoded size of `event`, to size buffers ahead.
pub fn encoded_len(event: &ValidEvent) -> usize {
    2 + (4 * 6)
        + 16
        + event.service.len()
        + event.message.len()
        + 8
        + event.user_id.as_ref().map_or(0, String::len)
        + 1
        + event.metadata_json.len()
}

fn put_field(out: &mut BytesMut, value: &[u8]) {
    out.put_i32(len_i32(value.len()));
    out.put_slice(value);
}

/// Field lengths are bounded by validation (kilobytes), far below i32::MAX.
fn len_i32(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn a_row_is_encoded_with_header_fields_and_trailer() {
        let event = ValidEvent {
            index: 0,
            id: Uuid::nil(),
            service: "svc".to_owned(),
            message: "hi".to_owned(),
            timestamp: DateTime::from_timestamp(946_684_800, 1_000).expect("date"),
            user_id: None,
            metadata_json: "{}".to_owned(),
        };
        let mut out = BytesMut::new();
        encode([&event], &mut out);
        assert_eq!(&out[..11], SIGNATURE);
        assert_eq!(out.len(), 19 + encoded_len(&event) + 2);
        // The timestamp is 1 µs after PostgreSQL's epoch.
        let ts_at = 19 + 2 + 4 + 16 + 4 + 3 + 4 + 2 + 4;
        assert_eq!(&out[ts_at..ts_at + 8], &1i64.to_be_bytes());
        assert_eq!(&out[out.len() - 2..], &(-1i16).to_be_bytes());
    }
}
