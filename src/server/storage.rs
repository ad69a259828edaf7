//! Phase 1: where events are kept. The spool opens first, so that a spool left by an earlier
//! run is found even when the database is down; then the archive, PostgreSQL (a URL, or the
//! private cluster), the broker in Redis mode, and the privacy keys checked against the stored
//! data before anything is written.

use std::sync::Arc;

use super::ServerError;
use crate::{
    archive::{Archive, ArchiveError},
    broker::Broker,
    config::Config,
    metrics,
    privacy::{self, SharedPrivacy, optouts::OptOuts},
    spool::{Spool, SpoolError},
    store::{Store, StoreError},
};

pub struct Storage {
    pub store: Arc<Store>,
    /// The Redis streams, in Redis mode.
    pub broker: Option<Broker>,
    pub spool: Option<Spool>,
    pub archive: Arc<Archive>,
    pub privacy: SharedPrivacy,
    pub optouts: Arc<OptOuts>,
}

impl Storage {
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        let spool = open_spool(config).await?;
        let archive = Arc::new(open_archive(config).await?);
        let cluster_settings = crate::backup::cluster_settings(config)?;
        let store = Arc::new(Store::open_with(config, cluster_settings).await?);
        let broker = match config.redis.enabled() {
            true => {
                let broker = Broker::connect(&config.redis).await?;
                tracing::info!(role = ?config.role, shards = broker.shards(), "redis mode: events go through redis streams");
                Some(broker)
            }
            false => None,
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
            broker,
            spool,
            archive,
            privacy,
            optouts,
        })
    }

    /// Closes the pools and stops the private cluster. Last: everything else writes here.
    pub async fn close(self) {
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
