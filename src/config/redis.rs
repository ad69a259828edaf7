//! `role` and `[redis]`: Redis mode, with ingest nodes and writer nodes between which Redis
//! Streams carry the events.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, Secret, invalid};

/// A node's part in Redis mode. Without `redis.url` every node is `all` (direct mode).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes events and writes them to PostgreSQL (through Redis when `redis.url` is set).
    #[default]
    All,
    /// Validates events and appends them to the Redis streams; writes nothing to `events`.
    Ingest,
    /// Reads the Redis streams and writes them to PostgreSQL; refuses ingest RPCs.
    Writer,
}

/// How a Redis entry holds its batch.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryCompression {
    /// Compressed with zstd at `redis.compression_level`.
    #[default]
    Zstd,
    /// As encoded.
    None,
}

impl Role {
    pub fn ingests(self) -> bool {
        matches!(self, Self::All | Self::Ingest)
    }

    pub fn writes(self) -> bool {
        matches!(self, Self::All | Self::Writer)
    }
}

/// Redis Streams between ingest nodes and writer nodes. Off (direct mode) unless `url` is set.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` (or `rediss://` for TLS). Never logged.
    pub url: Option<Secret>,
    /// Seed nodes of a Redis Cluster (`redis://host:port`), instead of `url`: the slot map is
    /// read from them and followed (MOVED, ASK). Comma-separated in the environment.
    #[serde(deserialize_with = "super::secret::secret_list::deserialize")]
    pub cluster_nodes: Vec<Secret>,
    /// Streams events are spread over, each batch to the next (`<prefix>:<n>`, or
    /// `<prefix>:{<n>}` in a cluster: one slot per shard, its counters with it). Unset:
    /// [`RedisConfig::shards`]'s default. May be changed later: every count used is
    /// registered, and writers read them all.
    pub shards: Option<usize>,
    /// Key prefix of the streams and the backlog counters.
    #[default("sluice:events")]
    pub prefix: String,
    /// The consumer group writers read through.
    #[default("sluice-writers")]
    pub group: String,
    /// Entries pending this long with a consumer that stopped renewing them are claimed by
    /// another writer.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// Consumer names (one per writer worker) idle this long with nothing pending are removed
    /// from the group: those of writers that died or were replaced.
    #[default(Duration::from_secs(3600))]
    #[serde(with = "humantime_serde")]
    pub consumer_expiry: Duration,
    /// Deliveries after which an entry no writer could store goes to `dead_letters`.
    #[default(5)]
    pub max_deliveries: u64,
    /// Events in the streams, not yet written to PostgreSQL, beyond which ingest refuses with
    /// RESOURCE_EXHAUSTED and RetryInfo...
    #[default(1_000_000)]
    pub max_pending_events: u64,
    /// ...or bytes (encoded entries).
    #[default(1 << 30)]
    pub max_pending_bytes: u64,
    /// Replicas that must confirm an append before the ack (`WAITAOF`, in their AOF, where
    /// the server knows it; else `WAIT`, in their memory); 0: the primary only.
    pub wait_replicas: u32,
    /// Longest wait for those replicas; fewer in time fails the append (it is retried).
    #[default(Duration::from_secs(1))]
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Start even when Redis is not `appendonly yes` + `appendfsync always` (acks then
    /// survive less than a Redis crash).
    pub allow_weak_durability: bool,
    /// How entries hold their batch: `zstd` (a batch of logs in a third to a fourth of the
    /// bytes, in Redis's memory, its AOF, its replication and every hop between the nodes) or
    /// `none`. Writer nodes read both; writers older than this setting cannot read `zstd`
    /// entries, so upgrade writer nodes first.
    pub compression: EntryCompression,
    /// zstd's level for entries: negative levels are faster and compress less.
    #[default(-1)]
    pub compression_level: i32,
    /// How often every master's durability settings are read again while running (a
    /// failover or a reshard brings other masters in): while one is weak, appends stop and
    /// ingest spools.
    #[default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub durability_check_interval: Duration,
}

impl RedisConfig {
    /// Whether Redis mode is on.
    pub fn enabled(&self) -> bool {
        self.url.is_some() || self.is_cluster()
    }

    /// The shards: `redis.shards`, else 4 on one Redis and 12 in a cluster (12 spreads evenly
    /// over 1, 2, 3, 4 or 6 masters).
    pub fn shards(&self) -> usize {
        self.shards
            .unwrap_or(if self.is_cluster() { 12 } else { 4 })
    }

    /// Whether the streams live in a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    pub fn check(&self, role: Role) -> Result<(), ConfigError> {
        if role != Role::All && !self.enabled() {
            return Err(invalid(
                "role",
                "ingest and writer roles need redis.url or redis.cluster_nodes (Redis mode)",
            ));
        }
        if self.url.is_some() && self.is_cluster() {
            return Err(invalid(
                "redis.cluster_nodes",
                "set redis.url (one Redis) or redis.cluster_nodes (a cluster), not both",
            ));
        }
        if !(1..=1024).contains(&self.shards()) {
            return Err(invalid("redis.shards", "must be between 1 and 1024"));
        }
        if self.max_deliveries == 0 {
            return Err(invalid("redis.max_deliveries", "must be at least 1"));
        }
        if !zstd::compression_level_range().contains(&self.compression_level) {
            return Err(invalid(
                "redis.compression_level",
                "must be a zstd level (-131072 to 22)",
            ));
        }
        if self.consumer_expiry < self.claim_idle {
            return Err(invalid(
                "redis.consumer_expiry",
                "must be at least redis.claim_idle",
            ));
        }
        if self.claim_idle < Duration::from_millis(100) {
            return Err(invalid("redis.claim_idle", "must be at least 100ms"));
        }
        Ok(())
    }
}
