//! `grpc.health.v1` statuses, kept current by a watcher task.
//!
//! `sluice.v1.IngestService` (and the overall `""` service) is SERVING while the buffer has room,
//! PostgreSQL answers and the circuit breaker is closed; NOT_SERVING otherwise and during
//! shutdown.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    buffer::Buffer,
    metrics,
    store::Store,
    writer::breaker::{Breaker, CircuitState},
};

pub const INGEST_SERVICE: &str = "sluice.v1.IngestService";
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Watches the buffer, the database and the writers until `stopping` turns true, then reports
/// NOT_SERVING for good.
pub async fn watch(
    reporter: HealthReporter,
    buffer: Arc<Buffer>,
    store: Arc<Store>,
    breaker: Arc<Breaker>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last: Option<bool> = None;
    loop {
        if *stopping.borrow() {
            set(&reporter, ServingStatus::NotServing).await;
            return;
        }
        let usage = buffer.usage();
        let database_up = store.is_reachable(PING_TIMEOUT).await;
        let full = usage.is_full();
        let failing = breaker.state() != CircuitState::Closed;
        let serving = database_up && !full && !failing && !buffer.is_closed();
        metrics::health(usage, database_up, serving);
        metrics::circuit(breaker.state().as_str());
        if last != Some(serving) {
            if serving {
                tracing::info!("ingest is SERVING");
            } else {
                tracing::warn!(
                    database_up,
                    buffer_full = full,
                    circuit = breaker.state().as_str(),
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
