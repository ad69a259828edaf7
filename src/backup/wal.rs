//! WAL archiving: `sluice wal-push` (PostgreSQL's `archive_command`) and `sluice wal-fetch`
//! (its `restore_command`), and the settings that turn archiving on.

use std::{path::Path as FsPath, time::Duration};

use super::{BackupError, Repository, ZSTD_LEVEL, sluice_command};

/// The object of WAL file `name` (a segment, or a timeline history file).
fn object_path(name: &str) -> Result<String, BackupError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || character == '.');
    if !valid {
        return Err(BackupError::Refused(format!(
            "{name:?} is not a WAL file name"
        )));
    }
    Ok(format!("wal/{name}.zst"))
}

/// Archives the WAL file at `path` as `name`. A file archived before with the same content
/// succeeds again (PostgreSQL retries after a crash); with other content it fails, as
/// PostgreSQL's documentation asks of an `archive_command`.
pub async fn push(repository: &Repository, path: &FsPath, name: &str) -> Result<(), BackupError> {
    let object = object_path(name)?;
    let content = tokio::fs::read(path).await.map_err(BackupError::io(path))?;
    if let Some(existing) = repository.get_bytes(&object).await? {
        let existing =
            zstd::stream::decode_all(existing.as_ref()).map_err(|error| BackupError::Corrupt {
                path: object.clone(),
                reason: error.to_string(),
            })?;
        if existing == content {
            return Ok(());
        }
        return Err(BackupError::Refused(format!(
            "{} already holds a different {name}: refusing to overwrite it",
            repository.url()
        )));
    }
    let compressed = tokio::task::spawn_blocking(move || {
        zstd::stream::encode_all(content.as_slice(), ZSTD_LEVEL)
    })
    .await
    .map_err(BackupError::Task)?
    .map_err(BackupError::io(path))?;
    repository.put_bytes(&object, compressed).await
}

/// Attempts at reading a WAL file before [`fetch`] gives up with an error.
const FETCH_ATTEMPTS: u32 = 4;

/// Restores WAL file `name` into `path`; false when the repository does not have it (the
/// normal end of a recovery). A repository that fails to answer is retried, then an error:
/// it must not pass for the end of the archive.
pub async fn fetch(
    repository: &Repository,
    name: &str,
    path: &FsPath,
) -> Result<bool, BackupError> {
    let object = object_path(name)?;
    let mut attempt = 1;
    let compressed = loop {
        match repository.get_bytes(&object).await {
            Ok(Some(compressed)) => break compressed,
            Ok(None) => return Ok(false),
            Err(error) if attempt >= FETCH_ATTEMPTS => return Err(error),
            Err(error) => {
                tracing::warn!(%error, attempt, file = name, "cannot read a WAL file; retrying");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                attempt += 1;
            }
        }
    };
    let content =
        zstd::stream::decode_all(compressed.as_ref()).map_err(|error| BackupError::Corrupt {
            path: object,
            reason: error.to_string(),
        })?;
    tokio::fs::write(path, content)
        .await
        .map_err(BackupError::io(path))?;
    Ok(true)
}

/// The server settings that archive every WAL segment to `url`, switching segments at least
/// every half of `max_rpo` so that no commit waits longer than that to leave the machine.
pub fn archive_settings(
    url: &str,
    max_rpo: Duration,
) -> Result<Vec<(&'static str, String)>, BackupError> {
    let timeout = (max_rpo / 2).max(Duration::from_secs(1));
    Ok(vec![
        ("archive_mode", "on".to_owned()),
        (
            "archive_command",
            format!("{} \"%p\" \"%f\"", sluice_command("wal-push", url)?),
        ),
        ("archive_timeout", format!("{}s", timeout.as_secs())),
        // New segments are zero-filled rather than recycled, so that the unused tail of a
        // segment closed early by archive_timeout compresses to almost nothing.
        ("wal_recycle", "off".to_owned()),
    ])
}

/// The `restore_command` that fetches WAL from `url`.
pub fn restore_command(url: &str) -> Result<String, BackupError> {
    Ok(format!(
        "{} \"%f\" \"%p\"",
        sluice_command("wal-fetch", url)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pushed_segment_is_fetched_back_and_a_different_one_is_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("repo").display());
        let repository = Repository::open(&url).expect("open");
        let segment = dir.path().join("000000010000000000000001");
        let content: Vec<u8> = (0..1_000_000u32).map(|index| (index % 7) as u8).collect();
        std::fs::write(&segment, &content).expect("write");
        push(&repository, &segment, "000000010000000000000001")
            .await
            .expect("push");
        push(&repository, &segment, "000000010000000000000001")
            .await
            .expect("pushing the same file again succeeds");
        std::fs::write(&segment, b"other").expect("write");
        assert!(
            push(&repository, &segment, "000000010000000000000001")
                .await
                .is_err()
        );
        let restored = dir.path().join("restored");
        assert!(
            fetch(&repository, "000000010000000000000001", &restored)
                .await
                .expect("fetch")
        );
        assert_eq!(std::fs::read(&restored).expect("read"), content);
        assert!(
            !fetch(&repository, "000000010000000000000002", &restored)
                .await
                .expect("fetch a missing one")
        );
        assert!(object_path("../etc/passwd").is_err());
    }
}
