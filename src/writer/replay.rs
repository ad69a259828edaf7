//! The replayer: while the circuit is open it probes the writers' destination (even with the
//! spool off), so the circuit closes when PostgreSQL (or, on a Redis-mode ingest node, Redis)
//! takes writes again even if no traffic arrives; once closed, it drains spooled batches there
//! and deletes the replayed segments. A spool left by an earlier run is replayed too.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{
    Destination, Target, WriteError,
    breaker::{Breaker, CircuitState},
};
use crate::{
    event::ValidEvent,
    metrics,
    spool::{SegmentReplay, Spool, SpoolError},
};

const REPLAY_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The rollup shard of replayed events (writers use their index, Delete uses -1).
const REPLAY_SHARD: i16 = i16::MAX;

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("circuit is open")]
    CircuitOpen,
}

/// Replays until `stopping` is cancelled. What is left is replayed at the next start.
pub async fn run(
    destination: Destination,
    write_timeout: Duration,
    breaker: Arc<Breaker>,
    spool: Option<Spool>,
    stopping: CancellationToken,
) {
    let target = destination.target(REPLAY_SHARD, write_timeout);
    loop {
        tokio::select! {
            () = tokio::time::sleep(REPLAY_INTERVAL) => {}
            () = stopping.cancelled() => return,
        }
        if breaker.state() != CircuitState::Closed {
            if !breaker.allow() {
                continue;
            }
            // This task is the half-open probe.
            if is_reachable(&destination).await {
                breaker.record_success(Duration::ZERO);
            } else {
                breaker.record_failure();
                continue;
            }
        }
        let Some(spool) = spool.as_ref().filter(|spool| !spool.is_empty()) else {
            continue;
        };
        spool.seal_active();
        loop {
            let segment = match spool.oldest_segment().await {
                Ok(Some(segment)) => segment,
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(%error, "cannot open spool segment; will retry");
                    break;
                }
            };
            let path = segment.path().to_owned();
            match replay_segment(&target, &breaker, segment).await {
                Ok(events) => {
                    metrics::spool_replayed(events, spool.bytes());
                    tracing::info!(segment = %path.display(), events, "replayed spool segment");
                }
                // Moved aside and logged by the spool; go on with the next segment.
                Err(ReplayError::Spool(SpoolError::Quarantined { .. })) => {}
                Err(error) => {
                    tracing::warn!(segment = %path.display(), %error, "spool replay paused; will retry");
                    break;
                }
            }
        }
    }
}

/// Whether the destination takes writes again: Redis answers, or the database is reachable
/// and not a read-only standby.
async fn is_reachable(destination: &Destination) -> bool {
    let pool = match destination {
        Destination::Postgres(pool, _) => pool,
        Destination::Broker(streams) => {
            return tokio::time::timeout(PROBE_TIMEOUT, streams.ping())
                .await
                .unwrap_or(false);
        }
    };
    let probe = sqlx::query_scalar::<_, bool>(
        "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'",
    )
    .fetch_one(pool);
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Ok(true))
    )
}

/// Writes every batch of a segment, then deletes it; idempotent, so a segment interrupted
/// halfway can be replayed again from its start.
async fn replay_segment(
    target: &Target,
    breaker: &Breaker,
    mut segment: SegmentReplay,
) -> Result<usize, ReplayError> {
    let mut replayed = 0;
    while let Some(batch) = segment.next_batch().await? {
        if !breaker.allow() {
            return Err(ReplayError::CircuitOpen);
        }
        let events: Vec<&ValidEvent> = batch.events.iter().collect();
        let started = Instant::now();
        match target.write_batch(&events, batch.admitted_at).await {
            Ok(_) => breaker.record_success(started.elapsed()),
            Err(error) => {
                breaker.record_failure();
                return Err(error.into());
            }
        }
        replayed += events.len();
    }
    segment.finish().await?;
    Ok(replayed)
}
