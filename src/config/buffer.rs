//! `[buffer]`: the bounded buffer between the RPCs and the writers.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Events held between the RPCs and the writers (accepted, not yet committed).
    #[default(50_000)]
    pub max_events: usize,
    /// Bytes held between the RPCs and the writers.
    #[default(256 * 1024 * 1024)]
    pub max_bytes: usize,
    /// How long a request may wait for buffer space before RESOURCE_EXHAUSTED (0 = never wait).
    #[default(Duration::from_millis(200))]
    #[serde(with = "humantime_serde")]
    pub admit_wait: Duration,
}

impl BufferConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_events == 0 || self.max_events > u32::MAX as usize {
            return Err(invalid(
                "buffer.max_events",
                "must be between 1 and 4294967295",
            ));
        }
        if self.max_bytes == 0 || self.max_bytes > u32::MAX as usize {
            return Err(invalid(
                "buffer.max_bytes",
                "must be between 1 and 4294967295",
            ));
        }
        Ok(())
    }
}
