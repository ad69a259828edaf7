//! Decoded archived objects for Query: an object is fetched, checked against its sha256 and
//! decoded once, then kept (bounded in bytes, `archive.query_cache_bytes`) for the next page
//! that reads it. A load runs in a task of its own, so a call that stops at its time budget
//! leaves the load going and the next call finds the object decoded. Objects are keyed by
//! their catalog id, which a rewrite never reuses: a cached object is never stale.

use std::sync::Arc;

use quick_cache::{Weighter, sync::Cache};
use tokio::task::JoinHandle;

use super::{
    Archive, ArchiveError,
    catalog::ArchivedObject,
    format::{self, ArchivedEvent},
};
use crate::metrics;

/// The events of one archived object, in `(timestamp, id)` order.
pub struct DecodedObject {
    pub events: Vec<ArchivedEvent>,
    /// About what it holds in memory, in bytes.
    weight: u64,
}

impl DecodedObject {
    /// Parses an object's bytes (already checked against its sha256).
    fn parse(path: &str, bytes: &[u8]) -> Result<Self, ArchiveError> {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let lines = format::decode(bytes).map_err(|error| corrupt(error.to_string()))?;
        let mut weight = 0u64;
        let mut events = Vec::with_capacity(lines.len());
        for line in lines {
            // Parsed, a line holds about twice its text (strings, the metadata's map).
            weight += 2 * line.len() as u64 + std::mem::size_of::<ArchivedEvent>() as u64;
            events.push(ArchivedEvent::parse(&line).map_err(|error| corrupt(error.to_string()))?);
        }
        // Written in this order; sorting again costs little and guards objects written by
        // anything else.
        if !events.is_sorted_by_key(|event| (event.timestamp, event.id)) {
            events.sort_by_key(|event| (event.timestamp, event.id));
        }
        Ok(Self { events, weight })
    }
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<i64, Arc<DecodedObject>> for ByBytes {
    fn weight(&self, _id: &i64, object: &Arc<DecodedObject>) -> u64 {
        object.weight.max(1)
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
            encoder.push(&text, ts, None).expect("push");
        }
        let encoded = encoder.finish().expect("finish").expect("lines");
        let decoded = DecodedObject::parse("p", &encoded.bytes).expect("decoded");
        let order: Vec<u128> = decoded
            .events
            .iter()
            .map(|event| event.id.as_u128())
            .collect();
        assert_eq!(order, [2, 1, 3]);
        assert!(decoded.events[0].ingested_at.is_some());
        assert!(decoded.weight > 3 * 100, "{}", decoded.weight);
        assert!(matches!(
            DecodedObject::parse("p", b"not zstd"),
            Err(ArchiveError::Corrupt { .. })
        ));
    }
}
