//! Base backups (`pg_basebackup`), their retention, point-in-time restore and verification.

use std::{
    path::{Path as FsPath, PathBuf},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{ConnectOptions, Connection};

use super::{BackupError, Repository, StoredObject, journal, wal};
use crate::store::embedded::EmbeddedPostgres;

/// The files `pg_basebackup -Ft` writes, in the order they are stored and restored.
const BACKUP_FILES: [&str; 3] = ["base.tar", "pg_wal.tar", "backup_manifest"];
/// The advisory lock a base backup holds (as `hashtext` of this).
const BACKUP_LOCK: &str = "sluice.backup";
/// Longest a restore may replay WAL before it is given up: the RTO.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a base backup holds, written as `base/<id>/backup.json` once every file is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupManifest {
    /// The UTC start time, `20261201T100000.123Z`: backups sort by id.
    pub id: String,
    pub started_at: DateTime<Utc>,
    /// When the backup was complete: a restore can reach any time after this.
    pub finished_at: DateTime<Utc>,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    /// The WAL segment the backup starts in: older segments are not needed to restore it.
    pub start_wal: String,
    pub end_wal: String,
    /// Each stored file (zstd), with its size and sha256.
    pub files: Vec<StoredObject>,
}

impl BackupManifest {
    fn object(&self, file: &str) -> String {
        format!("base/{}/{file}.zst", self.id)
    }

    fn stored(&self, file: &str) -> Option<&StoredObject> {
        let name = format!("{file}.zst");
        self.files.iter().find(|stored| stored.name == name)
    }
}

/// `pg_basebackup`'s `backup_manifest`: the part read here.
#[derive(Deserialize)]
struct PgManifest {
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<WalRange>,
}

#[derive(Deserialize)]
struct WalRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start_lsn: String,
    #[serde(rename = "End-LSN")]
    end_lsn: String,
}

/// Parses an LSN such as `0/2000028`.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// The name of the WAL segment holding `lsn` on `timeline`.
fn wal_file_name(timeline: u32, lsn: u64, segment_bytes: u64) -> String {
    let segments_per_id = 0x1_0000_0000 / segment_bytes;
    let segment = lsn / segment_bytes;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segment / segments_per_id,
        segment % segments_per_id
    )
}

/// Takes a base backup of the running private cluster into the repository, through
/// `scratch` (a directory on a volume with room for one uncompressed copy).
pub async fn take(
    cluster: &EmbeddedPostgres,
    repository: &Repository,
    scratch: &FsPath,
) -> Result<BackupManifest, BackupError> {
    // One base backup at a time (the server's schedule and `sluice backup --once` may meet):
    // the fast checkpoint that starts a backup can end a running one's replication slot.
    let mut lock = cluster.connect_options().connect().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(BACKUP_LOCK)
        .execute(&mut lock)
        .await?;
    let started_at = Utc::now();
    let id = started_at.format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let dir = scratch.join(&id);
    let result = async {
        // Under the lock, whatever is in the scratch directory was left by an interrupted
        // backup (a stop mid-way): a full uncompressed copy, worth reclaiming.
        if scratch.exists() {
            tokio::fs::remove_dir_all(scratch)
                .await
                .map_err(BackupError::io(scratch))?;
        }
        tokio::fs::create_dir_all(scratch)
            .await
            .map_err(BackupError::io(scratch))?;
        take_into(cluster, repository, &dir, id, started_at).await
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let _ = lock.close().await;
    result
}

async fn take_into(
    cluster: &EmbeddedPostgres,
    repository: &Repository,
    dir: &FsPath,
    id: String,
    started_at: DateTime<Utc>,
) -> Result<BackupManifest, BackupError> {
    let program = cluster.program("pg_basebackup");
    let output = tokio::process::Command::new(&program)
        .arg("-h")
        .arg(cluster.socket_dir())
        .args([
            "-U", "sluice", "-w", "-Ft", "-X", "stream", "-c", "fast", "-D",
        ])
        .arg(dir)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(BackupError::io(&program))?;
    if !output.status.success() {
        return Err(BackupError::Command {
            command: "pg_basebackup".to_owned(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let manifest_path = dir.join("backup_manifest");
    let manifest = tokio::fs::read(&manifest_path)
        .await
        .map_err(BackupError::io(&manifest_path))?;
    let manifest: PgManifest =
        serde_json::from_slice(&manifest).map_err(|error| BackupError::Corrupt {
            path: manifest_path.display().to_string(),
            reason: error.to_string(),
        })?;
    let (Some(first), Some(last)) = (manifest.wal_ranges.first(), manifest.wal_ranges.last())
    else {
        return Err(BackupError::Corrupt {
            path: manifest_path.display().to_string(),
            reason: "no WAL range".to_owned(),
        });
    };
    let segment_bytes = wal_segment_bytes(cluster).await?;
    let lsn = |text: &str| {
        parse_lsn(text).ok_or_else(|| BackupError::Corrupt {
            path: manifest_path.display().to_string(),
            reason: format!("{text:?} is not an LSN"),
        })
    };
    let start_wal = wal_file_name(first.timeline, lsn(&first.start_lsn)?, segment_bytes);
    let end_wal = wal_file_name(last.timeline, lsn(&last.end_lsn)?, segment_bytes);
    let mut files = Vec::new();
    for file in BACKUP_FILES {
        let path = dir.join(file);
        let object = format!("base/{id}/{file}.zst");
        files.push(repository.put_file(&object, &path).await?);
    }
    let backup = BackupManifest {
        id,
        started_at,
        finished_at: Utc::now(),
        timeline: last.timeline,
        start_lsn: first.start_lsn.clone(),
        end_lsn: last.end_lsn.clone(),
        start_wal,
        end_wal,
        files,
    };
    let json = serde_json::to_vec_pretty(&backup).map_err(|error| BackupError::Corrupt {
        path: "backup.json".to_owned(),
        reason: error.to_string(),
    })?;
    repository
        .put_bytes(&format!("base/{}/backup.json", backup.id), json)
        .await?;
    Ok(backup)
}

async fn wal_segment_bytes(cluster: &EmbeddedPostgres) -> Result<u64, BackupError> {
    let mut connection = cluster.connect_options().connect().await?;
    let bytes: i64 = sqlx::query_scalar(
        "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
    )
    .fetch_one(&mut connection)
    .await?;
    let _ = connection.close().await;
    u64::try_from(bytes)
        .ok()
        .filter(|bytes| bytes.is_power_of_two())
        .ok_or_else(|| BackupError::Refused(format!("wal_segment_size {bytes} is not usable")))
}

/// Every complete backup in the repository, oldest first.
pub async fn list(repository: &Repository) -> Result<Vec<BackupManifest>, BackupError> {
    let mut backups = Vec::new();
    for path in repository.list("base").await? {
        if !path.ends_with("/backup.json") {
            continue;
        }
        let Some(bytes) = repository.get_bytes(&path).await? else {
            continue;
        };
        let backup: BackupManifest =
            serde_json::from_slice(&bytes).map_err(|error| BackupError::Corrupt {
                path: path.clone(),
                reason: error.to_string(),
            })?;
        backups.push(backup);
    }
    backups.sort_by_key(|backup| backup.finished_at);
    Ok(backups)
}

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Pruned {
    pub backups: usize,
    pub wal_files: usize,
    /// Journal entries of erasures older than every backup left.
    pub erasures: usize,
}

/// Removes the backups that finished more than `keep` ago (never the newest), then the WAL
/// segments older than the oldest backup left, which no restore can use.
pub async fn prune(repository: &Repository, keep: Duration) -> Result<Pruned, BackupError> {
    let backups = list(repository).await?;
    let cutoff = Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    let mut pruned = Pruned::default();
    let newest = backups.len().saturating_sub(1);
    // The newest backup that finished before the cutoff stays too: without it, the times
    // between the cutoff and the next backup could not be restored.
    let newest_before_cutoff = backups
        .iter()
        .rposition(|backup| backup.finished_at < cutoff);
    let kept = |index: usize, backup: &BackupManifest| {
        index == newest || backup.finished_at >= cutoff || Some(index) == newest_before_cutoff
    };
    for (index, backup) in backups.iter().enumerate() {
        if kept(index, backup) {
            continue;
        }
        // The manifest goes first: a half-removed backup is incomplete, never used.
        repository
            .delete(&format!("base/{}/backup.json", backup.id))
            .await?;
        for path in repository.list(&format!("base/{}", backup.id)).await? {
            repository.delete(&path).await?;
        }
        pruned.backups += 1;
    }
    // Erasures that ended before the oldest backup left began are in every backup.
    if let Some(oldest) = backups
        .iter()
        .enumerate()
        .filter(|(index, backup)| kept(*index, backup))
        .map(|(_, backup)| backup.started_at)
        .min()
    {
        pruned.erasures = journal::prune(repository, oldest - journal::CLOCK_SKEW).await?;
    }
    // WAL older than every backup left is of no use to any restore.
    let Some(oldest_segment) = backups
        .iter()
        .enumerate()
        .filter(|(index, backup)| kept(*index, backup))
        .map(|(_, backup)| backup.start_wal[8..].to_owned())
        .min()
    else {
        return Ok(pruned);
    };
    // Segments compare by their log and segment numbers, whatever their timeline.
    for path in repository.list("wal").await? {
        let Some(name) = path
            .strip_prefix("wal/")
            .and_then(|name| name.strip_suffix(".zst"))
        else {
            continue;
        };
        let is_segment = name.len() >= 24 && name[..24].chars().all(|c| c.is_ascii_hexdigit());
        if is_segment && !name.ends_with(".history") && name[8..24] < *oldest_segment {
            repository.delete(&path).await?;
            pruned.wal_files += 1;
        }
    }
    Ok(pruned)
}

/// Where a restore stops.
#[derive(Debug, Clone, Copy)]
pub enum RecoveryTarget {
    /// Every archived WAL segment.
    Latest,
    /// The last commit at or before this time.
    Time(DateTime<Utc>),
    /// The end of the newest backup (the first consistent point).
    Immediate,
}

/// What a restore does with the erasures (Delete, Anonymize, OptOut, OptIn) journaled since
/// the backup it restores began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRestore {
    /// The server applies them again before it serves: an erasure is never undone by a
    /// restore.
    Reapply,
    /// They stay undone: the restore is to bring back what a mistaken Delete removed.
    Undo,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup: String,
    pub target: String,
    pub data_dir: PathBuf,
    /// Rows of `events` in the restored cluster.
    pub events: i64,
    /// Erasures made since the restored backup began, which the server applies again before
    /// it serves (`backup::journal`).
    pub erasures_to_reapply: usize,
    /// Erasures since the backup began left undone (`--undo-erasures`).
    pub erasures_undone: usize,
    pub seconds: f64,
}

/// Rebuilds the private cluster of `root` (a data directory with no cluster yet) from the
/// repository, up to `target`, and leaves it stopped, promoted, ready for `sluice` to start.
///
/// With `publish_timeline`, the new timeline's history file (and the partial last segment of
/// the old one) go to the repository, as PostgreSQL's archiver would have sent them: a later
/// restore then knows the timeline exists. [`verify`]'s throwaway copies publish nothing, or a
/// later restore would follow their timeline.
pub async fn restore(
    repository: &Repository,
    target: RecoveryTarget,
    root: &FsPath,
    publish_timeline: bool,
    erasures: AfterRestore,
) -> Result<RestoreReport, BackupError> {
    let started = std::time::Instant::now();
    let backups = list(repository).await?;
    let backup = match target {
        RecoveryTarget::Time(time) => backups
            .iter()
            .rev()
            .find(|backup| backup.finished_at < time)
            .ok_or_else(|| {
                BackupError::NoBackup(format!(
                    "none finished before {time}{}",
                    backups
                        .first()
                        .map(|oldest| format!(" (the oldest finished at {})", oldest.finished_at))
                        .unwrap_or_default()
                ))
            })?,
        RecoveryTarget::Latest | RecoveryTarget::Immediate => backups
            .last()
            .ok_or_else(|| BackupError::NoBackup(format!("{} holds none", repository.url())))?,
    };
    let cluster = EmbeddedPostgres::locate(root)?;
    let data_dir = cluster.data_dir().to_owned();
    let occupied = match std::fs::read_dir(&data_dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(BackupError::Io {
                path: data_dir,
                source,
            });
        }
    };
    if occupied {
        return Err(BackupError::Refused(format!(
            "{} already holds a cluster: restore into a data directory without one",
            data_dir.display()
        )));
    }
    tracing::info!(backup = %backup.id, data_dir = %data_dir.display(), "restoring base backup");
    unpack(repository, backup, &data_dir).await?;
    let recovery_signal = data_dir.join("recovery.signal");
    std::fs::write(&recovery_signal, b"").map_err(BackupError::io(&recovery_signal))?;
    cluster.give_to_postgres(&data_dir)?;
    let mut settings = vec![
        ("restore_command", wal::restore_command(repository.url())?),
        // The restored cluster archives nothing until sluice starts it with its settings.
        ("archive_mode", "off".to_owned()),
    ];
    let target_text = match target {
        RecoveryTarget::Latest => "latest".to_owned(),
        RecoveryTarget::Time(time) => {
            settings.push(("recovery_target_time", time.to_rfc3339()));
            settings.push(("recovery_target_action", "promote".to_owned()));
            time.to_rfc3339()
        }
        RecoveryTarget::Immediate => {
            settings.push(("recovery_target", "immediate".to_owned()));
            settings.push(("recovery_target_action", "promote".to_owned()));
            "immediate".to_owned()
        }
    };
    let root_owned = root.to_owned();
    let start =
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start_with(&root_owned, &settings))
            .await
            .map_err(BackupError::Task)?;
    let cluster = match start {
        Ok(cluster) => cluster,
        Err(error) => {
            // `pg_ctl start` gave up waiting, but the server may still be recovering: stop it
            // before anyone touches its directory.
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
            return Err(BackupError::Refused(format!(
                "the restored cluster did not start: {error}; see {}",
                data_dir.join("postgres.log").display()
            )));
        }
    };
    let recovered = wait_for_promotion(&cluster).await;
    let recovered = match recovered {
        Ok(()) if publish_timeline => publish_new_timeline(repository, &data_dir).await,
        other => other,
    };
    let events = match recovered {
        Ok(()) => count_events(&cluster).await,
        Err(error) => Err(error),
    };
    let stopped = tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .map_err(BackupError::Task)?;
    let events = events?;
    stopped?;
    // The erasures the restored database may lack, for the server to apply again before it
    // serves, unless they are what the restore is to undo. A throwaway copy ([`verify`])
    // leaves none.
    let (mut erasures_to_reapply, mut erasures_undone) = (0, 0);
    if publish_timeline {
        let since = backup.started_at - journal::CLOCK_SKEW;
        let entries = journal::reaching_after(repository, since).await?;
        match erasures {
            AfterRestore::Reapply => {
                journal::write_pending(root, &entries)?;
                erasures_to_reapply = entries.len();
            }
            AfterRestore::Undo => {
                for entry in &entries {
                    tracing::warn!(journal_id = %entry.id, principal = %entry.principal, started_at = %entry.started_at, "an erasure since the restored backup is not applied again (--undo-erasures)");
                }
                erasures_undone = entries.len();
            }
        }
    }
    Ok(RestoreReport {
        backup: backup.id.clone(),
        target: target_text,
        data_dir,
        events,
        erasures_to_reapply,
        erasures_undone,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Downloads, checks and unpacks a backup's files into `data_dir`.
async fn unpack(
    repository: &Repository,
    backup: &BackupManifest,
    data_dir: &FsPath,
) -> Result<(), BackupError> {
    std::fs::create_dir_all(data_dir).map_err(BackupError::io(data_dir))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(BackupError::io(data_dir))?;
    }
    let staging = data_dir.with_extension("restore-staging");
    std::fs::create_dir_all(&staging).map_err(BackupError::io(&staging))?;
    let result = async {
        for (file, into) in [
            ("base.tar", data_dir.to_owned()),
            ("pg_wal.tar", data_dir.join("pg_wal")),
        ] {
            let stored = backup.stored(file).ok_or_else(|| BackupError::Corrupt {
                path: format!("base/{}/backup.json", backup.id),
                reason: format!("{file} is missing"),
            })?;
            let tar_path = staging.join(file);
            repository
                .get_file(&backup.object(file), stored, &tar_path)
                .await?;
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&into).map_err(BackupError::io(&into))?;
                let file = std::fs::File::open(&tar_path).map_err(BackupError::io(&tar_path))?;
                tar::Archive::new(std::io::BufReader::new(file))
                    .unpack(&into)
                    .map_err(BackupError::io(&into))?;
                std::fs::remove_file(&tar_path).map_err(BackupError::io(&tar_path))
            })
            .await
            .map_err(BackupError::Task)??;
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Waits until recovery has ended and the cluster takes writes.
async fn wait_for_promotion(cluster: &EmbeddedPostgres) -> Result<(), BackupError> {
    let deadline = std::time::Instant::now() + RECOVERY_TIMEOUT;
    loop {
        let in_recovery = async {
            let mut connection = cluster.connect_options().connect().await?;
            let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
                .fetch_one(&mut connection)
                .await?;
            let _ = connection.close().await;
            Ok::<bool, sqlx::Error>(in_recovery)
        }
        .await;
        if let Ok(false) = in_recovery {
            return Ok(());
        }
        if in_recovery.is_err() && !cluster.is_running() {
            let log = cluster.data_dir().join("postgres.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(BackupError::Refused(format!(
                "PostgreSQL stopped during recovery ({}):\n{}",
                log.display(),
                tail.join("\n")
            )));
        }
        if std::time::Instant::now() > deadline {
            return Err(BackupError::Refused(format!(
                "recovery did not end within {RECOVERY_TIMEOUT:?}; see {}",
                cluster.data_dir().join("postgres.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Archives the history file of the timeline a promotion started, and the partial last
/// segment of the one it left.
async fn publish_new_timeline(
    repository: &Repository,
    data_dir: &FsPath,
) -> Result<(), BackupError> {
    let pg_wal = data_dir.join("pg_wal");
    let entries = std::fs::read_dir(&pg_wal).map_err(BackupError::io(&pg_wal))?;
    for entry in entries {
        let entry = entry.map_err(BackupError::io(&pg_wal))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".history") || name.ends_with(".partial") {
            wal::push(repository, &entry.path(), &name).await?;
        }
    }
    Ok(())
}

async fn count_events(cluster: &EmbeddedPostgres) -> Result<i64, BackupError> {
    let mut connection = cluster.connect_options().connect().await?;
    let events = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut connection)
        .await?;
    let _ = connection.close().await;
    Ok(events)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backup: String,
    pub finished_at: DateTime<Utc>,
    /// Stored bytes checked against their sha256.
    pub checked_bytes: u64,
    /// Rows of `events` in the restored copy.
    pub events: i64,
    pub seconds: f64,
}

/// Restores the newest backup to its end into `scratch` (emptied first and removed after),
/// checking every object's checksum, and counts the rows.
pub async fn verify(
    repository: &Repository,
    scratch: &FsPath,
) -> Result<VerifyReport, BackupError> {
    let cluster_dir = EmbeddedPostgres::locate(scratch)?.data_dir().to_owned();
    for dir in [scratch, cluster_dir.as_path()] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(BackupError::io(dir))?;
        }
    }
    let result = restore(
        repository,
        RecoveryTarget::Immediate,
        scratch,
        false,
        AfterRestore::Undo,
    )
    .await;
    for dir in [scratch, cluster_dir.as_path()] {
        let _ = std::fs::remove_dir_all(dir);
    }
    let report = result?;
    let backups = list(repository).await?;
    let backup = backups
        .iter()
        .find(|backup| backup.id == report.backup)
        .ok_or_else(|| BackupError::NoBackup(format!("{} vanished", report.backup)))?;
    Ok(VerifyReport {
        backup: report.backup.clone(),
        finished_at: backup.finished_at,
        checked_bytes: backup
            .files
            .iter()
            .filter(|file| file.name != "backup_manifest.zst")
            .map(|file| file.bytes)
            .sum(),
        events: report.events,
        seconds: report.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, days_ago: i64, start_segment: u32) -> BackupManifest {
        let finished_at = Utc::now() - chrono::Duration::days(days_ago);
        BackupManifest {
            id: id.to_owned(),
            started_at: finished_at,
            finished_at,
            timeline: 1,
            start_lsn: String::new(),
            end_lsn: String::new(),
            start_wal: format!("00000001{:016X}", start_segment),
            end_wal: String::new(),
            files: Vec::new(),
        }
    }

    #[tokio::test]
    async fn prune_keeps_what_restores_within_keep_need_and_removes_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let repository = Repository::open(&url).expect("open");
        for backup in [
            manifest("a", 10, 2),
            manifest("b", 8, 5),
            manifest("c", 1, 9),
        ] {
            let json = serde_json::to_vec(&backup).expect("json");
            repository
                .put_bytes(&format!("base/{}/backup.json", backup.id), json)
                .await
                .expect("put");
        }
        for segment in 1..=10u32 {
            repository
                .put_bytes(&format!("wal/00000001{segment:016X}.zst"), vec![0])
                .await
                .expect("put");
        }
        repository
            .put_bytes("wal/00000002.history.zst", vec![0])
            .await
            .expect("put");
        let pruned = prune(&repository, Duration::from_secs(7 * 86400))
            .await
            .expect("prune");
        // `a` goes; `b`, the newest before the cutoff, stays so that 7 days ago is reachable.
        assert_eq!(pruned.backups, 1);
        let kept: Vec<String> = list(&repository)
            .await
            .expect("list")
            .into_iter()
            .map(|backup| backup.id)
            .collect();
        assert_eq!(kept, ["b", "c"]);
        // Segments before `b`'s start go; the rest and history files stay.
        assert_eq!(pruned.wal_files, 4);
        let wal = repository.list("wal").await.expect("list");
        assert!(wal.contains(&format!("wal/00000001{:016X}.zst", 5)));
        assert!(!wal.contains(&format!("wal/00000001{:016X}.zst", 4)));
        assert!(wal.contains(&"wal/00000002.history.zst".to_owned()));
        assert_eq!(wal.len(), 7);
    }

    #[test]
    fn an_lsn_names_its_wal_segment() {
        let lsn = parse_lsn("0/2000028").expect("lsn");
        assert_eq!(lsn, 0x0200_0028);
        assert_eq!(wal_file_name(1, lsn, 16 << 20), "000000010000000000000002");
        let lsn = parse_lsn("1/A0000000").expect("lsn");
        assert_eq!(wal_file_name(3, lsn, 16 << 20), "0000000300000001000000A0");
        assert!(parse_lsn("nonsense").is_none());
    }
}
