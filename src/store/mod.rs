//! PostgreSQL: connecting (to a URL or the private cluster), migrations and partitions.

pub mod closed_indexes;
pub mod embedded;
pub mod hosts;
pub mod jsonb_text;
pub mod line;
pub mod migrations;
pub mod nodelay;
pub mod partitions;
pub mod search_indexes;

use std::time::Duration;

use chrono::Utc;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::Config;

pub use embedded::EmbeddedPostgres;
use hosts::{Failover, HostList, SessionAttrs};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database url: {0}")]
    Url(sqlx::Error),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    #[error("no database host fits target_session_attrs={attrs} among {hosts}: {last_error}")]
    NoHostFits {
        attrs: &'static str,
        hosts: String,
        last_error: String,
    },
}

/// One `events` row as a line of NDJSON: the format of Export and of archived objects. Run it
/// with `TimeZone = 'UTC'` so that timestamps read `…+00:00`.
pub const EVENT_JSON: &str = "json_build_object('id', id, 'service', service, 'message', message, \
     'timestamp', ts, 'ingested_at', ingested_at, 'user_id', user_id, 'metadata', metadata, \
     'trace_id', trace_id)::text";

/// The SQLSTATE of a database error, when PostgreSQL answered with one.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|database_error| database_error.code())
        .map(|code| code.into_owned())
}

/// The SQLSTATEs sluice acts on (PostgreSQL's appendix A).
pub mod sqlstates {
    /// `query_canceled`: a statement ran into its `statement_timeout`.
    pub const QUERY_CANCELED: &str = "57014";
    /// `deadlock_detected`.
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// `unique_violation`: an `(id, ts)` already stored.
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// `check_violation`: among others, a row no partition takes.
    pub const CHECK_VIOLATION: &str = "23514";
}

/// Runs `work` while this session holds the advisory lock `name` (by `hashtext`), one node at
/// a time: None, without running it, when another session holds the lock.
pub async fn while_locked<T>(
    pool: &PgPool,
    name: &str,
    work: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<Option<T>, sqlx::Error> {
    let mut lock = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(name)
        .fetch_one(&mut *lock)
        .await?;
    if !locked {
        return Ok(None);
    }
    let result = work.await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(name)
        .execute(&mut *lock)
        .await;
    result.map(Some)
}

/// Whether `error` is the database's `state`.
pub fn is_sqlstate(error: &sqlx::Error, state: &str) -> bool {
    sqlstate(error).as_deref() == Some(state)
}

/// The status of a call that failed in the database: a read past the read statement timeout
/// needs a narrower filter (DEADLINE_EXCEEDED); a value PostgreSQL refuses after the checks
/// is INVALID_ARGUMENT; lost connections, resources and conflicts are retryable
/// (UNAVAILABLE); anything else is INTERNAL. The database's own words go to the log only.
pub fn database_status(error: &sqlx::Error) -> tonic::Status {
    use tonic::{Code, Status};
    let state = sqlstate(error);
    if state.as_deref() == Some(sqlstates::QUERY_CANCELED) {
        tracing::warn!(%error, "a read ran past database.read_statement_timeout");
        return Status::deadline_exceeded(
            "the query ran past database.read_statement_timeout; narrow it with services, user_id or a time range",
        );
    }
    let code = match state.as_deref().and_then(|state| state.get(..2)) {
        // Data exceptions: a filter value PostgreSQL cannot take. Filters are checked before
        // they reach the database, so this is a gap in those checks.
        Some("22") => {
            tracing::warn!(%error, sqlstate = state.as_deref(), "a filter value passed the checks but PostgreSQL refused it");
            return crate::proto::status::bad_request(
                "invalid filter value".to_owned(),
                "filter",
                "PostgreSQL cannot compare a value of this filter".to_owned(),
            );
        }
        // Connection, resources, operator intervention, serialization: retryable.
        None | Some("08" | "40" | "53" | "57") => Code::Unavailable,
        Some(_) => Code::Internal,
    };
    tracing::error!(%error, sqlstate = state.as_deref(), "a call failed in the database");
    Status::new(code, "database error; see server logs")
}

/// How many days ahead of today partitions exist (created hourly; a writer creates a
/// missing one on demand, so this only keeps that off the hot path).
const PARTITIONS_AHEAD_DAYS: i64 = 2;

/// Connections of the write pool beyond one per writer: health pings, partition upkeep, the
/// spool replayer and Delete.
const WRITE_SIDE_EXTRA_CONNECTIONS: u32 = 3;
/// Connections of the audit log's own pool.
const AUDIT_CONNECTIONS: u32 = 2;

/// Connections for lifecycle and archive work: a lifecycle run holds up to three (its lock,
/// a transaction, a side connection), and a Delete, Restore or Anonymize two.
const MAINTENANCE_CONNECTIONS: u32 = 6;
/// Archive work waits for a connection behind other archive work, which may take minutes.
const MAINTENANCE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(120);

/// Pool settings shared by the primary and the read replica: size, acquire timeout, TCP_NODELAY
/// on each new connection, and no connection opened before a failover handed out after it.
fn pool_options(
    config: &Config,
    max_connections: u32,
    clock: &hosts::SwitchClock,
) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(config.database.connect_timeout)
        .after_connect(|connection, _| {
            Box::pin(async move { nodelay::enable(connection).await.map(|_| ()) })
        })
        .before_acquire(hosts::opened_after_switch(
            clock.clone(),
            config.database.connect_timeout,
        ))
}

/// Opens a pool on host `index` of `hosts`, each host's options changed by `change`; returns
/// the pool and its options for every host (for [`Failover::pool`]).
async fn open_pool(
    pool_options: PgPoolOptions,
    hosts: &HostList,
    index: usize,
    change: impl Fn(PgConnectOptions) -> PgConnectOptions,
) -> Result<(PgPool, Vec<PgConnectOptions>), StoreError> {
    let options: Vec<PgConnectOptions> = hosts
        .hosts
        .iter()
        .map(|host| change(host.options.clone()))
        .collect();
    let Some(selected) = options.get(index) else {
        return Err(StoreError::Url(sqlx::Error::Configuration(
            "no database host".into(),
        )));
    };
    let pool = pool_options
        .connect_with(selected.clone())
        .await
        .map_err(StoreError::Connect)?;
    Ok((pool, options))
}

/// Warns when the primary behind `pool` has no synchronous standby: a failover would then
/// lose the commits not yet streamed (`database.require_sync_standby`).
pub async fn warn_without_sync_standby(pool: &PgPool) {
    let check = sqlx::query_as::<_, (String, bool)>(
        "SELECT current_setting('synchronous_standby_names'), \
         EXISTS (SELECT 1 FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))",
    )
    .fetch_one(pool)
    .await;
    match check {
        Ok((names, _)) if names.is_empty() => tracing::warn!(
            "the primary has no synchronous standby (synchronous_standby_names is empty): a failover loses the commits not yet streamed, acknowledged events among them"
        ),
        Ok((names, false)) => tracing::warn!(
            synchronous_standby_names = %names,
            "no synchronous standby is connected to the primary (or this role cannot see pg_stat_replication): commits wait for one, and a failover may lose what was not streamed"
        ),
        Ok(_) => tracing::info!("the primary has a synchronous standby"),
        Err(error) => tracing::warn!(%error, "cannot check the primary for a synchronous standby"),
    }
}

/// The database sluice writes to, and the private cluster behind it when there is one.
pub struct Store {
    pub pool: PgPool,
    /// Where reads go: the read replica when configured, else `pool`.
    pub read_pool: PgPool,
    /// The lifecycle job and the archive side of Delete, Restore and Anonymize: no statement
    /// timeout, and apart from the writers' connections.
    pub maintenance_pool: PgPool,
    /// The audit log's own small pool on the primary: neither ingest nor a flood of reads can
    /// take the connections the other needs for its rows.
    pub audit_pool: PgPool,
    pub embedded: Option<EmbeddedPostgres>,
    /// Which partitions searches read through their closed-partition indexes.
    pub closed_indexes: std::sync::Arc<closed_indexes::ClosedIndexes>,
    /// Keep the pools on the host that fits when `database.url` (or `read_url`) names several.
    failovers: Vec<Failover>,
}

impl Store {
    /// Connects to `database.url` (the first host that takes writes, when it names several),
    /// or starts the private cluster under `data_dir`, then runs the migrations and creates
    /// the partitions the retention window needs.
    pub async fn open(config: &Config) -> Result<Self, StoreError> {
        Self::open_with(config, None).await
    }

    /// [`Store::open`], starting the private cluster with `cluster_settings` (the server's
    /// WAL archiving); None leaves the settings of its last start.
    pub async fn open_with(
        config: &Config,
        cluster_settings: Option<Vec<(&'static str, String)>>,
    ) -> Result<Self, StoreError> {
        let (write_hosts, embedded) = match &config.database.url {
            Some(url) => {
                let hosts = HostList::parse(url)?;
                // With several hosts, writers need the one that takes writes, whatever the URL
                // asks for (a single host is taken as the URL says, as libpq does).
                let hosts = if hosts.hosts.len() > 1 {
                    hosts.with_attrs(SessionAttrs::ReadWrite)
                } else {
                    hosts
                };
                (hosts, None)
            }
            None => {
                let data_dir = config.data_dir.clone();
                let cluster = tokio::task::spawn_blocking(move || match cluster_settings {
                    Some(settings) => EmbeddedPostgres::start_with(&data_dir, &settings),
                    None => EmbeddedPostgres::start(&data_dir),
                })
                .await
                .map_err(|join| embedded::EmbeddedError::Command {
                    command: "initdb".to_owned(),
                    detail: join.to_string(),
                })??;
                cluster
                    .ensure_database()
                    .await
                    .map_err(StoreError::Connect)?;
                (
                    HostList::single("private cluster", cluster.connect_options()),
                    Some(cluster),
                )
            }
        };
        let connect_timeout = config.database.connect_timeout;
        let current = write_hosts.select(connect_timeout).await?;
        if write_hosts.hosts.len() > 1 {
            tracing::info!(
                host = %write_hosts.hosts[current].name,
                hosts = write_hosts.hosts.len(),
                "writing to the first host that takes writes"
            );
        }
        let write_clock = hosts::SwitchClock::default();
        // The server gives up on a write-side statement, or on a transaction left idle by a
        // client-side timeout, after the write timeout too, so no connection stays stuck.
        let write_timeout = format!("{}ms", config.writer.write_timeout.as_millis());
        let (pool, write_options) = open_pool(
            pool_options(
                config,
                config.writer.workers as u32 + WRITE_SIDE_EXTRA_CONNECTIONS,
                &write_clock,
            ),
            &write_hosts,
            current,
            |options| {
                options.application_name("sluice").options([
                    ("statement_timeout", write_timeout.as_str()),
                    (
                        "idle_in_transaction_session_timeout",
                        write_timeout.as_str(),
                    ),
                ])
            },
        )
        .await?;
        {
            // Migrations run without the write-side statement timeout.
            use sqlx::{ConnectOptions, Connection};
            let options = write_hosts.hosts[current]
                .options
                .clone()
                .application_name("sluice");
            let mut migration_connection = options.connect().await.map_err(StoreError::Connect)?;
            migrations::migrator()
                .run(&mut migration_connection)
                .await?;
            migration_connection.close().await?;
        }
        // Lifecycle and archive work: long transactions (an object upload under the archive
        // lock, batched deletes) that must neither hit the write timeout nor take the
        // connections the writers need.
        let (maintenance_pool, maintenance_options) = open_pool(
            pool_options(config, MAINTENANCE_CONNECTIONS, &write_clock)
                .acquire_timeout(MAINTENANCE_ACQUIRE_TIMEOUT),
            &write_hosts,
            current,
            |options| {
                options
                    .application_name("sluice")
                    .options([("idle_in_transaction_session_timeout", "10min")])
            },
        )
        .await?;
        let (audit_pool, audit_options) = open_pool(
            pool_options(config, AUDIT_CONNECTIONS, &write_clock),
            &write_hosts,
            current,
            |options| {
                options
                    .application_name("sluice-audit")
                    .options([("statement_timeout", write_timeout.as_str())])
            },
        )
        .await?;
        // No read runs away: each statement is bounded (Export lifts it in its transaction).
        let read_timeout = format!("{}ms", config.database.read_statement_timeout.as_millis());
        let read_settings = |options: PgConnectOptions| {
            options
                .application_name("sluice-read")
                .options([("statement_timeout", read_timeout.as_str())])
        };
        let read_connections = config.database.read_connections.max(1);
        let mut write_failover =
            Failover::new("write", write_hosts.clone(), current, write_clock.clone())
                .pool(pool.clone(), write_options)
                .pool(maintenance_pool.clone(), maintenance_options)
                .pool(audit_pool.clone(), audit_options)
                .require_sync_standby(config.database.require_sync_standby);
        let mut failovers = Vec::new();
        let read_pool = match &config.database.read_url {
            Some(url) => {
                let read_hosts = HostList::parse(url)?;
                let read_current = read_hosts.select(connect_timeout).await?;
                let read_clock = hosts::SwitchClock::default();
                let (read_pool, read_options) = open_pool(
                    pool_options(config, read_connections, &read_clock),
                    &read_hosts,
                    read_current,
                    read_settings,
                )
                .await?;
                tracing::info!(host = %read_hosts.hosts[read_current].name, "reads go to the read replica");
                failovers.push(
                    Failover::new("read", read_hosts, read_current, read_clock)
                        .pool(read_pool.clone(), read_options),
                );
                read_pool
            }
            // A pool of its own even on the primary: slow readers (an Export to a slow client)
            // can never take the connections the writers need.
            None => {
                let (read_pool, read_options) = open_pool(
                    pool_options(config, read_connections, &write_clock),
                    &write_hosts,
                    current,
                    read_settings,
                )
                .await?;
                write_failover = write_failover.pool(read_pool.clone(), read_options);
                read_pool
            }
        };
        failovers.insert(0, write_failover);
        if config.database.require_sync_standby {
            warn_without_sync_standby(&pool).await;
        }
        let store = Self {
            pool,
            read_pool,
            maintenance_pool,
            audit_pool,
            embedded,
            closed_indexes: Default::default(),
            failovers,
        };
        // Not fatal: a lock held on `events` (a long export, pg_dump) must not stop start-up. The
        // hourly task retries, and writers create a missing partition on demand.
        if let Err(error) = store.ensure_partitions(config.retention.longest()).await {
            tracing::error!(%error, "cannot create partitions ahead at start-up; will retry");
        }
        Ok(store)
    }

    /// Keeps every pool on the host that fits until `stopping` (nothing to do with one host).
    pub async fn watch_hosts(&self, stopping: tokio_util::sync::CancellationToken) {
        let watches = self
            .failovers
            .iter()
            .map(|failover| failover.watch(stopping.clone()));
        futures::future::join_all(watches).await;
    }

    /// Makes sure partitions exist from the oldest accepted time to
    /// [`PARTITIONS_AHEAD_DAYS`] ahead. Creates the partitions ahead every hour (every minute after a failure), until the
    /// task is dropped.
    pub async fn maintain_partitions(&self, retention: Duration) {
        const CHECK_INTERVAL: Duration = Duration::from_secs(3600);
        const RETRY_INTERVAL: Duration = Duration::from_secs(60);
        let mut wait = RETRY_INTERVAL;
        loop {
            tokio::time::sleep(wait).await;
            wait = match self.ensure_partitions(retention).await {
                Ok(_) => CHECK_INTERVAL,
                Err(error) => {
                    tracing::error!(%error, "cannot create partitions ahead; will retry");
                    RETRY_INTERVAL
                }
            };
        }
    }

    pub async fn ensure_partitions(&self, retention: Duration) -> Result<usize, StoreError> {
        let now = Utc::now();
        let oldest = now - retention;
        let ahead = now + chrono::Duration::days(PARTITIONS_AHEAD_DAYS);
        Ok(partitions::ensure_partitions(&self.pool, oldest, ahead).await?)
    }

    /// True when PostgreSQL answers a trivial query within `timeout`.
    pub async fn is_reachable(&self, timeout: Duration) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)))
    }

    /// Closes the pools and stops the private cluster, if this process started it.
    pub async fn close(&self) {
        self.read_pool.close().await;
        self.maintenance_pool.close().await;
        self.audit_pool.close().await;
        self.pool.close().await;
        if let Some(cluster) = &self.embedded
            && cluster.started_here()
            && let Err(error) = tokio::task::block_in_place(|| cluster.stop())
        {
            tracing::error!(%error, "cannot stop private PostgreSQL cluster");
        }
    }
}
