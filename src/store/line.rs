//! An `events` row as Export's NDJSON line, written by sluice from the row's binary columns
//! instead of by PostgreSQL. `json_build_object(…)::text` ([`super::EVENT_JSON`]) costs
//! PostgreSQL about four times the CPU of sending the columns (BENCHMARKS.md, "Export lines
//! written from the binary columns"), and on a box PostgreSQL shares, that is Export's limit.
//!
//! The line is the one [`super::EVENT_JSON`] gives, byte for byte (a test holds the two
//! together): the same keys in the same order with PostgreSQL's `" : "` and `", "` separators,
//! timestamps as PostgreSQL writes a `timestamptz` in JSON in UTC (microseconds without
//! trailing zeros), strings escaped as PostgreSQL's `escape_json` escapes them, and the
//! metadata as `jsonb`'s own text (what its binary form carries after a version byte). The
//! columns are read in place from the row ([`EventColumns`]): nothing is decoded into owned
//! strings, and the line is appended to the caller's buffer.

use chrono::{DateTime, Datelike, Timelike};
use sqlx::{
    Row,
    postgres::{PgRow, PgValueFormat},
};
use uuid::Uuid;

use super::jsonb_text::JSONB_VERSION;
use crate::json_text::needs_escape;

/// The columns [`EventColumns::from_row`] reads, in its order.
pub const EVENT_COLUMNS: &str =
    "id, service, message, ts, ingested_at, user_id, metadata, trace_id";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("column {column} of an events row is not in the binary form expected")]
    Unexpected { column: &'static str },
    #[error("reading an events row: {0}")]
    Row(#[from] sqlx::Error),
}

impl From<LineError> for tonic::Status {
    fn from(error: LineError) -> Self {
        match error {
            LineError::Row(database) => super::database_status(&database),
            unexpected @ LineError::Unexpected { .. } => Self::internal(unexpected.to_string()),
        }
    }
}

/// One row of [`EVENT_COLUMNS`] as slices of the row's binary values.
pub struct EventColumns<'r> {
    id: Uuid,
    service: &'r [u8],
    message: &'r [u8],
    ts: i64,
    ingested_at: i64,
    user_id: Option<&'r [u8]>,
    metadata: &'r [u8],
    trace_id: Option<&'r [u8]>,
}

impl<'r> EventColumns<'r> {
    pub fn from_row(row: &'r PgRow) -> Result<Self, LineError> {
        let id = <[u8; 16]>::try_from(required(row, 0, "id")?)
            .map_err(|_| LineError::Unexpected { column: "id" })?;
        let metadata = match required(row, 6, "metadata")? {
            [JSONB_VERSION, text @ ..] => text,
            _ => return Err(LineError::Unexpected { column: "metadata" }),
        };
        Ok(Self {
            id: Uuid::from_bytes(id),
            service: required(row, 1, "service")?,
            message: required(row, 2, "message")?,
            ts: timestamp(required(row, 3, "ts")?, "ts")?,
            ingested_at: timestamp(required(row, 4, "ingested_at")?, "ingested_at")?,
            user_id: optional(row, 5, "user_id")?,
            metadata,
            trace_id: optional(row, 7, "trace_id")?,
        })
    }

    /// The metadata as `jsonb`'s text.
    pub fn metadata(&self) -> &[u8] {
        self.metadata
    }

    /// Appends the row's NDJSON line, without its newline, to `line`.
    pub fn write_line(&self, line: &mut Vec<u8>) {
        line.reserve(
            160 + self.service.len()
                + self.message.len()
                + self.metadata.len()
                + self.user_id.map_or(0, <[u8]>::len)
                + self.trace_id.map_or(0, <[u8]>::len),
        );
        line.extend_from_slice(b"{\"id\" : \"");
        line.extend_from_slice(
            self.id
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        line.extend_from_slice(b"\", \"service\" : ");
        push_string(line, self.service);
        line.extend_from_slice(b", \"message\" : ");
        push_string(line, self.message);
        line.extend_from_slice(b", \"timestamp\" : ");
        push_timestamp(line, self.ts);
        line.extend_from_slice(b", \"ingested_at\" : ");
        push_timestamp(line, self.ingested_at);
        line.extend_from_slice(b", \"user_id\" : ");
        push_optional(line, self.user_id);
        line.extend_from_slice(b", \"metadata\" : ");
        line.extend_from_slice(self.metadata);
        line.extend_from_slice(b", \"trace_id\" : ");
        push_optional(line, self.trace_id);
        line.push(b'}');
    }
}

/// Column `index`'s binary value; NULL is not expected.
fn required<'r>(row: &'r PgRow, index: usize, column: &'static str) -> Result<&'r [u8], LineError> {
    optional(row, index, column)?.ok_or(LineError::Unexpected { column })
}

/// Column `index`'s binary value, `None` for NULL.
fn optional<'r>(
    row: &'r PgRow,
    index: usize,
    column: &'static str,
) -> Result<Option<&'r [u8]>, LineError> {
    let value = row.try_get_raw(index)?;
    if value.format() != PgValueFormat::Binary {
        return Err(LineError::Unexpected { column });
    }
    if sqlx::ValueRef::is_null(&value) {
        return Ok(None);
    }
    value
        .as_bytes()
        .map(Some)
        .map_err(|_| LineError::Unexpected { column })
}

/// A binary `timestamptz`: microseconds since PostgreSQL's epoch, as Unix microseconds.
fn timestamp(bytes: &[u8], column: &'static str) -> Result<i64, LineError> {
    let micros = <[u8; 8]>::try_from(bytes).map_err(|_| LineError::Unexpected { column })?;
    i64::from_be_bytes(micros)
        .checked_add(POSTGRES_EPOCH_MICROS)
        .ok_or(LineError::Unexpected { column })
}

fn push_optional(line: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => push_string(line, value),
        None => line.extend_from_slice(b"null"),
    }
}

/// `value` as a JSON string, escaped as PostgreSQL's `escape_json` does: the two-character
/// escapes for `"`, `\`, backspace, form feed, newline, carriage return and tab, `\u00xx` for
/// the other control characters, every other byte as it is.
fn push_string(line: &mut Vec<u8>, value: &[u8]) {
    line.push(b'"');
    if !needs_escape(value) {
        line.extend_from_slice(value);
        line.push(b'"');
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &byte in value {
        match byte {
            b'"' => line.extend_from_slice(b"\\\""),
            b'\\' => line.extend_from_slice(b"\\\\"),
            0x08 => line.extend_from_slice(b"\\b"),
            0x0c => line.extend_from_slice(b"\\f"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            b'\t' => line.extend_from_slice(b"\\t"),
            0x00..=0x1f => {
                line.extend_from_slice(b"\\u00");
                line.push(HEX[usize::from(byte >> 4)]);
                line.push(HEX[usize::from(byte & 0x0f)]);
            }
            _ => line.push(byte),
        }
    }
    line.push(b'"');
}

/// A timestamp (Unix microseconds) as PostgreSQL writes a `timestamptz` in JSON with the
/// session in UTC: `"2026-12-01T00:00:08.4392+00:00"`, the fraction of a second without
/// trailing zeros and left out when zero.
fn push_timestamp(line: &mut Vec<u8>, micros: i64) {
    let Some(time) = DateTime::from_timestamp_micros(micros) else {
        // Past chrono's range (PostgreSQL's is wider): only `infinity` is stored this far
        // out, and ingest never stores it.
        line.extend_from_slice(if micros < 0 {
            b"\"-infinity\""
        } else {
            b"\"infinity\""
        });
        return;
    };
    line.push(b'"');
    push_digits(line, time.year().unsigned_abs(), 4);
    line.push(b'-');
    push_digits(line, time.month(), 2);
    line.push(b'-');
    push_digits(line, time.day(), 2);
    line.push(b'T');
    push_digits(line, time.hour(), 2);
    line.push(b':');
    push_digits(line, time.minute(), 2);
    line.push(b':');
    push_digits(line, time.second(), 2);
    let mut fraction = time.timestamp_subsec_micros();
    if fraction > 0 {
        let mut digits = 6;
        while fraction % 10 == 0 {
            fraction /= 10;
            digits -= 1;
        }
        line.push(b'.');
        push_digits(line, fraction, digits);
    }
    line.extend_from_slice(b"+00:00\"");
}

/// `value` in decimal, zero-padded to at least `width` digits.
fn push_digits(line: &mut Vec<u8>, value: u32, width: usize) {
    let mut digits = [b'0'; 10];
    let mut rest = value;
    let mut start = digits.len();
    while rest > 0 || digits.len() - start < width {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    line.extend_from_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(value: &str) -> String {
        let mut line = Vec::new();
        push_string(&mut line, value.as_bytes());
        String::from_utf8(line).expect("utf-8")
    }

    fn time(unix_micros: i64) -> String {
        let mut line = Vec::new();
        push_timestamp(&mut line, unix_micros);
        String::from_utf8(line).expect("utf-8")
    }

    #[test]
    fn strings_are_escaped_as_postgresql_escapes_them() {
        assert_eq!(
            string("a\"b\\c\u{8}\u{c}\n\r\t\u{1}\u{1f} é ✓ \u{7f}"),
            "\"a\\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u001f é ✓ \u{7f}\""
        );
        assert_eq!(string("plain"), "\"plain\"");
        assert_eq!(string(""), "\"\"");
    }

    #[test]
    fn timestamps_keep_only_the_digits_of_the_fraction_that_count() {
        let at = |micros: i64| time(1_764_547_208_000_000 + micros);
        assert_eq!(at(0), "\"2025-12-01T00:00:08+00:00\"");
        assert_eq!(at(439_201), "\"2025-12-01T00:00:08.439201+00:00\"");
        assert_eq!(at(100_000), "\"2025-12-01T00:00:08.1+00:00\"");
        assert_eq!(at(10), "\"2025-12-01T00:00:08.00001+00:00\"");
        assert_eq!(time(0), "\"1970-01-01T00:00:00+00:00\"");
    }

    #[test]
    fn digits_are_padded_to_their_width() {
        let mut line = Vec::new();
        push_digits(&mut line, 7, 2);
        push_digits(&mut line, 0, 4);
        push_digits(&mut line, 12345, 2);
        assert_eq!(line, b"07000012345");
    }

    #[test]
    fn a_binary_timestamp_before_postgresqls_epoch_reads_back() {
        let micros = timestamp(&(-1i64).to_be_bytes(), "ts").expect("eight bytes");
        assert_eq!(time(micros), "\"1999-12-31T23:59:59.999999+00:00\"");
        assert!(timestamp(&[0; 4], "ts").is_err());
    }
}
