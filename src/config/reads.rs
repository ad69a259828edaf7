//! `[reads]`: what one reader may hold of the server. A client that stops reading, or asks
//! for huge pages, or opens a thousand streams, gets its own calls refused or ended; the
//! others go on.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ReadsConfig {
    /// Largest Query response, in bytes of events (message and metadata as stored): a page
    /// stops early past it, with a token for the rest. Below clients' usual 4 MiB limit.
    #[default(2 * 1024 * 1024)]
    pub max_response_bytes: usize,
    /// Query calls one principal may have running at once; more are RESOURCE_EXHAUSTED.
    #[default(8)]
    pub max_queries_per_principal: usize,
    /// Exports one principal may have running at once; more are RESOURCE_EXHAUSTED.
    #[default(2)]
    pub max_exports_per_principal: usize,
    /// Longest an Export waits for its client to take the next chunk; past it the export
    /// ends, and its database connection (and snapshot) is freed.
    #[default(Duration::from_secs(60))]
    #[serde(with = "humantime_serde")]
    pub export_idle_timeout: Duration,
    /// Tail streams open at once on this node...
    #[default(1024)]
    pub max_tails: usize,
    /// ...and per principal.
    #[default(64)]
    pub max_tails_per_principal: usize,
}

impl ReadsConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_response_bytes < 64 * 1024 {
            return Err(invalid(
                "reads.max_response_bytes",
                "must be at least 65536",
            ));
        }
        for (field, value) in [
            (
                "reads.max_queries_per_principal",
                self.max_queries_per_principal,
            ),
            (
                "reads.max_exports_per_principal",
                self.max_exports_per_principal,
            ),
            ("reads.max_tails", self.max_tails),
            (
                "reads.max_tails_per_principal",
                self.max_tails_per_principal,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.export_idle_timeout.is_zero() {
            return Err(invalid("reads.export_idle_timeout", "must be above zero"));
        }
        Ok(())
    }
}
