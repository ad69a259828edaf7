//! `[spool]`: the fsync'd disk spool that takes batches while PostgreSQL is down.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Spool batches to disk while the circuit is open. Off: clients get RESOURCE_EXHAUSTED
    /// once the buffer fills during a database outage.
    #[default(true)]
    pub enabled: bool,
    /// Spool directory. Default: `data_dir/spool`.
    pub dir: Option<PathBuf>,
    /// Most bytes the spool may hold; beyond, the buffer fills and clients are refused.
    #[default(1024 * 1024 * 1024)]
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started.
    #[default(64 * 1024 * 1024)]
    pub segment_bytes: u64,
}
