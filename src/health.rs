//! `grpc.health.v1` statuses, kept current by a watcher task.
//!
//! `sluice.v1.IngestService` (and the overall `""` service) is SERVING while the buffer has room,
//! PostgreSQL answers, the circuit breaker is closed and no spool segment waits in quarantine;
//! NOT_SERVING otherwise and during shutdown.
//!
//! In Redis mode an ingest node needs Redis (its writers' destination) instead of PostgreSQL,
//! and a backlog under its limit; a writer node needs PostgreSQL and Redis, and reports
//! `sluice.v1.IngestService` NOT_SERVING (it takes no events) and `""` by its own health.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    buffer::Buffer,
    config::Role,
    metrics,
    spool::Spool,
    store::Store,
    stream::{BacklogGate, Streams},
    writer::breaker::{Breaker, CircuitState},
};

pub const INGEST_SERVICE: &str = "sluice.v1.IngestService";
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What health watches.
pub struct Watched {
    pub buffer: Arc<Buffer>,
    pub store: Arc<Store>,
    pub breaker: Arc<Breaker>,
    pub spool: Option<Spool>,
    /// Redis mode.
    pub streams: Option<WatchedStreams>,
}

/// What health watches in Redis mode.
pub struct WatchedStreams {
    pub streams: Streams,
    pub role: Role,
    /// The circuit of the writer side (streams into PostgreSQL).
    pub consumers_breaker: Arc<Breaker>,
    /// Set from the backlog read here; ingest refuses while it is over.
    pub backlog: Arc<BacklogGate>,
}

/// The Redis side of health: (ingest may serve, this node is healthy as a writer).
async fn streams_health(watched: &WatchedStreams) -> (bool, bool) {
    let redis_up = matches!(
        tokio::time::timeout(PING_TIMEOUT, watched.streams.ping()).await,
        Ok(true)
    );
    let backlog_over = match watched.streams.backlog().await {
        Ok(backlog) => {
            metrics::stream_backlog(backlog.events, backlog.bytes);
            watched.streams.is_over(backlog)
        }
        Err(_) => false,
    };
    watched.backlog.set(backlog_over);
    let writer_ok = watched.consumers_breaker.state() == CircuitState::Closed;
    (redis_up && !backlog_over, redis_up && writer_ok)
}

/// Watches the buffer, the database, the writers and the spool until `stopping` turns true,
/// then reports NOT_SERVING for good.
pub async fn watch(
    reporter: HealthReporter,
    watched: Watched,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last: Option<(bool, bool)> = None;
    loop {
        if *stopping.borrow() {
            set(&reporter, ServingStatus::NotServing).await;
            return;
        }
        let usage = watched.buffer.usage();
        let database_up = watched.store.is_reachable(PING_TIMEOUT).await;
        let full = usage.is_full();
        let circuit = watched.breaker.state();
        let quarantined = match &watched.spool {
            Some(spool) => spool.quarantined().await,
            None => 0,
        };
        let local = !full
            && circuit == CircuitState::Closed
            && quarantined == 0
            && !watched.buffer.is_closed();
        let (serving, overall) = match &watched.streams {
            None => {
                let serving = database_up && local;
                (serving, serving)
            }
            Some(streams) => {
                let (ingest_ok, writer_ok) = streams_health(streams).await;
                let writer_ok = writer_ok && database_up;
                match streams.role {
                    Role::Ingest => (ingest_ok && local, ingest_ok && local),
                    Role::Writer => (false, writer_ok),
                    Role::All => {
                        let serving = ingest_ok && local && writer_ok;
                        (serving, serving)
                    }
                }
            }
        };
        metrics::buffer(usage.events, usage.bytes, usage.max_events, usage.max_bytes);
        metrics::serving(database_up, serving);
        metrics::circuit(circuit.as_str());
        if last != Some((serving, overall)) {
            if overall {
                tracing::info!(ingest = serving, "SERVING");
            } else {
                tracing::warn!(
                    database_up,
                    buffer_full = full,
                    circuit = circuit.as_str(),
                    quarantined_spool_segments = quarantined,
                    "NOT_SERVING"
                );
            }
            reporter
                .set_service_status(INGEST_SERVICE, status(serving))
                .await;
            reporter.set_service_status("", status(overall)).await;
            last = Some((serving, overall));
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stopping.changed() => {}
        }
    }
}

fn status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Sets the ingest and overall statuses.
pub async fn set(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status(INGEST_SERVICE, status).await;
    reporter.set_service_status("", status).await;
}
