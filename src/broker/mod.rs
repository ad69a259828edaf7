//! Redis Broker between ingest nodes and writer nodes (Redis mode).
//!
//! Ingest nodes append each batch of acknowledged-to-be events as entries of `redis.shards`
//! streams (`<prefix>:<n>`, by a hash of the event id), in one `MULTI` with the backlog
//! counters, and acknowledge clients only after Redis (and `WAIT`'s replicas) has them.
//! Writer nodes read through one consumer group, write to PostgreSQL, then `XACK` and `XDEL`
//! each entry and lower the counters in one script. Nothing is ever trimmed by length: an
//! entry leaves a stream only once it is stored (or dead-lettered).
//!
//! An entry is the spool's record format (a version byte, then a protobuf `SpoolBatch`), so
//! both ends share one versioned, tested encoding.

use std::{sync::Arc, time::Duration};

use redis::{
    AsyncCommands, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply},
};

use chrono::{DateTime, Utc};

use crate::{
    config::RedisConfig,
    event::ValidEvent,
    event::batch::{self, Batch},
};

/// Field of an entry holding the encoded batch.
const PAYLOAD_FIELD: &str = "b";
/// Field of an entry holding its number of events.
const COUNT_FIELD: &str = "n";
/// How long a writer's read waits for new entries before it looks for stale ones.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// Entries one read takes from each stream.
const ENTRIES_PER_READ: usize = 8;

/// Acknowledges entries, deletes them, and lowers the backlog counters by what was really
/// acknowledged (an entry stored twice, after a claim, counts once).
const ACK_SCRIPT: &str = r"
local events, bytes = 0, 0
for i = 3, #KEYS do
  local at = (i - 3) * 3
  if redis.call('XACK', KEYS[i], ARGV[1], ARGV[at + 2]) == 1 then
    redis.call('XDEL', KEYS[i], ARGV[at + 2])
    events = events + tonumber(ARGV[at + 3])
    bytes = bytes + tonumber(ARGV[at + 4])
  end
end
redis.call('DECRBY', KEYS[1], events)
redis.call('DECRBY', KEYS[2], bytes)
return events
";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("only {acked} of {wanted} replicas confirmed the append within {timeout:?}")]
    Replicas {
        wanted: u32,
        acked: i64,
        timeout: Duration,
    },
    #[error(
        "redis is not durable enough: {setting} is {value:?}, acks need appendonly yes, appendfsync always and maxmemory-policy noeviction (set redis.allow_weak_durability to start anyway)"
    )]
    WeakDurability {
        setting: &'static str,
        value: String,
    },
}

/// Redis could not serve a call (the Delete barrier, Stats): retryable.
impl From<BrokerError> for tonic::Status {
    fn from(error: BrokerError) -> Self {
        tracing::error!(%error, "redis error during a call");
        tonic::Status::unavailable("redis error; see server logs")
    }
}

/// Whether the backlog is over its limit, as last read: ingest refuses new events while it is.
#[derive(Debug, Default)]
pub struct BacklogGate {
    over: std::sync::atomic::AtomicBool,
}

impl BacklogGate {
    pub fn is_over(&self) -> bool {
        self.over.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, over: bool) {
        self.over.store(over, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Events and bytes in the streams, not yet in PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub events: u64,
    pub bytes: u64,
}

/// Why an entry's events cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("the entry has no payload")]
    NoPayload,
    #[error(transparent)]
    Batch(#[from] crate::event::batch::BatchError),
}

/// One entry as a writer reads it.
#[derive(Debug)]
pub struct Entry {
    pub shard: usize,
    pub id: String,
    /// The events and when they were admitted, or why they cannot be read (a newer format,
    /// a damaged entry).
    pub events: Result<Batch, EntryError>,
    /// The payload as stored, for `dead_letters` when it cannot be read.
    pub payload: Vec<u8>,
    pub event_count: u64,
    /// Times the entry was delivered to a writer, this delivery included.
    pub deliveries: u64,
}

/// The streams of one deployment. Cheap to clone; clones share one multiplexed connection.
#[derive(Clone)]
pub struct Broker {
    connection: ConnectionManager,
    shared: Arc<Shared>,
}

/// What every connection to the streams shares.
struct Shared {
    client: redis::Client,
    config: RedisConfig,
    keys: Vec<String>,
    backlog_events_key: String,
    backlog_bytes_key: String,
}

/// Whether `error` says a stream has no consumer group (it was deleted and recreated).
pub fn is_missing_group(error: &BrokerError) -> bool {
    matches!(error, BrokerError::Redis(error) if error.code() == Some("NOGROUP"))
}

impl Broker {
    /// Connects, checks Redis's durability settings, and creates the consumer group.
    pub async fn connect(config: &RedisConfig) -> Result<Self, BrokerError> {
        let url = config
            .url
            .as_ref()
            .map(|url| url.0.as_str())
            .unwrap_or_default();
        let client = redis::Client::open(url)?;
        let connection = client
            .get_connection_manager_with_config(connection_config(config))
            .await?;
        let keys = (0..config.shards)
            .map(|shard| format!("{}:{shard}", config.prefix))
            .collect();
        let streams = Self {
            connection,
            shared: Arc::new(Shared {
                client,
                config: config.clone(),
                keys,
                backlog_events_key: format!("{}:backlog:events", config.prefix),
                backlog_bytes_key: format!("{}:backlog:bytes", config.prefix),
            }),
        };
        streams.check_durability().await?;
        streams.create_group().await?;
        Ok(streams)
    }

    /// Refuses (or warns, with `allow_weak_durability`) when an acknowledged append would not
    /// survive a Redis crash: AOF on, fsync on every write.
    async fn check_durability(&self) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        // Eviction would drop entries no writer has stored yet.
        for (setting, wanted) in [
            ("appendonly", "yes"),
            ("appendfsync", "always"),
            ("maxmemory-policy", "noeviction"),
        ] {
            let reply: Result<Vec<String>, _> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(setting)
                .query_async(&mut connection)
                .await;
            let value = match reply {
                Ok(pair) => pair.get(1).cloned().unwrap_or_default(),
                Err(error) => {
                    tracing::warn!(%error, setting, "cannot read redis settings (CONFIG disabled?); make sure appendonly is yes and appendfsync is always");
                    return Ok(());
                }
            };
            if value != wanted {
                if self.shared.config.allow_weak_durability {
                    tracing::warn!(setting, value = %value, wanted, "redis durability is weaker than acks promise: an acknowledged event can be lost in a redis crash (redis.allow_weak_durability is set)");
                } else {
                    return Err(BrokerError::WeakDurability { setting, value });
                }
            }
        }
        Ok(())
    }

    /// Creates the consumer group on every stream that lacks it (a stream deleted by hand is
    /// recreated empty by the next append, without the group).
    pub async fn create_group(&self) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        for key in &self.shared.keys {
            let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(&self.shared.config.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut connection)
                .await;
            match created {
                Ok(()) => {}
                Err(error) if error.code() == Some("BUSYGROUP") => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// A connection of its own, for a writer's blocking reads (a blocked read would hold up
    /// every command multiplexed on a shared one).
    pub async fn reader(&self) -> Result<Self, BrokerError> {
        let connection = self
            .shared
            .client
            .get_connection_manager_with_config(connection_config(&self.shared.config))
            .await?;
        Ok(Self {
            connection,
            shared: self.shared.clone(),
        })
    }

    pub fn shards(&self) -> usize {
        self.shared.keys.len()
    }

    /// Appends `events`, one entry per shard they fall in, with the backlog counters, all or
    /// nothing; then waits for `redis.wait_replicas`. Retrying after an error may append twice:
    /// writers store by id, so a second copy is a duplicate, not a second event.
    pub async fn append(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<(), BrokerError> {
        let mut by_shard: Vec<Vec<&ValidEvent>> = vec![Vec::new(); self.shared.keys.len()];
        for event in events {
            by_shard[shard_of(event, self.shared.keys.len())].push(event);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let (mut total_events, mut total_bytes) = (0u64, 0u64);
        for (key, shard_events) in self.shared.keys.iter().zip(&by_shard) {
            if shard_events.is_empty() {
                continue;
            }
            let payload = batch::encode(shard_events, admitted_at);
            total_events += shard_events.len() as u64;
            total_bytes += payload.len() as u64;
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg(PAYLOAD_FIELD)
                .arg(payload)
                .arg(COUNT_FIELD)
                .arg(shard_events.len())
                .ignore();
        }
        if total_events == 0 {
            return Ok(());
        }
        pipe.cmd("INCRBY")
            .arg(&self.shared.backlog_events_key)
            .arg(total_events)
            .ignore();
        pipe.cmd("INCRBY")
            .arg(&self.shared.backlog_bytes_key)
            .arg(total_bytes)
            .ignore();
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection).await?;
        let wanted = self.shared.config.wait_replicas;
        if wanted > 0 {
            let timeout = self.shared.config.wait_timeout;
            let acked: i64 = redis::cmd("WAIT")
                .arg(wanted)
                .arg(timeout.as_millis() as u64)
                .query_async(&mut connection)
                .await?;
            if acked < i64::from(wanted) {
                return Err(BrokerError::Replicas {
                    wanted,
                    acked,
                    timeout,
                });
            }
        }
        Ok(())
    }

    /// Events and bytes appended and not yet acknowledged by a writer.
    pub async fn backlog(&self) -> Result<Backlog, BrokerError> {
        let mut connection = self.connection.clone();
        let (events, bytes): (Option<i64>, Option<i64>) = connection
            .mget(&[
                &self.shared.backlog_events_key,
                &self.shared.backlog_bytes_key,
            ])
            .await?;
        Ok(Backlog {
            events: events.unwrap_or_default().max(0) as u64,
            bytes: bytes.unwrap_or_default().max(0) as u64,
        })
    }

    /// Whether the backlog is past `redis.max_pending_events` or `max_pending_bytes`.
    pub fn is_over(&self, backlog: Backlog) -> bool {
        backlog.events >= self.shared.config.max_pending_events
            || backlog.bytes >= self.shared.config.max_pending_bytes
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        let mut connection = self.connection.clone();
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut connection).await;
        pong.is_ok()
    }

    /// New entries for `consumer`, waiting up to [`READ_BLOCK`] for some.
    pub async fn read_new(&self, consumer: &str) -> Result<Vec<Entry>, BrokerError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.shared.config.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(ENTRIES_PER_READ)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.shared.keys);
        for _ in &self.shared.keys {
            command.arg(">");
        }
        let mut connection = self.connection.clone();
        let reply: Option<StreamReadReply> = command.query_async(&mut connection).await?;
        let mut entries = Vec::new();
        for stream in reply.map(|reply| reply.keys).unwrap_or_default() {
            let Some(shard) = self.shared.keys.iter().position(|key| *key == stream.key) else {
                continue;
            };
            entries.extend(stream.ids.into_iter().map(|id| entry(shard, id, 1)));
        }
        Ok(entries)
    }

    /// Entries another writer took and left idle past `redis.claim_idle` (it died, or its node
    /// stopped), now delivered to `consumer`.
    pub async fn claim_stale(&self, consumer: &str) -> Result<Vec<Entry>, BrokerError> {
        let mut connection = self.connection.clone();
        let mut entries = Vec::new();
        for (shard, key) in self.shared.keys.iter().enumerate() {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(&self.shared.config.group)
                .arg(consumer)
                .arg(self.shared.config.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(ENTRIES_PER_READ)
                .query_async(&mut connection)
                .await?;
            if !reply.deleted_ids.is_empty() {
                // Pending, but gone from the stream: nothing to store.
                let _: i64 = redis::cmd("XACK")
                    .arg(key)
                    .arg(&self.shared.config.group)
                    .arg(&reply.deleted_ids)
                    .query_async(&mut connection)
                    .await?;
            }
            if reply.claimed.is_empty() {
                continue;
            }
            // Each claimed entry's own delivery count (a range query could be filled by other
            // entries this consumer holds).
            let mut lookups = redis::pipe();
            for claimed in &reply.claimed {
                lookups
                    .cmd("XPENDING")
                    .arg(key)
                    .arg(&self.shared.config.group)
                    .arg(&claimed.id)
                    .arg(&claimed.id)
                    .arg(1);
            }
            let pending: Vec<StreamPendingCountReply> =
                lookups.query_async(&mut connection).await?;
            for (claimed, pending) in reply.claimed.into_iter().zip(pending) {
                // Not pending any more: another writer acknowledged it meanwhile.
                let Some(deliveries) = pending.ids.first().map(|id| id.times_delivered as u64)
                else {
                    continue;
                };
                entries.push(entry(shard, claimed, deliveries));
            }
        }
        Ok(entries)
    }

    /// Keeps `entries` owned by `consumer` (resets their idle time without counting a
    /// delivery), so that a writer waiting out a database outage is not taken for dead.
    pub async fn renew(&self, consumer: &str, entries: &[&Entry]) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        for (shard, key) in self.shared.keys.iter().enumerate() {
            let ids: Vec<&str> = entries
                .iter()
                .filter(|entry| entry.shard == shard)
                .map(|entry| entry.id.as_str())
                .collect();
            if ids.is_empty() {
                continue;
            }
            let _: Vec<String> = redis::cmd("XCLAIM")
                .arg(key)
                .arg(&self.shared.config.group)
                .arg(consumer)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID")
                .query_async(&mut connection)
                .await?;
        }
        Ok(())
    }

    /// Acknowledges and deletes `entries` once they are stored (or dead-lettered), lowering
    /// the backlog. Returns the events acknowledged now (not by an earlier delivery).
    pub async fn ack(&self, entries: &[&Entry]) -> Result<u64, BrokerError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let script = Script::new(ACK_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.shared.backlog_events_key)
            .key(&self.shared.backlog_bytes_key)
            .arg(&self.shared.config.group);
        for entry in entries {
            invocation
                .key(&self.shared.keys[entry.shard])
                .arg(&entry.id)
                .arg(entry.event_count)
                .arg(entry.payload.len());
        }
        let mut connection = self.connection.clone();
        Ok(invocation.invoke_async(&mut connection).await?)
    }

    /// The newest entry id of every stream now: what [`Self::delivered_up_to`] waits for.
    pub async fn mark(&self) -> Result<Vec<Option<String>>, BrokerError> {
        let mut connection = self.connection.clone();
        let mut mark = Vec::with_capacity(self.shared.keys.len());
        for key in &self.shared.keys {
            let newest: Vec<(String, redis::Value)> = redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut connection)
                .await?;
            mark.push(newest.into_iter().next().map(|(id, _)| id));
        }
        Ok(mark)
    }

    /// Whether every entry up to `mark` has left the streams (stored in PostgreSQL or
    /// dead-lettered): entries are deleted only then.
    pub async fn delivered_up_to(&self, mark: &[Option<String>]) -> Result<bool, BrokerError> {
        let mut connection = self.connection.clone();
        for (key, newest) in self.shared.keys.iter().zip(mark) {
            let Some(newest) = newest else { continue };
            let left: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg(newest)
                .arg("COUNT")
                .arg(1)
                .query_async(&mut connection)
                .await?;
            if !left.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn connection_config(config: &RedisConfig) -> ConnectionManagerConfig {
    // Appends with `appendfsync always` (and `WAIT`) take longer than the client's 500 ms
    // default under load; a blocked read takes READ_BLOCK.
    let response_timeout = (config.wait_timeout + Duration::from_secs(5)).max(READ_BLOCK * 4);
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
}

/// The shard of an event: its id's low 64 bits (random in UUIDv4 and v7) modulo the shards.
fn shard_of(event: &ValidEvent, shards: usize) -> usize {
    (event.id.as_u64_pair().1 % shards as u64) as usize
}

fn entry(shard: usize, stream_id: StreamId, deliveries: u64) -> Entry {
    let payload = match stream_id.map.get(PAYLOAD_FIELD) {
        Some(redis::Value::BulkString(bytes)) => bytes.clone(),
        _ => Vec::new(),
    };
    let event_count = stream_id.get::<u64>(COUNT_FIELD).unwrap_or_default();
    let events = if payload.is_empty() {
        Err(EntryError::NoPayload)
    } else {
        batch::decode(&payload).map_err(EntryError::Batch)
    };
    Entry {
        shard,
        id: stream_id.id,
        events,
        payload,
        event_count,
        deliveries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_spread_over_every_shard() {
        let mut seen = [0usize; 4];
        for index in 0..400 {
            seen[shard_of(&ValidEvent::sample(index), 4)] += 1;
        }
        assert!(seen.iter().all(|count| *count > 50), "{seen:?}");
    }

    #[test]
    fn an_entry_decodes_what_an_append_encodes_and_names_what_it_cannot_read() {
        let events = [ValidEvent::sample(0), ValidEvent::sample(1)];
        let payload = batch::encode(&events.iter().collect::<Vec<_>>(), None);
        let mut map = std::collections::HashMap::new();
        map.insert(PAYLOAD_FIELD.to_owned(), redis::Value::BulkString(payload));
        map.insert(
            COUNT_FIELD.to_owned(),
            redis::Value::BulkString(b"2".to_vec()),
        );
        let read = entry(
            1,
            StreamId {
                id: "1-0".to_owned(),
                map,
                ..StreamId::default()
            },
            1,
        );
        assert_eq!(read.event_count, 2);
        let decoded = read.events.expect("decodes").events;
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[1].id, events[1].id);

        let mut map = std::collections::HashMap::new();
        map.insert(
            PAYLOAD_FIELD.to_owned(),
            redis::Value::BulkString(vec![9, 1, 2]),
        );
        let unreadable = entry(
            0,
            StreamId {
                id: "2-0".to_owned(),
                map,
                ..StreamId::default()
            },
            3,
        );
        assert!(unreadable.events.is_err());
        assert_eq!(unreadable.payload, vec![9, 1, 2]);
    }
}
