//! `[validation]`: what an event may hold.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Largest `message`, in bytes.
    #[default(8 * 1024)]
    pub max_message_bytes: usize,
    /// Largest `metadata`, in bytes of compact JSON.
    #[default(16 * 1024)]
    pub max_metadata_bytes: usize,
    /// Deepest nesting of `metadata` (the top-level object is depth 1).
    #[default(16)]
    pub max_metadata_depth: usize,
    /// Deprecated alias of `retention.default`; when set, it is used as that.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
    /// How far in the future a `timestamp` may be.
    #[default(Duration::from_secs(5 * 60))]
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Rejections detailed in one response (all are counted).
    #[default(100)]
    pub max_reported_rejections: usize,
    /// Largest `user_id`, in bytes (it is indexed).
    #[default(256)]
    pub max_user_id_bytes: usize,
}

impl ValidationConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_metadata_depth == 0 {
            return Err(invalid(
                "validation.max_metadata_depth",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
