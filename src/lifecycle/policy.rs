//! How long each service's events are kept: the first `retention.rules` entry whose globs
//! match, else `retention.default`.

use std::time::Duration;

use crate::{
    config::RetentionConfig,
    glob::{GlobError, ServiceGlobs},
};

#[derive(Debug, Clone)]
struct Rule {
    services: ServiceGlobs,
    keep: Duration,
    /// How the rule is named in rejections and logs.
    label: String,
}

/// Retention per service.
#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    default: Duration,
    rules: Vec<Rule>,
}

/// The retention that applies to one service, and which setting says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep<'a> {
    pub keep: Duration,
    pub rule: &'a str,
}

const DEFAULT_LABEL: &str = "retention.default";

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            default: RetentionConfig::default().default,
            rules: Vec::new(),
        }
    }
}

impl RetentionPolicy {
    pub fn new(config: &RetentionConfig) -> Result<Self, GlobError> {
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                Ok(Rule {
                    services: ServiceGlobs::new(&rule.services)?,
                    keep: rule.keep,
                    label: format!(
                        "retention rule for [{}] ({})",
                        rule.services.join(", "),
                        humantime::format_duration(rule.keep)
                    ),
                })
            })
            .collect::<Result<_, GlobError>>()?;
        Ok(Self {
            default: config.default,
            rules,
        })
    }

    pub fn keep_for(&self, service: &str) -> Keep<'_> {
        self.rules
            .iter()
            .find(|rule| rule.services.allows(service))
            .map_or(
                Keep {
                    keep: self.default,
                    rule: DEFAULT_LABEL,
                },
                |rule| Keep {
                    keep: rule.keep,
                    rule: &rule.label,
                },
            )
    }

    /// The longest retention of any service: partitions older than this hold nothing kept.
    pub fn longest(&self) -> Duration {
        self.rules
            .iter()
            .map(|rule| rule.keep)
            .fold(self.default, Duration::max)
    }

    /// Each distinct way of selecting services, with its retention, for the lifecycle job: the
    /// rules in order (a service belongs to the first that matches), then the default for the
    /// rest. Each entry carries the LIKE patterns of the rules before it, to exclude.
    pub fn sweeps(&self) -> Vec<Sweep> {
        let mut earlier: Vec<String> = Vec::new();
        let mut sweeps = Vec::new();
        for rule in &self.rules {
            let patterns = rule.services.like_patterns();
            sweeps.push(Sweep {
                include: patterns.clone(),
                exclude: earlier.clone(),
                keep: rule.keep,
                label: rule.label.clone(),
            });
            match patterns {
                Some(patterns) => earlier.extend(patterns),
                // A rule for every service: nothing is left for later ones.
                None => return sweeps,
            }
        }
        sweeps.push(Sweep {
            include: None,
            exclude: earlier,
            keep: self.default,
            label: DEFAULT_LABEL.to_owned(),
        });
        sweeps
    }
}

/// The `WHERE` of one sweep: its services (or all, `$2` NULL), less those of earlier rules
/// (`$3`).
pub const SWEEP_SERVICES: &str =
    "($2::text[] IS NULL OR service LIKE ANY($2)) AND NOT (service LIKE ANY($3))";

/// One retention rule as the lifecycle job applies it in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// `service LIKE ANY(include)`; None for every service.
    pub include: Option<Vec<String>>,
    /// `NOT service LIKE ANY(exclude)`: services an earlier rule owns.
    pub exclude: Vec<String>,
    pub keep: Duration,
    pub label: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetentionRule;

    fn policy() -> RetentionPolicy {
        RetentionPolicy::new(&RetentionConfig {
            default: Duration::from_secs(30 * 86_400),
            rules: vec![
                RetentionRule {
                    services: vec!["audit-*".to_owned(), "payments".to_owned()],
                    keep: Duration::from_secs(365 * 86_400),
                },
                RetentionRule {
                    services: vec!["debug-*".to_owned()],
                    keep: Duration::from_secs(86_400),
                },
            ],
        })
        .expect("policy")
    }

    #[test]
    fn the_first_matching_rule_wins_and_others_get_the_default() {
        let policy = policy();
        assert_eq!(
            policy.keep_for("payments").keep,
            Duration::from_secs(365 * 86_400)
        );
        assert_eq!(
            policy.keep_for("debug-api").keep,
            Duration::from_secs(86_400)
        );
        let other = policy.keep_for("checkout");
        assert_eq!(
            (other.keep, other.rule),
            (Duration::from_secs(30 * 86_400), DEFAULT_LABEL)
        );
        assert_eq!(policy.longest(), Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn sweeps_give_each_service_to_exactly_one_rule() {
        let sweeps = policy().sweeps();
        assert_eq!(sweeps.len(), 3);
        assert_eq!(sweeps[1].exclude, ["audit-%", "payments"]);
        assert_eq!(sweeps[2].include, None);
        assert_eq!(sweeps[2].exclude, ["audit-%", "payments", "debug-%"]);
    }
}
