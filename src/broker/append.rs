//! An append: a batch as one entry of the next shard of this node's layout, with its backlog
//! counters, in one `MULTI` transaction, and the wait for replicas after it, all in one
//! pipeline to the shard's master.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use redis::{RedisWrite, ToRedisArgs};

use super::{Broker, BrokerError, COUNT_FIELD, PAYLOAD_FIELD, layouts::ShardKeys};
use crate::{
    config::EntryCompression,
    event::{ValidEvent, batch},
};

/// A batch as the argument of its append: encoded into the command itself.
struct EntryArg<'a> {
    events: &'a [&'a ValidEvent],
    admitted_at: Option<DateTime<Utc>>,
    /// Its encoded length (the backlog counts bytes).
    len: usize,
}

impl<'a> EntryArg<'a> {
    fn new(events: &'a [&'a ValidEvent], admitted_at: Option<DateTime<Utc>>) -> Self {
        Self {
            events,
            admitted_at,
            len: batch::encoded_len(events, admitted_at),
        }
    }
}

impl ToRedisArgs for EntryArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.bufmut_for_next_arg(self.len);
        batch::encode_into(self.events, self.admitted_at, &mut arg);
    }
}

impl Broker {
    /// Appends `events` as one entry of the next shard of this node's layout, with its backlog
    /// counters, all or nothing; then waits for `redis.wait_replicas`. Retrying after an error
    /// may append twice: writers store by id, so a second copy is a duplicate, not a second
    /// event.
    pub async fn append(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<(), BrokerError> {
        if let Some(reason) = self.shared.durability.weak() {
            return Err(BrokerError::Weak { reason });
        }
        let all = self.all_shards();
        // Appends go to this node's own layout, the first shards of the list, a whole batch
        // to one shard, each batch to the next: one entry, one transaction and one fsync per
        // batch.
        let shards = &all[..self.shared.config.shards().min(all.len())];
        if events.is_empty() || shards.is_empty() {
            return Ok(());
        }
        let shard = self.shared.next_shard.fetch_add(1, Ordering::Relaxed) % shards.len();
        let keys = &shards[shard];
        // One transaction on the shard's slot: the entry and its shard's counters (on one
        // Redis every shard shares them; in a cluster they sit in the shard's slot), all or
        // nothing, then the wait for replicas, in one pipeline to one node. Not a Lua script:
        // a script's arguments are copied into Lua and back, which doubled a master's CPU for
        // entries this size (BENCHMARKS.md, "An append as MULTI, not a script"). `MULTI` and
        // `EXEC` are commands of the pipeline rather than redis-rs's atomic mode: redis-rs
        // follows a `MOVED` (and learns the new slot map) only from a plain pipeline's
        // replies; an aborted transaction's would stay an error on every append until
        // something else refreshed the map.
        let config = &self.shared.config;
        let mut append = match config.compression {
            // The compressed entry is copied into the command from this thread's buffer.
            EntryCompression::Zstd => {
                batch::with_compressed(events, admitted_at, config.compression_level, |payload| {
                    append_pipeline(keys, &payload, payload.len(), events.len())
                })?
            }
            // The entry is encoded straight into the command: no payload of its own first.
            EntryCompression::None => {
                let entry = EntryArg::new(events, admitted_at);
                append_pipeline(keys, &entry, entry.len, events.len())
            }
        };
        let wait = self.wait_command();
        if let Some(wait) = &wait {
            append.add_command(wait.command.clone());
        }
        let mut connection = self.connection.clone();
        let replies: Vec<redis::Value> =
            append.ignore_errors().query_async(&mut connection).await?;
        let waited = appended(replies)?;
        match (wait, waited) {
            (Some(wait), Some(reply)) => {
                self.check_wait(wait, reply, &mut connection, &keys.stream)
                    .await
            }
            (None, _) => Ok(()),
            (Some(_), None) => Err(BrokerError::AppendReply("no reply to the wait")),
        }
    }
}

/// An append of `entry` (`bytes` long, `events` events) to `keys`' stream, with its counters:
/// `MULTI`, `XADD`, `INCRBY`, `INCRBY`, `EXEC`.
fn append_pipeline(
    keys: &ShardKeys,
    entry: &impl ToRedisArgs,
    bytes: usize,
    events: usize,
) -> redis::Pipeline {
    let mut append = redis::pipe();
    append
        .cmd("MULTI")
        .cmd("XADD")
        .arg(&keys.stream)
        .arg("*")
        .arg(PAYLOAD_FIELD)
        .arg(entry)
        .arg(COUNT_FIELD)
        .arg(events)
        .cmd("INCRBY")
        .arg(&keys.backlog_events)
        .arg(events)
        .cmd("INCRBY")
        .arg(&keys.backlog_bytes)
        .arg(bytes)
        .cmd("EXEC");
    append
}

/// Checks the replies of an append's pipeline (`MULTI`, `XADD`, `INCRBY`, `INCRBY`, `EXEC`,
/// then the wait, if any) and returns the wait's. The entry was taken only when `EXEC` answered
/// the new entry's id and both counters: a command refused when queued (`OOM`, a stale route
/// that could not be followed) is the error; any other shape (a peer that is not Redis) is
/// not taken for an append.
fn appended(replies: Vec<redis::Value>) -> Result<Option<redis::Value>, BrokerError> {
    let mut replies = replies.into_iter();
    for _queued in 0..4 {
        let reply = replies
            .next()
            .ok_or(BrokerError::AppendReply("fewer replies than commands"))?;
        reply.extract_error()?;
    }
    let exec = replies
        .next()
        .ok_or(BrokerError::AppendReply("no reply to EXEC"))?
        .extract_error()?;
    let redis::Value::Array(executed) = exec else {
        return Err(BrokerError::AppendReply("EXEC answered no array"));
    };
    let [id, events, bytes] = executed.as_slice() else {
        return Err(BrokerError::AppendReply(
            "EXEC answered another count of replies",
        ));
    };
    let is_id = |id: &redis::Value| match id {
        redis::Value::BulkString(id) => id.split(|byte| *byte == b'-').count() == 2,
        redis::Value::SimpleString(id) => id.split('-').count() == 2,
        _ => false,
    };
    if !is_id(id)
        || !matches!(
            (events, bytes),
            (redis::Value::Int(_), redis::Value::Int(_))
        )
    {
        return Err(BrokerError::AppendReply(
            "EXEC answered no entry id and counters",
        ));
    }
    Ok(replies.next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;

    fn ok() -> redis::Value {
        redis::Value::Okay
    }

    fn queued() -> redis::Value {
        redis::Value::SimpleString("QUEUED".to_owned())
    }

    fn error(reply: &[u8]) -> redis::Value {
        redis::parse_redis_value(reply).expect("an error reply")
    }

    fn executed() -> redis::Value {
        redis::Value::Array(vec![
            redis::Value::BulkString(b"1733400000000-0".to_vec()),
            redis::Value::Int(500),
            redis::Value::Int(81_920),
        ])
    }

    #[test]
    fn an_append_is_taken_when_exec_answers_the_entry_id_and_both_counters() {
        let waited = appended(vec![ok(), queued(), queued(), queued(), executed()]).expect("taken");
        assert_eq!(waited, None);
        let wait = redis::Value::Int(1);
        let waited = appended(vec![
            ok(),
            queued(),
            queued(),
            queued(),
            executed(),
            wait.clone(),
        ])
        .expect("taken");
        assert_eq!(waited, Some(wait));
    }

    #[test]
    fn an_append_refused_when_queued_fails_with_the_refusal() {
        let refusal = error(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n");
        let aborted = error(b"-EXECABORT Transaction discarded because of previous errors.\r\n");
        let failure =
            appended(vec![ok(), refusal, queued(), queued(), aborted]).expect_err("not taken");
        assert!(failure.to_string().contains("OOM"), "{failure}");
    }

    #[test]
    fn an_exec_that_did_not_take_the_entry_fails_the_append() {
        let wrong_type = redis::Value::Array(vec![
            error(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
            redis::Value::Int(1),
            redis::Value::Int(1),
        ]);
        // A watched key changed (nil), a runtime error inside, and what a peer that is not
        // Redis, or a socket connected to itself, answers: its own commands echoed back.
        let echo = redis::Value::Array(vec![redis::Value::BulkString(b"EXEC".to_vec())]);
        for exec in [redis::Value::Nil, wrong_type, echo] {
            let replies = vec![ok(), queued(), queued(), queued(), exec.clone()];
            assert!(appended(replies).is_err(), "{exec:?}");
        }
        assert!(appended(vec![ok(), queued()]).is_err(), "cut short");
    }

    /// The arguments of the `index`-th command of `pipeline`.
    fn command_args(pipeline: &redis::Pipeline, index: usize) -> Vec<Vec<u8>> {
        pipeline
            .cmd_iter()
            .nth(index)
            .map(|command| {
                command
                    .args_iter()
                    .map(|arg| match arg {
                        redis::Arg::Simple(bytes) => bytes.to_vec(),
                        _ => Vec::new(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Two sample events, their admission time and the keys of shard 0.
    fn sample_append() -> ([ValidEvent; 2], Option<DateTime<Utc>>, ShardKeys) {
        let events = [ValidEvent::sample(0), ValidEvent::sample(1)];
        let admitted_at = DateTime::from_timestamp_micros(1_800_000_000_000_000);
        let mut layout = ShardKeys::layout(&RedisConfig::default(), 1);
        (events, admitted_at, layout.remove(0))
    }

    #[test]
    fn an_append_encodes_its_entry_into_the_command_as_the_spool_encodes_a_record() {
        let (events, admitted_at, keys) = sample_append();
        let events: Vec<&ValidEvent> = events.iter().collect();
        let keys = &keys;
        let entry = EntryArg::new(&events, admitted_at);
        let append = append_pipeline(keys, &entry, entry.len, events.len());
        let payload = batch::encode(&events, admitted_at);
        assert_eq!(command_args(&append, 1)[4], payload);
        assert_eq!(
            command_args(&append, 3)[2],
            payload.len().to_string().as_bytes()
        );
    }

    #[test]
    fn a_compressed_append_carries_the_batch_and_counts_the_bytes_redis_holds() {
        let (events, admitted_at, keys) = sample_append();
        let events: Vec<&ValidEvent> = events.iter().collect();
        let keys = &keys;
        let append = batch::with_compressed(&events, admitted_at, -1, |payload| {
            append_pipeline(keys, &payload, payload.len(), events.len())
        })
        .expect("compressed");
        let args = |index| command_args(&append, index);
        let xadd = args(1);
        assert_eq!(xadd.len(), 7, "XADD stream * b <entry> n <count>");
        assert_eq!(
            batch::decode(&xadd[4]).expect("decoded"),
            batch::decode(&batch::encode(&events, admitted_at)).expect("decoded")
        );
        assert_eq!(args(3)[2], xadd[4].len().to_string().as_bytes());
    }
}
