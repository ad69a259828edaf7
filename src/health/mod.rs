//! `grpc.health.v1` statuses, kept current by a watcher task.
//!
//! `sluice.v1.IngestService` (and the overall `""` service) is SERVING while the buffer has room,
//! PostgreSQL answers, the circuit breaker is closed, no spool segment waits in quarantine, the
//! data and spool volumes have their free space ([`resources`]) and memory is under its limit;
//! NOT_SERVING otherwise and during shutdown. Each check is the gauge
//! `sluice_health_check{check}`, and a change of status is logged with the failing checks.
//! The `jwks` check only warns: an unusable JWKS file refuses tokens, not certificates. So
//! does `kms`: keys unwrapped at start stay in use while the KMS cannot be reached.
//!
//! In Redis mode an ingest node needs Redis (its writers' destination) instead of PostgreSQL,
//! and a backlog under its limit; a writer node needs PostgreSQL and Redis, and reports
//! `sluice.v1.IngestService` NOT_SERVING (it takes no events) and `""` by its own health.

pub mod resources;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    auth::Authorizer,
    broker::{BacklogGate, Broker},
    buffer::Buffer,
    config::Role,
    health::resources::Resources,
    metrics,
    privacy::kms::KmsStatus,
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
    pub resources: Resources,
    /// The JWKS file behind bearer tokens.
    pub auth: Arc<Authorizer>,
    /// Keys from a KMS: whether it still unwraps them.
    pub kms: Option<Arc<KmsStatus>>,
    /// Redis mode.
    pub streams: Option<WatchedStreams>,
}

/// What health watches in Redis mode.
pub struct WatchedStreams {
    pub streams: Broker,
    pub role: Role,
    /// The circuit of the writer side (streams into PostgreSQL).
    pub consumers_breaker: Arc<Breaker>,
    /// Set from the backlog read here; ingest refuses while it is over.
    pub backlog: Arc<BacklogGate>,
}

/// The Redis side of health: (ingest may serve, this node is healthy as a writer).
async fn streams_health(watched: &WatchedStreams, failing: &mut Failing) -> (bool, bool) {
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
    check(
        failing,
        "redis",
        redis_up.then_some(()).ok_or("redis does not answer"),
    );
    // Ingest nodes append: a weak master stops their appends (they spool meanwhile).
    let weak = if watched.role.ingests() {
        watched.streams.recheck_durability().await
    } else {
        None
    };
    let durable = weak.is_none();
    check(failing, "redis_durability", weak.map_or(Ok(()), Err));
    check(
        failing,
        "backlog",
        (!backlog_over)
            .then_some(())
            .ok_or("the stream backlog is over its limit"),
    );
    (redis_up && !backlog_over && durable, redis_up && writer_ok)
}

/// The checks that fail, with their reasons.
type Failing = Vec<(&'static str, String)>;

/// Records one check in its gauge and, when it fails, its reason in `failing`.
fn check(failing: &mut Failing, name: &'static str, result: Result<(), impl ToString>) {
    metrics::health_check(name, result.is_ok());
    if let Err(reason) = result {
        failing.push((name, reason.to_string()));
    }
}

/// Watches the buffer, the database, the writers and the spool until `stopping` is
/// cancelled, then reports NOT_SERVING for good.
pub async fn watch(reporter: HealthReporter, watched: Watched, stopping: CancellationToken) {
    let mut last: Option<(bool, bool, Vec<&'static str>)> = None;
    loop {
        if stopping.is_cancelled() {
            set(&reporter, ServingStatus::NotServing).await;
            return;
        }
        let mut failing = Failing::new();
        let usage = watched.buffer.usage();
        let database_up = watched.store.is_reachable(PING_TIMEOUT).await;
        check(
            &mut failing,
            "database",
            database_up
                .then_some(())
                .ok_or("PostgreSQL does not answer"),
        );
        check(
            &mut failing,
            "buffer",
            (!usage.is_full() && !watched.buffer.is_closed())
                .then_some(())
                .ok_or("the buffer is full or closed"),
        );
        let circuit = watched.breaker.state();
        check(
            &mut failing,
            "circuit",
            match circuit {
                CircuitState::Closed => Ok(()),
                other => Err(format!("the circuit breaker is {}", other.as_str())),
            },
        );
        let quarantined = match &watched.spool {
            Some(spool) => spool.quarantined().await,
            None => 0,
        };
        check(
            &mut failing,
            "spool_quarantine",
            match quarantined {
                0 => Ok(()),
                segments => Err(format!("{segments} spool segments wait in quarantine")),
            },
        );
        let resources = watched.resources.clone();
        let (disk, memory) = tokio::task::spawn_blocking(move || {
            (resources.disk_shortage(), resources.memory_excess())
        })
        .await
        .unwrap_or_default();
        check(&mut failing, "disk", disk.map_or(Ok(()), Err));
        check(&mut failing, "memory", memory.map_or(Ok(()), Err));
        // A warning, not a failure: certificates still authenticate while the JWKS file is
        // unusable, and tokens are refused once it has been so past auth.jwt.max_stale.
        if let Some(stale) = watched.auth.jwks_stale() {
            metrics::health_check("jwks", stale.is_zero());
        }
        // A warning too: the keys unwrapped at start stay in memory and in use.
        if let Some(kms) = &watched.kms {
            metrics::health_check("kms", kms.reachable());
        }
        // Everything but the database and Redis: what this node itself must have to serve.
        let local = failing.iter().all(|(name, _)| *name == "database");
        let (serving, overall) = match &watched.streams {
            None => {
                let serving = database_up && local;
                (serving, serving)
            }
            Some(streams) => {
                let (ingest_ok, writer_ok) = streams_health(streams, &mut failing).await;
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
        let names: Vec<&'static str> = failing.iter().map(|(name, _)| *name).collect();
        let now = (serving, overall, names);
        if last.as_ref() != Some(&now) {
            if overall {
                tracing::info!(ingest = serving, "SERVING");
            } else {
                let reasons: Vec<String> = failing
                    .iter()
                    .map(|(name, reason)| format!("{name}: {reason}"))
                    .collect();
                tracing::warn!(reasons = %reasons.join("; "), "NOT_SERVING");
            }
            reporter
                .set_service_status(INGEST_SERVICE, status(serving))
                .await;
            reporter.set_service_status("", status(overall)).await;
            last = Some(now);
        }
        tokio::select! {
            () = tokio::time::sleep(CHECK_INTERVAL) => {}
            () = stopping.cancelled() => {}
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
