//! Redis mode against real redis-server processes (AOF `always`, each test its own) and real
//! sluice processes: ingest and writer nodes, kill -9 of either, a Redis restart under load, a
//! poison entry, backpressure on a full backlog, the durability check, and Delete covering
//! events still in the streams.

mod common;

use std::{
    collections::HashSet,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{ServerSpec, TestDatabase, TestServer, event, request};
use sluice::proto::{
    DeleteRequest, StatsRequest, TailRequest, ingest_service_client::IngestServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

/// A redis-server of one test: its own port and directory, AOF on, fsync on every write.
struct Redis {
    child: Option<Child>,
    /// redis-server, or valkey-server where a test needs Redis 7.2+'s commands.
    binary: String,
    port: u16,
    dir: tempfile::TempDir,
    durable: bool,
}

impl Redis {
    async fn start() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(durable: bool) -> Self {
        let port = common::free_port();
        let mut redis = Self {
            child: None,
            binary: server_binary("TEST_SLUICE_REDIS_SERVER"),
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            durable,
        };
        redis.spawn().await;
        redis
    }

    async fn spawn(&mut self) {
        self.spawn_server(&[]).await;
    }

    /// A durable server of `binary` (redis-server or valkey-server), with `extra` arguments.
    async fn start_server(binary: &str, extra: &[String]) -> Self {
        let mut redis = Self {
            child: None,
            binary: binary.to_owned(),
            port: common::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            durable: true,
        };
        redis.spawn_server(extra).await;
        redis
    }

    async fn spawn_server(&mut self, extra: &[String]) {
        let (appendonly, fsync) = if self.durable {
            ("yes", "always")
        } else {
            ("no", "everysec")
        };
        let child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                appendonly,
                "--appendfsync",
                fsync,
                "--save",
                "",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it as a cluster node (fails over after 2 s without its master).
    async fn spawn_clustered(&mut self) {
        self.spawn_clustered_process();
        assert!(
            self.clustered_up().await,
            "redis did not start on {}",
            self.port
        );
    }

    fn spawn_clustered_process(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
    }

    /// Waits until this node's own process answers as a cluster node; false when the process
    /// exited (another test took the port meanwhile).
    async fn clustered_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|child| child.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return false;
            }
            let info = Command::new(redis_cli())
                .args(["-p", &self.port.to_string(), "info", "cluster"])
                .output();
            if info.is_ok_and(|output| {
                String::from_utf8_lossy(&output.stdout).contains("cluster_enabled:1")
            }) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether this node is the master that serves `slot` now.
    fn is_master_of(&self, slot: u16) -> bool {
        let Ok(output) = Command::new(redis_cli())
            .args(["-p", &self.port.to_string(), "cluster", "nodes"])
            .output()
        else {
            return false;
        };
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.lines()
            .filter(|line| line.contains("myself") && line.contains("master"))
            .flat_map(|line| line.split_whitespace().skip(8))
            .any(|range| match range.split_once('-') {
                Some((low, high)) => low
                    .parse::<u16>()
                    .ok()
                    .zip(high.parse::<u16>().ok())
                    .is_some_and(|(low, high)| (low..=high).contains(&slot)),
                None => range.parse::<u16>().is_ok_and(|single| single == slot),
            })
    }

    /// SIGKILL: whatever AOF `always` wrote survives.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    async fn backlog_events(&self) -> i64 {
        self.backlog("events").await
    }

    async fn backlog_bytes(&self) -> i64 {
        self.backlog("bytes").await
    }

    /// The backlog counter `sluice:events:backlog:<what>`.
    async fn backlog(&self, what: &str) -> i64 {
        let mut connection = self.connection().await;
        redis::cmd("GET")
            .arg(format!("sluice:events:backlog:{what}"))
            .query_async::<Option<i64>>(&mut connection)
            .await
            .expect("backlog")
            .unwrap_or_default()
    }

    /// Entries delivered to a writer and not acknowledged, over every shard.
    async fn pending(&self) -> i64 {
        let mut connection = self.connection().await;
        let mut pending = 0;
        for shard in 0..4 {
            let summary: redis::Value = redis::cmd("XPENDING")
                .arg(format!("sluice:events:{shard}"))
                .arg("sluice-writers")
                .query_async(&mut connection)
                .await
                .expect("xpending");
            if let redis::Value::Array(fields) = summary
                && let Some(redis::Value::Int(count)) = fields.first()
            {
                pending += count;
            }
        }
        pending
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of one test: 3 masters and 3 replicas (`redis-server --cluster-enabled yes`,
/// AOF `always`, each in its own directory, on free loopback ports whose bus port, port +
/// 10000, is free too), made with `redis-cli --cluster create`.
struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    async fn start() -> Self {
        Self::start_of(&server_binary("TEST_SLUICE_REDIS_SERVER")).await
    }

    /// A cluster of `binary` (redis-server or valkey-server).
    async fn start_of(binary: &str) -> Self {
        // A port another test takes between the check and the spawn is replaced by another.
        let mut nodes = Vec::new();
        while nodes.len() < 6 {
            let port = Self::free_ports()[0];
            let mut node = Redis {
                child: None,
                binary: binary.to_owned(),
                port,
                dir: tempfile::tempdir().expect("tempdir"),
                durable: true,
            };
            node.spawn_clustered_process();
            if node.clustered_up().await {
                nodes.push(node);
            } else {
                node.kill();
            }
        }
        Self::create(nodes).await
    }

    /// Six free loopback ports whose bus ports (port + 10000) are free too.
    fn free_ports() -> Vec<u16> {
        let mut ports = Vec::new();
        while ports.len() < 6 {
            let port = common::free_port();
            if port < 55_535
                && !ports.contains(&port)
                && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                ports.push(port);
            }
        }
        ports
    }

    async fn start_on(ports: Vec<u16>) -> Self {
        let mut nodes = Vec::new();
        for port in ports {
            let mut node = Redis {
                child: None,
                binary: server_binary("TEST_SLUICE_REDIS_SERVER"),
                port,
                dir: tempfile::tempdir().expect("tempdir"),
                durable: true,
            };
            node.spawn_clustered().await;
            nodes.push(node);
        }
        Self::create(nodes).await
    }

    /// `redis-cli --cluster create` over `nodes`, then waits until the cluster is ok.
    async fn create(nodes: Vec<Redis>) -> Self {
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let output = Command::new(redis_cli())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ok().await;
        cluster.wait_until_replicas_synced().await;
        cluster
    }

    /// Waits until every replica is linked to its master and done rewriting the AOF its full
    /// sync starts (until then it cannot confirm an append's fsync to `WAITAOF`).
    async fn wait_until_replicas_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let synced = self.nodes.iter().all(|node| {
                Command::new(redis_cli())
                    .args(["-p", &node.port.to_string(), "info"])
                    .output()
                    .is_ok_and(|output| {
                        let text = String::from_utf8_lossy(&output.stdout);
                        text.contains("role:master")
                            || (text.contains("master_link_status:up")
                                && text.contains("aof_rewrite_in_progress:0")
                                && text.contains("aof_rewrite_scheduled:0"))
                    })
            });
            if synced {
                return;
            }
            assert!(Instant::now() < deadline, "the replicas never synced");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every live node says `cluster_state:ok` and sees 3 masters.
    async fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|node| node.child.is_some())
                .all(|node| {
                    Command::new(redis_cli())
                        .args(["-p", &node.port.to_string(), "cluster", "info"])
                        .output()
                        .is_ok_and(|output| {
                            let text = String::from_utf8_lossy(&output.stdout);
                            text.contains("cluster_state:ok") && text.contains("cluster_size:3")
                        })
                });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster never became ok");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The seed nodes, as `redis.cluster_nodes` takes them from the environment.
    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(Redis::url)
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the cluster")
    }

    /// The streams (and their counters) sluice made: `sluice:events:{<tag>}`.
    async fn streams(&self) -> Vec<String> {
        let mut streams = Vec::new();
        for node in self.nodes.iter().filter(|node| node.child.is_some()) {
            let mut connection = node.connection().await;
            // Not `sluice:events:{*}`: Valkey 8 takes a pattern's `{…}` as a hash tag and
            // looks in that one slot only.
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("sluice:events:*")
                .query_async(&mut connection)
                .await
                .expect("keys");
            streams.extend(keys.into_iter().filter(|key| key.contains('{')));
        }
        streams.sort();
        streams.dedup();
        streams
    }

    /// The nodes (consumer names less their worker index) holding pending entries.
    async fn consumers_with_pending(&self) -> HashSet<String> {
        let mut connection = self.connection().await;
        let mut nodes = HashSet::new();
        for key in self.streams().await {
            if key.contains(":backlog:") {
                continue;
            }
            let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&key)
                .arg("sluice-writers")
                .query_async(&mut connection)
                .await
                .expect("xinfo consumers");
            nodes.extend(
                reply
                    .consumers
                    .iter()
                    .filter(|consumer| consumer.pending > 0)
                    .filter_map(|consumer| {
                        consumer
                            .name
                            .rsplit_once('-')
                            .map(|(node, _)| node.to_owned())
                    }),
            );
        }
        nodes
    }

    /// Backlog events over every shard, and entries pending with a writer.
    async fn backlog_and_pending(&self) -> (i64, i64) {
        let mut connection = self.connection().await;
        let (mut backlog, mut pending) = (0, 0);
        for key in self.streams().await {
            if key.ends_with(":backlog:events") {
                let value: Option<i64> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
                    .expect("get");
                backlog += value.unwrap_or_default();
            } else if !key.contains(":backlog:") {
                let summary: redis::Value = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg("sluice-writers")
                    .query_async(&mut connection)
                    .await
                    .expect("xpending");
                if let redis::Value::Array(fields) = summary
                    && let Some(redis::Value::Int(count)) = fields.first()
                {
                    pending += count;
                }
            }
        }
        (backlog, pending)
    }

    /// `redis-cli --cluster reshard`: every slot of master `from` moved to master `to`.
    fn move_all_slots(&self, from: usize, to: usize) {
        let id = |index: usize| {
            let output = Command::new(redis_cli())
                .args(["-p", &self.nodes[index].port.to_string(), "cluster", "myid"])
                .output()
                .expect("cluster myid");
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        let output = Command::new(redis_cli())
            .args(["--cluster", "reshard"])
            .arg(format!("127.0.0.1:{}", self.nodes[to].port))
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", "16384", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }

    /// A master other than node `from`.
    fn another_master(&self, from: usize) -> usize {
        (0..self.nodes.len())
            .find(|index| {
                *index != from
                    && Command::new(redis_cli())
                        .args(["-p", &self.nodes[*index].port.to_string(), "role"])
                        .output()
                        .is_ok_and(|output| {
                            String::from_utf8_lossy(&output.stdout).starts_with("master")
                        })
            })
            .expect("another master")
    }

    /// The node that is master of the most sluice streams.
    fn busiest_master(&self, streams: &[String]) -> usize {
        let mut best = (0, 0);
        for (index, node) in self.nodes.iter().enumerate() {
            let Some(_) = node.child else { continue };
            let owned = streams
                .iter()
                .filter(|key| !key.contains(":backlog:"))
                .filter(|key| {
                    Command::new(redis_cli())
                        .args(["-p", &node.port.to_string(), "cluster", "keyslot", key])
                        .output()
                        .ok()
                        .and_then(|output| {
                            String::from_utf8_lossy(&output.stdout)
                                .trim()
                                .parse::<u16>()
                                .ok()
                        })
                        .is_some_and(|slot| node.is_master_of(slot))
                })
                .count();
            if owned > best.1 {
                best = (index, owned);
            }
        }
        best.0
    }

    /// Waits until the streams hold nothing: every entry written and acknowledged.
    async fn drained(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (backlog, pending) = self.backlog_and_pending().await;
            if backlog == 0 && pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backlog never drained: {backlog} events, {pending} pending entries"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The server binary `scripts/test` names in `variable` (redis-server or valkey-server).
fn server_binary(variable: &str) -> String {
    std::env::var(variable)
        .unwrap_or_else(|_| panic!("{variable} is unset: run the suite with scripts/test"))
}

fn redis_cli() -> std::path::PathBuf {
    let server = server_binary("TEST_SLUICE_REDIS_SERVER");
    std::path::Path::new(&server).with_file_name("redis-cli")
}

fn node(database: &TestDatabase, redis: &Redis, role: &str) -> ServerSpec {
    ServerSpec::with_database(&database.url)
        .env("SLUICE_REDIS__URL", &redis.url())
        .env("SLUICE_REDIS__CLAIM_IDLE", "1s")
        .arg("--role")
        .arg(role)
}

/// `rounds` requests of `size` events of `service`, each sent once the previous one is
/// acknowledged; messages are `<round>-<index>`.
async fn publish_one_at_a_time(
    client: &mut IngestServiceClient<Channel>,
    service: &str,
    rounds: usize,
    size: usize,
) {
    for round in 0..rounds {
        let events = (0..size)
            .map(|index| event(service, &format!("{round}-{index}")))
            .collect();
        client.publish(request(events)).await.expect("publish");
    }
}

/// What a sender does with a refused request.
#[derive(Clone, Copy)]
enum Refused {
    /// Retries refusals that say when to come back (a full backlog or buffer); any other
    /// means the node was killed, and what it acknowledged is all that counts.
    RetryWhenTold,
    /// Retries every refusal (a cluster failing over) until the request is acknowledged.
    RetryUntilAcknowledged,
}

/// Sends `rounds` requests of `size` events through `client`, counting the acknowledged ids.
async fn send(
    mut client: IngestServiceClient<Channel>,
    service: String,
    rounds: usize,
    size: usize,
    acknowledged: Arc<Mutex<HashSet<String>>>,
    refused: Refused,
) {
    for round in 0..rounds {
        let events: Vec<_> = (0..size)
            .map(|index| event(&service, &format!("{round}-{index}")))
            .collect();
        let ids: Vec<String> = events.iter().map(|event| event.id.clone()).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match client.publish(request(events.clone())).await {
                Ok(response) => {
                    assert_eq!(response.into_inner().accepted as usize, size);
                    acknowledged.lock().expect("ids").extend(ids);
                    break;
                }
                Err(status) => match refused {
                    Refused::RetryWhenTold if status.get_error_details().retry_info().is_none() => {
                        return;
                    }
                    Refused::RetryWhenTold => {}
                    Refused::RetryUntilAcknowledged => {
                        assert!(Instant::now() < deadline, "never acknowledged: {status:?}");
                    }
                },
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn stored_ids(database: &TestDatabase, service_like: &str) -> (i64, HashSet<String>) {
    let mut connection = database.connect().await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT id::text FROM events WHERE service LIKE $1")
        .bind(service_like)
        .fetch_all(&mut connection)
        .await
        .expect("ids");
    (ids.len() as i64, ids.into_iter().collect())
}

/// Waits until every acknowledged id of `service_like` is in PostgreSQL (spools may still be
/// replaying), then checks that each is stored once. `logs` say what the nodes saw on failure.
async fn all_stored_once(
    database: &TestDatabase,
    service_like: &str,
    acknowledged: &HashSet<String>,
    logs: impl Fn() -> String,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (rows, stored) = stored_ids(database, service_like).await;
        if acknowledged.is_subset(&stored) {
            assert_eq!(rows as usize, stored.len(), "every event stored once");
            return rows;
        }
        let lost: Vec<&String> = acknowledged.difference(&stored).take(5).collect();
        assert!(
            Instant::now() < deadline,
            "{} acknowledged but not stored, e.g. {lost:?}\n{}",
            acknowledged.difference(&stored).count(),
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Delete of `user` through `server`, checked to be still waiting a second later (for the
/// streams to be stored); await it once a writer runs.
async fn delete_waiting(
    server: &TestServer,
    user: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<sluice::proto::DeleteResponse>, tonic::Status>>
{
    let mut query = server.query_client().await;
    let user = user.to_owned();
    let delete = tokio::spawn(async move {
        query
            .delete(DeleteRequest {
                user_id: user,
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!delete.is_finished(), "delete waits for the streams");
    delete
}

/// Waits until the streams hold nothing: every entry written and acknowledged.
async fn drained(redis: &Redis, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (backlog, pending) = (redis.backlog_events().await, redis.pending().await);
        if backlog == 0 && pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backlog never drained: {backlog} events, {pending} pending entries"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_node_tails_what_it_stores_and_counts_it_per_service() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    let ingest = TestServer::start(node(&database, &redis, "ingest")).await;
    let writer = TestServer::start(node(&database, &redis, "writer")).await;
    let mut tail = writer
        .query_client()
        .await
        .tail(TailRequest::default())
        .await
        .expect("tail")
        .into_inner();
    let mut client = ingest.ingest_client().await;
    let events = (0..30)
        .map(|index| {
            let service = if index % 3 == 0 {
                "tailed-a"
            } else {
                "tailed-b"
            };
            event(service, &format!("event {index}"))
        })
        .collect();
    client.publish(request(events)).await.expect("publish");

    let mut received = HashSet::new();
    while received.len() < 30 {
        let response = tokio::time::timeout(Duration::from_secs(20), tail.next())
            .await
            .expect("tailed in time")
            .expect("a message")
            .expect("ok");
        received.extend(response.events.into_iter().map(|event| event.message));
    }
    assert_eq!(received.len(), 30);
    let metrics = writer
        .wait_for_metrics("both services counted", |metrics| {
            common::metric_sum(
                metrics,
                "sluice_service_events_total",
                "service=\"tailed-b\"",
            ) == 20.0
        })
        .await;
    assert_eq!(
        common::metric_sum(
            &metrics,
            "sluice_service_events_total",
            "service=\"tailed-a\""
        ),
        10.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_and_two_writer_nodes_keep_every_acknowledged_event_once_through_kill_9() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    let mut ingest_a = TestServer::start(node(&database, &redis, "ingest")).await;
    let ingest_b = TestServer::start(node(&database, &redis, "ingest")).await;
    let mut writer_a = TestServer::start(node(&database, &redis, "writer")).await;
    let writer_b = TestServer::start(
        node(&database, &redis, "writer").env("SLUICE_REDIS__CONSUMER_EXPIRY", "2s"),
    )
    .await;

    // A writer node takes no events, and says so through health.
    let refused = writer_b
        .ingest_client()
        .await
        .publish(request(vec![event("cluster", "to a writer")]))
        .await
        .expect_err("writer nodes refuse ingest");
    assert_eq!(refused.code(), Code::Unavailable);

    // 200k events over both ingest nodes, 4 senders each.
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut senders = tokio::task::JoinSet::new();
    for (index, server) in [&ingest_a, &ingest_b, &ingest_a, &ingest_b]
        .iter()
        .enumerate()
    {
        senders.spawn(send(
            server.ingest_client().await,
            format!("cluster-{index}"),
            50,
            1_000,
            acknowledged.clone(),
            Refused::RetryWhenTold,
        ));
    }
    // Mid-stream: kill -9 a writer (its pending entries must be claimed), then an ingest node.
    let deadline = Instant::now() + Duration::from_secs(120);
    while acknowledged.lock().expect("ids").len() < 40_000 {
        assert!(Instant::now() < deadline, "too slow before the first kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer_a.kill_hard();
    while acknowledged.lock().expect("ids").len() < 100_000 {
        assert!(Instant::now() < deadline, "too slow before the second kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ingest_a.kill_hard();
    while senders.join_next().await.is_some() {}

    drained(&redis, Duration::from_secs(120)).await;
    let acknowledged = acknowledged.lock().expect("ids").clone();
    let (rows, stored) = stored_ids(&database, "cluster-%").await;
    assert!(acknowledged.len() >= 100_000, "{}", acknowledged.len());
    let lost: Vec<&String> = acknowledged.difference(&stored).take(5).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert_eq!(rows as usize, stored.len(), "every event stored once");
    eprintln!(
        "acknowledged {}, stored {rows}; claims by the surviving writer: {}",
        acknowledged.len(),
        writer_b
            .logs()
            .matches("claimed entries another writer left pending")
            .count()
    );
    let stats = writer_b
        .query_client()
        .await
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    let writer = stats.writer.expect("writer stats");
    assert_eq!(writer.mode, "writer");
    assert_eq!(writer.stream_backlog_events, 0);
    // The dead writer's consumer names leave the group once idle past consumer_expiry (they
    // hold nothing pending: the survivor claimed it all); the survivor's stay.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut connection = redis.connection().await;
        let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("sluice:events:0")
            .arg("sluice-writers")
            .query_async(&mut connection)
            .await
            .expect("xinfo consumers");
        let nodes: HashSet<String> = reply
            .consumers
            .iter()
            .filter_map(|consumer| {
                consumer
                    .name
                    .rsplit_once('-')
                    .map(|(node, _)| node.to_owned())
            })
            .collect();
        if nodes.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead writer's consumers stayed: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(ingest_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_loses_nothing_acknowledged() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut redis = Redis::start().await;
    let server = TestServer::start(
        node(&database, &redis, "all").env("SLUICE_BREAKER__OPEN_INITIAL", "200ms"),
    )
    .await;
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let sender = tokio::spawn(send(
        server.ingest_client().await,
        "outage".to_owned(),
        60,
        200,
        acknowledged.clone(),
        Refused::RetryWhenTold,
    ));
    while acknowledged.lock().expect("ids").len() < 2_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.kill();
    // While Redis is away, acks keep coming: the node spools them to its disk.
    let during = acknowledged.lock().expect("ids").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().expect("ids").len() < during + 1_000 {
        assert!(
            Instant::now() < deadline,
            "no acks while redis was down:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.spawn().await;
    sender.await.expect("sender");
    drained(&redis, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let acknowledged = acknowledged.lock().expect("ids").clone();
        let (_, stored) = stored_ids(&database, "outage").await;
        if acknowledged.is_subset(&stored) {
            assert_eq!(acknowledged.len(), 12_000);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events missing:\n{}",
            acknowledged.difference(&stored).count(),
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server.logs().contains("replayed spool segment"),
        "the spool carried the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_goes_to_dead_letters_after_max_deliveries() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    let server = TestServer::start(
        node(&database, &redis, "all")
            .env("SLUICE_REDIS__CLAIM_IDLE", "300ms")
            .env("SLUICE_REDIS__MAX_DELIVERIES", "2"),
    )
    .await;
    // An entry no writer can read (a record version from the future), beside good events.
    let mut connection = redis.connection().await;
    let _: String = redis::cmd("XADD")
        .arg("sluice:events:0")
        .arg("*")
        .arg("b")
        .arg(vec![9u8, 1, 2, 3])
        .arg("n")
        .arg(1)
        .query_async(&mut connection)
        .await
        .expect("xadd");
    let _: i64 = redis::cmd("INCRBY")
        .arg("sluice:events:backlog:events")
        .arg(1)
        .query_async(&mut connection)
        .await
        .expect("incrby");
    server
        .ingest_client()
        .await
        .publish(request(vec![event("beside-poison", "fine")]))
        .await
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(30);
    while database
        .scalar("SELECT count(*) FROM dead_letters WHERE service = '(unreadable)' AND error LIKE '%delivered 3 times%'")
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "poison entry never dead-lettered:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drained(&redis, Duration::from_secs(10)).await;
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'beside-poison'")
            .await,
        1
    );
    let raw: Vec<u8> =
        sqlx::query_scalar("SELECT raw FROM dead_letters WHERE service = '(unreadable)'")
            .fetch_one(&mut database.connect().await)
            .await
            .expect("raw");
    assert_eq!(raw, vec![9u8, 1, 2, 3], "kept byte for byte");

    // Every stream deleted by hand: appends recreate them without the group, and the writers
    // put the group back and store what was appended meanwhile.
    let _: i64 = redis::cmd("DEL")
        .arg(
            (0..4)
                .map(|shard| format!("sluice:events:{shard}"))
                .collect::<Vec<_>>(),
        )
        .query_async(&mut connection)
        .await
        .expect("del");
    let after: Vec<_> = (0..20)
        .map(|index| event("after-del", &index.to_string()))
        .collect();
    server
        .ingest_client()
        .await
        .publish(request(after))
        .await
        .expect("publish");
    let deadline = Instant::now() + Duration::from_secs(30);
    while database
        .scalar("SELECT count(*) FROM events WHERE service = 'after-del'")
        .await
        < 20
    {
        assert!(
            Instant::now() < deadline,
            "the group never came back:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.logs().contains("lost its consumer group"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batch_is_one_entry_and_the_batches_take_the_shards_in_turn() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    // An ingest node and no writer: every entry stays in its stream to be counted.
    let ingest = TestServer::start(node(&database, &redis, "ingest")).await;
    let mut client = ingest.ingest_client().await;
    // One request at a time, so each batch holds exactly one request's events.
    publish_one_at_a_time(&mut client, "turns", 8, 50).await;
    let mut connection = redis.connection().await;
    for shard in 0..4 {
        let entries: Vec<(String, std::collections::HashMap<String, redis::Value>)> =
            redis::cmd("XRANGE")
                .arg(format!("sluice:events:{shard}"))
                .arg("-")
                .arg("+")
                .query_async(&mut connection)
                .await
                .expect("xrange");
        let counts: Vec<String> = entries
            .iter()
            .map(|(_, fields)| match fields.get("n") {
                Some(redis::Value::BulkString(count)) => String::from_utf8_lossy(count).into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(counts, ["50", "50"], "shard {shard}: one entry per batch");
    }
    assert_eq!(redis.backlog_events().await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_plain_entries_are_both_stored_and_compressed_ones_hold_fewer_bytes() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    // Ingest nodes only, first: every entry stays in its stream to be weighed.
    let plain = TestServer::start(
        node(&database, &redis, "ingest").env("SLUICE_REDIS__COMPRESSION", "none"),
    )
    .await;
    let compressed = TestServer::start(node(&database, &redis, "ingest")).await;
    let log_lines = |service: &str, round: usize| {
        (0..100)
            .map(|index| {
                let latency = index * 7 + round;
                event(
                    service,
                    &format!("{service} handled GET /api/orders/{index} -> 200 in {latency} ms"),
                )
            })
            .collect()
    };
    let mut client = plain.ingest_client().await;
    for round in 0..4 {
        client
            .publish(request(log_lines("plain", round)))
            .await
            .expect("publish");
    }
    let plain_bytes = redis.backlog_bytes().await;
    let mut client = compressed.ingest_client().await;
    for round in 0..4 {
        client
            .publish(request(log_lines("zstd", round)))
            .await
            .expect("publish");
    }
    let compressed_bytes = redis.backlog_bytes().await - plain_bytes;
    assert!(
        compressed_bytes * 3 < plain_bytes * 2,
        "the same events: {compressed_bytes} bytes compressed, {plain_bytes} plain"
    );

    // One writer reads both forms.
    let _writer = TestServer::start(node(&database, &redis, "writer")).await;
    drained(&redis, Duration::from_secs(60)).await;
    assert_eq!(stored_ids(&database, "plain").await.0, 400);
    assert_eq!(stored_ids(&database, "zstd").await.0, 400);
}

/// One field of `INFO <section>` on `redis`.
async fn info_field(redis: &Redis, section: &str, field: &str) -> Option<String> {
    let mut connection = redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut connection)
        .await
        .expect("info");
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::to_owned)
}

/// With `redis.wait_replicas = 1`, a master of `binary` and one replica: the ack waits with
/// the command the server knows. Returns the master's `INFO commandstats`.
async fn acks_wait_for_a_replica_with(binary: &str) -> String {
    let database = TestDatabase::create().await;
    let master = Redis::start_server(binary, &[]).await;
    let replica = Redis::start_server(
        binary,
        &[
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port.to_string(),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while info_field(&replica, "replication", "master_link_status")
        .await
        .as_deref()
        != Some("up")
    {
        assert!(Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ingest = TestServer::start(
        node(&database, &master, "ingest").env("SLUICE_REDIS__WAIT_REPLICAS", "1"),
    )
    .await;
    let mut client = ingest.ingest_client().await;
    publish_one_at_a_time(&mut client, "replicas", 3, 10).await;
    // Every batch went to Redis (none to the spool, where a failed wait would send it).
    assert_eq!(master.backlog_events().await, 30, "{}", ingest.logs());
    let mut connection = master.connection().await;
    redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("commandstats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_for_the_replicas_aof_with_waitaof_where_the_server_knows_it() {
    common::init_crypto();
    let valkey = server_binary("TEST_SLUICE_VALKEY_SERVER");
    let stats = acks_wait_for_a_replica_with(&valkey).await;
    assert!(stats.contains("cmdstat_waitaof:calls=3,"), "{stats}");
    assert!(!stats.contains("cmdstat_wait:"), "{stats}");
}

/// `calls` and `failed_calls` of `command` in a node's `INFO commandstats` (0 when never called).
fn command_calls(stats: &str, command: &str) -> (i64, i64) {
    let Some(line) = stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
    else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .unwrap_or_default()
    };
    (field("calls"), field("failed_calls"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_with_waitaof_on_the_master_that_took_each_append_in_a_valkey_cluster() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let cluster = RedisCluster::start_of(&server_binary("TEST_SLUICE_VALKEY_SERVER")).await;
    let ingest = TestServer::start(cluster_node(&database, &cluster, "ingest")).await;
    let mut client = ingest.ingest_client().await;
    // 24 batches: the 12 shards take two each, in turn, so every master takes appends.
    publish_one_at_a_time(&mut client, "valkey-cluster", 24, 10).await;

    // Each master was asked WAITAOF (its own AOF and a replica's) once per entry it took: the
    // wait went to the node that took the append, never a plain WAIT, and none failed.
    let mut entries_per_master = Vec::new();
    for node in &cluster.nodes {
        let mut connection = node.connection().await;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .expect("commandstats");
        assert_eq!(command_calls(&stats, "wait"), (0, 0), "{stats}");
        if info_field(node, "replication", "role").await.as_deref() != Some("master") {
            assert_eq!(command_calls(&stats, "waitaof"), (0, 0), "{stats}");
            continue;
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("sluice:events:*")
            .query_async(&mut connection)
            .await
            .expect("keys");
        let mut entries = 0;
        for stream in keys
            .iter()
            .filter(|key| key.contains('{') && !key.contains(":backlog:"))
        {
            let length: i64 = redis::cmd("XLEN")
                .arg(stream)
                .query_async(&mut connection)
                .await
                .expect("xlen");
            entries += length;
        }
        assert_eq!(command_calls(&stats, "waitaof"), (entries, 0), "{stats}");
        if entries > 0 {
            entries_per_master.push(entries);
        }
    }
    assert_eq!(entries_per_master.len(), 3, "{entries_per_master:?}");
    assert_eq!(
        entries_per_master.iter().sum::<i64>(),
        24,
        "{entries_per_master:?}"
    );
    // Every batch went to the streams, none to the ingest node's spool (where an append whose
    // wait fell short would go).
    assert_eq!(cluster.backlog_and_pending().await, (240, 0));
    let metrics = ingest.metrics().await;
    assert!(metrics.contains("sluice_events_spooled_total"), "{metrics}");
    assert_eq!(
        common::metric_sum(&metrics, "sluice_events_spooled_total", ""),
        0.0,
        "{}",
        ingest.logs()
    );
    assert!(
        ingest.logs().contains("redis knows WAITAOF"),
        "{}",
        ingest.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_with_wait_on_a_redis_without_waitaof() {
    common::init_crypto();
    let redis = server_binary("TEST_SLUICE_REDIS_SERVER");
    let stats = acks_wait_for_a_replica_with(&redis).await;
    assert!(stats.contains("cmdstat_wait:calls=3,"), "{stats}");
    assert!(!stats.contains("cmdstat_waitaof:"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_is_refused_with_retry_info_and_delete_waits_for_the_streams() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    // An ingest node and no writer: the backlog only grows.
    let ingest = TestServer::start(
        node(&database, &redis, "ingest").env("SLUICE_REDIS__MAX_PENDING_EVENTS", "1000"),
    )
    .await;
    let mut client = ingest.ingest_client().await;
    let mut user_event = event("backlog", "personal");
    user_event.user_id = "u-forget".to_owned();
    client
        .publish(request(vec![user_event]))
        .await
        .expect("publish");
    for _ in 0..3 {
        let events = (0..500)
            .map(|index| event("backlog", &index.to_string()))
            .collect();
        client
            .publish(request(events))
            .await
            .expect("under the limit");
    }
    // The limit is read every 500 ms: a few more may pass before the refusals start.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut extra = 0;
    let status = loop {
        match client
            .publish(request(vec![event("backlog", "one more")]))
            .await
        {
            Err(status) => break status,
            Ok(_) => {
                extra += 1;
                assert!(Instant::now() < deadline, "never refused");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    assert!(details.retry_info().is_some(), "RetryInfo: {status:?}");
    let metrics = ingest.metrics().await;
    assert!(common::metric_sum(&metrics, "sluice_events_refused_total", "backlog_full") >= 1.0);
    // A full backlog takes the ingest node out of the load balancer's rotation.
    common::wait_for_status(&ingest, ServingStatus::NotServing).await;
    let stats = ingest
        .query_client()
        .await
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner()
        .writer
        .expect("writer stats");
    assert_eq!(stats.mode, "ingest");
    assert_eq!(stats.stream_backlog_events, 1_501 + extra);

    // Delete of a user whose event is still in the streams: it waits for a writer to store
    // it, then deletes it.
    let delete = delete_waiting(&ingest, "u-forget").await;
    let writer = TestServer::start(node(&database, &redis, "writer")).await;
    let deleted = delete.await.expect("task").expect("delete").into_inner();
    assert_eq!(deleted.deleted, 1);
    drained(&redis, Duration::from_secs(30)).await;
    // Drained: the ingest node serves again; a writer node never serves ingest.
    common::wait_for_status(&ingest, ServingStatus::Serving).await;
    assert_eq!(
        common::ingest_status(&writer).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE user_id = 'u-forget'")
            .await,
        0
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'backlog'")
            .await,
        1_500 + extra as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_without_aof_always_is_refused_at_start_unless_allowed() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start_with(false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &database.url)
        .env("SLUICE_DATA_DIR", dir.path().join("data"))
        .env("SLUICE_TLS__CERT_DIR", dir.path().join("certs"))
        .env("SLUICE_REDIS__URL", redis.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run sluice");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("appendonly"), "{stderr}");
    assert!(!stderr.contains(&redis.url()), "the url is never logged");

    let allowed = TestServer::start(
        node(&database, &redis, "all").env("SLUICE_REDIS__ALLOW_WEAK_DURABILITY", "true"),
    )
    .await;
    assert!(allowed.logs().contains("redis durability is weaker"));
}

fn cluster_node(database: &TestDatabase, cluster: &RedisCluster, role: &str) -> ServerSpec {
    ServerSpec::with_database(&database.url)
        .env("SLUICE_REDIS__CLUSTER_NODES", &cluster.seeds())
        .env("SLUICE_REDIS__CLAIM_IDLE", "1s")
        .env("SLUICE_REDIS__WAIT_REPLICAS", "1")
        .env("SLUICE_REDIS__WAIT_TIMEOUT", "2s")
        .arg("--role")
        .arg(role)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_every_acknowledged_event_once_through_a_master_kill_9() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut cluster = RedisCluster::start().await;
    let ingest_a = TestServer::start(cluster_node(&database, &cluster, "ingest")).await;
    let ingest_b = TestServer::start(cluster_node(&database, &cluster, "ingest")).await;
    let writer_a = TestServer::start(cluster_node(&database, &cluster, "writer")).await;
    let writer_b = TestServer::start(cluster_node(&database, &cluster, "writer")).await;

    // Every shard in a slot of its own (12 by default in a cluster), spread over all three
    // masters.
    let streams = cluster.streams().await;
    let shards: Vec<&String> = streams
        .iter()
        .filter(|key| !key.contains(":backlog:"))
        .collect();
    assert_eq!(shards.len(), 12, "{streams:?}");
    let masters: HashSet<usize> = (0..cluster.nodes.len())
        .filter(|index| {
            shards.iter().any(|key| {
                let slot = Command::new(redis_cli())
                    .args([
                        "-p",
                        &cluster.nodes[*index].port.to_string(),
                        "cluster",
                        "keyslot",
                        key,
                    ])
                    .output()
                    .ok()
                    .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok());
                slot.is_some_and(|slot| cluster.nodes[*index].is_master_of(slot))
            })
        })
        .collect();
    assert_eq!(masters.len(), 3, "the shards sit on {masters:?}");

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut senders = tokio::task::JoinSet::new();
    for (index, server) in [&ingest_a, &ingest_b, &ingest_a, &ingest_b]
        .iter()
        .enumerate()
    {
        senders.spawn(send(
            server.ingest_client().await,
            format!("cluster-{index}"),
            40,
            500,
            acknowledged.clone(),
            Refused::RetryUntilAcknowledged,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acknowledged.lock().expect("ids").len() < 20_000 {
        assert!(Instant::now() < deadline, "too slow before the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // kill -9 of the master with the most shards: its replica takes over, alone. With
    // wait_replicas = 1 those shards' appends cannot be confirmed until the old master is back
    // (as the new master's replica): the ingest nodes spool them meanwhile, and go on acking.
    let busiest = cluster.busiest_master(&streams);
    cluster.nodes[busiest].kill();
    while senders.join_next().await.is_some() {}
    cluster.nodes[busiest].spawn_clustered().await;
    cluster.wait_until_ok().await;

    // Acks the ingest nodes spooled while a shard had no master replay into the streams.
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(
        acknowledged.len(),
        80_000,
        "every request was acknowledged in the end"
    );
    let rows = all_stored_once(&database, "cluster-%", &acknowledged, || {
        format!("ingest:\n{}\nwriter:\n{}", ingest_a.logs(), writer_a.logs())
    })
    .await;
    cluster.drained(Duration::from_secs(60)).await;
    eprintln!(
        "acknowledged {}, stored {rows}; spooled by the ingest nodes: {}",
        acknowledged.len(),
        ingest_a.logs().matches("replayed spool segment").count()
            + ingest_b.logs().matches("replayed spool segment").count()
    );
    let stats = writer_b
        .query_client()
        .await
        .stats(StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.writer.expect("writer stats").stream_backlog_events, 0);
    drop((ingest_a, ingest_b, writer_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_under_load_and_a_writer_kill_9_lose_nothing_acknowledged_in_a_cluster() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let cluster = RedisCluster::start().await;
    let ingest = TestServer::start(cluster_node(&database, &cluster, "ingest")).await;
    let mut writer_a = TestServer::start(cluster_node(&database, &cluster, "writer")).await;
    let writer_b = TestServer::start(cluster_node(&database, &cluster, "writer")).await;
    let streams = cluster.streams().await;

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut senders = tokio::task::JoinSet::new();
    for index in 0..3 {
        senders.spawn(send(
            ingest.ingest_client().await,
            format!("reshard-{index}"),
            40,
            500,
            acknowledged.clone(),
            Refused::RetryUntilAcknowledged,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acknowledged.lock().expect("ids").len() < 10_000 {
        assert!(Instant::now() < deadline, "too slow before the writer kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A writer dies mid-batch: with PostgreSQL held, both writers hold entries pending;
    // writer A is killed with some, and the other claims them on each master.
    let stall = database.stall_writers().await;
    let deadline_pending = Instant::now() + Duration::from_secs(60);
    while cluster.consumers_with_pending().await.len() < 2 {
        assert!(
            Instant::now() < deadline_pending,
            "the writers never held entries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer_a.kill_hard();
    TestDatabase::resume_writers(stall).await;
    while acknowledged.lock().expect("ids").len() < 20_000 {
        assert!(Instant::now() < deadline, "too slow before the reshard");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every slot of the busiest master moves to another master, under load.
    let from = cluster.busiest_master(&streams);
    let to = cluster.another_master(from);
    cluster.move_all_slots(from, to);
    while senders.join_next().await.is_some() {}

    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(
        acknowledged.len(),
        60_000,
        "every request was acknowledged in the end"
    );
    all_stored_once(&database, "reshard-%", &acknowledged, || writer_b.logs()).await;
    cluster.drained(Duration::from_secs(60)).await;
    // The shards left the emptied master.
    assert_eq!(cluster.busiest_master(&streams), to);
    assert!(
        writer_b
            .logs()
            .contains("claimed entries another writer left pending"),
        "the surviving writer claimed the dead one's entries"
    );
}

/// An event as validation makes it, for appending through the broker itself.
fn valid_event(index: u64) -> sluice::event::ValidEvent {
    sluice::event::ValidEvent {
        index,
        id: uuid::Uuid::new_v4(),
        service: "moved".to_owned(),
        message: format!("event {index}"),
        timestamp: chrono::Utc::now(),
        user_id: None,
        metadata_json: "{}".to_owned(),
        trace_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_follows_its_shard_to_another_master_and_waits_for_that_masters_replica() {
    let cluster = RedisCluster::start().await;
    let config = sluice::config::RedisConfig {
        cluster_nodes: cluster
            .seeds()
            .split(',')
            .map(|seed| sluice::config::Secret(seed.to_owned()))
            .collect(),
        wait_replicas: 1,
        wait_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    // The broker alone, in this process: nothing else (no health check, no backlog poll, no
    // writer) refreshes its slot map, so the appends themselves meet the stale one.
    let broker = sluice::broker::Broker::connect(&config)
        .await
        .expect("connect");
    let event = valid_event(0);
    let shards = broker.shards();
    for _ in 0..shards {
        broker.append(&[&event], None).await.expect("append");
    }
    let streams = cluster.streams().await;
    let from = cluster.busiest_master(&streams);
    let to = cluster.another_master(from);
    cluster.move_all_slots(from, to);

    // Each shard whose slot moved answers MOVED inside the transaction: the append is sent
    // where MOVED points, and its wait asks that master's replica, not the old master.
    for _ in 0..shards {
        broker
            .append(&[&event], None)
            .await
            .expect("an append follows its slot");
    }
    let backlog = broker.backlog().await.expect("backlog");
    assert_eq!(
        backlog.events,
        2 * shards as u64,
        "every append is in a stream once"
    );
    assert_eq!(cluster.busiest_master(&streams), to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_down_and_back_loses_nothing_acknowledged() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let mut cluster = RedisCluster::start().await;
    let ingest = TestServer::start(cluster_node(&database, &cluster, "ingest")).await;
    let writer = TestServer::start(cluster_node(&database, &cluster, "writer")).await;
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let sender = tokio::spawn(send(
        ingest.ingest_client().await,
        "outage".to_owned(),
        60,
        200,
        acknowledged.clone(),
        Refused::RetryUntilAcknowledged,
    ));
    while acknowledged.lock().expect("ids").len() < 2_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in &mut cluster.nodes {
        node.kill();
    }
    // With every node gone, acks keep coming: the ingest node spools them.
    let during = acknowledged.lock().expect("ids").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().expect("ids").len() < during + 1_000 {
        assert!(
            Instant::now() < deadline,
            "no acks while the cluster was down:\n{}",
            ingest.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Down longer than a connection may fail before it is replaced (5 s): the nodes try fresh
    // connections while nothing answers, and keep working once the cluster is back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Back, each node with its AOF and nodes.conf.
    for node in &mut cluster.nodes {
        node.spawn_clustered().await;
    }
    cluster.wait_until_ok().await;
    sender.await.expect("sender");
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(acknowledged.len(), 12_000);
    all_stored_once(&database, "outage", &acknowledged, || {
        format!("ingest:\n{}\nwriter:\n{}", ingest.logs(), writer.logs())
    })
    .await;
    cluster.drained(Duration::from_secs(60)).await;
    assert!(
        ingest.logs().contains("replayed spool segment"),
        "the spool carried the outage"
    );
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_start_before_the_cluster_exists_spool_and_drain_when_it_appears() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let ports = RedisCluster::free_ports();
    let seeds = ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let spec = |role: &str| {
        ServerSpec::with_database(&database.url)
            .env("SLUICE_REDIS__CLUSTER_NODES", &seeds)
            .env("SLUICE_REDIS__CLAIM_IDLE", "1s")
            .arg("--role")
            .arg(role)
    };
    // No Redis anywhere yet: both nodes start.
    let ingest = TestServer::start(spec("ingest")).await;
    let writer = TestServer::start(spec("writer")).await;
    assert!(
        ingest.logs().contains("redis cannot be reached at start"),
        "{}",
        ingest.logs()
    );
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    send(
        ingest.ingest_client().await,
        "early".to_owned(),
        10,
        100,
        acknowledged.clone(),
        Refused::RetryWhenTold,
    )
    .await;
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(acknowledged.len(), 1_000, "acknowledged into the spool");

    // The cluster appears: the spool drains into it, and the writer stores everything.
    let cluster = RedisCluster::start_on(ports).await;
    all_stored_once(&database, "early", &acknowledged, || {
        format!("ingest:\n{}\nwriter:\n{}", ingest.logs(), writer.logs())
    })
    .await;
    cluster.drained(Duration::from_secs(60)).await;
}

/// Sets `appendfsync` on every node of the cluster.
async fn set_appendfsync(cluster: &RedisCluster, value: &str) {
    for node in &cluster.nodes {
        let mut connection = node.connection().await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(value)
            .query_async(&mut connection)
            .await
            .expect("config set");
    }
}

/// Waits until the node's `sluice_health_check{check}` gauge reads `value`.
async fn health_check_reads(server: &TestServer, check: &str, value: f64) {
    let label = format!("check=\"{check}\"");
    server
        .wait_for_metrics(&format!("{check} at {value}"), |metrics| {
            common::metric_sum(metrics, "sluice_health_check", &label) == value
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_found_weak_while_running_stops_appends_and_ingest_spools_until_it_is_durable() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let cluster = RedisCluster::start().await;
    let ingest = TestServer::start(
        cluster_node(&database, &cluster, "ingest")
            .env("SLUICE_REDIS__DURABILITY_CHECK_INTERVAL", "200ms"),
    )
    .await;
    let _writer = TestServer::start(cluster_node(&database, &cluster, "writer")).await;
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let sending = |service: &str| {
        let (ingest, acknowledged, service) = (&ingest, acknowledged.clone(), service.to_owned());
        async move {
            send(
                ingest.ingest_client().await,
                service,
                5,
                100,
                acknowledged,
                Refused::RetryUntilAcknowledged,
            )
            .await;
        }
    };
    sending("durable").await;
    health_check_reads(&ingest, "redis_durability", 1.0).await;

    // An operator (or a failover to a node configured otherwise) weakens the masters.
    set_appendfsync(&cluster, "everysec").await;
    health_check_reads(&ingest, "redis_durability", 0.0).await;
    assert!(
        ingest
            .logs()
            .lines()
            .any(|line| line.contains("not durable enough") && line.contains("everysec")),
        "{}",
        ingest.logs()
    );
    let spooled_before =
        common::metric_sum(&ingest.metrics().await, "sluice_events_spooled_total", "");
    sending("weak").await;
    // Acknowledged all the same, into the node's own fsync'd spool, not the weak masters.
    let spooled = common::metric_sum(&ingest.metrics().await, "sluice_events_spooled_total", "")
        - spooled_before;
    assert!(spooled >= 500.0, "{spooled} spooled:\n{}", ingest.logs());

    // Durable again: appends resume, the spool drains, everything is stored once.
    set_appendfsync(&cluster, "always").await;
    health_check_reads(&ingest, "redis_durability", 1.0).await;
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(acknowledged.len(), 1_000);
    all_stored_once(&database, "%", &acknowledged, || ingest.logs()).await;
    cluster.drained(Duration::from_secs(60)).await;
}

/// The Stats backlog of `server` once it reads zero (within a minute).
async fn backlog_reads_zero(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = server
            .query_client()
            .await
            .stats(StatsRequest::default())
            .await
            .expect("stats")
            .into_inner()
            .writer
            .expect("writer stats");
        if stats.stream_backlog_events == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backlog stays at {}:\n{}",
            stats.stream_backlog_events,
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events appended under one `redis.shards`, then nodes restarted with another: the writers
/// (of the new count) read the old layout's streams too, a Delete waits for them, and the
/// backlog of every layout drains. `spec` makes a node of a role and a shard count.
async fn a_change_of_shards_drains_the_old_layout(
    database: &TestDatabase,
    spec: impl Fn(&str, &str) -> ServerSpec,
) {
    let old = TestServer::start(spec("ingest", "6")).await;
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    send(
        old.ingest_client().await,
        "reshaped".to_owned(),
        10,
        200,
        acknowledged.clone(),
        Refused::RetryWhenTold,
    )
    .await;
    let mut forget = event("reshaped-user", "personal");
    forget.user_id = "u-reshaped".to_owned();
    old.ingest_client()
        .await
        .publish(request(vec![forget]))
        .await
        .expect("publish");
    drop(old);

    // New nodes with another count; the Delete of a user still in the old streams waits
    // for a writer to store it.
    let ingest = TestServer::start(spec("ingest", "3")).await;
    let delete = delete_waiting(&ingest, "u-reshaped").await;
    let writer = TestServer::start(spec("writer", "3")).await;
    send(
        ingest.ingest_client().await,
        "reshaped".to_owned(),
        5,
        200,
        acknowledged.clone(),
        Refused::RetryWhenTold,
    )
    .await;
    let deleted = delete.await.expect("task").expect("delete").into_inner();
    assert_eq!(deleted.deleted, 1);
    let acknowledged = acknowledged.lock().expect("ids").clone();
    assert_eq!(acknowledged.len(), 3_000);
    let rows = all_stored_once(database, "reshaped", &acknowledged, || {
        format!("{}\n{}", ingest.logs(), writer.logs())
    })
    .await;
    assert_eq!(rows, 3_000);
    backlog_reads_zero(&ingest).await;
    assert!(
        writer
            .logs()
            .contains("reading the streams of another redis.shards layout too"),
        "{}",
        writer.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_redis_shards_on_one_redis_drains_the_old_streams() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let redis = Redis::start().await;
    a_change_of_shards_drains_the_old_layout(&database, |role, shards| {
        node(&database, &redis, role).env("SLUICE_REDIS__SHARDS", shards)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_redis_shards_in_a_cluster_drains_the_old_streams() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let cluster = RedisCluster::start().await;
    a_change_of_shards_drains_the_old_layout(&database, |role, shards| {
        cluster_node(&database, &cluster, role).env("SLUICE_REDIS__SHARDS", shards)
    })
    .await;
}
