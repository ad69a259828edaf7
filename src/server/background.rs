//! Phase 2: the tasks that run beside the RPCs, in groups with one cancellation token each,
//! and the handles the services share with them. [`Background::shutdown`] holds the teardown
//! order.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use super::{
    reload::{self, Reloadable, Reloader},
    storage::Storage,
    tasks::TaskGroup,
};
use crate::{
    audit::{self, Audit},
    auth::Authorizer,
    broker::BacklogGate,
    buffer::Buffer,
    config::Config,
    feed::TailFeed,
    figures, health,
    lifecycle::{self, RetentionPolicy},
    metrics::Counters,
    privacy::{kms, optouts},
    store::{closed_indexes, search_indexes},
    writer::{
        self, Destination, WriterContext,
        breaker::Breaker,
        consume::{self, ConsumeContext},
        replay,
    },
};

pub struct Background {
    pub buffer: Arc<Buffer>,
    pub breaker: Arc<Breaker>,
    pub counters: Arc<Counters>,
    pub audit: Arc<Audit>,
    pub feed: Arc<TailFeed>,
    /// Redis mode: whether the streams' backlog refuses ingest.
    pub backlog: Arc<BacklogGate>,
    /// Cancelled by the stop signal: handlers stop reading and settle, health turns
    /// NOT_SERVING, consumers finish their batch. The buffer closes with it.
    shutdown: CancellationToken,
    /// The writer pool: ends on its own once the buffer is closed and drained.
    writers: TaskGroup,
    /// Redis mode, writer side: the stream consumers.
    consumers: TaskGroup,
    /// Health, host watching, partitions, backups, search indexes, lifecycle, reload, audit
    /// upkeep and the opt-out refresh: nothing depends on them.
    upkeep: TaskGroup,
    /// The spool replayer.
    replay: TaskGroup,
}

impl Background {
    pub fn start(
        config: &Config,
        storage: &Storage,
        health_reporter: HealthReporter,
        auth: Arc<Authorizer>,
        retention: Arc<RetentionPolicy>,
        reloader: Option<Reloader>,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let (buffer, receiver) = Buffer::new(&config.buffer);
        let background = Self {
            audit: Arc::new(Audit::new(storage.store.audit_pool.clone())),
            breaker: Arc::new(Breaker::new(&config.breaker)),
            counters: Arc::new(Counters::default()),
            feed: Arc::new(TailFeed::default()),
            backlog: Arc::new(BacklogGate::default()),
            buffer,
            writers: TaskGroup::new(),
            consumers: TaskGroup::child_of(&shutdown),
            upkeep: TaskGroup::new(),
            replay: TaskGroup::new(),
            shutdown,
        };
        let destination = match &storage.broker {
            Some(broker) => Destination::Broker(broker.clone()),
            None => Destination::Postgres(storage.store.pool.clone(), storage.privacy.clone()),
        };
        let writers = WriterContext {
            config: config.writer.clone(),
            destination: destination.clone(),
            buffer: background.buffer.clone(),
            receiver,
            breaker: background.breaker.clone(),
            spool: storage.spool.clone(),
            counters: background.counters.clone(),
            tail: background.feed.clone(),
        };
        for writer in writer::writers(&writers) {
            background.writers.spawn_until_cancelled(writer);
        }
        // Writer nodes of Redis mode: the streams into PostgreSQL, behind their own circuit.
        let consumers_breaker = Arc::new(Breaker::new(&config.breaker));
        if let Some(broker) = &storage.broker
            && config.role.writes()
        {
            let context = ConsumeContext {
                streams: broker.clone(),
                pool: storage.store.pool.clone(),
                writer: config.writer.clone(),
                redis: config.redis.clone(),
                breaker: consumers_breaker.clone(),
                counters: background.counters.clone(),
                tail: background.feed.clone(),
                privacy: storage.privacy.clone(),
                node: format!(
                    "{}-{}",
                    std::process::id(),
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ),
                stopping: background.consumers.token(),
            };
            for consumer in consume::consumers(&context) {
                background.consumers.spawn(consumer);
            }
        }
        background.start_upkeep(
            config,
            storage,
            health_reporter,
            consumers_breaker,
            Reloadable {
                auth,
                privacy: storage.privacy.clone(),
                pool: storage.store.pool.clone(),
            },
            reloader,
            retention,
        );
        background.replay.spawn(replay::run(
            destination,
            config.writer.write_timeout,
            background.breaker.clone(),
            storage.spool.clone(),
            background.replay.token(),
        ));
        background
    }

    #[allow(clippy::too_many_arguments)]
    fn start_upkeep(
        &self,
        config: &Config,
        storage: &Storage,
        health_reporter: HealthReporter,
        consumers_breaker: Arc<Breaker>,
        reloadable: Reloadable,
        reloader: Option<Reloader>,
        retention: Arc<RetentionPolicy>,
    ) {
        let upkeep = &self.upkeep;
        // Stopped after the writers: their last acknowledgements are in the last flush.
        upkeep.spawn(figures::store::flush_every(
            storage.store.pool.clone(),
            self.counters.figures().clone(),
            config.metrics.figures_interval,
            upkeep.token(),
        ));
        let kms = config.privacy.uses_kms().then(|| {
            let status = Arc::new(kms::KmsStatus::default());
            upkeep.spawn_until_cancelled(kms::keep_checked(
                config.privacy.kms.clone(),
                storage.privacy.clone(),
                storage.store.pool.clone(),
                status.clone(),
            ));
            status
        });
        upkeep.spawn(health::watch(
            health_reporter,
            health::Watched {
                buffer: self.buffer.clone(),
                store: storage.store.clone(),
                breaker: self.breaker.clone(),
                spool: storage.spool.clone(),
                resources: health::resources::Resources::new(config),
                auth: reloadable.auth.clone(),
                kms,
                streams: storage
                    .broker
                    .clone()
                    .map(|streams| health::WatchedStreams {
                        streams,
                        role: config.role,
                        consumers_breaker,
                        backlog: self.backlog.clone(),
                    }),
            },
            self.shutdown.clone(),
        ));
        let store = storage.store.clone();
        let stopping = self.shutdown.clone();
        upkeep.spawn(async move { store.watch_hosts(stopping).await });
        let store = storage.store.clone();
        let longest = config.retention.longest();
        upkeep.spawn_until_cancelled(async move { store.maintain_partitions(longest).await });
        // The whole-table search indexes first, then the closed partitions' (never both at
        // once: their DDL on `events` and on a partition would wait on each other).
        let (build_pool, read_pool) = (
            storage.store.maintenance_pool.clone(),
            storage.store.read_pool.clone(),
        );
        let (search, closed) = (config.search.clone(), storage.store.closed_indexes.clone());
        upkeep.spawn_until_cancelled(async move {
            search_indexes::keep(build_pool.clone(), search.clone()).await;
            closed_indexes::keep(build_pool, read_pool, search, closed).await;
        });
        upkeep.spawn_until_cancelled(crate::backup::schedule::run(
            config.backup.clone(),
            storage.store.clone(),
            config.data_dir.join("backup-scratch"),
        ));
        upkeep.spawn_until_cancelled(audit::upkeep(
            self.audit.clone(),
            config.auth.audit_retention,
        ));
        upkeep.spawn_until_cancelled(optouts::keep_fresh(
            storage.optouts.clone(),
            storage.privacy.clone(),
            Arc::new(config.clone()),
            storage.store.pool.clone(),
            config.privacy.optout_refresh,
        ));
        upkeep.spawn_until_cancelled(reload::on_sighup(reloadable, self.audit.clone(), reloader));
        if config.lifecycle.enabled {
            upkeep.spawn_until_cancelled(lifecycle::schedule::run(
                storage.store.maintenance_pool.clone(),
                retention,
                storage.archive.clone(),
                config.lifecycle.interval,
            ));
        }
    }

    /// The token the stop signal cancels, for the services' long-lived calls.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Turns shutdown on: handlers stop reading and settle, the buffer refuses new events,
    /// and the writers drain what it holds, then stop.
    pub fn trip(&self) {
        self.shutdown.cancel();
        self.buffer.close();
    }

    pub fn is_stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves once the stop signal tripped shutdown.
    pub async fn stopping(&self) {
        self.shutdown.cancelled().await;
    }

    /// Resolves once every writer stopped: the buffer is closed and drained.
    pub async fn writers_drained(&self) {
        self.writers.finished().await;
    }

    /// The teardown order, in one place:
    /// 1. the buffer refuses new events (already so after a signal);
    /// 2. writers still running (the shutdown timeout passed) are stopped: what they held was
    ///    never acknowledged, and clients were told so;
    /// 3. consumers finish their current batch (or leave it pending for another writer);
    /// 4. the upkeep tasks stop (nothing depends on them), then the refusals counted since the
    ///    last flush are written to the audit log;
    /// 5. the replayer stops last: a segment it was replaying stays on disk and replays at the
    ///    next start (replay is idempotent).
    ///
    /// The storage closes after this, in [`Storage::close`].
    pub async fn shutdown(self) {
        self.trip();
        self.writers.stop().await;
        self.consumers.stop().await;
        self.upkeep.stop().await;
        self.audit.flush().await;
        self.replay.stop().await;
    }
}
