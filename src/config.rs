//! Typed configuration: defaults, then `sluice.toml` (or `--config FILE`), then `SLUICE_*`
//! environment variables, then command-line flags. Every field is listed in the README.

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

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Directory for server state: the private PostgreSQL cluster (when no database URL is set).
    pub data_dir: PathBuf,
    /// Time allowed, after SIGTERM/SIGINT, to finish in-flight RPCs and drain the buffer (a
    /// humantime string such as `30s`).
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
    pub health: HealthConfig,
    pub backup: BackupConfig,
}

/// How long events are kept, per service. An event older than its service's retention is
/// refused at ingest, and the lifecycle job removes stored events once they pass it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// For services no rule names.
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
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(30 * 86_400),
            rules: Vec::new(),
        }
    }
}

/// The lifecycle job: removes what retention no longer keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Run the job in the server (one node at a time).
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(3600),
        }
    }
}

/// Personal data: pseudonymized user ids, redacted, hashed and encrypted metadata keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Store `user_id` as `h1:` + hex(HMAC-SHA256(key, user_id)).
    pub pseudonymize_user_id: bool,
    /// Metadata keys (any depth, any case) dropped before storage.
    pub redact_metadata_keys: Vec<String>,
    /// Metadata keys (any depth, any case) whose values are replaced by their keyed hash.
    pub hash_metadata_keys: Vec<String>,
    /// Metadata keys (any depth, any case) whose values are stored AES-256-GCM encrypted.
    pub encrypt_metadata_keys: Vec<String>,
    /// The key file. Default: `<data_dir>/privacy.keys`, created (mode 0600) when missing.
    pub key_file: Option<PathBuf>,
    /// The HMAC key (base64 of 32 bytes), instead of the key file's: `SLUICE_PRIVACY__KEY`.
    pub key: Option<Secret>,
    /// How often each node reloads the opt-out list (the serving node applies one at once).
    #[serde(with = "humantime_serde")]
    pub optout_refresh: Duration,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            pseudonymize_user_id: false,
            redact_metadata_keys: Vec::new(),
            hash_metadata_keys: Vec::new(),
            encrypt_metadata_keys: Vec::new(),
            key_file: None,
            key: None,
            optout_refresh: Duration::from_secs(2),
        }
    }
}

impl PrivacyConfig {
    /// Whether any setting transforms events.
    pub fn enabled(&self) -> bool {
        self.pseudonymize_user_id
            || !self.redact_metadata_keys.is_empty()
            || !self.hash_metadata_keys.is_empty()
            || !self.encrypt_metadata_keys.is_empty()
    }
}

/// A secret setting: shown as `<redacted>` in debug output and never serialized back.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// The archive: events older than `after` move from PostgreSQL to an object store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Age at which events leave PostgreSQL for the archive; `off` disables archiving (what
    /// was archived stays readable by Export, Delete and Restore).
    #[serde(with = "optional_duration")]
    pub after: Option<Duration>,
    /// `file:///path` or `s3://bucket/prefix` (credentials, region and endpoint from the
    /// usual `AWS_*` variables). Default: `file://<data_dir>/archive`.
    pub url: Option<String>,
    /// How long a range brought back by Restore stays in PostgreSQL before it is archived
    /// again.
    #[serde(with = "humantime_serde")]
    pub restore_hold: Duration,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            after: Some(Duration::from_secs(7 * 86_400)),
            url: None,
            restore_hold: Duration::from_secs(7 * 86_400),
        }
    }
}

/// A duration that may be `off` (or empty): None.
mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => {
                serializer.serialize_str(&humantime::format_duration(*duration).to_string())
            }
            None => serializer.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "" | "off" | "none" => Ok(None),
            text => humantime::parse_duration(text).map(Some).map_err(|error| {
                D::Error::custom(format!("{text:?} is not a duration or off: {error}"))
            }),
        }
    }
}

/// What a principal may do. Health and reflection need none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Ingest, Publish, IngestStream.
    Ingest,
    /// Query, Stats.
    Query,
    /// Export.
    Export,
    /// Delete.
    Delete,
    /// Audit, Restore, and every other scope but `pii`.
    Admin,
    /// Plaintext of encrypted metadata values in Query and Export (never implied by `admin`).
    Pii,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Ingest,
        Scope::Query,
        Scope::Export,
        Scope::Delete,
        Scope::Admin,
        Scope::Pii,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Query => "query",
            Self::Export => "export",
            Self::Delete => "delete",
            Self::Admin => "admin",
            Self::Pii => "pii",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == text)
    }
}

/// Who may do what. With no principals configured every authenticated client has every scope
/// on every service (the zero-config first run), and start-up says so loudly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub principals: Vec<PrincipalConfig>,
    /// Scopes of an authenticated client that is not among `principals` (once any is).
    pub default_scopes: Vec<Scope>,
    pub jwt: JwtConfig,
    /// How long audit rows are kept.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
}

/// One principal: a certificate identity (URI SAN, else first DNS SAN, else CN) or a JWT `sub`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    /// Globs of the services it may write and read.
    #[serde(default = "all_services")]
    pub services: Vec<String>,
    /// Events per second; 0: no limit.
    #[serde(default)]
    pub events_per_second: u32,
    /// Events allowed at once above the rate (default: one second's worth).
    #[serde(default)]
    pub burst_events: u32,
    /// Event bytes per second (text fields plus metadata as JSON, as `sluice_event_bytes`
    /// counts them); 0: no limit. The burst is one second's worth.
    #[serde(default)]
    pub bytes_per_second: u32,
}

fn all_services() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Bearer JWTs, checked against keys from a JWKS file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// JWKS file; re-read when it changes. Unset: bearer tokens are refused.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            principals: Vec::new(),
            default_scopes: Vec::new(),
            jwt: JwtConfig::default(),
            audit_retention: Duration::from_secs(365 * 86_400),
        }
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            jwks_file: None,
            issuer: None,
            audience: None,
            algorithms: vec!["RS256".to_owned(), "ES256".to_owned(), "EdDSA".to_owned()],
            leeway: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub read_connections: u32,
    /// Longest a Query, Stats or Audit statement may run on the read pool: one whose filter
    /// has no index path fails with DEADLINE_EXCEEDED instead of holding a connection (Export
    /// streams and is exempt).
    #[serde(with = "humantime_serde")]
    pub read_statement_timeout: Duration,
    /// How long to wait for a connection before failing a database call.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Warn at start-up, and after a failover, when the primary has no synchronous standby
    /// (a failover then loses the commits not yet streamed).
    pub require_sync_standby: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve plaintext HTTP/2 without TLS. For local development only; logged loudly.
    pub insecure_plaintext: bool,
    /// Where dev certificates are created on first run when the paths below are unset.
    pub cert_dir: PathBuf,
    /// Server certificate chain (PEM). Default: `cert_dir/server.pem`.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM). Default: `cert_dir/server.key`.
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to. Default: `cert_dir/ca.pem`.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Largest accepted gRPC message, in bytes, after decompression.
    pub max_message_bytes: usize,
    /// Largest number of events in one IngestRequest.
    pub max_events_per_request: usize,
    /// Interval of HTTP/2 keepalive pings sent to clients.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long to wait for a keepalive ack before closing the connection.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Concurrent HTTP/2 streams allowed per connection.
    pub max_concurrent_streams: u32,
    /// Largest QueryService request message, in bytes, after decompression: a read request
    /// has no business being as large as an ingest request.
    pub max_query_message_bytes: usize,
    /// Open connections allowed (in handshake or served); one more is closed at once. 0: the
    /// open-file limit (raised to its hard limit at start) less 256.
    pub max_connections: usize,
    /// Connections in their TLS handshake at once; more are closed at once. Peers that have
    /// proved nothing can hold at most these, never the slots of served connections.
    pub max_handshakes: usize,
    /// Time a new connection has to finish its TLS handshake and send the HTTP/2 preface.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Events held between the RPCs and the writers (accepted, not yet committed).
    pub max_events: usize,
    /// Bytes held between the RPCs and the writers.
    pub max_bytes: usize,
    /// How long a request may wait for buffer space before RESOURCE_EXHAUSTED (0 = never wait).
    #[serde(with = "humantime_serde")]
    pub admit_wait: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Writer tasks. They share one pool of `workers + 3` connections (the extra ones serve
    /// health pings, partition upkeep, the spool replayer and Delete).
    pub workers: usize,
    /// A batch is flushed once it holds this many events...
    pub batch_max_events: usize,
    /// ...or this many bytes...
    pub batch_max_bytes: usize,
    /// ...or when its first event has waited this long.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// First delay before retrying a failed write; doubles up to `retry_max_backoff`.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Longest one database step of a batch write (a transaction) may take before it counts as
    /// a failure; isolating bad rows takes several steps, each bounded by this. Also the
    /// server-side statement and idle-in-transaction timeout of the write pool.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed writes that open the circuit (writes then go to the spool).
    pub failure_threshold: u32,
    /// First pause before a half-open probe; doubles after each failed probe...
    #[serde(with = "humantime_serde")]
    pub open_initial: Duration,
    /// ...up to this.
    #[serde(with = "humantime_serde")]
    pub open_max: Duration,
    /// A write (one transaction) that takes at least this long is slow...
    #[serde(with = "humantime_serde")]
    pub slow_write: Duration,
    /// ...and this many slow writes within `window` open the circuit (0: no slow rule).
    pub slow_write_count: u32,
    /// The sliding window of the slow and error-rate rules.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Failed writes above this share of those in `window` open the circuit...
    pub max_error_rate: f64,
    /// ...once the window holds at least this many writes (0: no error-rate rule).
    pub min_writes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Spool batches to disk while the circuit is open. Off: clients get RESOURCE_EXHAUSTED
    /// once the buffer fills during a database outage.
    pub enabled: bool,
    /// Spool directory. Default: `data_dir/spool`.
    pub dir: Option<PathBuf>,
    /// Most bytes the spool may hold; beyond, the buffer fills and clients are refused.
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started.
    pub segment_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Largest `message`, in bytes.
    pub max_message_bytes: usize,
    /// Largest `metadata`, in bytes of compact JSON.
    pub max_metadata_bytes: usize,
    /// Deepest nesting of `metadata` (the top-level object is depth 1).
    pub max_metadata_depth: usize,
    /// Deprecated alias of `retention.default`; when set, it is used as that.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
    /// How far in the future a `timestamp` may be.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Rejections detailed in one response (all are counted).
    pub max_reported_rejections: usize,
    /// Largest `user_id`, in bytes (it is indexed).
    pub max_user_id_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint; unset disables it.
    pub listen: Option<SocketAddr>,
}

/// How Query bounds a search that no index narrows (no `user_id`, no `trace_id`, and no
/// `services` or a content filter): it scans time slices, newest first (or oldest first), and
/// returns what it found when the page is full or `max_scan_time` is spent, with a token that
/// goes on from where it stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// First time slice one step scans; halved when a step is slow, doubled when fast.
    #[serde(with = "humantime_serde")]
    pub slice: Duration,
    /// Longest a Query scans before it answers with what it found and a token.
    #[serde(with = "humantime_serde")]
    pub max_scan_time: Duration,
    /// A trigram GIN index (`pg_trgm`) on `message`, for `message_contains` of 3 characters or
    /// more. Created (concurrently, partition by partition) or dropped at start-up.
    pub message_index: bool,
    /// A GIN `jsonb_path_ops` index on `metadata`, for every `metadata_contains`.
    pub metadata_index: bool,
    /// Top-level metadata keys with a B-tree index on their text value each, for
    /// `metadata_contains` with a string or boolean value under that key.
    pub indexed_metadata_keys: Vec<String>,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            slice: Duration::from_secs(3600),
            max_scan_time: Duration::from_millis(80),
            message_index: false,
            metadata_index: false,
            indexed_metadata_keys: Vec::new(),
        }
    }
}

/// A node's part in Redis mode. Without `redis.url` every node is `all` (direct mode).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes events and writes them to PostgreSQL (through Redis when `redis.url` is set).
    #[default]
    All,
    /// Validates events and appends them to the Redis streams; writes nothing to `events`.
    Ingest,
    /// Reads the Redis streams and writes them to PostgreSQL; refuses ingest RPCs.
    Writer,
}

impl Role {
    pub fn ingests(self) -> bool {
        matches!(self, Self::All | Self::Ingest)
    }

    pub fn writes(self) -> bool {
        matches!(self, Self::All | Self::Writer)
    }
}

/// Redis Broker between ingest nodes and writer nodes. Off (direct mode) unless `url` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` (or `rediss://` for TLS). Never logged.
    pub url: Option<Secret>,
    /// Broker events are spread over, by a hash of the event id (`<prefix>:<n>`).
    pub shards: usize,
    /// Key prefix of the streams and the backlog counters.
    pub prefix: String,
    /// The consumer group writers read through.
    pub group: String,
    /// Entries pending this long with a consumer that stopped renewing them are claimed by
    /// another writer.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// Deliveries after which an entry no writer could store goes to `dead_letters`.
    pub max_deliveries: u64,
    /// Events in the streams, not yet written to PostgreSQL, beyond which ingest refuses with
    /// RESOURCE_EXHAUSTED and RetryInfo...
    pub max_pending_events: u64,
    /// ...or bytes (encoded entries).
    pub max_pending_bytes: u64,
    /// Replicas that must confirm an append before the ack (`WAIT`); 0: the primary only.
    pub wait_replicas: u32,
    /// Longest `WAIT` for those replicas; fewer in time fails the append (it is retried).
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Start even when Redis is not `appendonly yes` + `appendfsync always` (acks then
    /// survive less than a Redis crash).
    pub allow_weak_durability: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            shards: 4,
            prefix: "sluice:events".to_owned(),
            group: "sluice-writers".to_owned(),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            max_pending_events: 1_000_000,
            max_pending_bytes: 1 << 30,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            allow_weak_durability: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `sluice=debug,sqlx=warn`. `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            data_dir: PathBuf::from("data"),
            shutdown_timeout: Duration::from_secs(30),
            database: DatabaseConfig::default(),
            tls: TlsConfig::default(),
            grpc: GrpcConfig::default(),
            buffer: BufferConfig::default(),
            writer: WriterConfig::default(),
            breaker: BreakerConfig::default(),
            spool: SpoolConfig::default(),
            validation: ValidationConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            telemetry: TelemetryConfig::default(),
            auth: AuthConfig::default(),
            retention: RetentionConfig::default(),
            lifecycle: LifecycleConfig::default(),
            archive: ArchiveConfig::default(),
            privacy: PrivacyConfig::default(),
            role: Role::All,
            redis: RedisConfig::default(),
            search: SearchConfig::default(),
            health: HealthConfig::default(),
            backup: BackupConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            read_url: None,
            read_connections: 4,
            read_statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            require_sync_standby: false,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            insecure_plaintext: false,
            cert_dir: PathBuf::from("certs"),
            cert: None,
            key: None,
            client_ca: None,
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            max_events_per_request: 10_000,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
            max_query_message_bytes: 1024 * 1024,
            max_connections: 0,
            max_handshakes: 512,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_events: 50_000,
            max_bytes: 256 * 1024 * 1024,
            admit_wait: Duration::from_millis(200),
        }
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_max_events: 5_000,
            batch_max_bytes: 16 * 1024 * 1024,
            flush_interval: Duration::from_millis(5),
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_initial: Duration::from_secs(1),
            open_max: Duration::from_secs(30),
            slow_write: Duration::from_secs(2),
            slow_write_count: 3,
            window: Duration::from_secs(30),
            max_error_rate: 0.1,
            min_writes: 20,
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 8 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_metadata_depth: 16,
            retention: None,
            max_future_skew: Duration::from_secs(5 * 60),
            max_reported_rejections: 100,
            max_user_id_bytes: 256,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// OpenTelemetry traces. Export is off unless an endpoint is set here or in the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` are honoured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of a collector, e.g. `http://otel-collector:4317`.
    pub otlp_endpoint: Option<String>,
    /// Share of traces started here that are kept (0.0 to 1.0). A caller's `traceparent`
    /// decides for its own traces (parent-based sampling). `OTEL_TRACES_SAMPLER` overrides it.
    pub sample_ratio: f64,
    /// Store the trace id of the request that brought each event (the `trace_id` column, a
    /// `Query` filter): the caller's `traceparent`, or this server's sampled trace.
    pub store_trace_id: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            store_trace_id: true,
        }
    }
}

/// Backups of the private cluster (with `database.url` set, sluice manages none).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// `file:///path` or `s3://bucket/prefix` (credentials from the usual `AWS_*` variables).
    /// Set: WAL archiving, scheduled base backups and point-in-time restore. Unset: none.
    pub url: Option<String>,
    /// Take a base backup when the newest is older than this.
    #[serde(with = "humantime_serde")]
    pub full_every: Duration,
    /// Remove backups older than this (never the newest), and the WAL only they needed.
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
    /// Most commits a lost machine may take with it, in time: WAL segments are switched and
    /// archived at least every half of this.
    #[serde(with = "humantime_serde")]
    pub max_rpo: Duration,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            url: None,
            full_every: Duration::from_secs(24 * 3600),
            keep: Duration::from_secs(7 * 24 * 3600),
            max_rpo: Duration::from_secs(15 * 60),
        }
    }
}

/// Readiness beyond the database: the room left on disk and the memory in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Health turns NOT_SERVING when a volume holding `data_dir` or the spool has less free
    /// space than this: a share of the volume (`5%`) or a size (`1GiB`, `500MB`).
    pub min_free_disk: FreeSpace,
    /// Health turns NOT_SERVING when the server's resident memory passes this many bytes.
    /// Default: `buffer.max_bytes` plus 256 MiB.
    pub max_rss: Option<u64>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            min_free_disk: FreeSpace::Percent(5.0),
            max_rss: None,
        }
    }
}

impl HealthConfig {
    /// The resident memory above which health turns NOT_SERVING.
    pub fn max_rss_bytes(&self, buffer: &BufferConfig) -> u64 {
        self.max_rss
            .unwrap_or(buffer.max_bytes as u64 + 256 * 1024 * 1024)
    }
}

/// Free space to keep on a volume: a share of its size, or a size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FreeSpace {
    Percent(f64),
    Bytes(u64),
}

impl FreeSpace {
    /// The free bytes required on a volume of `total` bytes.
    pub fn required(self, total: u64) -> u64 {
        match self {
            Self::Percent(percent) => (total as f64 * percent / 100.0) as u64,
            Self::Bytes(bytes) => bytes,
        }
    }
}

impl TryFrom<String> for FreeSpace {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(percent) if (0.0..=100.0).contains(&percent) => Ok(Self::Percent(percent)),
                _ => Err(format!("{text:?} is not a percentage between 0% and 100%")),
            };
        }
        text.parse::<bytesize::ByteSize>()
            .map(|size| Self::Bytes(size.as_u64()))
            .map_err(|error| format!("{text:?} is neither a percentage nor a size: {error}"))
    }
}

impl From<FreeSpace> for String {
    fn from(space: FreeSpace) -> Self {
        match space {
            FreeSpace::Percent(percent) => format!("{percent}%"),
            FreeSpace::Bytes(bytes) => bytes.to_string(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
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

    /// Rejects values that cannot work, with the field named.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.buffer.max_events == 0 {
            return invalid("buffer.max_events", "must be at least 1");
        }
        if self.buffer.max_bytes == 0 || self.buffer.max_bytes > u32::MAX as usize {
            return invalid("buffer.max_bytes", "must be between 1 and 4294967295");
        }
        if self.buffer.max_events > u32::MAX as usize {
            return invalid("buffer.max_events", "must be at most 4294967295");
        }
        if self.writer.workers == 0 || self.writer.workers > 1024 {
            return invalid("writer.workers", "must be between 1 and 1024");
        }
        if self.writer.batch_max_events == 0 || self.writer.batch_max_bytes == 0 {
            return invalid("writer.batch_max_events", "batch limits must be at least 1");
        }
        if self.writer.batch_max_bytes > 32 * 1024 * 1024 {
            // A spooled batch is one spool record (256 MiB at most); JSON escaping can grow
            // text up to 6 times.
            return invalid(
                "writer.batch_max_bytes",
                "must be at most 33554432 (32 MiB)",
            );
        }
        if self.breaker.failure_threshold == 0 {
            return invalid("breaker.failure_threshold", "must be at least 1");
        }
        if self.backup.full_every.is_zero() || self.backup.max_rpo < Duration::from_secs(2) {
            return invalid(
                "backup.full_every",
                "full_every must be above zero and max_rpo at least 2s",
            );
        }
        for key in &self.search.indexed_metadata_keys {
            let usable = !key.is_empty()
                && key.len() <= 40
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !usable {
                return invalid(
                    "search.indexed_metadata_keys",
                    "keys are 1 to 40 characters of [A-Za-z0-9_.-]",
                );
            }
        }
        if !(0.0..=1.0).contains(&self.breaker.max_error_rate) {
            return invalid("breaker.max_error_rate", "must be between 0.0 and 1.0");
        }
        if self.retention.default.is_zero() {
            return invalid("retention.default", "must be above zero");
        }
        for rule in &self.retention.rules {
            if rule.keep.is_zero() {
                return invalid("retention.rules.keep", "must be above zero");
            }
            if rule.services.is_empty() {
                return invalid("retention.rules.services", "must name at least one glob");
            }
            if rule
                .services
                .iter()
                .any(|glob| glob.is_empty() || glob.contains(['[', ']', '{', '}', '\\']))
            {
                return invalid(
                    "retention.rules.services",
                    "globs may use * and ? only, and must not be empty",
                );
            }
        }
        if self.archive.after.is_some_and(|after| after.is_zero()) {
            return invalid("archive.after", "must be above zero (or off)");
        }
        if self.privacy.optout_refresh.is_zero() {
            return invalid("privacy.optout_refresh", "must be above zero");
        }
        if self.role != Role::All && self.redis.url.is_none() {
            return invalid(
                "role",
                "ingest and writer roles need redis.url (Redis mode)",
            );
        }
        if self.search.slice < Duration::from_secs(1) {
            return invalid("search.slice", "must be at least 1s");
        }
        if self.search.max_scan_time.is_zero() {
            return invalid("search.max_scan_time", "must be above zero");
        }
        if self.redis.shards == 0 || self.redis.shards > 1024 {
            return invalid("redis.shards", "must be between 1 and 1024");
        }
        if self.redis.max_deliveries == 0 {
            return invalid("redis.max_deliveries", "must be at least 1");
        }
        if self.redis.claim_idle < Duration::from_millis(100) {
            return invalid("redis.claim_idle", "must be at least 100ms");
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return invalid("telemetry.sample_ratio", "must be between 0.0 and 1.0");
        }
        if self.archive.restore_hold.is_zero() {
            return invalid("archive.restore_hold", "must be above zero");
        }
        if self.lifecycle.interval.is_zero() {
            return invalid("lifecycle.interval", "must be above zero");
        }
        if self.auth.audit_retention < Duration::from_secs(86_400) {
            return invalid("auth.audit_retention", "must be at least 1day");
        }
        if self.grpc.max_connections > 1 << 20 {
            return invalid(
                "grpc.max_connections",
                "must be at most 1048576 (0: automatic)",
            );
        }
        if self.grpc.max_handshakes == 0 || self.grpc.max_handshakes > 1 << 20 {
            return invalid("grpc.max_handshakes", "must be between 1 and 1048576");
        }
        if self.grpc.handshake_timeout.is_zero() {
            return invalid("grpc.handshake_timeout", "must be above zero");
        }
        if self.database.read_statement_timeout.is_zero() {
            return invalid("database.read_statement_timeout", "must be above zero");
        }
        if self.grpc.max_query_message_bytes == 0 {
            return invalid("grpc.max_query_message_bytes", "must be at least 1");
        }
        if self.grpc.max_events_per_request == 0 {
            return invalid("grpc.max_events_per_request", "must be at least 1");
        }
        if self.validation.max_metadata_depth == 0 {
            return invalid("validation.max_metadata_depth", "must be at least 1");
        }
        Ok(())
    }

    /// Spool directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("spool"))
    }

    /// Server certificate path.
    pub fn tls_cert_path(&self) -> PathBuf {
        self.tls
            .cert
            .clone()
            .unwrap_or_else(|| self.tls.cert_dir.join("server.pem"))
    }

    /// Server key path.
    pub fn tls_key_path(&self) -> PathBuf {
        self.tls
            .key
            .clone()
            .unwrap_or_else(|| self.tls.cert_dir.join("server.key"))
    }

    /// Client CA path.
    pub fn tls_client_ca_path(&self) -> PathBuf {
        self.tls
            .client_ca
            .clone()
            .unwrap_or_else(|| self.tls.cert_dir.join("ca.pem"))
    }

    /// True when every TLS path is left to its default under `cert_dir`, so dev certificates
    /// may be created there.
    pub fn uses_dev_certs(&self) -> bool {
        self.tls.cert.is_none() && self.tls.key.is_none() && self.tls.client_ca.is_none()
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
        config.redis.shards = 0;
        assert!(config.check().is_err());
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
