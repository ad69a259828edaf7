//! An event row as the NDJSON line Export sends, built by sluice from the row's columns rather
//! than by PostgreSQL (`json_build_object` per row costs PostgreSQL about 2.5× the CPU of
//! sending the columns: BENCHMARKS.md, "Export lines built by sluice"). The line is the one
//! [`super::EVENT_JSON`] gives, byte for byte (a test holds the two together): the same keys in
//! the same order with PostgreSQL's `" : "` and `", "` separators, timestamps as PostgreSQL
//! writes them in JSON (UTC, microseconds without trailing zeros), strings escaped as
//! PostgreSQL escapes them, and the metadata as `jsonb`'s own text.

use std::fmt::Write;

use chrono::{DateTime, Datelike, Timelike, Utc};
use uuid::Uuid;

/// The columns of an event row that [`EventRow`] decodes, in its order.
pub const EVENT_COLUMNS: &str =
    "id, service, message, ts, ingested_at, user_id, metadata::text, trace_id";

/// One row of [`EVENT_COLUMNS`]: id, service, message, timestamp, ingested at, user id,
/// metadata (as `jsonb` text), trace id.
pub type EventRow = (
    Uuid,
    String,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<String>,
    String,
    Option<String>,
);

/// Writes `row` as its NDJSON line (without the newline) into `line`, which is cleared first.
pub fn write_line(row: &EventRow, line: &mut String) {
    let (id, service, message, timestamp, ingested_at, user_id, metadata, trace_id) = row;
    line.clear();
    line.push_str("{\"id\" : \"");
    line.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
    line.push_str("\", \"service\" : ");
    push_string(line, service);
    line.push_str(", \"message\" : ");
    push_string(line, message);
    line.push_str(", \"timestamp\" : ");
    push_timestamp(line, timestamp);
    line.push_str(", \"ingested_at\" : ");
    push_timestamp(line, ingested_at);
    line.push_str(", \"user_id\" : ");
    push_optional(line, user_id.as_deref());
    line.push_str(", \"metadata\" : ");
    line.push_str(metadata);
    line.push_str(", \"trace_id\" : ");
    push_optional(line, trace_id.as_deref());
    line.push('}');
}

fn push_optional(line: &mut String, value: Option<&str>) {
    match value {
        Some(value) => push_string(line, value),
        None => line.push_str("null"),
    }
}

/// `value` as a JSON string, escaped as PostgreSQL's `escape_json` does: the two-character
/// escapes for `"`, `\`, backspace, form feed, newline, carriage return and tab, `\u00xx` for
/// the other control characters, everything else as it is.
fn push_string(line: &mut String, value: &str) {
    line.push('"');
    let bytes = value.as_bytes();
    let mut start = 0;
    for (position, &byte) in bytes.iter().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Escapes are ASCII: the slices around them end on character boundaries.
        line.push_str(&value[start..position]);
        if escape.is_empty() {
            let _ = write!(line, "\\u{byte:04x}");
        } else {
            line.push_str(escape);
        }
        start = position + 1;
    }
    line.push_str(&value[start..]);
    line.push('"');
}

/// A timestamp as PostgreSQL writes a `timestamptz` in JSON with the session in UTC:
/// `"2026-12-01T00:00:08.4392+00:00"`, the fraction of a second without trailing zeros and
/// left out when zero.
fn push_timestamp(line: &mut String, timestamp: &DateTime<Utc>) {
    let _ = write!(
        line,
        "\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        timestamp.year(),
        timestamp.month(),
        timestamp.day(),
        timestamp.hour(),
        timestamp.minute(),
        timestamp.second()
    );
    let micros = timestamp.timestamp_subsec_micros();
    if micros > 0 {
        let mut fraction = micros;
        let mut digits = 6;
        while fraction.is_multiple_of(10) {
            fraction /= 10;
            digits -= 1;
        }
        let _ = write!(line, ".{fraction:0digits$}");
    }
    line.push_str("+00:00\"");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_postgresql_escapes_them() {
        let mut line = String::new();
        push_string(&mut line, "a\"b\\c\u{8}\u{c}\n\r\t\u{1}\u{1f} é ✓ \u{7f}");
        assert_eq!(
            line,
            "\"a\\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u001f é ✓ \u{7f}\""
        );
    }

    #[test]
    fn timestamps_keep_only_the_digits_of_the_fraction_that_count() {
        let at = |micros: u32| {
            let mut line = String::new();
            let time = DateTime::from_timestamp(1_764_547_208, micros * 1000).expect("time");
            push_timestamp(&mut line, &time);
            line
        };
        assert_eq!(at(0), "\"2025-12-01T00:00:08+00:00\"");
        assert_eq!(at(439_201), "\"2025-12-01T00:00:08.439201+00:00\"");
        assert_eq!(at(100_000), "\"2025-12-01T00:00:08.1+00:00\"");
        assert_eq!(at(10), "\"2025-12-01T00:00:08.00001+00:00\"");
    }
}
