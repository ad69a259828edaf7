//! `[writer]` and `[breaker]`: the writer pool, its batches and retries, and the circuit that
//! sends batches to the spool while PostgreSQL fails.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

/// A spooled batch is one spool record (256 MiB at most); JSON escaping can grow text up to 6
/// times, so a batch stays at or under 32 MiB.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Writer tasks. They share one pool of `workers + 3` connections (the extra ones serve
    /// health pings, partition upkeep, the spool replayer and Delete).
    #[default(2)]
    pub workers: usize,
    /// A batch is flushed once it holds this many events...
    #[default(5_000)]
    pub batch_max_events: usize,
    /// ...or this many bytes...
    #[default(16 * 1024 * 1024)]
    pub batch_max_bytes: usize,
    /// ...or when its first event has waited this long.
    #[default(Duration::from_millis(5))]
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// First delay before retrying a failed write; doubles up to `retry_max_backoff`.
    #[default(Duration::from_millis(100))]
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Longest one database step of a batch write (a transaction) may take before it counts as
    /// a failure; isolating bad rows takes several steps, each bounded by this. Also the
    /// server-side statement and idle-in-transaction timeout of the write pool.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl WriterConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(invalid("writer.workers", "must be between 1 and 1024"));
        }
        if self.batch_max_events == 0 {
            return Err(invalid("writer.batch_max_events", "must be at least 1"));
        }
        if self.batch_max_bytes == 0 || self.batch_max_bytes > MAX_BATCH_BYTES {
            return Err(invalid(
                "writer.batch_max_bytes",
                "must be between 1 and 33554432 (32 MiB)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed writes that open the circuit (writes then go to the spool).
    #[default(3)]
    pub failure_threshold: u32,
    /// First pause before a half-open probe; doubles after each failed probe...
    #[default(Duration::from_secs(1))]
    #[serde(with = "humantime_serde")]
    pub open_initial: Duration,
    /// ...up to this.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub open_max: Duration,
    /// A write (one transaction) that takes at least this long is slow...
    #[default(Duration::from_secs(2))]
    #[serde(with = "humantime_serde")]
    pub slow_write: Duration,
    /// ...and this many slow writes within `window` open the circuit (0: no slow rule).
    #[default(3)]
    pub slow_write_count: u32,
    /// The sliding window of the slow and error-rate rules.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Failed writes above this share of those in `window` open the circuit...
    #[default(0.1)]
    pub max_error_rate: f64,
    /// ...once the window holds at least this many writes (0: no error-rate rule).
    #[default(20)]
    pub min_writes: u32,
}

impl BreakerConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.failure_threshold == 0 {
            return Err(invalid("breaker.failure_threshold", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err(invalid(
                "breaker.max_error_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        Ok(())
    }
}
