//! Backup jobs of the `sluice` command: `backup --once`, `backup --verify`, `restore`, and the
//! `wal-push` / `wal-fetch` commands that PostgreSQL runs.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sluice::{
    backup::{
        self, BackupError, Repository,
        base::{self, AfterRestore, BackupManifest, Pruned, RecoveryTarget},
        wal,
    },
    config::Config,
    store::EmbeddedPostgres,
};

/// What `sluice backup --once` did.
#[derive(Debug, Serialize)]
pub struct Taken {
    pub backup: BackupManifest,
    pub pruned: Pruned,
}

fn repository(config: &Config) -> Result<Repository, BackupError> {
    if config.database.url.is_some() {
        return Err(BackupError::ExternalDatabase);
    }
    let url = config.backup.url.as_deref().ok_or_else(|| {
        BackupError::Config("unset: set backup.url (file:///path or s3://bucket/prefix)".to_owned())
    })?;
    Repository::open(url)
}

/// Takes a base backup of the private cluster now (starting it, with archiving, when it is
/// not running), then applies retention.
pub async fn once(config: &Config) -> Result<Taken, BackupError> {
    let repository = repository(config)?;
    let settings = backup::cluster_settings(config)?.unwrap_or_default();
    let data_dir = config.data_dir.clone();
    let cluster =
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start_with(&data_dir, &settings))
            .await
            .map_err(BackupError::Task)??;
    let taken = base::take(
        &cluster,
        &repository,
        &config.data_dir.join("backup-scratch"),
    )
    .await;
    let pruned = match &taken {
        Ok(_) => Some(base::prune(&repository, config.backup.keep).await),
        Err(_) => None,
    };
    if cluster.started_here() {
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .map_err(BackupError::Task)??;
    }
    Ok(Taken {
        backup: taken?,
        pruned: pruned.transpose()?.unwrap_or_default(),
    })
}

/// Restores the newest backup into a scratch directory, checking every checksum, and counts
/// its rows.
pub async fn verify(config: &Config) -> Result<base::VerifyReport, BackupError> {
    let repository = repository(config)?;
    base::verify(&repository, &config.data_dir.join("backup-verify")).await
}

/// Parses `--to`: `latest`, or an RFC 3339 time.
pub fn recovery_target(text: &str) -> Result<RecoveryTarget, BackupError> {
    if text == "latest" {
        return Ok(RecoveryTarget::Latest);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|time| RecoveryTarget::Time(time.with_timezone(&Utc)))
        .map_err(|error| {
            BackupError::Refused(format!(
                "--to {text:?}: use `latest` or an RFC 3339 time such as 2026-12-01T10:00:00Z ({error})"
            ))
        })
}

/// Rebuilds the private cluster of `data_dir` at `target`.
pub async fn restore(
    config: &Config,
    url: Option<&str>,
    target: RecoveryTarget,
    data_dir: &Path,
    erasures: AfterRestore,
) -> Result<base::RestoreReport, BackupError> {
    let repository = match url {
        Some(url) => Repository::open(url)?,
        None => repository(config)?,
    };
    base::restore(&repository, target, data_dir, true, erasures).await
}

/// `archive_command`: archives one WAL file.
pub async fn wal_push(url: &str, path: &Path, name: &str) -> Result<(), BackupError> {
    wal::push(&Repository::open(url)?, path, name).await
}

/// `restore_command`: false when the repository has no such file.
pub async fn wal_fetch(url: &str, name: &str, path: &Path) -> Result<bool, BackupError> {
    wal::fetch(&Repository::open(url)?, name, path).await
}
