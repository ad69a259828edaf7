//! Decoded archived objects for Query: an object is fetched, checked against its sha256 and
//! decoded once, then kept (bounded in bytes, `archive.query_cache_bytes`) for the next page
//! that reads it. A load runs in a task of its own, so a call that stops at its time budget
//! leaves the load going and the next call finds the object decoded. Objects are keyed by
//! their catalog id, which a rewrite never reuses: a cached object is never stale.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use quick_cache::{Weighter, sync::Cache};
use serde::Deserialize;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{
    Archive, ArchiveError,
    catalog::ArchivedObject,
    format::{self, ArchivedEvent},
};
use crate::metrics;

/// One archived object, decompressed: its text, and where each line is, in
/// `(timestamp, id)` order. Lines are parsed whole only when a call looks at them.
pub struct DecodedObject {
    path: String,
    text: String,
    pub lines: Vec<LineKey>,
}

/// Where a line is in its object, and its place in the order of events.
#[derive(Debug, Clone, Copy)]
pub struct LineKey {
    pub timestamp: DateTime<Utc>,
    pub id: Uuid,
    start: u32,
    end: u32,
}

/// The fields of a line that order it; the rest is skipped, not built.
#[derive(Deserialize)]
struct KeyFields {
    id: Uuid,
    timestamp: DateTime<Utc>,
}

impl DecodedObject {
    /// Decompresses an object's bytes (already checked against its sha256) and reads the
    /// key of every line.
    fn parse(path: &str, bytes: &[u8]) -> Result<Self, ArchiveError> {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let text = format::decompress(bytes).map_err(|error| corrupt(error.to_string()))?;
        let mut lines = Vec::new();
        let mut start = 0usize;
        for line in text.split_inclusive('\n') {
            let end = start + line.len();
            let body = line.trim_end_matches('\n');
            if !body.is_empty() {
                let key: KeyFields =
                    serde_json::from_str(body).map_err(|error| corrupt(error.to_string()))?;
                let offset = |at: usize| {
                    u32::try_from(at).map_err(|_| corrupt("larger than 4 GiB".to_owned()))
                };
                lines.push(LineKey {
                    timestamp: key.timestamp,
                    id: key.id,
                    start: offset(start)?,
                    end: offset(start + body.len())?,
                });
            }
            start = end;
        }
        // Written in this order; sorting again costs little and guards objects written by
        // anything else.
        if !lines.is_sorted_by_key(|line| (line.timestamp, line.id)) {
            lines.sort_by_key(|line| (line.timestamp, line.id));
        }
        Ok(Self {
            path: path.to_owned(),
            text,
            lines,
        })
    }

    /// The text of a line.
    pub fn text(&self, line: &LineKey) -> &str {
        self.text
            .get(line.start as usize..line.end as usize)
            .unwrap_or_default()
    }

    /// A line parsed whole.
    pub fn event(&self, line: &LineKey) -> Result<ArchivedEvent, ArchiveError> {
        ArchivedEvent::parse(self.text(line)).map_err(|error| ArchiveError::Corrupt {
            path: self.path.clone(),
            reason: error.to_string(),
        })
    }

    /// About what it holds in memory, in bytes.
    fn weight(&self) -> u64 {
        (self.text.len() + self.lines.len() * std::mem::size_of::<LineKey>()) as u64
    }
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<i64, Arc<DecodedObject>> for ByBytes {
    fn weight(&self, _id: &i64, object: &Arc<DecodedObject>) -> u64 {
        object.weight().max(1)
    }
}

/// Decoded objects by catalog id; `None` when `archive.query_cache_bytes` is 0.
pub struct ObjectCache {
    cache: Option<Cache<i64, Arc<DecodedObject>, ByBytes>>,
}

/// Objects of this size are expected, for the cache's table (it grows past it if needed).
const TYPICAL_OBJECT_BYTES: u64 = 4 * 1024 * 1024;

impl ObjectCache {
    pub fn new(bytes: u64) -> Self {
        let cache = (bytes > 0).then(|| {
            let items = (bytes / TYPICAL_OBJECT_BYTES).clamp(16, 4096) as usize;
            Cache::with_weighter(items, bytes, ByBytes)
        });
        Self { cache }
    }
}

impl Archive {
    /// Starts reading `object` for Query (or takes it from the cache): the task ends with
    /// its decoded events, and goes on if the caller stops waiting, so that the cache has it
    /// for the next call. Concurrent calls for one object share one load.
    pub fn decode(
        self: &Arc<Self>,
        object: ArchivedObject,
    ) -> JoinHandle<Result<Arc<DecodedObject>, ArchiveError>> {
        let archive = self.clone();
        tokio::spawn(async move {
            let Some(cache) = &archive.cache.cache else {
                return archive.load(&object).await;
            };
            if let Some(decoded) = cache.get(&object.id) {
                metrics::archive_query_object("cache");
                return Ok(decoded);
            }
            cache
                .get_or_insert_async(&object.id, archive.load(&object))
                .await
        })
    }

    async fn load(&self, object: &ArchivedObject) -> Result<Arc<DecodedObject>, ArchiveError> {
        let bytes = self.get(object).await?;
        let path = object.path.clone();
        let decoded = tokio::task::spawn_blocking(move || DecodedObject::parse(&path, &bytes))
            .await
            .map_err(ArchiveError::Task)??;
        metrics::archive_query_object("store");
        Ok(Arc::new(decoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::format::Encoder;

    fn line(id: u128, seconds: i64) -> (String, chrono::DateTime<chrono::Utc>) {
        let ts = chrono::DateTime::from_timestamp(seconds, 0).expect("ts");
        let text = serde_json::json!({
            "id": uuid::Uuid::from_u128(id), "service": "s", "message": "m",
            "timestamp": ts, "ingested_at": ts, "user_id": null, "metadata": {"n": id},
        })
        .to_string();
        (text, ts)
    }

    #[test]
    fn decoded_objects_are_in_timestamp_then_id_order_and_weigh_their_text() {
        let mut encoder = Encoder::new().expect("encoder");
        for (id, seconds) in [(3, 20), (2, 10), (1, 20)] {
            let (text, ts) = line(id, seconds);
            encoder.push(&text, ts, None, None).expect("push");
        }
        let encoded = encoder.finish().expect("finish").expect("lines");
        let decoded = DecodedObject::parse("p", &encoded.bytes).expect("decoded");
        let order: Vec<u128> = decoded.lines.iter().map(|line| line.id.as_u128()).collect();
        assert_eq!(order, [2, 1, 3]);
        let first = decoded.event(&decoded.lines[0]).expect("event");
        assert_eq!(first.id.as_u128(), 2);
        assert!(first.ingested_at.is_some());
        assert!(decoded.text(&decoded.lines[2]).contains("\"n\":3"));
        assert!(decoded.weight() > 3 * 100, "{}", decoded.weight());
        assert!(matches!(
            DecodedObject::parse("p", b"not zstd"),
            Err(ArchiveError::Corrupt { .. })
        ));
    }
}
