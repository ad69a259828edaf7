//! Builds and runs the server in named phases, one file each:
//!
//! 1. [`storage`]: the spool, the archive, PostgreSQL (a URL, or the private cluster), the
//!    broker in Redis mode, and the privacy keys;
//! 2. [`background`]: the buffer, the writer pool, consumers, upkeep and the spool replayer,
//!    as groups of tasks with one cancellation token each ([`tasks`]);
//! 3. [`services`]: ingest, OTLP logs, query, health and reflection, behind the RPC envelope;
//! 4. [`serve`]: mTLS behind the hardened accept loop of [`listener`], each connection served
//!    by hyper ([`connections`]), until SIGTERM or SIGINT ([`signals`]), then drain within
//!    `shutdown_timeout`; SIGHUP reloads ([`reload`]);
//!
//! then [`background::Background::shutdown`] and [`storage::Storage::close`] tear down in the
//! one order that keeps every acknowledged event durable.

mod background;
mod connections;
pub mod listener;
mod reload;
mod serve;
mod services;
mod signals;
mod storage;
mod tasks;

use std::sync::Arc;

use tonic_health::ServingStatus;

pub use reload::{OPERATOR, Reloader};
pub use serve::{GRPC_LISTENER, METRICS_LISTENER, OTLP_HTTP_LISTENER};
pub use storage::open_archive;

use crate::{
    archive::ArchiveError,
    auth::{AuthConfigError, Authorizer},
    broker::BrokerError,
    config::Config,
    health,
    lifecycle::RetentionPolicy,
    metrics,
    privacy::fingerprints::PrivacyStartError,
    proto,
    spool::SpoolError,
    store::StoreError,
    tls::TlsError,
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("redis streams: {0}")]
    Broker(#[from] BrokerError),
    #[error("the accept loop stopped without a shutdown signal")]
    AcceptLoopStopped,
    #[error("invalid configuration: retention.rules: {0}")]
    Retention(#[from] crate::glob::GlobError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Privacy(#[from] PrivacyStartError),
    #[error("backups: {0}")]
    Backup(#[from] crate::backup::BackupError),
    #[error(
        "the erasures a restore left could not be applied again (they are retried at the next start): {0}"
    )]
    Reapply(#[from] crate::erasure::ErasureError),
}

/// Every series with a known label set, at 0 before it first counts.
fn register_series(config: &Config, auth: &Authorizer) {
    let rpcs = crate::rpc::Rpc::ALL.map(crate::rpc::Rpc::name);
    let breaker_causes = crate::writer::breaker::OpenCause::ALL.map(|cause| cause.as_str());
    metrics::zero::register(&metrics::zero::Known {
        rejection_reasons: &crate::event::RejectReason::LABELS,
        auth_refusals: &crate::auth::AuthError::REASONS,
        rpcs: &rpcs,
        limited_principals: &auth.limited_principals(),
        breaker_causes: &breaker_causes,
        redis: config.redis.enabled(),
        backups: config.backup.url.is_some() && config.database.url.is_none(),
        kms: config.privacy.uses_kms(),
        log_export: crate::telemetry::logs::endpoint(&config.telemetry).is_some()
            && config.telemetry.log_level.trim() != "off",
    });
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully. With a `reloader`,
/// SIGHUP reloads the `auth` section (principals, scopes, limits, JWKS) and the `privacy`
/// section and key file (checked against the stored fingerprints) without a restart.
pub async fn run(config: Config, reloader: Option<Reloader>) -> Result<(), ServerError> {
    let config = Arc::new(config);
    // Struct fields stop decoding past the metadata limit instead of building a tree.
    proto::metadata::set_max_json_bytes(config.validation.max_metadata_bytes);
    serve::serve_metrics(&config).await?;
    let tls_config = serve::prepare_tls(&config)?;
    let auth = Arc::new(Authorizer::new(&config.auth)?);
    register_series(&config, &auth);
    let storage = storage::Storage::open(&config).await?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::set(&health_reporter, ServingStatus::NotServing).await;
    let retention = Arc::new(RetentionPolicy::new(&config.retention)?);
    let background = background::Background::start(
        &config,
        &storage,
        health_reporter,
        auth.clone(),
        retention.clone(),
        reloader,
    );
    // Errors from here on still tear down what was started.
    let outcome = match services::build(
        &config,
        &storage,
        &background,
        &auth,
        &retention,
        health_service,
    )
    .await
    {
        Ok(served) => serve::until_signal(&config, tls_config, served, &background).await,
        Err(error) => Err(error),
    };
    let redis_mode = storage.broker.is_some();
    background.shutdown().await;
    if redis_mode {
        tracing::info!("all acknowledged events are stored or in the redis streams; stopping");
    } else {
        tracing::info!("all acknowledged events are stored; stopping");
    }
    storage.close().await;
    outcome
}
