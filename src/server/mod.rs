//! Builds and runs the server in named phases:
//!
//! 1. **open storage**: the spool, then PostgreSQL (a URL, or the private cluster);
//! 2. **start background tasks**: the buffer, the writer pool, health, the spool replayer and
//!    partition upkeep ([`Background`]);
//! 3. **build services**: ingest, query, health and reflection, with their codec limits;
//! 4. **serve until signal**: mTLS (or the loudly logged plaintext opt-in) behind the
//!    hardened accept loop of [`listener`], until SIGTERM or SIGINT, then drain within
//!    `shutdown_timeout`;
//!
//! then [`Background::shutdown`] and [`Storage::close`] tear down in the one order that keeps
//! every acknowledged event durable.

pub mod listener;

use std::{io, sync::Arc, time::Duration};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tonic::{
    codec::CompressionEncoding,
    service::{Routes, RoutesBuilder},
    transport::{Server, server::Connected},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{
    archive::{Archive, ArchiveError},
    audit::Audit,
    auth::{AuthConfigError, Authorizer},
    broker::{BacklogGate, Broker, BrokerError},
    buffer::Buffer,
    config::{Config, ConfigError},
    feed::TailFeed,
    health,
    ingest::{IngestHandler, service::IngestDeps},
    lifecycle::{self, RetentionPolicy},
    metrics::{self, Counters},
    privacy::{
        self, SharedPrivacy,
        fingerprints::PrivacyStartError,
        optouts::{self, OptOuts},
    },
    proto::status,
    proto::{
        self, ingest_service_server::IngestServiceServer, query_service_server::QueryServiceServer,
    },
    query::{QueryHandler, service::QueryDeps},
    spool::{Spool, SpoolError},
    store::{Store, StoreError},
    telemetry,
    tls::{self, TlsError},
    writer::{
        self, Destination, WriterContext,
        breaker::Breaker,
        consume::{self, ConsumeContext},
        replay,
    },
};

/// The span of one RPC: its method, request id and trace id (a child of the caller's span when
/// the request carries `traceparent`); handlers add the principal.
fn rpc_span<B>(request: &tonic::codegen::http::Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "rpc",
        otel.name = %request.uri().path(),
        otel.kind = "server",
        rpc.system = "grpc",
        method = %request.uri().path(),
        rpc = request.uri().path().rsplit('/').next().unwrap_or_default(),
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        principal = tracing::field::Empty,
    );
    telemetry::adopt_caller(&span, request.headers());
    span
}

/// Message size limit and compression (gzip and zstd, both ways) for a generated service. A
/// macro because the generated servers share these methods but no trait.
macro_rules! with_codec_limits {
    ($service:expr, $max_message_bytes:expr) => {
        $service
            .max_decoding_message_size($max_message_bytes)
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
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("redis streams: {0}")]
    Broker(#[from] BrokerError),
    #[error("the accept loop stopped without a shutdown signal")]
    AcceptLoopStopped,
    #[error("invalid configuration: retention.rules: {0}")]
    Retention(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Privacy(#[from] PrivacyStartError),
    #[error("backups: {0}")]
    Backup(#[from] crate::backup::BackupError),
}

/// Loads the configuration again (file, environment, flags) for a reload on SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully. With a `reloader`,
/// SIGHUP reloads the `auth` section (principals, scopes, limits, JWKS) and the `privacy`
/// section and key file (checked against the stored fingerprints) without a restart.
pub async fn run(config: Config, reloader: Option<Reloader>) -> Result<(), ServerError> {
    let config = Arc::new(config);
    // Struct fields stop decoding past the metadata limit instead of building a tree.
    proto::metadata::set_max_json_bytes(config.validation.max_metadata_bytes);
    serve_metrics(&config).await?;
    let tls_config = prepare_tls(&config)?;
    let auth = Arc::new(Authorizer::new(&config.auth)?);
    let storage = Storage::open(&config).await?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::set(&health_reporter, ServingStatus::NotServing).await;
    let retention = Arc::new(
        RetentionPolicy::new(&config.retention)
            .map_err(|error| ServerError::Retention(error.to_string()))?,
    );
    let mut background = Background::start(
        &config,
        &storage,
        health_reporter,
        auth.clone(),
        retention.clone(),
        reloader,
    );
    // Errors from here on still tear down what was started.
    let outcome = match build_services(
        &config,
        &storage,
        &background,
        &auth,
        &retention,
        health_service,
    ) {
        Ok(routes) => serve_until_signal(&config, tls_config, routes, &mut background).await,
        Err(error) => Err(error),
    };
    let redis_mode = storage.streams.is_some();
    background.shutdown().await;
    if redis_mode {
        tracing::info!("all acknowledged events are stored or in the redis streams; stopping");
    } else {
        tracing::info!("all acknowledged events are stored; stopping");
    }
    storage.close().await;
    outcome
}

async fn serve_metrics(config: &Config) -> Result<(), ServerError> {
    if let Some(address) = config.metrics.listen {
        let handle = metrics::install()?;
        let bound = metrics::serve(handle, address).await?;
        tracing::info!(address = %bound, "metrics endpoint listening on /metrics");
    }
    Ok(())
}

/// Creates dev certificates on first run (unless paths are configured) and loads the mTLS
/// config. None when plaintext was explicitly requested.
fn prepare_tls(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    if config.tls.insecure_plaintext {
        tracing::warn!(
            "!!! TLS IS DISABLED (--insecure-plaintext): traffic and events travel in clear text and clients are not authenticated. Use only for local development. !!!"
        );
        return Ok(None);
    }
    if config.tls.uses_dev_certs() && tls::ensure_dev_certs(&config.tls.cert_dir, "client")? {
        tracing::warn!(
            dir = %config.tls.cert_dir.display(),
            "created development certificates (ca.pem, server.pem/key, client.pem/key); use real certificates in production"
        );
    }
    Ok(Some(tls::server_tls_config(config)?))
}

/// Phase 1: where events are kept. The spool opens first, so that a spool left by an earlier
/// run is found even when the database is down.
struct Storage {
    store: Arc<Store>,
    /// The Redis streams, in Redis mode.
    streams: Option<Broker>,
    spool: Option<Spool>,
    archive: Arc<Archive>,
    privacy: SharedPrivacy,
    optouts: Arc<OptOuts>,
}

impl Storage {
    async fn open(config: &Config) -> Result<Self, ServerError> {
        let spool = open_spool(config).await?;
        let archive = Arc::new(open_archive(config).await?);
        let cluster_settings = crate::backup::cluster_settings(config)?;
        let store = Arc::new(Store::open_with(config, cluster_settings).await?);
        let streams = match &config.redis.url {
            Some(_) => {
                let streams = Broker::connect(&config.redis).await?;
                tracing::info!(role = ?config.role, shards = streams.shards(), "redis mode: events go through redis streams");
                Some(streams)
            }
            None => None,
        };
        // Before anything is written: keys that differ from the stored data's refuse start.
        let privacy = Arc::new(arc_swap::ArcSwap::from_pointee(
            privacy::fingerprints::open(config, &store.pool).await?,
        ));
        let optouts = Arc::new(OptOuts::default());
        optouts
            .refresh(&store.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(Self {
            store,
            streams,
            spool,
            archive,
            privacy,
            optouts,
        })
    }

    /// Closes the pools and stops the private cluster. Last: everything else writes here.
    async fn close(self) {
        self.store.close().await;
    }
}

/// Opens the spool and reports what an earlier run left there.
async fn open_spool(config: &Config) -> Result<Option<Spool>, SpoolError> {
    if !config.spool.enabled {
        tracing::warn!(
            "spool disabled: a database outage fills the buffer and then refuses clients"
        );
        return Ok(None);
    }
    let dir = config.spool_dir();
    let (spool, recovery) =
        Spool::open(&dir, config.spool.max_bytes, config.spool.segment_bytes).await?;
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
    if recovery.quarantined > 0 {
        tracing::error!(
            dir = %dir.join("quarantine").display(),
            segments = recovery.quarantined,
            "spool segments that cannot be read were moved to quarantine; health stays NOT_SERVING until an operator removes them"
        );
    }
    Ok(Some(spool))
}

/// Opens the archive (proving it writable when archiving is on) and says, once, which
/// services expire before they reach archive age.
pub async fn open_archive(config: &Config) -> Result<Archive, ArchiveError> {
    let archive = Archive::open(&config.archive, &config.data_dir).await?;
    match archive.after {
        Some(after) => {
            tracing::info!(after = %humantime::format_duration(after), "archiving events older than archive.after");
            for rule in &config.retention.rules {
                if rule.keep <= after {
                    tracing::info!(
                        services = ?rule.services,
                        keep = %humantime::format_duration(rule.keep),
                        "these services expire before archive.after: their events are never archived"
                    );
                }
            }
        }
        None => tracing::info!("archiving is off (archive.after = off)"),
    }
    Ok(archive)
}

/// Turns shutdown on: handlers stop reading and settle, the buffer refuses new events, and
/// the writers drain what it holds, then stop.
#[derive(Clone)]
struct ShutdownSwitch {
    stopping: watch::Sender<bool>,
    buffer: Arc<Buffer>,
}

impl ShutdownSwitch {
    fn trip(&self) {
        self.stopping.send_replace(true);
        self.buffer.close();
    }
}

/// Phase 2: the tasks that run beside the RPCs, and the handles the services share with them.
struct Background {
    buffer: Arc<Buffer>,
    breaker: Arc<Breaker>,
    counters: Arc<Counters>,
    audit: Arc<Audit>,
    switch: ShutdownSwitch,
    writers: JoinSet<()>,
    /// Redis mode, writer side: the stream consumers.
    consumers: JoinSet<()>,
    /// Redis mode: whether the streams' backlog refuses ingest.
    backlog: Arc<BacklogGate>,
    health: JoinHandle<()>,
    partitions: JoinHandle<()>,
    /// Keeps the pools on the database host that takes writes (multi-host `database.url`).
    hosts: JoinHandle<()>,
    /// Base backups of the private cluster on schedule (`backup.url`).
    backup: JoinHandle<()>,
    /// Builds or drops the optional search indexes once at start-up (`search.*`).
    search_indexes: JoinHandle<()>,
    replay: JoinHandle<()>,
    audit_upkeep: JoinHandle<()>,
    optout_refresh: JoinHandle<()>,
    tail: Arc<TailFeed>,
    reload: JoinHandle<()>,
    lifecycle: Option<JoinHandle<()>>,
}

impl Background {
    fn start(
        config: &Config,
        storage: &Storage,
        health_reporter: HealthReporter,
        auth: Arc<Authorizer>,
        retention: Arc<RetentionPolicy>,
        reloader: Option<Reloader>,
    ) -> Self {
        let audit = Arc::new(Audit::new(storage.store.pool.clone()));
        let audit_upkeep = tokio::spawn(keep_audit_log(audit.clone(), config.auth.audit_retention));
        let optout_refresh = tokio::spawn(optouts::keep_fresh(
            storage.optouts.clone(),
            storage.privacy.clone(),
            Arc::new(config.clone()),
            storage.store.pool.clone(),
            config.privacy.optout_refresh,
        ));
        let reload = tokio::spawn(reload_on_sighup(
            Reloadable {
                auth,
                privacy: storage.privacy.clone(),
                pool: storage.store.pool.clone(),
            },
            audit.clone(),
            reloader,
        ));
        let lifecycle = config.lifecycle.enabled.then(|| {
            tokio::spawn(run_lifecycle(
                storage.store.maintenance_pool.clone(),
                retention.clone(),
                storage.archive.clone(),
                config.lifecycle.interval,
            ))
        });
        let (buffer, receiver) = Buffer::new(&config.buffer);
        let breaker = Arc::new(Breaker::new(&config.breaker));
        let counters = Arc::new(Counters::default());
        let (stopping, _) = watch::channel(false);
        let tail = Arc::new(TailFeed::default());
        let destination = match &storage.streams {
            Some(streams) => Destination::Broker(streams.clone()),
            None => Destination::Postgres(storage.store.pool.clone()),
        };
        let writers = writer::spawn(&WriterContext {
            config: config.writer.clone(),
            destination: destination.clone(),
            buffer: buffer.clone(),
            receiver,
            breaker: breaker.clone(),
            spool: storage.spool.clone(),
            counters: counters.clone(),
            tail: tail.clone(),
        });
        // Writer nodes of Redis mode: the streams into PostgreSQL, behind their own circuit.
        let backlog = Arc::new(BacklogGate::default());
        let consumers_breaker = Arc::new(Breaker::new(&config.breaker));
        let consumers = match &storage.streams {
            Some(streams) if config.role.writes() => consume::spawn(&ConsumeContext {
                streams: streams.clone(),
                pool: storage.store.pool.clone(),
                writer: config.writer.clone(),
                redis: config.redis.clone(),
                breaker: consumers_breaker.clone(),
                counters: counters.clone(),
                tail: tail.clone(),
                node: format!(
                    "{}-{}",
                    std::process::id(),
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ),
                stopping: stopping.subscribe(),
            }),
            _ => JoinSet::new(),
        };
        let health = tokio::spawn(health::watch(
            health_reporter,
            health::Watched {
                buffer: buffer.clone(),
                store: storage.store.clone(),
                breaker: breaker.clone(),
                spool: storage.spool.clone(),
                resources: health::resources::Resources::new(config),
                streams: storage
                    .streams
                    .clone()
                    .map(|streams| health::WatchedStreams {
                        streams,
                        role: config.role,
                        consumers_breaker: consumers_breaker.clone(),
                        backlog: backlog.clone(),
                    }),
            },
            stopping.subscribe(),
        ));
        let replay = tokio::spawn(replay::run(
            destination,
            config.writer.write_timeout,
            breaker.clone(),
            storage.spool.clone(),
            stopping.subscribe(),
        ));
        let partitions = tokio::spawn(maintain_partitions(
            storage.store.clone(),
            config.retention.longest(),
        ));
        let hosts = {
            let store = storage.store.clone();
            let stopping = stopping.subscribe();
            tokio::spawn(async move { store.watch_hosts(stopping).await })
        };
        let search_indexes = tokio::spawn(keep_search_indexes(
            storage.store.clone(),
            config.search.clone(),
        ));
        let backup = tokio::spawn(crate::backup::schedule::run(
            config.backup.clone(),
            storage.store.clone(),
            config.data_dir.join("backup-scratch"),
        ));
        Self {
            switch: ShutdownSwitch {
                stopping,
                buffer: buffer.clone(),
            },
            buffer,
            breaker,
            counters,
            audit,
            writers,
            consumers,
            backlog,
            health,
            partitions,
            hosts,
            search_indexes,
            backup,
            replay,
            audit_upkeep,
            optout_refresh,
            tail,
            reload,
            lifecycle,
        }
    }

    fn stopping(&self) -> watch::Receiver<bool> {
        self.switch.stopping.subscribe()
    }

    /// Resolves once every writer stopped: the buffer is closed and drained.
    async fn writers_drained(&mut self) {
        while self.writers.join_next().await.is_some() {}
    }

    /// The teardown order, in one place:
    /// 1. the buffer refuses new events (already so after a signal);
    /// 2. writers still running (the shutdown timeout passed) are stopped: what they held was
    ///    never acknowledged, and clients were told so;
    /// 3. health, partition upkeep, host watching, backups, search indexes, reload and audit
    ///    upkeep stop (nothing depends on them),
    ///    and the authentication failures counted in the last minute are written;
    /// 4. the replayer stops last: a segment it was replaying stays on disk and replays at the
    ///    next start (replay is idempotent).
    ///
    /// The storage closes after this, in [`Storage::close`].
    async fn shutdown(mut self) {
        self.switch.trip();
        self.writers.abort_all();
        self.writers_drained().await;
        // Consumers finish their current batch (or leave it pending for another writer).
        while self.consumers.join_next().await.is_some() {}
        self.health.abort();
        self.partitions.abort();
        self.hosts.abort();
        self.backup.abort();
        self.search_indexes.abort();
        self.reload.abort();
        self.audit_upkeep.abort();
        self.optout_refresh.abort();
        if let Some(lifecycle) = self.lifecycle.take() {
            lifecycle.abort();
            let _ = lifecycle.await;
        }
        let _ = tokio::join!(
            self.health,
            self.partitions,
            self.hosts,
            self.backup,
            self.search_indexes,
            self.reload,
            self.audit_upkeep,
            self.optout_refresh
        );
        // Authentication failures counted since the last minute.
        self.audit.flush().await;
        self.replay.abort();
        let _ = self.replay.await;
    }
}

/// Phase 3: every gRPC service, with its codec limits.
fn build_services(
    config: &Arc<Config>,
    storage: &Storage,
    background: &Background,
    auth: &Arc<Authorizer>,
    retention: &Arc<RetentionPolicy>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Routes, ServerError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let ingest = IngestHandler::new(IngestDeps {
        buffer: background.buffer.clone(),
        config: config.clone(),
        counters: background.counters.clone(),
        auth: auth.clone(),
        audit: background.audit.clone(),
        retention: retention.clone(),
        privacy: storage.privacy.clone(),
        optouts: storage.optouts.clone(),
        stopping: background.stopping(),
        backlog: storage.streams.as_ref().map(|_| background.backlog.clone()),
    });
    let query = QueryHandler::new(QueryDeps {
        store: storage.store.clone(),
        buffer: background.buffer.clone(),
        breaker: background.breaker.clone(),
        spool: storage.spool.clone(),
        config: config.clone(),
        counters: background.counters.clone(),
        auth: auth.clone(),
        audit: background.audit.clone(),
        archive: storage.archive.clone(),
        privacy: storage.privacy.clone(),
        optouts: storage.optouts.clone(),
        tail: background.tail.clone(),
        stopping: background.stopping(),
        streams: storage.streams.clone(),
    });
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(with_codec_limits!(
            IngestServiceServer::new(ingest),
            config.grpc.max_message_bytes
        ))
        .add_service(with_codec_limits!(
            QueryServiceServer::new(query),
            config.grpc.max_query_message_bytes
        ));
    Ok(routes.routes())
}

/// Phase 4: serves until SIGTERM or SIGINT, then gives in-flight calls and the writers
/// `shutdown_timeout` to finish.
async fn serve_until_signal(
    config: &Config,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    routes: Routes,
    background: &mut Background,
) -> Result<(), ServerError> {
    let bind_error = |source| ServerError::Bind {
        address: config.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    // Handlers first: a signal right after "listening" must start a shutdown, not kill.
    let signals = StopSignals::install();
    let limits = listener::Limits {
        max_connections: match config.grpc.max_connections {
            0 => listener::default_max_connections(),
            configured => {
                listener::raise_open_file_limit();
                configured
            }
        },
        max_handshakes: config.grpc.max_handshakes,
        handshake_timeout: config.grpc.handshake_timeout,
    };
    tracing::info!(
        address = %bound,
        tls = tls_config.is_some(),
        max_connections = limits.max_connections,
        handshake_timeout = ?limits.handshake_timeout,
        "sluice listening"
    );
    match tls_config {
        Some(tls_config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
            let incoming = listener::incoming(listener, limits, listener::tls(acceptor));
            serve(config, routes, incoming, signals, background).await
        }
        None => {
            let incoming = listener::incoming(listener, limits, listener::plaintext());
            serve(config, routes, incoming, signals, background).await
        }
    }
}

/// Serves `incoming` until the signal, then drains.
async fn serve<IO>(
    config: &Config,
    routes: Routes,
    incoming: impl Stream<Item = io::Result<IO>>,
    signals: StopSignals,
    background: &mut Background,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let shutdown_timeout = config.shutdown_timeout;
    let switch = background.switch.clone();
    let stop_signal = async move {
        signals.wait().await;
        tracing::info!(timeout = ?shutdown_timeout, "shutting down: refusing new events, draining the buffer");
        switch.trip();
    };
    let serve = Server::builder()
        // A request id on every call: the client's `x-request-id`, or a new UUID. It is echoed
        // in the response headers and is a field of every log line of the call.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_grpc().make_span_with(rpc_span))
        .layer(tower::util::MapResponseLayer::new(
            status::oversized_unary_to_invalid_argument,
        ))
        .http2_keepalive_interval(Some(config.grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(config.grpc.keepalive_timeout))
        .max_concurrent_streams(config.grpc.max_concurrent_streams)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stop_signal);
    tokio::pin!(serve);
    let mut stopping = background.stopping();
    // Serving ends on its own after the signal when no connection is open: the signal sets
    // `stopping` inside the same poll. Serving that ends while not stopping means the accept
    // loop stopped.
    let ended = tokio::select! {
        biased;
        _ = stopping.wait_for(|stopping| *stopping) => None,
        result = &mut serve => Some(result),
    };
    if !*stopping.borrow()
        && let Some(result) = ended
    {
        return match result {
            Ok(()) => Err(ServerError::AcceptLoopStopped),
            Err(error) => Err(error.into()),
        };
    }
    let drain = async {
        let served = match ended {
            Some(result) => result,
            None => (&mut serve).await,
        };
        background.writers_drained().await;
        served
    };
    match tokio::time::timeout(shutdown_timeout, drain).await {
        Ok(served) => served.map_err(ServerError::from),
        Err(_) => {
            let left = background.buffer.usage().events;
            tracing::error!(
                unacknowledged_events = left,
                "shutdown timeout reached; events not yet acknowledged were not stored and clients were not told they were"
            );
            Ok(())
        }
    }
}

/// Writes the counted authentication failures once a minute, and applies the audit log's
/// retention once an hour.
async fn keep_audit_log(audit: Arc<Audit>, retention: Duration) {
    const EXPIRE_EVERY: u32 = 60;
    let mut ticks = 0u32;
    loop {
        if ticks.is_multiple_of(EXPIRE_EVERY) {
            match audit.expire(retention).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "audit rows past their retention removed"),
                Err(error) => tracing::error!(%error, "cannot apply the audit log retention"),
            }
        }
        tokio::time::sleep(crate::audit::FLUSH_INTERVAL).await;
        audit.flush().await;
        ticks = ticks.wrapping_add(1);
    }
}

/// Reloads the auth policy on SIGHUP, and audits each reload.
/// What a SIGHUP reloads.
struct Reloadable {
    auth: Arc<Authorizer>,
    privacy: SharedPrivacy,
    pool: sqlx::PgPool,
}

impl Reloadable {
    /// Applies the reloaded configuration, all of it or (on any error) none of it: the privacy
    /// keys are checked against the stored fingerprints first.
    async fn reload(&self, reloader: &Reloader) -> Result<(), String> {
        let config = reloader().map_err(|error| error.to_string())?;
        let privacy = privacy::fingerprints::open(&config, &self.pool)
            .await
            .map_err(|error| error.to_string())?;
        self.auth
            .reload(&config.auth)
            .map_err(|error| error.to_string())?;
        self.privacy.store(Arc::new(privacy));
        Ok(())
    }
}

async fn reload_on_sighup(reloadable: Reloadable, audit: Arc<Audit>, reloader: Option<Reloader>) {
    let Some(reloader) = reloader else {
        return;
    };
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reloads need a restart");
        return;
    };
    while hangups.recv().await.is_some() {
        let outcome = reloadable.reload(&reloader).await;
        let (code, details) = match &outcome {
            Ok(()) => (tonic::Code::Ok, serde_json::json!({})),
            Err(error) => {
                tracing::error!(%error, "reload refused; the previous policy stays in force");
                (
                    tonic::Code::InvalidArgument,
                    serde_json::json!({ "error": error }),
                )
            }
        };
        audit
            .record(crate::audit::Entry {
                principal: "(operator)".to_owned(),
                rpc: "Reload",
                code,
                details,
            })
            .await;
    }
}

/// Runs the lifecycle job every `interval` (the first run one interval after start). A failed
/// run is retried after 1 minute, then 2, 4, … up to `interval`.
async fn run_lifecycle(
    pool: sqlx::PgPool,
    retention: Arc<RetentionPolicy>,
    archive: Arc<Archive>,
    interval: Duration,
) {
    const FIRST_RETRY: Duration = Duration::from_secs(60);
    let mut wait = interval;
    let mut retry = FIRST_RETRY;
    loop {
        tokio::time::sleep(wait).await;
        wait = match lifecycle::run_once(&pool, &retention, &archive).await {
            Ok(_) => {
                retry = FIRST_RETRY;
                interval
            }
            Err(error) => {
                let wait = retry.min(interval);
                tracing::error!(%error, retry_in = ?wait, "lifecycle run failed; hot rows stay in place");
                retry = retry.saturating_mul(2);
                wait
            }
        };
    }
}

/// Builds the search indexes the configuration asks for and drops the others, in the
/// background: ingest and queries go on meanwhile (queries without the index until it is done).
async fn keep_search_indexes(store: Arc<Store>, search: crate::config::SearchConfig) {
    match crate::store::search_indexes::reconcile(&store.maintenance_pool, &search).await {
        Ok(Some(done)) if !done.created.is_empty() || !done.dropped.is_empty() => {
            tracing::info!(created = ?done.created, dropped = ?done.dropped, "search indexes match the configuration");
        }
        Ok(Some(_)) => {}
        Ok(None) => tracing::info!("another node is changing the search indexes"),
        Err(error) => tracing::error!(
            %error,
            "cannot build or drop the search indexes; queries work without them, and the next start resumes"
        ),
    }
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

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct StopSignals(Option<(Signal, Signal)>);

impl StopSignals {
    fn install() -> Self {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(terminate), Ok(interrupt)) => Self(Some((terminate, interrupt))),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                Self(None)
            }
        }
    }

    async fn wait(self) {
        let Some((mut terminate, mut interrupt)) = self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = terminate.recv() => tracing::info!("received SIGTERM"),
            _ = interrupt.recv() => tracing::info!("received SIGINT"),
        }
    }
}
