//! The erasure journal. A point-in-time restore brings back the database of then, and with it
//! the events of every Delete and Anonymize made since, and the opt-outs made since undone:
//! the database's own record of them is restored to before they happened. So every erasure
//! of a server with backups is also written to the backup repository, before it changes
//! anything: `erasures/<started, µs>-<id>.json`, one [`Entry`] per call. [`base::restore`]
//! leaves the entries the restored cluster may lack in the data directory ([`PENDING_FILE`]),
//! and the server applies them again before it serves (`erasure::reapply`). An entry goes
//! with the last backup it could be needed for ([`prune`]).
//!
//! [`base::restore`]: super::base::restore

use std::path::{Path as FsPath, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupError, Repository};
use crate::{config::Config, filter::Filter};

const PREFIX: &str = "erasures";

/// How far the clocks of the nodes and of the cluster may disagree: a restore takes the
/// erasures that ended up to this long before its backup began.
pub const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// What a restore leaves in the data directory: the erasures to apply again.
pub const PENDING_FILE: &str = "erasures-to-reapply.json";

/// What an erasure changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// The events matching `filter` (in stored form, restricted to the caller's services).
    Delete { filter: Filter },
    /// The user of `filter` became `pseudonym`.
    Anonymize { filter: Filter, pseudonym: String },
    /// The user recorded under `user_key` opted out of `services` (empty: every service).
    OptOut {
        user_key: String,
        services: Vec<String>,
    },
    OptIn {
        user_key: String,
        services: Vec<String>,
    },
}

/// One erasure call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `<started, µs since the epoch, 20 digits>-<uuid>`: entries sort by their start.
    pub id: String,
    pub change: Change,
    /// The globs of the services the caller could change; None: every service.
    pub service_globs: Option<Vec<String>>,
    pub principal: String,
    pub started_at: DateTime<Utc>,
    /// None until the call ended (a call cut short by a crash stays so).
    pub finished_at: Option<DateTime<Utc>>,
}

impl Entry {
    pub fn new(change: Change, service_globs: Option<Vec<String>>, principal: &str) -> Self {
        let started_at = Utc::now();
        Self {
            id: format!(
                "{:020}-{}",
                started_at.timestamp_micros().max(0),
                uuid::Uuid::new_v4().simple()
            ),
            change,
            service_globs,
            principal: principal.to_owned(),
            started_at,
            finished_at: None,
        }
    }

    /// When the erasure stopped reaching new events: its end, or a day after a start it never
    /// ended from (as the lifecycle job closes such erasures in the database).
    pub fn reach_end(&self) -> DateTime<Utc> {
        self.finished_at
            .unwrap_or(self.started_at + chrono::Duration::days(1))
    }

    fn path(&self) -> String {
        format!("{PREFIX}/{}.json", self.id)
    }
}

/// The journal of a server whose private cluster is backed up (`backup.url`).
#[derive(Clone)]
pub struct Journal {
    repository: Repository,
}

impl Journal {
    /// The journal, when the server keeps backups.
    pub fn open(config: &Config) -> Result<Option<Self>, BackupError> {
        if config.database.url.is_some() {
            return Ok(None);
        }
        let Some(url) = config.backup.url.as_deref() else {
            return Ok(None);
        };
        Ok(Some(Self {
            repository: Repository::open(url)?,
        }))
    }

    /// Writes (or rewrites, once finished) `entry`.
    pub async fn write(&self, entry: &Entry) -> Result<(), BackupError> {
        let bytes = serde_json::to_vec(entry).map_err(|error| BackupError::Corrupt {
            path: entry.path(),
            reason: error.to_string(),
        })?;
        self.repository.put_bytes(&entry.path(), bytes).await
    }
}

/// The entries of erasures that reached events written after `time`, oldest first.
pub async fn reaching_after(
    repository: &Repository,
    time: DateTime<Utc>,
) -> Result<Vec<Entry>, BackupError> {
    let mut entries = Vec::new();
    for path in repository.list(PREFIX).await? {
        if !path.ends_with(".json") {
            continue;
        }
        let Some(bytes) = repository.get_bytes(&path).await? else {
            continue;
        };
        let entry: Entry =
            serde_json::from_slice(&bytes).map_err(|error| BackupError::Corrupt {
                path: path.clone(),
                reason: error.to_string(),
            })?;
        if entry.reach_end() >= time {
            entries.push(entry);
        }
    }
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(entries)
}

/// Removes the entries that ended before `time` (the start of the oldest backup kept): no
/// restore can bring back a database from before them.
pub async fn prune(repository: &Repository, time: DateTime<Utc>) -> Result<usize, BackupError> {
    let mut pruned = 0;
    for path in repository.list(PREFIX).await? {
        let Some(bytes) = repository.get_bytes(&path).await? else {
            continue;
        };
        // An entry that cannot be read is kept: it may be an erasure a restore needs.
        let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
            continue;
        };
        if entry.reach_end() < time {
            repository.delete(&path).await?;
            pruned += 1;
        }
    }
    Ok(pruned)
}

/// Where a restore of the private cluster of `data_dir` leaves its pending erasures.
pub fn pending_path(data_dir: &FsPath) -> PathBuf {
    data_dir.join(PENDING_FILE)
}

/// Leaves `entries` for the server to apply again (private: they name users).
pub fn write_pending(data_dir: &FsPath, entries: &[Entry]) -> Result<(), BackupError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let path = pending_path(data_dir);
    let bytes = serde_json::to_vec_pretty(entries).map_err(|error| BackupError::Corrupt {
        path: path.display().to_string(),
        reason: error.to_string(),
    })?;
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(BackupError::io(&partial))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(BackupError::io(&partial))?;
    std::fs::rename(&partial, &path).map_err(BackupError::io(&path))
}

/// The erasures a restore left, if any.
pub fn read_pending(data_dir: &FsPath) -> Result<Vec<Entry>, BackupError> {
    let path = pending_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| BackupError::Corrupt {
            path: path.display().to_string(),
            reason: error.to_string(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(BackupError::Io { path, source }),
    }
}

/// Forgets the pending erasures, once applied.
pub fn remove_pending(data_dir: &FsPath) -> Result<(), BackupError> {
    let path = pending_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BackupError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(started: &str, finished: Option<&str>) -> Entry {
        let time = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .expect("time")
                .with_timezone(&Utc)
        };
        let mut entry = Entry::new(
            Change::OptOut {
                user_key: "k".to_owned(),
                services: Vec::new(),
            },
            None,
            "ops",
        );
        entry.started_at = time(started);
        entry.finished_at = finished.map(time);
        entry
    }

    #[test]
    fn an_erasure_cut_short_reaches_a_day_past_its_start() {
        let ended = entry("2026-12-01T10:00:00Z", Some("2026-12-01T10:00:05Z"));
        assert_eq!(ended.reach_end().to_rfc3339(), "2026-12-01T10:00:05+00:00");
        let cut_short = entry("2026-12-01T10:00:00Z", None);
        assert_eq!(
            cut_short.reach_end().to_rfc3339(),
            "2026-12-02T10:00:00+00:00"
        );
    }

    #[test]
    fn entry_ids_sort_by_their_start() {
        let first = Entry::new(
            Change::OptIn {
                user_key: "k".to_owned(),
                services: Vec::new(),
            },
            None,
            "ops",
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = Entry::new(first.change.clone(), None, "ops");
        assert!(first.id < second.id);
        assert_eq!(first.id.find('-'), Some(20));
    }

    #[tokio::test]
    async fn entries_round_trip_through_the_repository_and_the_pending_file() {
        let directory = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", directory.path().join("repository").display());
        let repository = Repository::open(&url).expect("repository");
        let journal = Journal {
            repository: repository.clone(),
        };
        let old = entry("2026-11-01T10:00:00Z", Some("2026-11-01T10:00:01Z"));
        let mut recent = Entry::new(
            Change::Delete {
                filter: Filter {
                    user_id: Some("u".to_owned()),
                    ..Filter::default()
                },
            },
            Some(vec!["app-*".to_owned()]),
            "ops",
        );
        journal.write(&old).await.expect("write");
        journal.write(&recent).await.expect("write");
        recent.finished_at = Some(Utc::now());
        journal.write(&recent).await.expect("rewrite");
        let since = entry("2026-11-15T00:00:00Z", None).started_at;
        let reaching = reaching_after(&repository, since).await.expect("list");
        assert_eq!(reaching, vec![recent.clone()]);

        let data_dir = directory.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        assert_eq!(read_pending(&data_dir).expect("none"), Vec::new());
        write_pending(&data_dir, &reaching).expect("write pending");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pending_path(&data_dir))
            .expect("pending file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_pending(&data_dir).expect("read"), reaching);
        remove_pending(&data_dir).expect("remove");
        assert_eq!(read_pending(&data_dir).expect("gone"), Vec::new());

        assert_eq!(prune(&repository, since).await.expect("prune"), 1);
        let left = reaching_after(&repository, old.started_at)
            .await
            .expect("list");
        assert_eq!(left, vec![recent]);
    }
}
