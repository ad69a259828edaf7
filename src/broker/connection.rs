//! The connection to the streams: one Redis (a reconnecting `ConnectionManager`) or a Redis
//! Cluster (redis-rs's async cluster connection, which follows MOVED and ASK and refreshes
//! the slot map). Both are `ConnectionLike`, so a command is written once for either. A node
//! that finds Redis unreachable at start still starts: its connection is pending, and the
//! first command that finds Redis up connects (and checks its durability) for every clone.

use std::{sync::Arc, time::Duration};

use futures::FutureExt;
use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_routing::{
        MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr,
    },
};

use super::cluster_link::ClusterLink;
use crate::config::RedisConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "redis is not durable enough: {setting} is {value:?}, acks need appendonly yes, appendfsync always and maxmemory-policy noeviction (set redis.allow_weak_durability to start anyway)"
    )]
    WeakDurability {
        setting: &'static str,
        value: String,
    },
}

/// How the streams are reached.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterLink),
    /// Redis was unreachable at start: connected by the first command that finds it up.
    Pending(Arc<Pending>),
}

pub struct Pending {
    config: RedisConfig,
    connected: tokio::sync::OnceCell<(Connector, Connection)>,
}

impl Pending {
    async fn get(&self) -> Result<&(Connector, Connection), ConnectError> {
        self.connected
            .get_or_try_init(|| async {
                let connected = Connector::establish(&self.config).await?;
                tracing::info!("redis answers now: connected");
                Ok(connected)
            })
            .await
    }
}

/// What makes connections: a client for one Redis, or the cluster connection itself (it is
/// multiplexed over every node, and cluster mode never blocks a connection in a read).
#[derive(Clone)]
pub enum Connector {
    Single(redis::Client),
    Cluster(ClusterLink),
    Pending(Arc<Pending>),
}

impl Connector {
    /// Connects to `config.url`, or to the cluster behind `config.cluster_nodes`, and checks
    /// its durability; when Redis cannot be reached, a pending connection that connects later.
    pub async fn connect(config: &RedisConfig) -> Result<(Self, Connection), ConnectError> {
        match Self::establish(config).await {
            Ok(connected) => Ok(connected),
            Err(ConnectError::Redis(error)) => {
                tracing::warn!(%error, "redis cannot be reached at start; ingest spools until it answers");
                let pending = Arc::new(Pending {
                    config: config.clone(),
                    connected: tokio::sync::OnceCell::new(),
                });
                Ok((Self::Pending(pending.clone()), Connection::Pending(pending)))
            }
            Err(weak) => Err(weak),
        }
    }

    async fn establish(config: &RedisConfig) -> Result<(Self, Connection), ConnectError> {
        let (connector, mut connection) = Self::open(config).await?;
        check_durability(&mut connection, config).await?;
        Ok((connector, connection))
    }

    async fn open(config: &RedisConfig) -> redis::RedisResult<(Self, Connection)> {
        if config.is_cluster() {
            let nodes: Vec<&str> = config
                .cluster_nodes
                .iter()
                .map(|node| node.0.as_str())
                .collect();
            let client = ClusterClient::builder(nodes)
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(response_timeout(config))
                .retries(CLUSTER_RETRIES)
                .build()?;
            let connection = ClusterLink::connect(client, cluster_call_budget(config)).await?;
            return Ok((
                Self::Cluster(connection.clone()),
                Connection::Cluster(connection),
            ));
        }
        let url = config
            .url
            .as_ref()
            .map(|url| url.0.as_str())
            .unwrap_or_default();
        let client = redis::Client::open(url)?;
        let connection = client
            .get_connection_manager_with_config(manager_config(config))
            .await?;
        Ok((Self::Single(client), Connection::Single(connection)))
    }

    /// A connection of its own for a writer's blocking reads on one Redis; in a cluster, the
    /// shared one (reads there do not block).
    pub async fn reader(&self, config: &RedisConfig) -> Result<Connection, ConnectError> {
        match self {
            Self::Single(client) => Ok(Connection::Single(
                client
                    .get_connection_manager_with_config(manager_config(config))
                    .await?,
            )),
            Self::Cluster(connection) => Ok(Connection::Cluster(connection.clone())),
            Self::Pending(pending) => Box::pin(pending.get().await?.0.reader(config)).await,
        }
    }
}

/// Appends with `appendfsync always` (and `WAIT`) take longer than the client's 500 ms
/// default under load; a blocked read takes up to `read_block`.
fn response_timeout(config: &RedisConfig) -> Duration {
    (config.wait_timeout + Duration::from_secs(5)).max(super::READ_BLOCK * 4)
}

/// How often redis-rs retries a cluster command (after MOVED, ASK, a lost node).
const CLUSTER_RETRIES: u32 = 4;

/// The longest one cluster command may take with its retries before it counts as failed (and
/// towards replacing a connection that stays broken).
fn cluster_call_budget(config: &RedisConfig) -> Duration {
    response_timeout(config) * (CLUSTER_RETRIES + 2)
}

fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout(config)))
        .set_number_of_retries(2)
}

impl Connection {
    /// `command` on the master that holds `key`'s slot (a keyless command such as `WAIT`
    /// must reach the node that took the write); on one Redis, that Redis.
    pub async fn on_master_of(&mut self, key: &str, command: Cmd) -> redis::RedisResult<Value> {
        // A cluster's routed command hands a server's error back as a value: an error here.
        self.routed_to_master_of(key, command)
            .await
            .and_then(Value::extract_error)
    }

    async fn routed_to_master_of(&mut self, key: &str, command: Cmd) -> redis::RedisResult<Value> {
        match self {
            Self::Pending(pending) => {
                let mut connection = pending.get().await.map_err(redis_error)?.1.clone();
                Box::pin(connection.on_master_of(key, command)).await
            }
            Self::Single(connection) => command.query_async(connection).await,
            Self::Cluster(link) => {
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                link.route_command(
                    command,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(link) => link.command(cmd).boxed(),
            Self::Pending(pending) => async move {
                let mut connection = pending.get().await.map_err(redis_error)?.1.clone();
                connection.req_packed_command(cmd).await
            }
            .boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(link) => link.pipeline(pipeline, offset, count).boxed(),
            Self::Pending(pending) => async move {
                let mut connection = pending.get().await.map_err(redis_error)?.1.clone();
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }
            .boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(link) => link.get_db(),
            Self::Pending(_) => 0,
        }
    }
}

/// A connect failure as a command's error (what `ConnectionLike` returns).
fn redis_error(error: ConnectError) -> redis::RedisError {
    match error {
        ConnectError::Redis(error) => error,
        weak @ ConnectError::WeakDurability { .. } => {
            redis::RedisError::from((redis::ErrorKind::Client, "redis refused", weak.to_string()))
        }
    }
}

/// Refuses (or warns, with `allow_weak_durability`) when an acknowledged append would not
/// survive a Redis crash: AOF on, fsync on every write, and no eviction (which would drop
/// entries no writer has stored yet). In a cluster, every master is read; the weakest decides.
pub(super) async fn check_durability(
    connection: &mut Connection,
    config: &RedisConfig,
) -> Result<(), ConnectError> {
    for (setting, wanted) in [
        ("appendonly", "yes"),
        ("appendfsync", "always"),
        ("maxmemory-policy", "noeviction"),
    ] {
        let values = match setting_everywhere(connection, setting).await {
            Ok(values) => values,
            Err(error) if is_refused(&error) => {
                tracing::warn!(%error, setting, "cannot read redis settings (CONFIG disabled?); make sure appendonly is yes and appendfsync is always");
                return Ok(());
            }
            // Not there yet (no connection, a cluster with no master yet): not checked, so
            // not connected either.
            Err(error) => return Err(error.into()),
        };
        let Some(value) = values.into_iter().find(|value| value != wanted) else {
            continue;
        };
        if !config.allow_weak_durability {
            return Err(ConnectError::WeakDurability { setting, value });
        }
        tracing::warn!(setting, value = %value, wanted, "redis durability is weaker than acks promise: an acknowledged event can be lost in a redis crash (redis.allow_weak_durability is set)");
    }
    Ok(())
}

/// Whether `error` is Redis refusing a command (renamed away, or denied by an ACL), as opposed
/// to Redis not answering it at all.
fn is_refused(error: &redis::RedisError) -> bool {
    matches!(
        error.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::ResponseError | redis::ServerErrorKind::NoPerm
        ) | redis::ErrorKind::Extension
    )
}

/// The value of `setting` on every master (one Redis: on it).
async fn setting_everywhere(
    connection: &mut Connection,
    setting: &str,
) -> Result<Vec<String>, redis::RedisError> {
    let mut command = redis::cmd("CONFIG");
    command.arg("GET").arg(setting);
    let pairs: Vec<Vec<String>> = match connection {
        Connection::Cluster(link) => {
            let replies = link
                .route_command(
                    command,
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await?;
            // Each master's reply, keyed by its address.
            let by_node: Vec<(String, Vec<String>)> =
                redis::from_redis_value(replies).map_err(redis::RedisError::from)?;
            by_node.into_iter().map(|(_, pair)| pair).collect()
        }
        connection => vec![command.query_async(connection).await?],
    };
    Ok(pairs
        .into_iter()
        .map(|pair| pair.get(1).cloned().unwrap_or_default())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_error(reply: &[u8]) -> redis::RedisError {
        redis::parse_redis_value(reply)
            .and_then(Value::extract_error)
            .expect_err("an error reply")
    }

    #[test]
    fn a_config_renamed_away_or_denied_is_a_refusal() {
        for reply in [
            &b"-ERR unknown command 'CONFIG', with args beginning with: 'GET'\r\n"[..],
            b"-NOPERM this user has no permissions to run the 'config|get' command\r\n",
        ] {
            assert!(is_refused(&reply_error(reply)), "{reply:?}");
        }
    }

    #[test]
    fn a_redis_not_there_yet_is_not_a_refusal_and_so_not_a_pass() {
        let no_master = redis::RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "No connections found for multi-node operation",
        ));
        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let forming = reply_error(b"-CLUSTERDOWN Hash slot not served\r\n");
        for error in [no_master, refused, forming] {
            assert!(!is_refused(&error), "{error}");
        }
    }
}
