//! Typed configuration: defaults, then `sluice.toml` (or `--config FILE`), then `SLUICE_*`
//! environment variables, then command-line flags. One struct per section, each with its
//! defaults beside its fields and its own `check()`; every key is listed in the README's
//! Configuration table (a test keeps the two equal).

mod archive;
mod auth;
mod buffer;
mod database;
mod grpc;
mod health;
mod otlp;
mod privacy;
mod reads;
mod redis;
mod retention;
mod search;
mod secret;
mod spool;
mod telemetry;
mod tls;
mod validation;
mod writer;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

pub use archive::{ArchiveConfig, BackupConfig};
pub use auth::{AuthConfig, JwtConfig, PrincipalConfig, PrincipalKind, Scope};
pub use buffer::BufferConfig;
pub use database::DatabaseConfig;
pub use grpc::GrpcConfig;
pub use health::{FreeSpace, HealthConfig};
pub use otlp::OtlpConfig;
pub use privacy::{KmsConfig, PrivacyConfig};
pub use reads::ReadsConfig;
pub use redis::{EntryCompression, RedisConfig, Role};
pub use retention::{LifecycleConfig, RetentionConfig, RetentionRule};
pub use search::SearchConfig;
pub use secret::Secret;
pub use spool::SpoolConfig;
pub use telemetry::{LogConfig, LogFormat, MetricsConfig, TelemetryConfig};
pub use tls::TlsConfig;
pub use validation::ValidationConfig;
pub use writer::{BreakerConfig, WriterConfig};

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// A value of `field` that cannot work.
fn invalid(field: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[default(SocketAddr::from(([0, 0, 0, 0], 50051)))]
    pub listen: SocketAddr,
    /// Directory for server state: the private PostgreSQL cluster (when no database URL is
    /// set), the spool, the archive and the key file by default.
    #[default(PathBuf::from("data"))]
    pub data_dir: PathBuf,
    /// Time allowed, after SIGTERM/SIGINT, to finish in-flight RPCs and drain the buffer (a
    /// humantime string such as `30s`).
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub database: DatabaseConfig,
    pub tls: TlsConfig,
    pub grpc: GrpcConfig,
    pub buffer: BufferConfig,
    pub writer: WriterConfig,
    pub breaker: BreakerConfig,
    pub spool: SpoolConfig,
    pub validation: ValidationConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
    pub retention: RetentionConfig,
    pub lifecycle: LifecycleConfig,
    pub archive: ArchiveConfig,
    pub privacy: PrivacyConfig,
    /// What this node does: `all`, `ingest` or `writer` (the last two need `redis.url`).
    pub role: Role,
    pub redis: RedisConfig,
    pub search: SearchConfig,
    pub reads: ReadsConfig,
    pub health: HealthConfig,
    pub backup: BackupConfig,
    pub otlp: OtlpConfig,
}

impl Config {
    /// Loads defaults, then the TOML file (`path`, or `sluice.toml` when it exists), then the
    /// environment (`SLUICE_LISTEN`, `SLUICE_BUFFER__MAX_EVENTS`, … and `DATABASE_URL`), then
    /// `overrides` (the command-line flags that were given).
    pub fn load(path: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(file) => figment = figment.merge(Toml::file_exact(file)),
            None => figment = figment.merge(Toml::file("sluice.toml")),
        }
        figment = figment
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["SLUICE_READ_DATABASE_URL"])
                    .map(|_| "database.read_url".into()),
            )
            .merge(
                Env::prefixed("SLUICE_")
                    .filter(|key| !key.as_str().eq_ignore_ascii_case("read_database_url"))
                    .split("__"),
            )
            .merge(overrides);
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if let Some(retention) = config.validation.retention {
            config.retention.default = retention;
        }
        config.check()?;
        Ok(config)
    }

    /// Rejects values that cannot work, with the field named: each section checks its own.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.database.check()?;
        self.grpc.check()?;
        self.buffer.check()?;
        self.writer.check()?;
        self.breaker.check()?;
        self.validation.check()?;
        self.telemetry.check()?;
        self.metrics.check()?;
        self.auth.check()?;
        self.retention.check()?;
        self.lifecycle.check()?;
        self.archive.check()?;
        self.privacy.check()?;
        self.redis.check(self.role)?;
        self.search.check()?;
        self.reads.check()?;
        self.backup.check()?;
        self.otlp.check()?;
        Ok(())
    }

    /// Spool directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("spool"))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let config = Config::default();
        assert_eq!(config.listen.port(), 50051);
        assert_eq!(config.buffer.max_events, 50_000);
        assert_eq!(config.buffer.max_bytes, 256 * 1024 * 1024);
        assert_eq!(config.writer.workers, 2);
        assert_eq!(config.retention.default, Duration::from_secs(30 * 86_400));
        assert!(config.lifecycle.enabled);
        assert!(!config.tls.insecure_plaintext);
        config.check().expect("defaults are valid");
    }

    #[test]
    fn bad_retention_settings_fail_at_start_naming_their_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("sluice.toml", "[retention]\ndefault = \"thirty days\"\n")?;
            let error = Config::load(None, Figment::new()).expect_err("unparseable");
            assert!(error.to_string().contains("retention.default"), "{error}");
            jail.create_file(
                "sluice.toml",
                "[[retention.rules]]\nservices = [\"debug-*\"]\nkeep = \"0s\"\n",
            )?;
            let error = Config::load(None, Figment::new()).expect_err("zero keep");
            assert!(
                error.to_string().contains("retention.rules.keep"),
                "{error}"
            );
            jail.create_file(
                "sluice.toml",
                "[[retention.rules]]\nservices = []\nkeep = \"1day\"\n",
            )?;
            let error = Config::load(None, Figment::new()).expect_err("no services");
            assert!(
                error.to_string().contains("retention.rules.services"),
                "{error}"
            );
            jail.create_file("sluice.toml", "[validation]\nretention = \"90days\"\n")?;
            let config = Config::load(None, Figment::new()).expect("deprecated alias");
            assert_eq!(config.retention.default, Duration::from_secs(90 * 86_400));
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_nested_fields_and_database_url() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICE_BUFFER__MAX_EVENTS", "123");
            jail.set_env("SLUICE_WRITER__FLUSH_INTERVAL", "250ms");
            jail.set_env("DATABASE_URL", "postgres://example/db");
            jail.set_env("SLUICE_READ_DATABASE_URL", "postgres://replica/db");
            let config = Config::load(None, Figment::new()).expect("loads");
            assert_eq!(
                config.database.read_url.as_deref(),
                Some("postgres://replica/db")
            );
            assert_eq!(config.buffer.max_events, 123);
            assert_eq!(config.writer.flush_interval, Duration::from_millis(250));
            assert_eq!(
                config.database.url.as_deref(),
                Some("postgres://example/db")
            );
            Ok(())
        });
    }

    #[test]
    fn file_values_apply_and_unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("sluice.toml", "[writer]\nworkers = 3\n")?;
            let config = Config::load(None, Figment::new()).expect("loads");
            assert_eq!(config.writer.workers, 3);
            jail.create_file("bad.toml", "[writer]\nworkerz = 3\n")?;
            assert!(Config::load(Some(Path::new("bad.toml")), Figment::new()).is_err());
            Ok(())
        });
    }

    #[test]
    fn redis_mode_comes_from_the_environment_and_roles_need_it() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICE_REDIS__URL", "redis://:secret@127.0.0.1:6379");
            jail.set_env("SLUICE_ROLE", "writer");
            jail.set_env("SLUICE_REDIS__CLAIM_IDLE", "5s");
            let config = Config::load(None, Figment::new()).expect("loads");
            assert_eq!(config.role, Role::Writer);
            assert_eq!(config.redis.claim_idle, Duration::from_secs(5));
            assert!(
                !format!("{config:?}").contains("secret"),
                "the url is redacted"
            );
            Ok(())
        });
        let mut config = Config {
            role: Role::Ingest,
            ..Config::default()
        };
        assert!(matches!(
            config.check(),
            Err(ConfigError::Invalid { field: "role", .. })
        ));
        config.redis.url = Some(Secret("redis://127.0.0.1".to_owned()));
        assert!(config.check().is_ok());
        config.redis.shards = Some(0);
        assert!(config.check().is_err());
    }

    #[test]
    fn redis_shards_default_to_4_on_one_redis_and_12_in_a_cluster() {
        let mut config = Config::default();
        config.redis.url = Some(Secret("redis://127.0.0.1".to_owned()));
        assert_eq!(config.redis.shards(), 4);
        config.redis.url = None;
        config.redis.cluster_nodes = vec![Secret("redis://127.0.0.1:7000".to_owned())];
        assert_eq!(config.redis.shards(), 12);
        config.redis.shards = Some(6);
        assert_eq!(config.redis.shards(), 6);
    }

    #[test]
    fn zero_buffer_is_refused() {
        let mut config = Config::default();
        config.buffer.max_events = 0;
        assert!(matches!(
            config.check(),
            Err(ConfigError::Invalid {
                field: "buffer.max_events",
                ..
            })
        ));
    }
}

/// The README's Configuration table, held against [`Config::default`].
#[cfg(test)]
mod readme {
    use std::collections::BTreeMap;

    use serde_json::Value as Json;

    use super::Config;

    const README: &str = include_str!("../../README.md");

    /// Every key of the defaults, dotted, with its value (arrays and nulls are leaves).
    fn flatten(prefix: &str, value: &Json, keys: &mut BTreeMap<String, Json>) {
        match value {
            Json::Object(object) => {
                for (key, value) in object {
                    let key = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    flatten(&key, value, keys);
                }
            }
            leaf => {
                keys.insert(prefix.to_owned(), leaf.clone());
            }
        }
    }

    /// Text without its parenthesized asides: "`0` (auto)" is "`0` ".
    fn without_asides(text: &str) -> String {
        let mut depth = 0;
        text.chars()
            .filter(|character| {
                match character {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        return false;
                    }
                    _ => {}
                }
                depth == 0
            })
            .collect()
    }

    /// The backticked parts of a cell.
    fn ticked(text: &str) -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// The table's rows: each key with the default the README gives it.
    fn documented() -> Vec<(String, String)> {
        let section = README
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("the README has a Configuration section");
        let mut rows = Vec::new();
        for line in section.lines().filter(|line| line.starts_with("| `")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let keys = ticked(&without_asides(cells[0]));
            let defaults: Vec<String> = cells[1].split(" / ").map(without_asides).collect();
            for (at, key) in keys.into_iter().enumerate() {
                let default = if defaults.len() > 1 {
                    defaults.get(at).cloned().unwrap_or_default()
                } else {
                    defaults[0].clone()
                };
                rows.push((key, default.trim().to_owned()));
            }
        }
        rows
    }

    /// Whether the README's `text` states `value`.
    fn states(text: &str, value: &Json) -> bool {
        let literal = ticked(text).into_iter().next();
        match (value, literal) {
            // Unset, none, or a default derived from other keys.
            (Json::Null, None) => true,
            (Json::Null, Some(literal)) => literal.contains('/') || literal.contains('<'),
            (Json::Array(items), None) => items.is_empty() && text.starts_with("none"),
            (Json::Array(items), Some(literal)) => {
                serde_json::from_str::<Json>(&literal).is_ok_and(|parsed| parsed == *value)
                    || (items.is_empty() && literal == "[]")
            }
            (_, None) => false,
            (Json::Bool(flag), Some(literal)) => literal == flag.to_string(),
            (Json::Number(number), Some(literal)) => literal
                .parse::<f64>()
                .is_ok_and(|parsed| Some(parsed) == number.as_f64()),
            (Json::String(string), Some(literal)) => {
                literal == *string
                    || humantime::parse_duration(&literal).is_ok_and(|parsed| {
                        humantime::parse_duration(string).is_ok_and(|wanted| parsed == wanted)
                    })
            }
            (Json::Object(_), Some(_)) => false,
        }
    }

    #[test]
    fn the_readme_configuration_table_lists_every_key_with_its_default() {
        let mut keys = BTreeMap::new();
        flatten(
            "",
            &serde_json::to_value(Config::default()).expect("defaults serialize"),
            &mut keys,
        );
        let rows = documented();
        let mut problems = Vec::new();
        for (key, default) in &rows {
            match keys.get(key) {
                None if key == "validation.retention" => {}
                None => problems.push(format!("`{key}` is in the README but not a key")),
                Some(value) if !states(default, value) => problems.push(format!(
                    "`{key}`: the README says {default:?}, the default is {value}"
                )),
                Some(_) => {}
            }
        }
        for key in keys.keys() {
            if !rows.iter().any(|(documented, _)| documented == key) {
                problems.push(format!("`{key}` is missing from the README"));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_readme_check_notices_a_wrong_default() {
        assert!(states("`5s`", &Json::from("5s")));
        assert!(states("`24h`", &Json::from("1day")));
        assert!(!states("`5s`", &Json::from("6s")));
        assert!(!states("`4`", &Json::from(5)));
        assert!(!states("unset", &Json::from(false)));
        assert!(states("unset (direct mode)", &Json::Null));
    }
}
