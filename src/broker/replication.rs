//! What an append waits for past its master: `redis.wait_replicas` replicas. Servers that
//! know `WAITAOF` (Redis 7.2 and later, Valkey) are asked `WAITAOF 1 N`: the master's AOF and
//! N replicas' AOFs have fsync'd the entry. Older servers (Redis 7.0, Debian bookworm's) answer
//! it with an unknown-command error; from then on this node asks `WAIT N`: N replicas hold the
//! entry in memory. Which one a node uses is logged when it learns it.
//!
//! The wait ends the append's own pipeline, so that it reaches the very connection and node
//! that took the entry, even when the append followed a `MOVED` its node's slot map did not
//! know yet (a `WAIT` routed on its own could ask the old master, which took nothing from this
//! connection and so confirms at once).

use std::{
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use redis::{Cmd, Value};

use super::{Broker, BrokerError, connection::Connection};

/// Whether the masters know `WAITAOF`, as learned from the first append that waited: 0 while
/// not known yet, then [`WAITAOF`] or [`WAIT`].
#[derive(Debug, Default)]
pub(super) struct WaitCommand(AtomicU8);

const WAITAOF: u8 = 1;
const WAIT: u8 = 2;

impl WaitCommand {
    fn learn(&self, command: u8) {
        if self.0.swap(command, Ordering::Relaxed) == command {
            return;
        }
        if command == WAITAOF {
            tracing::info!(
                "redis knows WAITAOF: acks wait until the master's and the replicas' AOF have each append"
            );
        } else {
            tracing::warn!(
                "redis has no WAITAOF (it is older than 7.2): acks wait with WAIT, until replicas hold each append in memory, not on disk"
            );
        }
    }
}

/// What an append waits with: the command, and which of the two it is.
pub(super) struct Wait {
    pub command: Cmd,
    kind: u8,
}

/// Whether `error` is a server's answer to a command it does not know.
fn is_unknown_command(error: &redis::RedisError) -> bool {
    error.code() == Some("ERR")
        && error
            .detail()
            .is_some_and(|detail| detail.to_ascii_lowercase().contains("unknown command"))
}

impl Broker {
    /// The command that ends an append's pipeline to wait for `redis.wait_replicas` replicas
    /// (and, with `WAITAOF`, for the master's own fsync): none when no replica is wanted.
    pub(super) fn wait_command(&self) -> Option<Wait> {
        let config = &self.shared.config;
        let wanted = config.wait_replicas;
        if wanted == 0 {
            return None;
        }
        let timeout = millis(config.wait_timeout);
        if self.shared.wait_command.0.load(Ordering::Relaxed) == WAIT {
            let mut command = redis::cmd("WAIT");
            command.arg(wanted).arg(timeout);
            return Some(Wait {
                command,
                kind: WAIT,
            });
        }
        // The master's own fsync too, unless weak durability was allowed: a master without an
        // AOF refuses `WAITAOF 1`.
        let local = u32::from(!config.allow_weak_durability);
        let mut command = redis::cmd("WAITAOF");
        command.arg(local).arg(wanted).arg(timeout);
        Some(Wait {
            command,
            kind: WAITAOF,
        })
    }

    /// Checks `reply`, the answer to `wait`: fewer replicas (or no fsync on the master) within
    /// `redis.wait_timeout` fails the append. A server without `WAITAOF` is asked `WAIT` now,
    /// on the master of `key` (once: later appends end with `WAIT` themselves).
    pub(super) async fn check_wait(
        &self,
        wait: Wait,
        reply: Value,
        connection: &mut Connection,
        key: &str,
    ) -> Result<(), BrokerError> {
        let wait_command = &self.shared.wait_command;
        let reply = match reply.extract_error() {
            Ok(reply) => reply,
            Err(error) if wait.kind == WAITAOF && is_unknown_command(&error) => {
                wait_command.learn(WAIT);
                let Some(wait) = self.wait_command() else {
                    return Ok(());
                };
                let reply = connection.on_master_of(key, wait.command).await?;
                return self.count_confirmations(WAIT, reply);
            }
            Err(error) => return Err(error.into()),
        };
        wait_command.learn(wait.kind);
        self.count_confirmations(wait.kind, reply)
    }

    /// Whether `reply` (of `WAITAOF` or `WAIT`, as `kind` says) confirms enough.
    fn count_confirmations(&self, kind: u8, reply: Value) -> Result<(), BrokerError> {
        let config = &self.shared.config;
        let wanted = config.wait_replicas;
        let (fsynced, replicas): (i64, i64) = if kind == WAITAOF {
            redis::from_redis_value(reply).map_err(redis::RedisError::from)?
        } else {
            let replicas = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            (1, replicas)
        };
        let local = i64::from(kind == WAITAOF && !config.allow_weak_durability);
        if fsynced < local || replicas < i64::from(wanted) {
            return Err(BrokerError::Replicas {
                wanted,
                acked: replicas,
                timeout: config.wait_timeout,
            });
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
