//! Builds and runs the server: storage, buffer, writers, health, reflection, TLS, and the
//! graceful shutdown sequence.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic::{codec::CompressionEncoding, transport::Server};

use crate::{
    buffer::Buffer,
    config::Config,
    error, health,
    ingest::IngestHandler,
    metrics,
    proto::{
        self, ingest_service_server::IngestServiceServer, query_service_server::QueryServiceServer,
    },
    query::QueryHandler,
    store::{Store, StoreError},
    tls::{self, TlsError},
    writer::{
        self, WriterContext,
        breaker::Breaker,
        replay,
        spool::{Spool, SpoolError},
    },
};

/// Message size limit and compression (gzip and zstd, both ways) for a generated service. A
/// macro because the generated servers share these methods but no trait.
macro_rules! with_codec_limits {
    ($service:expr, $config:expr) => {
        $service
            .max_decoding_message_size($config.grpc.max_message_bytes)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd)
    };
}

/// How often partitions ahead are checked (sooner after a failure).
const PARTITION_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
const PARTITION_RETRY_INTERVAL: Duration = Duration::from_secs(60);

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
}

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let config = Arc::new(config);
    if let Some(address) = config.metrics.listen {
        let handle = metrics::install()?;
        let bound = metrics::serve(handle, address).await?;
        tracing::info!(address = %bound, "metrics endpoint listening on /metrics");
    }
    let tls_config = prepare_tls(&config)?;

    let spool = open_spool(&config)?;
    let store = Arc::new(Store::open(&config).await?);
    let (buffer, receiver) = Buffer::new(&config.buffer);
    let writer_context = WriterContext {
        config: config.writer.clone(),
        pool: store.pool.clone(),
        buffer: buffer.clone(),
        receiver,
        breaker: Arc::new(Breaker::new(&config.breaker)),
        spool: spool.clone(),
    };
    let mut writers = writer::spawn(&writer_context);

    let (stopping_sender, stopping) = watch::channel(false);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::set(&health_reporter, tonic_health::ServingStatus::NotServing).await;
    let health_task = tokio::spawn(health::watch(
        health_reporter,
        buffer.clone(),
        store.clone(),
        writer_context.breaker.clone(),
        stopping.clone(),
    ));
    let replay_task = tokio::spawn(replay::run(
        store.pool.clone(),
        config.writer.write_timeout,
        writer_context.breaker.clone(),
        spool.clone(),
        stopping.clone(),
    ));
    let partition_task = tokio::spawn(maintain_partitions(
        store.clone(),
        config.validation.retention,
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let ingest = with_codec_limits!(
        IngestServiceServer::new(IngestHandler::new(
            buffer.clone(),
            config.clone(),
            stopping.clone()
        )),
        config
    );

    let query = with_codec_limits!(
        QueryServiceServer::new(QueryHandler::new(
            store.clone(),
            buffer.clone(),
            writer_context.breaker.clone(),
            writer_context.spool.clone(),
            config.clone(),
        )),
        config
    );

    let mut builder = Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            error::oversized_unary_to_invalid_argument,
        ))
        .http2_keepalive_interval(Some(config.grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(config.grpc.keepalive_timeout))
        .max_concurrent_streams(config.grpc.max_concurrent_streams);
    if let Some(tls_config) = tls_config {
        builder = builder.tls_config(tls_config)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            address: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ServerError::Bind {
        address: config.listen,
        source,
    })?;
    tracing::info!(address = %bound, tls = !config.tls.insecure_plaintext, "sluice listening");

    let shutdown_timeout = config.shutdown_timeout;
    let stop_signal = {
        let buffer = buffer.clone();
        async move {
            wait_for_signal().await;
            tracing::info!(timeout = ?shutdown_timeout, "shutting down: refusing new events, draining the buffer");
            stopping_sender.send_replace(true);
            buffer.close();
        }
    };
    let serve = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ingest)
        .add_service(query)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            stop_signal,
        );
    let mut serve = Box::pin(serve);
    // Serve until the signal; then give in-flight calls and the writers the shutdown timeout.
    let mut stopping_watch = stopping.clone();
    // Cleanup below runs whatever the outcome; the outcome is returned last.
    let outcome: Result<(), ServerError> = tokio::select! {
        result = &mut serve => result.map_err(ServerError::from),
        _ = async { stopping_watch.wait_for(|stopping| *stopping).await.map(|_| ()) } => {
            let drain = async {
                let served = (&mut serve).await;
                while writers.join_next().await.is_some() {}
                served
            };
            match tokio::time::timeout(shutdown_timeout, drain).await {
                Ok(served) => served.map_err(ServerError::from),
                Err(_) => {
                    let left = buffer.usage().events;
                    tracing::error!(unacknowledged_events = left, "shutdown timeout reached; events not yet acknowledged were not stored and clients were not told they were");
                    Ok(())
                }
            }
        }
    };
    // The services hold the store; drop them so the store can be closed below.
    drop(serve);
    buffer.close();
    writers.abort_all();
    while writers.join_next().await.is_some() {}
    partition_task.abort();
    health_task.abort();
    let _ = tokio::join!(partition_task, health_task);
    replay_task.abort();
    let _ = replay_task.await;
    drop(writer_context);
    tracing::info!("all acknowledged events are stored; stopping");
    store.close().await;
    outcome
}

/// Creates dev certificates on first run (unless paths are configured) and loads the mTLS
/// config. None when plaintext was explicitly requested.
fn prepare_tls(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
    if config.tls.insecure_plaintext {
        tracing::warn!(
            "!!! TLS IS DISABLED (--insecure-plaintext): traffic and events travel in clear text and clients are not authenticated. Use only for local development. !!!"
        );
        return Ok(None);
    }
    if config.uses_dev_certs() && tls::ensure_dev_certs(&config.tls.cert_dir, "client")? {
        tracing::warn!(
            dir = %config.tls.cert_dir.display(),
            "created development certificates (ca.pem, server.pem/key, client.pem/key); use real certificates in production"
        );
    }
    Ok(Some(tls::server_tls_config(config)?))
}

/// Opens the spool and reports what an earlier run left there.
fn open_spool(config: &Config) -> Result<Option<Arc<Spool>>, SpoolError> {
    if !config.spool.enabled {
        tracing::warn!(
            "spool disabled: a database outage fills the buffer and then refuses clients"
        );
        return Ok(None);
    }
    let dir = config.spool_dir();
    let (spool, recovery) = Spool::open(&dir, config.spool.max_bytes, config.spool.segment_bytes)?;
    metrics::spool_recovered(recovery.truncated_bytes, spool.bytes());
    if recovery.records > 0 || recovery.truncated_bytes > 0 {
        tracing::warn!(
            dir = %dir.display(),
            segments = recovery.segments,
            records = recovery.records,
            truncated_bytes = recovery.truncated_bytes,
            "found a spool from an earlier run; replaying it into PostgreSQL"
        );
    }
    Ok(Some(Arc::new(spool)))
}

async fn maintain_partitions(store: Arc<Store>, retention: Duration) {
    let mut wait = PARTITION_RETRY_INTERVAL;
    loop {
        tokio::time::sleep(wait).await;
        wait = match store.ensure_partitions(retention).await {
            Ok(_) => PARTITION_CHECK_INTERVAL,
            Err(error) => {
                tracing::error!(%error, "cannot create partitions ahead; will retry");
                PARTITION_RETRY_INTERVAL
            }
        };
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("received SIGTERM"),
        _ = interrupt.recv() => tracing::info!("received SIGINT"),
    }
}
