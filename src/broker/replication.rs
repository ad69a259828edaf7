//! What an append waits for past its master: `redis.wait_replicas` replicas. Servers that
//! know `WAITAOF` (Redis 7.2 and later, Valkey) are asked `WAITAOF 1 N`: the master's AOF and
//! N replicas' AOFs have fsync'd the entry. Older servers (Redis 7.0, Debian bookworm's) answer
//! it with an unknown-command error; from then on this node asks `WAIT N`: N replicas hold the
//! entry in memory. Which one a node uses is logged when it learns it.

use std::{
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

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

/// Whether `error` is a server's answer to a command it does not know.
fn is_unknown_command(error: &redis::RedisError) -> bool {
    error.code() == Some("ERR")
        && error
            .detail()
            .is_some_and(|detail| detail.to_ascii_lowercase().contains("unknown command"))
}

impl Broker {
    /// Waits for `redis.wait_replicas` replicas of the master that holds `key` to confirm
    /// what it took (and, with `WAITAOF`, for the master's own fsync); fewer within
    /// `redis.wait_timeout` fails the append.
    pub(super) async fn wait_replicas(
        &self,
        connection: &mut Connection,
        key: &str,
    ) -> Result<(), BrokerError> {
        let config = &self.shared.config;
        let wanted = config.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let timeout = config.wait_timeout;
        let wait_command = &self.shared.wait_command;
        if wait_command.0.load(Ordering::Relaxed) != WAIT {
            // The master's own fsync too, unless weak durability was allowed: a master
            // without an AOF refuses `WAITAOF 1`.
            let local = u32::from(!config.allow_weak_durability);
            let mut command = redis::cmd("WAITAOF");
            command.arg(local).arg(wanted).arg(millis(timeout));
            match connection.on_master_of(key, command).await {
                Ok(reply) => {
                    wait_command.learn(WAITAOF);
                    let (fsynced, replicas): (i64, i64) =
                        redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
                    if fsynced < i64::from(local) || replicas < i64::from(wanted) {
                        return Err(BrokerError::Replicas {
                            wanted,
                            acked: replicas,
                            timeout,
                        });
                    }
                    return Ok(());
                }
                Err(error) if is_unknown_command(&error) => wait_command.learn(WAIT),
                Err(error) => return Err(error.into()),
            }
        }
        let mut command = redis::cmd("WAIT");
        command.arg(wanted).arg(millis(timeout));
        let reply = connection.on_master_of(key, command).await?;
        let acked: i64 = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        if acked < i64::from(wanted) {
            return Err(BrokerError::Replicas {
                wanted,
                acked,
                timeout,
            });
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
