//! `[retention]` and `[lifecycle]`: how long events are kept per service, and the job that
//! removes (or archives) what retention no longer keeps.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

/// How long events are kept, per service. An event older than its service's retention is
/// refused at ingest, and the lifecycle job removes stored events once they pass it.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// For services no rule names.
    #[default(Duration::from_secs(30 * 86_400))]
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    /// The first rule whose globs match a service wins.
    pub rules: Vec<RetentionRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Globs (`*` and `?`).
    pub services: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
}

impl RetentionConfig {
    /// The longest retention of any service.
    pub fn longest(&self) -> Duration {
        self.rules
            .iter()
            .map(|rule| rule.keep)
            .fold(self.default, Duration::max)
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        if self.default.is_zero() {
            return Err(invalid("retention.default", "must be above zero"));
        }
        for rule in &self.rules {
            if rule.keep.is_zero() {
                return Err(invalid("retention.rules.keep", "must be above zero"));
            }
            if rule.services.is_empty() {
                return Err(invalid(
                    "retention.rules.services",
                    "must name at least one glob",
                ));
            }
            if rule
                .services
                .iter()
                .any(|glob| glob.is_empty() || glob.contains(['[', ']', '{', '}', '\\']))
            {
                return Err(invalid(
                    "retention.rules.services",
                    "globs may use * and ? only, and must not be empty",
                ));
            }
        }
        Ok(())
    }
}

/// The lifecycle job: removes what retention no longer keeps.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Run the job in the server (one node at a time).
    #[default(true)]
    pub enabled: bool,
    #[default(Duration::from_secs(3600))]
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl LifecycleConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(invalid("lifecycle.interval", "must be above zero"));
        }
        Ok(())
    }
}
