//! Redis Broker between ingest nodes and writer nodes (Redis mode).
//!
//! Ingest nodes append each batch of acknowledged-to-be events as one entry of one of
//! `redis.shards` streams (`<prefix>:<n>`, each batch to the next), in one `MULTI` with the
//! backlog counters, and acknowledge clients only after Redis (and `WAIT`'s replicas) has it.
//! Writer nodes read through one consumer group, write to PostgreSQL, then `XACK` and `XDEL`
//! each entry and lower the counters in one script. Nothing is ever trimmed by length: an
//! entry leaves a stream only once it is stored (or dead-lettered).
//!
//! In a Redis Cluster (`redis.cluster_nodes`) every shard lives in one slot: its stream and its
//! backlog counters carry the hash tag `{<n>}`, so an append is one `MULTI` transaction on
//! the master of that slot, and the shards spread over the masters. Commands never span slots:
//! reads and acks go shard by shard, concurrently.
//!
//! An entry is the spool's record format (a version byte, then a protobuf `SpoolBatch`), so
//! both ends share one versioned, tested encoding; by default (`redis.compression`) version 2,
//! that `SpoolBatch` compressed with zstd.

mod append;
mod cluster_link;
mod connection;
mod durability;
mod layouts;
mod replication;
mod reply;

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use futures::future::try_join_all;
use redis::{
    Script,
    streams::{StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamPendingCountReply},
};

use arc_swap::ArcSwap;
use connection::{ConnectError, Connection, Connector};
use layouts::{LAYOUTS_READ_EVERY, ShardKeys};

use crate::{
    config::RedisConfig,
    event::batch::{self, Batch},
};

/// Field of an entry holding the encoded batch.
const PAYLOAD_FIELD: &str = "b";
/// Field of an entry holding its number of events.
const COUNT_FIELD: &str = "n";
/// How long a writer's read waits for new entries before it looks for stale ones.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// In a cluster, where a read spans no slots and so cannot block on all shards at once, how
/// long a writer waits after reads that found nothing.
const CLUSTER_POLL: Duration = Duration::from_millis(50);
/// Entries (each one ingest batch) one read takes over all the streams it reads.
const ENTRIES_PER_READ: usize = 8;

/// Entries a read takes from each of `streams` streams, [`ENTRIES_PER_READ`] over them all.
fn entries_per_stream(streams: usize) -> usize {
    ENTRIES_PER_READ.div_ceil(streams.max(1))
}

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
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{reason}")]
    Weak { reason: String },
    #[error(transparent)]
    Reply(#[from] reply::ReplyError),
    #[error("unexpected reply to an append: {0}")]
    AppendReply(&'static str),
    #[error("cannot encode an entry: {0}")]
    Encode(#[from] batch::BatchError),
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
    connection: Connection,
    shared: Arc<Shared>,
}

/// What every connection to the streams shares.
struct Shared {
    connector: Connector,
    config: RedisConfig,
    /// Every shard writers read: this node's layout first (appends go to these), then the
    /// shards of the other counts nodes registered in `<prefix>:layouts` (a change of
    /// `redis.shards`), so that entries appended under an old count are read and stored.
    /// The list only grows: an entry's shard index stays valid until it is acknowledged.
    shards: ArcSwap<Vec<ShardKeys>>,
    /// When the registered layouts were last read.
    layouts_read: std::sync::Mutex<Option<std::time::Instant>>,
    /// The last re-check of the masters' durability.
    durability: durability::Verdict,
    /// The shard of this node's layout the next append goes to (modulo its count).
    next_shard: AtomicUsize,
    /// `WAITAOF` or `WAIT`, once the masters said which they know.
    wait_command: replication::WaitCommand,
}

/// Whether `error` says a stream has no consumer group (it was deleted and recreated).
pub fn is_missing_group(error: &BrokerError) -> bool {
    matches!(error, BrokerError::Redis(error) if error.code() == Some("NOGROUP"))
}

impl Broker {
    /// Connects, checks Redis's durability settings, and creates the consumer group; a Redis
    /// that cannot be reached yet is connected to by the first command that finds it up.
    pub async fn connect(config: &RedisConfig) -> Result<Self, BrokerError> {
        let (connector, connection) = Connector::connect(config).await?;
        let streams = Self {
            connection,
            shared: Arc::new(Shared {
                connector,
                config: config.clone(),
                shards: ArcSwap::from_pointee(ShardKeys::layout(config, config.shards())),
                layouts_read: std::sync::Mutex::new(None),
                durability: durability::Verdict::default(),
                next_shard: AtomicUsize::new(0),
                wait_command: replication::WaitCommand::default(),
            }),
        };
        // Redis that answers only later gets its groups from the writers (NOGROUP).
        if !matches!(streams.connection, Connection::Pending(_))
            && let Err(error) = streams.create_group().await
        {
            return Err(error);
        }
        Ok(streams)
    }

    /// Creates the consumer group on every stream that lacks it (a stream deleted by hand is
    /// recreated empty by the next append, without the group).
    pub async fn create_group(&self) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        // This node's layout, for writers of any count to find.
        let _: i64 = redis::cmd("SADD")
            .arg(self.layouts_key())
            .arg(self.shared.config.shards())
            .query_async(&mut connection)
            .await?;
        let shards = self.all_shards();
        self.create_group_on(shards.iter().map(|shard| &shard.stream))
            .await
    }

    async fn create_group_on(
        &self,
        keys: impl Iterator<Item = &String>,
    ) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        for key in keys {
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
        let connection = self.shared.connector.reader(&self.shared.config).await?;
        Ok(Self {
            connection,
            shared: self.shared.clone(),
        })
    }

    pub fn shards(&self) -> usize {
        self.shared.config.shards()
    }

    fn is_cluster(&self) -> bool {
        self.shared.config.is_cluster()
    }

    /// Events and bytes appended and not yet acknowledged by a writer.
    pub async fn backlog(&self) -> Result<Backlog, BrokerError> {
        self.discover_layouts(LAYOUTS_READ_EVERY).await?;
        let shards = self.all_shards();
        let mut connection = self.connection.clone();
        // One Redis: the two shared counters; a cluster: every shard's (MGET is split by slot).
        let counters: Vec<&String> = if self.is_cluster() {
            shards
                .iter()
                .flat_map(|shard| [&shard.backlog_events, &shard.backlog_bytes])
                .collect()
        } else {
            vec![&shards[0].backlog_events, &shards[0].backlog_bytes]
        };
        let values: Vec<Option<i64>> = redis::cmd("MGET")
            .arg(&counters)
            .query_async(&mut connection)
            .await?;
        let mut backlog = Backlog::default();
        for pair in values.chunks(2) {
            backlog.events += pair.first().copied().flatten().unwrap_or_default().max(0) as u64;
            backlog.bytes += pair.get(1).copied().flatten().unwrap_or_default().max(0) as u64;
        }
        Ok(backlog)
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

    /// New entries for `consumer`, waiting up to [`READ_BLOCK`] for some (in a cluster, one
    /// read per shard, then [`CLUSTER_POLL`] when none had any).
    pub async fn read_new(&self, consumer: &str) -> Result<Vec<Entry>, BrokerError> {
        self.discover_layouts(LAYOUTS_READ_EVERY).await?;
        let shards = self.all_shards();
        let keys: Vec<&String> = shards.iter().map(|shard| &shard.stream).collect();
        let count = entries_per_stream(keys.len());
        let read = |keys: &[&String], block: Option<Duration>| {
            let mut command = redis::cmd("XREADGROUP");
            command
                .arg("GROUP")
                .arg(&self.shared.config.group)
                .arg(consumer)
                .arg("COUNT")
                .arg(count);
            if let Some(block) = block {
                command.arg("BLOCK").arg(block.as_millis() as u64);
            }
            command.arg("STREAMS").arg(keys);
            for _ in keys {
                command.arg(">");
            }
            command
        };
        let replies: Vec<redis::Value> = if self.is_cluster() {
            let replies = try_join_all(keys.iter().map(|key| {
                let mut connection = self.connection.clone();
                let command = read(&[*key], None);
                async move { command.query_async(&mut connection).await }
            }))
            .await?;
            if replies.iter().all(|reply| *reply == redis::Value::Nil) {
                tokio::time::sleep(CLUSTER_POLL).await;
            }
            replies
        } else {
            let mut connection = self.connection.clone();
            vec![
                read(&keys, Some(READ_BLOCK))
                    .query_async(&mut connection)
                    .await?,
            ]
        };
        let mut entries = Vec::new();
        for reply in replies {
            for stream in reply::read_group(reply)? {
                let Some(shard) = keys.iter().position(|key| **key == stream.key) else {
                    continue;
                };
                entries.extend(stream.entries.into_iter().map(|id| entry(shard, id, 1)));
            }
        }
        Ok(entries)
    }

    /// Entries another writer took and left idle past `redis.claim_idle` (it died, or its node
    /// stopped), now delivered to `consumer`.
    pub async fn claim_stale(&self, consumer: &str) -> Result<Vec<Entry>, BrokerError> {
        let mut connection = self.connection.clone();
        let mut entries = Vec::new();
        let shards = self.all_shards();
        let count = entries_per_stream(shards.len());
        for (shard, key) in shards.iter().map(|shard| &shard.stream).enumerate() {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(&self.shared.config.group)
                .arg(consumer)
                .arg(self.shared.config.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(count)
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

    /// Removes from the group, on every stream, the consumers idle past
    /// `redis.consumer_expiry` that hold nothing pending (a consumer with pending entries
    /// stays: removing it would drop them from the pending list). Returns how many.
    pub async fn forget_idle_consumers(&self) -> Result<u64, BrokerError> {
        let expiry = self.shared.config.consumer_expiry.as_millis();
        let group = &self.shared.config.group;
        let mut connection = self.connection.clone();
        let mut forgotten = 0;
        let shards = self.all_shards();
        for key in shards.iter().map(|shard| &shard.stream) {
            let reply: StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(key)
                .arg(group)
                .query_async(&mut connection)
                .await?;
            for consumer in reply.consumers {
                if consumer.pending > 0 || (consumer.idle as u128) < expiry {
                    continue;
                }
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(key)
                    .arg(group)
                    .arg(&consumer.name)
                    .query_async(&mut connection)
                    .await?;
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }

    /// Keeps `entries` owned by `consumer` (resets their idle time without counting a
    /// delivery), so that a writer waiting out a database outage is not taken for dead.
    pub async fn renew(&self, consumer: &str, entries: &[&Entry]) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        let shards = self.all_shards();
        for (shard, key) in shards.iter().map(|shard| &shard.stream).enumerate() {
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
        let shards = self.all_shards();
        // One script over every stream on one Redis; one per shard (its slot) in a cluster.
        let groups: Vec<Vec<&Entry>> = if self.is_cluster() {
            let mut by_shard: Vec<Vec<&Entry>> = vec![Vec::new(); shards.len()];
            for entry in entries {
                by_shard[entry.shard].push(entry);
            }
            by_shard.retain(|group| !group.is_empty());
            by_shard
        } else {
            vec![entries.to_vec()]
        };
        let shards = &shards;
        let acked = try_join_all(groups.into_iter().map(|group| {
            let mut connection = self.connection.clone();
            async move {
                let counters = &shards[group[0].shard];
                let script = Script::new(ACK_SCRIPT);
                let mut invocation = script.prepare_invoke();
                invocation
                    .key(&counters.backlog_events)
                    .key(&counters.backlog_bytes)
                    .arg(&self.shared.config.group);
                for entry in &group {
                    invocation
                        .key(&shards[entry.shard].stream)
                        .arg(&entry.id)
                        .arg(entry.event_count)
                        .arg(entry.payload.len());
                }
                invocation.invoke_async::<u64>(&mut connection).await
            }
        }))
        .await?;
        Ok(acked.into_iter().sum())
    }

    /// The newest entry id of every stream now: what [`Self::delivered_up_to`] waits for.
    pub async fn mark(&self) -> Result<Vec<Option<String>>, BrokerError> {
        // Every layout's streams: a Delete waits for what nodes of another count appended.
        self.discover_layouts(Duration::ZERO).await?;
        let shards = self.all_shards();
        let mut connection = self.connection.clone();
        let mut mark = Vec::with_capacity(shards.len());
        for key in shards.iter().map(|shard| &shard.stream) {
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
        let shards = self.all_shards();
        for (key, newest) in shards.iter().map(|shard| &shard.stream).zip(mark) {
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

/// Slots of a Redis Cluster.
const CLUSTER_SLOTS: u32 = 16_384;

/// The slot of a hash tag (CRC16/XMODEM modulo the slots, as Redis computes it).
fn slot_of(tag: &str) -> u32 {
    u32::from(crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes())) % CLUSTER_SLOTS
}

/// The hash tag of `shard` (`<shard>.<k>`): the first whose slot falls in the shard's
/// `1/shards` of the slot space. `redis-cli --cluster create` and rebalancing give masters
/// even, contiguous slot ranges, so evenly spaced slots spread the shards over the masters.
fn spread_tag(shard: usize, shards: usize) -> String {
    (0u32..)
        .map(|k| format!("{shard}.{k}"))
        .find(|tag| (slot_of(tag) as usize * shards) / CLUSTER_SLOTS as usize == shard)
        .unwrap_or_else(|| shard.to_string())
}

fn entry(shard: usize, mut stream_id: StreamId, deliveries: u64) -> Entry {
    // Moved out of the reply: an entry's payload is a whole ingest batch.
    let payload = match stream_id.map.remove(PAYLOAD_FIELD) {
        Some(redis::Value::BulkString(bytes)) => bytes,
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
    use crate::event::ValidEvent;

    #[test]
    fn cluster_shards_take_evenly_spaced_slots() {
        // Redis's own example: the slot of "123456789" (CRC16/XMODEM 0x31C3).
        assert_eq!(slot_of("123456789"), 0x31C3 % CLUSTER_SLOTS);
        for shards in [1, 3, 4, 12] {
            for shard in 0..shards {
                let slot = slot_of(&spread_tag(shard, shards)) as usize;
                assert_eq!(
                    slot * shards / CLUSTER_SLOTS as usize,
                    shard,
                    "{shard}/{shards}"
                );
            }
        }
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
