//! The object format: zstd-compressed NDJSON, one event per line, in exactly the line format of
//! `Export` (`{"id", "service", "message", "timestamp", "ingested_at", "user_id", "metadata"}`),
//! ordered by `(timestamp, id)`. `zstdcat part-1.ndjson.zst | jq` reads one.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, Write},
};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The file name extension of archived objects.
pub const EXTENSION: &str = "ndjson.zst";
/// zstd level: 3 (zstd's default) compresses NDJSON about 8× at several hundred MB/s.
const LEVEL: i32 = 3;

/// One archived line, parsed: what filters, Delete and Restore look at.
#[derive(Debug, Clone, Deserialize)]
pub struct ArchivedEvent {
    pub id: Uuid,
    pub service: String,
    pub message: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub ingested_at: Option<DateTime<Utc>>,
    pub user_id: Option<String>,
    #[serde(default)]
    pub metadata: Json,
    /// Absent from objects archived before trace ids were stored.
    #[serde(default)]
    pub trace_id: Option<String>,
}

impl ArchivedEvent {
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// An object ready to be written, with what the catalog records about it.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Hex SHA-256 of `bytes`.
    pub sha256: String,
    pub rows: i64,
    pub min_ts: DateTime<Utc>,
    pub max_ts: DateTime<Utc>,
    /// Events per user (events without a user are not listed).
    pub users: BTreeMap<String, i64>,
    /// The Bloom filter of its trace ids ([`super::bloom`]).
    pub trace_bloom: Vec<u8>,
}

/// Compresses lines as they come; `finish` gives the object.
pub struct Encoder {
    zstd: zstd::stream::write::Encoder<'static, Vec<u8>>,
    rows: i64,
    raw_bytes: usize,
    span: Option<(DateTime<Utc>, DateTime<Utc>)>,
    users: BTreeMap<String, i64>,
    traces: BTreeSet<String>,
}

impl Encoder {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::stream::write::Encoder::new(Vec::new(), LEVEL)?,
            rows: 0,
            raw_bytes: 0,
            span: None,
            users: BTreeMap::new(),
            traces: BTreeSet::new(),
        })
    }

    /// Appends one line (without its newline).
    pub fn push(
        &mut self,
        line: &str,
        ts: DateTime<Utc>,
        user_id: Option<&str>,
        trace_id: Option<&str>,
    ) -> std::io::Result<()> {
        self.zstd.write_all(line.as_bytes())?;
        self.zstd.write_all(b"\n")?;
        self.rows += 1;
        self.raw_bytes += line.len() + 1;
        self.span = Some(match self.span {
            None => (ts, ts),
            Some((min, max)) => (min.min(ts), max.max(ts)),
        });
        if let Some(user) = user_id {
            *self.users.entry(user.to_owned()).or_default() += 1;
        }
        if let Some(trace) = trace_id.filter(|trace| !self.traces.contains(*trace)) {
            self.traces.insert(trace.to_owned());
        }
        Ok(())
    }

    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// Uncompressed bytes so far.
    pub fn raw_bytes(&self) -> usize {
        self.raw_bytes
    }

    /// The finished object; None when no line was pushed.
    pub fn finish(self) -> std::io::Result<Option<Encoded>> {
        let Some((min_ts, max_ts)) = self.span else {
            return Ok(None);
        };
        let bytes = self.zstd.finish()?;
        Ok(Some(Encoded {
            sha256: sha256_hex(&bytes),
            bytes,
            rows: self.rows,
            min_ts,
            max_ts,
            users: self.users,
            trace_bloom: super::bloom::build(self.traces.iter().map(String::as_str)),
        }))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An object's text, decompressed.
pub fn decompress(bytes: &[u8]) -> std::io::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut zstd::stream::read::Decoder::new(bytes)?, &mut text)?;
    Ok(text)
}

/// The lines of an object, without their newlines.
pub fn decode(bytes: &[u8]) -> std::io::Result<Vec<String>> {
    let reader = std::io::BufReader::new(zstd::stream::read::Decoder::new(bytes)?);
    reader
        .lines()
        .filter(|line| !matches!(line, Ok(line) if line.is_empty()))
        .collect()
}

/// PostgreSQL's `jsonb @>` on JSON values: objects contain objects whose every key they hold
/// with a containing value, arrays contain arrays whose every element some element of theirs
/// contains, and scalars contain equal scalars (numbers compared by value).
pub fn json_contains(container: &Json, contained: &Json) -> bool {
    match (container, contained) {
        (Json::Object(outer), Json::Object(inner)) => inner.iter().all(|(key, value)| {
            outer
                .get(key)
                .is_some_and(|present| json_contains(present, value))
        }),
        (Json::Array(outer), Json::Array(inner)) => inner
            .iter()
            .all(|wanted| outer.iter().any(|present| json_contains(present, wanted))),
        (Json::Number(left), Json::Number(right)) => {
            match (left.as_i64(), right.as_i64(), left.as_u64(), right.as_u64()) {
                (Some(left), Some(right), _, _) => left == right,
                (_, _, Some(left), Some(right)) => left == right,
                // A float against an integer: compared as floats only while the integer is
                // exact in f64 (PostgreSQL compares exact numerics).
                _ => {
                    let exact = |number: &serde_json::Number| {
                        !(number.is_i64() || number.is_u64())
                            || number
                                .as_f64()
                                .is_some_and(|value| value.abs() <= 9_007_199_254_740_992.0)
                    };
                    exact(left) && exact(right) && left.as_f64() == right.as_f64()
                }
            }
        }
        (left, right) => left == right,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).expect("time")
    }

    #[test]
    fn objects_round_trip_with_their_checksum_span_and_users() {
        let mut encoder = Encoder::new().expect("encoder");
        encoder
            .push("{\"a\":1}", at(20), Some("u1"), Some("t1"))
            .expect("push");
        encoder
            .push("{\"a\":2}", at(10), Some("u1"), None)
            .expect("push");
        encoder.push("{\"a\":3}", at(30), None, None).expect("push");
        let encoded = encoder.finish().expect("finish").expect("lines");
        assert_eq!(encoded.rows, 3);
        assert_eq!((encoded.min_ts, encoded.max_ts), (at(10), at(30)));
        assert_eq!(encoded.users.get("u1"), Some(&2));
        assert_eq!(encoded.sha256, sha256_hex(&encoded.bytes));
        assert!(super::super::bloom::may_hold(&encoded.trace_bloom, "t1"));
        assert_eq!(
            decode(&encoded.bytes).expect("decode"),
            ["{\"a\":1}", "{\"a\":2}", "{\"a\":3}"]
        );
        assert!(
            Encoder::new()
                .expect("encoder")
                .finish()
                .expect("finish")
                .is_none()
        );
    }

    #[test]
    fn corrupt_objects_fail_to_decode() {
        assert!(decode(b"not zstd at all").is_err());
    }

    #[test]
    fn containment_follows_jsonb() {
        let metadata =
            json!({"env": "prod", "tags": ["a", "b"], "n": 1, "nested": {"x": {"y": 2}}});
        assert!(json_contains(&metadata, &json!({})));
        assert!(json_contains(&metadata, &json!({"env": "prod"})));
        assert!(json_contains(&metadata, &json!({"tags": ["b"]})));
        assert!(json_contains(&metadata, &json!({"n": 1.0})));
        assert!(json_contains(&metadata, &json!({"nested": {"x": {}}})));
        assert!(!json_contains(&metadata, &json!({"env": "dev"})));
        assert!(!json_contains(&metadata, &json!({"tags": ["c"]})));
        assert!(!json_contains(&metadata, &json!({"tags": "a"})));
        assert!(!json_contains(&metadata, &json!({"missing": null})));
        assert!(!json_contains(
            &json!({"n": u64::MAX}),
            &json!({"n": 1.8446744073709552e19})
        ));
        assert!(json_contains(&json!({"n": 1e20}), &json!({"n": 1e20})));
    }

    #[test]
    fn archived_lines_parse_postgres_timestamps() {
        let event = ArchivedEvent::parse(
            r#"{"id":"0195f3c2-7a3b-7c1e-9f00-000000000001","service":"s","message":"m","timestamp":"2026-11-20T10:00:00.123456+00:00","ingested_at":"2026-11-20T10:00:01+00:00","user_id":null,"metadata":{}}"#,
        )
        .expect("parse");
        assert_eq!(event.timestamp.timestamp_subsec_micros(), 123_456);
        assert_eq!(event.user_id, None);
    }
}
