//! PostgreSQL: connecting (to a URL or the private cluster), migrations and partitions.

pub mod embedded;
pub mod nodelay;
pub mod partitions;

use std::{str::FromStr, time::Duration};

use chrono::Utc;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::Config;

pub use embedded::EmbeddedPostgres;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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

/// Connections of the write pool beyond one per writer: health pings, partition upkeep, the
/// spool replayer and Delete.
const WRITE_SIDE_EXTRA_CONNECTIONS: u32 = 3;

/// Connections for lifecycle and archive work: a lifecycle run holds up to three (its lock,
/// a transaction, a side connection), and a Delete, Restore or Anonymize two.
const MAINTENANCE_CONNECTIONS: u32 = 6;
/// Archive work waits for a connection behind other archive work, which may take minutes.
const MAINTENANCE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(120);

/// Pool settings shared by the primary and the read replica: size, acquire timeout, and
/// TCP_NODELAY on each new connection.
fn pool_options(config: &Config, max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(config.database.connect_timeout)
        .after_connect(|connection, _| {
            Box::pin(async move { nodelay::enable(connection).await.map(|_| ()) })
        })
}

/// The database sluice writes to, and the private cluster behind it when there is one.
pub struct Store {
    pub pool: PgPool,
    /// Where reads go: the read replica when configured, else `pool`.
    pub read_pool: PgPool,
    /// The lifecycle job and the archive side of Delete, Restore and Anonymize: no statement
    /// timeout, and apart from the writers' connections.
    pub maintenance_pool: PgPool,
    pub embedded: Option<EmbeddedPostgres>,
}

impl Store {
    /// Connects to `database.url`, or starts the private cluster under `data_dir`, then runs
    /// the migrations and creates the partitions the retention window needs.
    pub async fn open(config: &Config) -> Result<Self, StoreError> {
        let (options, embedded) = match &config.database.url {
            Some(url) => (
                PgConnectOptions::from_str(url).map_err(StoreError::Url)?,
                None,
            ),
            None => {
                let data_dir = config.data_dir.clone();
                let cluster =
                    tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&data_dir))
                        .await
                        .map_err(|join| embedded::EmbeddedError::Command {
                            command: "initdb".to_owned(),
                            detail: join.to_string(),
                        })??;
                cluster
                    .ensure_database()
                    .await
                    .map_err(StoreError::Connect)?;
                (cluster.connect_options(), Some(cluster))
            }
        };
        let options = options.application_name("sluice");
        // The server gives up on a write-side statement, or on a transaction left idle by a
        // client-side timeout, after the write timeout too, so no connection stays stuck.
        let write_timeout = format!("{}ms", config.writer.write_timeout.as_millis());
        let write_options = options.clone().options([
            ("statement_timeout", write_timeout.as_str()),
            (
                "idle_in_transaction_session_timeout",
                write_timeout.as_str(),
            ),
        ]);
        let pool = pool_options(
            config,
            config.writer.workers as u32 + WRITE_SIDE_EXTRA_CONNECTIONS,
        )
        .connect_with(write_options)
        .await
        .map_err(StoreError::Connect)?;
        {
            // Migrations run without the write-side statement timeout.
            use sqlx::{ConnectOptions, Connection};
            let mut migration_connection = options.connect().await.map_err(StoreError::Connect)?;
            MIGRATOR.run(&mut migration_connection).await?;
            migration_connection.close().await?;
        }
        // Lifecycle and archive work: long transactions (an object upload under the archive
        // lock, batched deletes) that must neither hit the write timeout nor take the
        // connections the writers need.
        let maintenance_pool = PgPoolOptions::new()
            .max_connections(MAINTENANCE_CONNECTIONS)
            .acquire_timeout(MAINTENANCE_ACQUIRE_TIMEOUT)
            .after_connect(|connection, _| {
                Box::pin(async move { nodelay::enable(connection).await.map(|_| ()) })
            })
            .connect_with(
                options
                    .clone()
                    .options([("idle_in_transaction_session_timeout", "10min")]),
            )
            .await
            .map_err(StoreError::Connect)?;
        // No read runs away: each statement is bounded (Export lifts it in its transaction).
        let read_timeout = format!("{}ms", config.database.read_statement_timeout.as_millis());
        let read_settings = [("statement_timeout", read_timeout.as_str())];
        let read_pool = match &config.database.read_url {
            Some(url) => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(StoreError::Url)?
                    .application_name("sluice-read")
                    .options(read_settings);
                tracing::info!("reads go to the read replica");
                pool_options(config, config.database.read_connections.max(1))
                    .connect_with(options)
                    .await
                    .map_err(StoreError::Connect)?
            }
            // A pool of its own even on the primary: slow readers (an Export to a slow client)
            // can never take the connections the writers need.
            None => pool_options(config, config.database.read_connections.max(1))
                .connect_with(
                    options
                        .application_name("sluice-read")
                        .options(read_settings),
                )
                .await
                .map_err(StoreError::Connect)?,
        };
        let store = Self {
            pool,
            read_pool,
            maintenance_pool,
            embedded,
        };
        // Not fatal: a lock held on `events` (a long export, pg_dump) must not stop start-up. The
        // hourly task retries, and writers create a missing partition on demand.
        if let Err(error) = store.ensure_partitions(config.retention.longest()).await {
            tracing::error!(%error, "cannot create partitions ahead at start-up; will retry");
        }
        Ok(store)
    }

    /// Makes sure partitions exist from the oldest accepted time to two months ahead.
    pub async fn ensure_partitions(&self, retention: Duration) -> Result<usize, StoreError> {
        let now = Utc::now();
        let oldest = now - retention;
        let ahead = now + chrono::Duration::days(62);
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
        self.pool.close().await;
        if let Some(cluster) = &self.embedded
            && cluster.started_here()
            && let Err(error) = tokio::task::block_in_place(|| cluster.stop())
        {
            tracing::error!(%error, "cannot stop private PostgreSQL cluster");
        }
    }
}
