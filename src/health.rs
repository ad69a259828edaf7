//! `grpc.health.v1` statuses, kept current by a watcher task.
//!
//! `sluice.v1.IngestService` (and the overall `""` service) is SERVING while the buffer has room,
//! PostgreSQL answers, the circuit breaker is closed and no spool segment waits in quarantine;
//! NOT_SERVING otherwise and during shutdown.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    buffer::Buffer,
    metrics,
    spool::Spool,
    store::Store,
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
}

/// Watches the buffer, the database, the writers and the spool until `stopping` turns true,
/// then reports NOT_SERVING for good.
pub async fn watch(
    reporter: HealthReporter,
    watched: Watched,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last: Option<bool> = None;
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
        let serving = database_up
            && !full
            && circuit == CircuitState::Closed
            && quarantined == 0
            && !watched.buffer.is_closed();
        metrics::buffer(usage.events, usage.bytes, usage.max_events, usage.max_bytes);
        metrics::serving(database_up, serving);
        metrics::circuit(circuit.as_str());
        if last != Some(serving) {
            if serving {
                tracing::info!("ingest is SERVING");
            } else {
                tracing::warn!(
                    database_up,
                    buffer_full = full,
                    circuit = circuit.as_str(),
                    quarantined_spool_segments = quarantined,
                    "ingest is NOT_SERVING"
                );
            }
            set(
                &reporter,
                if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                },
            )
            .await;
            last = Some(serving);
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stopping.changed() => {}
        }
    }
}

/// Sets the ingest and overall statuses.
pub async fn set(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status(INGEST_SERVICE, status).await;
    reporter.set_service_status("", status).await;
}
