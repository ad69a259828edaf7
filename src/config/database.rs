//! `[database]`: where events are stored, and the read pool.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. Unset: sluice runs a private cluster under `data_dir/postgres`.
    /// Also read from the plain `DATABASE_URL` environment variable.
    pub url: Option<String>,
    /// Optional read replica for Query, Export and Stats. Also read from
    /// `SLUICE_READ_DATABASE_URL`.
    pub read_url: Option<String>,
    /// Connections for Query, Export and Stats: a pool of their own (on the read replica when
    /// set), so slow readers never take the writers' connections.
    #[default(4)]
    pub read_connections: u32,
    /// Longest one Query or Stats statement may run on the read pool: one whose filter has no
    /// index path fails with DEADLINE_EXCEEDED instead of holding a connection. The steps of
    /// a time-sliced scan run under what is left of `search.max_scan_time` instead; Export
    /// streams from one snapshot and is exempt; Audit reads the primary.
    #[default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub read_statement_timeout: Duration,
    /// How long to wait for a connection before failing a database call.
    #[default(Duration::from_secs(5))]
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Warn at start-up, and after a failover, when the primary has no synchronous standby
    /// (a failover then loses the commits not yet streamed).
    pub require_sync_standby: bool,
}

impl DatabaseConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.read_statement_timeout.is_zero() {
            return Err(invalid(
                "database.read_statement_timeout",
                "must be above zero",
            ));
        }
        Ok(())
    }
}
