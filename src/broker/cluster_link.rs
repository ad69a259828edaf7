//! A Redis Cluster connection that mends itself. redis-rs's cluster connection follows MOVED
//! and ASK, reconnects lost nodes and refreshes the slot map, but once every node was gone at
//! the same time it can stay broken after they are back (redis-rs#2277: retries spent on
//! stale connections before any reconnect runs). A writer would then read nothing, ever,
//! while the cluster is fine. So every command's outcome is watched: when commands have only
//! failed with connection errors (or not answered within their budget) for [`MEND_AFTER`], a
//! fresh connection is made from the seed nodes and replaces the old one for every clone.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwap;
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisResult, Value, aio::ConnectionLike,
    cluster::ClusterClient, cluster_async::ClusterConnection, cluster_routing::RoutingInfo,
};
use tokio::time::Instant;

/// How long commands may fail with connection errors before the connection is replaced. The
/// library's own recovery takes well under a second when it works.
const MEND_AFTER: Duration = Duration::from_secs(5);

/// A cluster connection shared by clones, replaced when it stays broken.
#[derive(Clone)]
pub struct ClusterLink(Arc<Shared>);

struct Shared {
    client: ClusterClient,
    current: ArcSwap<ClusterConnection>,
    health: Mutex<Health>,
    /// Held while a replacement connects, so that one caller makes it.
    replacing: tokio::sync::Mutex<()>,
    /// The longest one command may take, retries included, before it counts as failed.
    call_budget: Duration,
}

impl ClusterLink {
    /// Connects to the cluster behind `client`'s seed nodes.
    pub async fn connect(client: ClusterClient, call_budget: Duration) -> RedisResult<Self> {
        let connection = within(call_budget, client.get_async_connection()).await?;
        Ok(Self(Arc::new(Shared {
            client,
            current: ArcSwap::from_pointee(connection),
            health: Mutex::new(Health::default()),
            replacing: tokio::sync::Mutex::new(()),
            call_budget,
        })))
    }

    /// `command` where `routing` says (a master, every master, a slot's node).
    pub async fn route_command(&self, command: Cmd, routing: RoutingInfo) -> RedisResult<Value> {
        self.watched(
            |mut connection| async move { connection.route_command(command, routing).await },
        )
        .await
    }

    /// `command`, routed by its key as redis-rs routes it.
    pub async fn command(&self, command: &Cmd) -> RedisResult<Value> {
        self.watched(|mut connection| async move { connection.req_packed_command(command).await })
            .await
    }

    /// `count` replies of `pipeline` from `offset`, routed as redis-rs routes a pipeline.
    pub async fn pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.watched(|mut connection| async move {
            connection
                .req_packed_commands(pipeline, offset, count)
                .await
        })
        .await
    }

    /// `call` on the current connection within the call budget, its outcome recorded.
    async fn watched<T, F>(&self, call: impl FnOnce(ClusterConnection) -> F) -> RedisResult<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let connection = ClusterConnection::clone(&self.0.current.load());
        let result = within(self.0.call_budget, call(connection)).await;
        self.observe(&result).await;
        result
    }

    pub fn get_db(&self) -> i64 {
        self.0.current.load().get_db()
    }

    /// Records how a command ended; replaces the connection when it has stayed broken.
    async fn observe<T>(&self, result: &RedisResult<T>) {
        let outcome = match result {
            Err(error) if is_link_failure(error) => Outcome::Broken,
            _ => Outcome::Answered,
        };
        let due = self
            .0
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(Instant::now(), outcome);
        if due {
            self.replace().await;
        }
    }

    async fn replace(&self) {
        // Another caller is replacing it already.
        let Ok(_replacing) = self.0.replacing.try_lock() else {
            return;
        };
        match within(self.0.call_budget, self.0.client.get_async_connection()).await {
            Ok(fresh) => {
                self.0.current.store(Arc::new(fresh));
                crate::metrics::redis_connection_replaced();
                tracing::warn!(
                    after_secs = MEND_AFTER.as_secs(),
                    "replaced the redis cluster connection: its commands kept failing with connection errors"
                );
            }
            Err(error) => {
                tracing::warn!(%error, "cannot make a fresh redis cluster connection yet; the old one stays");
            }
        }
    }
}

/// `call`, or a timeout error once `budget` has passed.
async fn within<T>(budget: Duration, call: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(budget, call)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis cluster command took longer than its budget",
            )))
        })
}

/// Errors of the connection rather than answers of a server: a node that cannot be reached, a
/// broken or timed-out socket, no connection for a slot. A server's error reply (`NOGROUP`,
/// `BUSYGROUP`, `CLUSTERDOWN`, a script's error) is an answer: the link works.
fn is_link_failure(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound | ErrorKind::Parse
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A reply came back (a value or a server's error).
    Answered,
    /// The command failed on the connection.
    Broken,
}

/// Since when commands have only failed on the connection.
#[derive(Debug, Default)]
struct Health {
    failing_since: Option<Instant>,
}

impl Health {
    /// Whether the connection is due for a replacement after `outcome` at `now`: after
    /// [`MEND_AFTER`] of nothing but failures, then again every [`MEND_AFTER`] while a
    /// replacement cannot connect either.
    fn record(&mut self, now: Instant, outcome: Outcome) -> bool {
        if outcome == Outcome::Answered {
            self.failing_since = None;
            return false;
        }
        let since = *self.failing_since.get_or_insert(now);
        if now.duration_since(since) < MEND_AFTER {
            return false;
        }
        self.failing_since = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_replaced_only_after_failing_for_the_whole_mend_period() {
        let start = Instant::now();
        let mut health = Health::default();
        assert!(!health.record(start, Outcome::Broken));
        assert!(!health.record(start + MEND_AFTER / 2, Outcome::Broken));
        assert!(health.record(start + MEND_AFTER, Outcome::Broken));
        // Due again only after another whole period of failures.
        assert!(!health.record(start + MEND_AFTER * 3 / 2, Outcome::Broken));
        assert!(health.record(start + MEND_AFTER * 2, Outcome::Broken));
    }

    #[test]
    fn one_answer_starts_the_mend_period_over() {
        let start = Instant::now();
        let mut health = Health::default();
        assert!(!health.record(start, Outcome::Broken));
        assert!(!health.record(
            start + MEND_AFTER - Duration::from_millis(1),
            Outcome::Answered
        ));
        assert!(!health.record(start + MEND_AFTER, Outcome::Broken));
        assert!(!health.record(
            start + MEND_AFTER * 2 - Duration::from_millis(1),
            Outcome::Broken
        ));
        assert!(health.record(start + MEND_AFTER * 2, Outcome::Broken));
    }

    #[test]
    fn server_errors_are_answers_and_socket_errors_are_failures() {
        let refused = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(is_link_failure(&refused));
        let no_node = RedisError::from((ErrorKind::ClusterConnectionNotFound, "no node"));
        assert!(is_link_failure(&no_node));
        for reply in [
            &b"-NOGROUP No such key or consumer group\r\n"[..],
            b"-CLUSTERDOWN The cluster is down\r\n",
        ] {
            let answer = redis::parse_redis_value(reply)
                .and_then(Value::extract_error)
                .expect_err("an error reply");
            assert!(!is_link_failure(&answer), "{answer}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_fails_after_its_budget() {
        let hung = within(
            Duration::from_secs(3),
            std::future::pending::<RedisResult<()>>(),
        );
        let error = hung.await.expect_err("times out");
        assert!(is_link_failure(&error));
    }
}
