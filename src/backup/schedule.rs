//! The server's backup task: a base backup whenever the newest is older than
//! `backup.full_every`, retention after each, and the WAL archiver's health in metrics.

use std::{path::PathBuf, sync::Arc, time::Duration};

use chrono::Utc;
use sqlx::PgPool;

use super::{BackupError, Repository, base};
use crate::{backoff::Backoff, config::BackupConfig, metrics, store::Store};

/// How often the archiver's state is read and the schedule looked at.
const TICK: Duration = Duration::from_secs(60);
/// The first wait after a failed backup; it doubles up to `full_every`.
const FIRST_RETRY: Duration = Duration::from_secs(300);

/// Runs until aborted. Does nothing without `backup.url`, or with an external database (sluice
/// backs up only its private cluster).
pub async fn run(config: BackupConfig, store: Arc<Store>, scratch: PathBuf) {
    let Some(url) = &config.url else {
        return;
    };
    let Some(cluster) = &store.embedded else {
        tracing::warn!(
            "backup.url is set, but sluice backs up only its private cluster; with database.url, use pgBackRest or WAL-G"
        );
        return;
    };
    let repository = match Repository::open(url) {
        Ok(repository) => repository,
        Err(error) => {
            tracing::error!(%error, "backups are off");
            return;
        }
    };
    let mut retry = Backoff::new(FIRST_RETRY, config.full_every);
    let mut next_attempt = tokio::time::Instant::now();
    let mut warned_archive_off = false;
    loop {
        match archiver_state(&store.pool).await {
            Ok(state) => {
                metrics::wal_archiver(state.last_archived, state.failed);
                if !state.archiving && !warned_archive_off {
                    tracing::warn!(
                        "WAL archiving is off in the running private cluster: restart sluice (the cluster with it) to turn it on"
                    );
                    warned_archive_off = true;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the WAL archiver's state"),
        }
        if tokio::time::Instant::now() >= next_attempt {
            next_attempt = match backup_if_due(cluster, &repository, &config, &scratch).await {
                Ok(wait) => {
                    retry.reset();
                    tokio::time::Instant::now() + wait
                }
                Err(error) => {
                    metrics::backup_taken(false);
                    let wait = retry.next_delay();
                    tracing::error!(%error, retry_in = ?wait, "base backup failed");
                    tokio::time::Instant::now() + wait
                }
            };
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Takes a backup when the newest is older than `full_every`; returns the time until the
/// next is due.
async fn backup_if_due(
    cluster: &crate::store::EmbeddedPostgres,
    repository: &Repository,
    config: &BackupConfig,
    scratch: &std::path::Path,
) -> Result<Duration, BackupError> {
    let backups = base::list(repository).await?;
    if let Some(newest) = backups.last() {
        metrics::backup_finished_at(newest.finished_at.timestamp() as f64);
        let age = (Utc::now() - newest.finished_at)
            .to_std()
            .unwrap_or_default();
        if age < config.full_every {
            return Ok(config.full_every - age);
        }
    }
    let backup = base::take(cluster, repository, scratch).await?;
    metrics::backup_taken(true);
    metrics::backup_finished_at(backup.finished_at.timestamp() as f64);
    let bytes: u64 = backup.files.iter().map(|file| file.bytes).sum();
    tracing::info!(backup = %backup.id, bytes, start_wal = %backup.start_wal, "base backup taken");
    match base::prune(repository, config.keep).await {
        Ok(pruned) if pruned.backups + pruned.wal_files > 0 => tracing::info!(
            backups = pruned.backups,
            wal_files = pruned.wal_files,
            "old backups removed"
        ),
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(%error, "cannot remove old backups; will retry after the next")
        }
    }
    Ok(config.full_every)
}

struct ArchiverState {
    archiving: bool,
    /// Unix time of the last archived segment.
    last_archived: Option<f64>,
    failed: i64,
}

async fn archiver_state(pool: &PgPool) -> Result<ArchiverState, sqlx::Error> {
    let (archiving, last_archived, failed): (bool, Option<f64>, i64) = sqlx::query_as(
        "SELECT current_setting('archive_mode') <> 'off', \
         extract(epoch FROM last_archived_time)::float8, failed_count \
         FROM pg_stat_archiver",
    )
    .fetch_one(pool)
    .await?;
    Ok(ArchiverState {
        archiving,
        last_archived,
        failed,
    })
}
