//! Backups of the private cluster, for point-in-time recovery: continuous WAL archiving
//! ([`wal`]: PostgreSQL's `archive_command` calls `sluice wal-push`) and scheduled base backups
//! ([`base`]: `pg_basebackup`), kept in an object store (`backup.url`, `file://` or `s3://`).
//! [`base::restore`] rebuilds a cluster at a point in time (`restore_command` calls
//! `sluice wal-fetch`), and [`base::verify`] proves the latest backup restores.
//!
//! Layout of the repository:
//! - `wal/<segment>.zst`: archived WAL segments and timeline history files, zstd-compressed;
//! - `base/<id>/base.tar.zst`, `base/<id>/pg_wal.tar.zst`, `base/<id>/backup_manifest`;
//! - `base/<id>/backup.json`: the [`base::BackupManifest`] (checksums, WAL range, times),
//!   written last: a backup without it is incomplete and is never used.

pub mod base;
pub mod journal;
pub mod schedule;
pub mod wal;

use std::{
    path::{Path as FsPath, PathBuf},
    sync::Arc,
};

use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, buffered::BufWriter, path::Path};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::store::{EmbeddedPostgres, embedded::EmbeddedError};

/// zstd level for WAL and base backups: fast, and WAL compresses well at any level.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("invalid configuration: backup.url: {0}")]
    Config(String),
    #[error("invalid configuration: backup.url: {0}")]
    Url(#[from] crate::objects::ObjectsError),
    #[error(
        "backups are for the private cluster only; with database.url set, use pgBackRest or WAL-G (see the README)"
    )]
    ExternalDatabase,
    #[error("object store error: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Postgres(#[from] EmbeddedError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("no usable backup: {0}")]
    NoBackup(String),
    #[error("{0}")]
    Refused(String),
    #[error("backup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl BackupError {
    fn io(path: &FsPath) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One stored object, as a backup manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredObject {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The object store of `backup.url`.
#[derive(Clone)]
pub struct Repository {
    objects: Arc<dyn ObjectStore>,
    url: String,
}

impl Repository {
    pub fn open(url: &str) -> Result<Self, BackupError> {
        let url = url.trim_end_matches('/').to_owned();
        let objects = crate::objects::open(&url)?;
        Ok(Self { objects, url })
    }

    /// The repository's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        self.objects
            .put(&Path::from(path), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// The object at `path`, or None when there is none.
    async fn get_bytes(&self, path: &str) -> Result<Option<bytes::Bytes>, BackupError> {
        match self.objects.get(&Path::from(path)).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Compresses `file` into the object at `path`, streaming; returns what was stored.
    async fn put_file(&self, path: &str, file: &FsPath) -> Result<StoredObject, BackupError> {
        let compressed = file.with_extension("zst-upload");
        let (source, target) = (file.to_owned(), compressed.clone());
        let sha256 = tokio::task::spawn_blocking(move || compress_file(&source, &target))
            .await
            .map_err(BackupError::Task)??;
        let mut reader = tokio::fs::File::open(&compressed)
            .await
            .map_err(BackupError::io(&compressed))?;
        let mut writer = BufWriter::new(self.objects.clone(), Path::from(path));
        let copied = tokio::io::copy(&mut reader, &mut writer).await;
        let bytes = match copied {
            Ok(bytes) => bytes,
            Err(source) => {
                let _ = writer.abort().await;
                return Err(BackupError::Io {
                    path: compressed,
                    source,
                });
            }
        };
        writer
            .shutdown()
            .await
            .map_err(BackupError::io(&compressed))?;
        let _ = tokio::fs::remove_file(&compressed).await;
        Ok(StoredObject {
            name: path.rsplit('/').next().unwrap_or(path).to_owned(),
            bytes,
            sha256,
        })
    }

    /// Downloads the object at `path`, checks it against `expected`, and decompresses it into
    /// `file`.
    async fn get_file(
        &self,
        path: &str,
        expected: &StoredObject,
        file: &FsPath,
    ) -> Result<(), BackupError> {
        let compressed = file.with_extension("zst-download");
        let mut stream = self.objects.get(&Path::from(path)).await?.into_stream();
        let mut writer = tokio::fs::File::create(&compressed)
            .await
            .map_err(BackupError::io(&compressed))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            writer
                .write_all(&chunk)
                .await
                .map_err(BackupError::io(&compressed))?;
        }
        writer.flush().await.map_err(BackupError::io(&compressed))?;
        drop(writer);
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != expected.sha256 || bytes != expected.bytes {
            let _ = tokio::fs::remove_file(&compressed).await;
            return Err(BackupError::Corrupt {
                path: format!("{}/{path}", self.url),
                reason: format!(
                    "{bytes} bytes with sha256 {sha256}, but the backup recorded {} bytes with sha256 {}",
                    expected.bytes, expected.sha256
                ),
            });
        }
        let (source, target) = (compressed.clone(), file.to_owned());
        tokio::task::spawn_blocking(move || decompress_file(&source, &target))
            .await
            .map_err(BackupError::Task)??;
        let _ = tokio::fs::remove_file(&compressed).await;
        Ok(())
    }

    /// The paths of every object under `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackupError> {
        let prefix = Path::from(prefix);
        let mut listing = self.objects.list(Some(&prefix));
        let mut paths = Vec::new();
        while let Some(meta) = listing.next().await {
            paths.push(meta?.location.to_string());
        }
        Ok(paths)
    }

    async fn delete(&self, path: &str) -> Result<(), BackupError> {
        match self.objects.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// zstd-compresses `source` into `target`; returns the sha256 of what was written.
fn compress_file(source: &FsPath, target: &FsPath) -> Result<String, BackupError> {
    let input = std::fs::File::open(source).map_err(BackupError::io(source))?;
    let output = std::fs::File::create(target).map_err(BackupError::io(target))?;
    let hashing = HashingWriter {
        inner: std::io::BufWriter::new(output),
        hasher: Sha256::new(),
    };
    let mut encoder =
        zstd::stream::write::Encoder::new(hashing, ZSTD_LEVEL).map_err(BackupError::io(target))?;
    std::io::copy(&mut std::io::BufReader::new(input), &mut encoder)
        .map_err(BackupError::io(source))?;
    let mut hashing = encoder.finish().map_err(BackupError::io(target))?;
    std::io::Write::flush(&mut hashing.inner).map_err(BackupError::io(target))?;
    Ok(hex::encode(hashing.hasher.finalize()))
}

fn decompress_file(source: &FsPath, target: &FsPath) -> Result<(), BackupError> {
    let input = std::fs::File::open(source).map_err(BackupError::io(source))?;
    let mut output =
        std::io::BufWriter::new(std::fs::File::create(target).map_err(BackupError::io(target))?);
    zstd::stream::copy_decode(std::io::BufReader::new(input), &mut output).map_err(|error| {
        BackupError::Corrupt {
            path: source.display().to_string(),
            reason: error.to_string(),
        }
    })?;
    std::io::Write::flush(&mut output).map_err(BackupError::io(target))
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buffer)?;
        self.hasher.update(&buffer[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The `"<sluice>" <subcommand> --url "<url>"` prefix of the commands PostgreSQL runs: the
/// path of this binary and the URL are quoted for the shell PostgreSQL runs them with, so
/// characters the shell would interpret are refused.
pub fn sluice_command(subcommand: &str, url: &str) -> Result<String, BackupError> {
    let exe = std::env::current_exe().map_err(|source| BackupError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let exe = exe.to_string_lossy().into_owned();
    for text in [&exe, &url.to_owned()] {
        // `%` would be taken for one of PostgreSQL's placeholders (`%p`, `%f`).
        if text.contains(['"', '\'', '$', '`', '\\', '\n', '%']) {
            return Err(BackupError::Config(format!(
                "{text:?} holds a character that cannot be passed to PostgreSQL's shell"
            )));
        }
    }
    Ok(format!("\"{exe}\" {subcommand} --url \"{url}\""))
}

/// The settings the server starts its private cluster with: WAL archiving to `backup.url`
/// when set, none otherwise (which turns archiving off at the cluster's next start). None
/// with an external database. A `file://` repository is made writable by the user PostgreSQL
/// runs as, since its `archive_command` writes there.
pub fn cluster_settings(
    config: &crate::config::Config,
) -> Result<Option<Vec<(&'static str, String)>>, BackupError> {
    if config.database.url.is_some() {
        return Ok(None);
    }
    let Some(url) = &config.backup.url else {
        return Ok(Some(Vec::new()));
    };
    Repository::open(url)?;
    if url.starts_with("file:") {
        let directory = crate::objects::local_directory(url)?;
        let wal = directory.join("wal");
        std::fs::create_dir_all(&wal).map_err(BackupError::io(&wal))?;
        let cluster = EmbeddedPostgres::locate(&config.data_dir)?;
        for dir in [&directory, &wal] {
            cluster.give_to_postgres(dir)?;
        }
    }
    wal::archive_settings(url, config.backup.max_rpo).map(Some)
}
