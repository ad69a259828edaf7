//! `[archive]` and `[backup]`: the object stores that hold old events and the private
//! cluster's backups.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid, secret::optional_duration};

/// The archive: events older than `after` move from PostgreSQL to an object store.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Age at which events leave PostgreSQL for the archive; `off` disables archiving (what
    /// was archived stays readable by Export, Delete and Restore).
    #[default(Some(Duration::from_secs(7 * 86_400)))]
    #[serde(with = "optional_duration")]
    pub after: Option<Duration>,
    /// `file:///path` or `s3://bucket/prefix` (credentials, region and endpoint from the
    /// usual `AWS_*` variables). Default: `file://<data_dir>/archive`.
    pub url: Option<String>,
    /// How long a range brought back by Restore stays in PostgreSQL before it is archived
    /// again.
    #[default(Duration::from_secs(7 * 86_400))]
    #[serde(with = "humantime_serde")]
    pub restore_hold: Duration,
    /// Decoded archived objects a node keeps for the next Query page over the same object,
    /// in bytes (about twice an object's uncompressed size); 0 keeps none.
    #[default(128 * 1024 * 1024)]
    pub query_cache_bytes: u64,
    /// Archived objects one Query call fetches and decodes at once.
    #[default(4)]
    pub query_concurrency: usize,
}

impl ArchiveConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.after.is_some_and(|after| after.is_zero()) {
            return Err(invalid("archive.after", "must be above zero (or off)"));
        }
        if self.restore_hold.is_zero() {
            return Err(invalid("archive.restore_hold", "must be above zero"));
        }
        if self.query_concurrency == 0 {
            return Err(invalid("archive.query_concurrency", "must be above zero"));
        }
        Ok(())
    }
}

/// Backups of the private cluster (with `database.url` set, sluice manages none).
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// `file:///path` or `s3://bucket/prefix` (credentials from the usual `AWS_*` variables).
    /// Set: WAL archiving, scheduled base backups and point-in-time restore. Unset: none.
    pub url: Option<String>,
    /// Take a base backup when the newest is older than this.
    #[default(Duration::from_secs(24 * 3600))]
    #[serde(with = "humantime_serde")]
    pub full_every: Duration,
    /// Remove backups older than this (never the newest), and the WAL only they needed.
    #[default(Duration::from_secs(7 * 24 * 3600))]
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
    /// Most commits a lost machine may take with it, in time: WAL segments are switched and
    /// archived at least every half of this.
    #[default(Duration::from_secs(15 * 60))]
    #[serde(with = "humantime_serde")]
    pub max_rpo: Duration,
}

impl BackupConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.full_every.is_zero() {
            return Err(invalid("backup.full_every", "must be above zero"));
        }
        if self.max_rpo < Duration::from_secs(2) {
            return Err(invalid("backup.max_rpo", "must be at least 2s"));
        }
        Ok(())
    }
}
