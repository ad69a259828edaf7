//! Layouts of `redis.shards`: every node registers its count in `<prefix>:layouts`, and
//! writers, the backlog and the Delete barrier read the shards of every registered count
//! beside their own, so that a change of `redis.shards` leaves no entry unread. Appends go to
//! the node's own layout only.

use std::{sync::Arc, time::Duration};

use super::{Broker, BrokerError, spread_tag};
use crate::config::RedisConfig;

/// How often a writer (and the backlog's readers) look for the shards of another
/// `redis.shards` layout.
pub(super) const LAYOUTS_READ_EVERY: Duration = Duration::from_secs(5);

/// The keys of one shard. On one Redis every shard shares the two backlog counters; in a
/// cluster each shard has its own, in its slot.
#[derive(Clone)]
pub(super) struct ShardKeys {
    pub(super) stream: String,
    pub(super) backlog_events: String,
    pub(super) backlog_bytes: String,
}

impl ShardKeys {
    /// The shards of a layout of `shards` streams.
    pub(super) fn layout(config: &RedisConfig, shards: usize) -> Vec<Self> {
        let prefix = &config.prefix;
        (0..shards)
            .map(|shard| {
                if config.is_cluster() {
                    let tag = spread_tag(shard, shards);
                    Self {
                        stream: format!("{prefix}:{{{tag}}}"),
                        backlog_events: format!("{prefix}:{{{tag}}}:backlog:events"),
                        backlog_bytes: format!("{prefix}:{{{tag}}}:backlog:bytes"),
                    }
                } else {
                    Self {
                        stream: format!("{prefix}:{shard}"),
                        backlog_events: format!("{prefix}:backlog:events"),
                        backlog_bytes: format!("{prefix}:backlog:bytes"),
                    }
                }
            })
            .collect()
    }
}

impl Broker {
    /// Every shard read now: this node's layout, then those found in the registry.
    pub(super) fn all_shards(&self) -> Arc<Vec<ShardKeys>> {
        self.shared.shards.load_full()
    }

    /// The set of shard counts nodes have used (one key, one slot).
    pub(super) fn layouts_key(&self) -> String {
        format!("{}:layouts", self.shared.config.prefix)
    }

    /// Reads the registered layouts again when `at_most_every` has passed since the last
    /// read (always with zero), and adds their shards to the read list, with the group.
    pub(super) async fn discover_layouts(
        &self,
        at_most_every: Duration,
    ) -> Result<(), BrokerError> {
        {
            let mut last = self
                .shared
                .layouts_read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|last| last.elapsed() < at_most_every) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let mut connection = self.connection.clone();
        // This node's own count too: a node that started before Redis answered registers here.
        let (_, counts): (i64, Vec<usize>) = redis::pipe()
            .cmd("SADD")
            .arg(self.layouts_key())
            .arg(self.shared.config.shards())
            .cmd("SMEMBERS")
            .arg(self.layouts_key())
            .query_async(&mut connection)
            .await?;
        let known = self.all_shards();
        let mut new: Vec<ShardKeys> = Vec::new();
        for count in counts {
            if !(1..=1024).contains(&count) || count == self.shared.config.shards() {
                continue;
            }
            for shard in ShardKeys::layout(&self.shared.config, count) {
                if known
                    .iter()
                    .chain(&new)
                    .all(|seen| seen.stream != shard.stream)
                {
                    new.push(shard);
                }
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        self.create_group_on(new.iter().map(|shard| &shard.stream))
            .await?;
        tracing::info!(
            streams = new.len(),
            "reading the streams of another redis.shards layout too"
        );
        // Only this task adds (under the time gate); appending keeps every index.
        self.shared.shards.rcu(|current| {
            let mut all: Vec<ShardKeys> = current.as_ref().clone();
            for shard in &new {
                if all.iter().all(|known| known.stream != shard.stream) {
                    all.push(shard.clone());
                }
            }
            all
        });
        Ok(())
    }
}
