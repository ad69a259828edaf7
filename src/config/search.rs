//! `[search]`: how Query bounds a search no index narrows, and the optional search indexes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

/// How Query bounds a search that no index narrows (no `user_id`, no `trace_id`, and no
/// `services` or a content filter): it scans time slices, newest first (or oldest first), and
/// returns what it found when the page is full or `max_scan_time` is spent, with a token that
/// goes on from where it stopped.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// First time slice one step scans; halved when a step is slow, doubled when fast.
    #[default(Duration::from_secs(3600))]
    #[serde(with = "humantime_serde")]
    pub slice: Duration,
    /// Longest a Query scans before it answers with what it found and a token.
    #[default(Duration::from_millis(80))]
    #[serde(with = "humantime_serde")]
    pub max_scan_time: Duration,
    /// A trigram GIN index (`pg_trgm`) on `message`, for `message_contains` of 3 characters or
    /// more. Created (concurrently, partition by partition) or dropped at start-up.
    pub message_index: bool,
    /// A GIN `jsonb_path_ops` index on `metadata`, for every `metadata_contains`.
    pub metadata_index: bool,
    /// Top-level metadata keys with a B-tree index on their text value each, for
    /// `metadata_contains` with a string or boolean value under that key.
    pub indexed_metadata_keys: Vec<String>,
    /// Search indexes on each partition once it stops taking writes (a trigram GIN on
    /// `message`, a GIN `jsonb_path_ops` on `metadata`, a B-tree on `(user_id, ts, id)`),
    /// built in the background, so that a rare `message_contains` or `metadata_contains` reads
    /// an index over past days and scans only the open one, and a user's page walks past days
    /// in order. Ingest never pays for them. Off drops them.
    #[default(true)]
    pub index_closed_partitions: bool,
    /// How long after a partition's range ends its indexes are built: events arriving later
    /// for that range still land, and pay for the index.
    #[default(Duration::from_secs(3600))]
    #[serde(with = "humantime_serde")]
    pub index_delay: Duration,
    /// How many indexed steps (one closed partition each) one Query call reads at once, each
    /// on its own read connection: the days of a search are independent, so a second core
    /// answers it in about half the time.
    #[default(2)]
    pub concurrent_steps: usize,
    /// How often each node looks for closed partitions to index (one node builds at a time)
    /// and refreshes which partitions its searches can read through an index.
    #[default(Duration::from_secs(60))]
    #[serde(with = "humantime_serde")]
    pub index_check_interval: Duration,
}

impl SearchConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.slice < Duration::from_secs(1) {
            return Err(invalid("search.slice", "must be at least 1s"));
        }
        if !(1..=16).contains(&self.concurrent_steps) {
            return Err(invalid("search.concurrent_steps", "must be 1 to 16"));
        }
        if self.index_check_interval.is_zero() {
            return Err(invalid("search.index_check_interval", "must be above zero"));
        }
        if self.max_scan_time.is_zero() {
            return Err(invalid("search.max_scan_time", "must be above zero"));
        }
        for key in &self.indexed_metadata_keys {
            let usable = !key.is_empty()
                && key.len() <= 40
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !usable {
                return Err(invalid(
                    "search.indexed_metadata_keys",
                    "keys are 1 to 40 characters of [A-Za-z0-9_.-]",
                ));
            }
        }
        Ok(())
    }
}
