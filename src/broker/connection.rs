//! The connection to the streams: one Redis (a reconnecting `ConnectionManager`) or a Redis
//! Cluster (redis-rs's async cluster connection, which follows MOVED and ASK and refreshes
//! the slot map). Both are `ConnectionLike`, so a command is written once for either.

use std::time::Duration;

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr},
};

use crate::config::RedisConfig;

/// How the streams are reached.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What makes connections: a client for one Redis, or the cluster connection itself (it is
/// multiplexed over every node, and cluster mode never blocks a connection in a read).
#[derive(Clone)]
pub enum Connector {
    Single(redis::Client),
    Cluster(ClusterConnection),
}

impl Connector {
    /// Connects to `config.url`, or to the cluster behind `config.cluster_nodes`.
    pub async fn connect(config: &RedisConfig) -> redis::RedisResult<(Self, Connection)> {
        if config.is_cluster() {
            let nodes: Vec<&str> = config
                .cluster_nodes
                .iter()
                .map(|node| node.0.as_str())
                .collect();
            let client = ClusterClient::builder(nodes)
                .connection_timeout(Duration::from_secs(2))
                .response_timeout(response_timeout(config))
                .retries(4)
                .build()?;
            let connection = client.get_async_connection().await?;
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
    pub async fn reader(&self, config: &RedisConfig) -> redis::RedisResult<Connection> {
        match self {
            Self::Single(client) => Ok(Connection::Single(
                client
                    .get_connection_manager_with_config(manager_config(config))
                    .await?,
            )),
            Self::Cluster(connection) => Ok(Connection::Cluster(connection.clone())),
        }
    }
}

/// Appends with `appendfsync always` (and `WAIT`) take longer than the client's 500 ms
/// default under load; a blocked read takes up to `read_block`.
fn response_timeout(config: &RedisConfig) -> Duration {
    (config.wait_timeout + Duration::from_secs(5)).max(super::READ_BLOCK * 4)
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
        match self {
            Self::Single(connection) => command.query_async(connection).await,
            Self::Cluster(connection) => {
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                connection
                    .route_command(
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
            Self::Cluster(connection) => connection.req_packed_command(cmd),
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
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}
