//! Rotation: a new encryption key ([`add_file_key`] for the key file, `kms::add_key` for the
//! KMS), then every value written under an older key re-encrypted under the newest, in
//! `events` and `dead_letters` ([`reencrypt_tables`]) and, through the rewriter and matcher
//! given here, in archived objects (the job in `cli::privacy` runs them over the archive).

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use serde_json::Value as Json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    ENCRYPTED_PREFIX, Privacy, PrivacyError,
    check::PrivacyStartError,
    keys::{self, KeyError, KeyFileProblem},
    kms::{NewKey, next_key_id},
};

/// What the rotate job did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Rotated {
    /// The key `--new-key` added, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_key: Option<String>,
    pub rows_scanned: u64,
    pub rows_updated: u64,
    pub values_reencrypted: u64,
    pub dead_letters_updated: u64,
    pub archived_events_updated: u64,
    pub archived_objects_rewritten: u64,
}

/// Rows per batch of the rotate job.
const ROTATE_BATCH: i64 = 1_000;

/// Re-encrypts, under the newest key, every encrypted metadata value of `events` and
/// `dead_letters` written under an older one, in batches (keyset on `(ts, id)`), each its own
/// transaction.
pub async fn reencrypt_tables(
    pool: &PgPool,
    privacy: &Privacy,
    done: &mut Rotated,
) -> Result<(), PrivacyStartError> {
    let mut cursor: Option<(chrono::DateTime<chrono::Utc>, Uuid)> = None;
    let pattern = format!("%{ENCRYPTED_PREFIX}%");
    loop {
        let mut transaction = pool.begin().await?;
        let rows: Vec<(Uuid, chrono::DateTime<chrono::Utc>, sqlx::types::Json<Json>)> =
            sqlx::query_as(
                "SELECT id, ts, metadata FROM events WHERE metadata::text LIKE $1 \
                 AND ($2::timestamptz IS NULL OR (ts, id) > ($2, $3)) ORDER BY ts, id LIMIT $4 \
                 FOR UPDATE",
            )
            .bind(&pattern)
            .bind(cursor.map(|(ts, _)| ts))
            .bind(cursor.map(|(_, id)| id))
            .bind(ROTATE_BATCH)
            .fetch_all(&mut *transaction)
            .await?;
        let full = rows.len() as i64 == ROTATE_BATCH;
        for (id, ts, metadata) in rows {
            done.rows_scanned += 1;
            cursor = Some((ts, id));
            let mut metadata = metadata.0;
            let changed = privacy.reencrypt(id, &mut metadata)?;
            if changed > 0 {
                sqlx::query("UPDATE events SET metadata = $1 WHERE id = $2 AND ts = $3")
                    .bind(sqlx::types::Json(&metadata))
                    .bind(id)
                    .bind(ts)
                    .execute(&mut *transaction)
                    .await?;
                done.rows_updated += 1;
                done.values_reencrypted += changed as u64;
            }
        }
        transaction.commit().await?;
        if !full {
            break;
        }
    }
    reencrypt_dead_letters(pool, privacy, done).await
}

/// The dead letters' part: `raw` holds the event as JSON, its metadata as JSON text.
async fn reencrypt_dead_letters(
    pool: &PgPool,
    privacy: &Privacy,
    done: &mut Rotated,
) -> Result<(), PrivacyStartError> {
    let mut after: i64 = 0;
    let pattern = ENCRYPTED_PREFIX.as_bytes().to_vec();
    loop {
        let mut transaction = pool.begin().await?;
        let rows: Vec<(i64, Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT id, event_id, raw FROM dead_letters WHERE id > $1 \
             AND position($2::bytea IN raw) > 0 ORDER BY id LIMIT $3 FOR UPDATE",
        )
        .bind(after)
        .bind(&pattern)
        .bind(ROTATE_BATCH)
        .fetch_all(&mut *transaction)
        .await?;
        let full = rows.len() as i64 == ROTATE_BATCH;
        for (id, event_id, raw) in rows {
            after = id;
            let Some(resealed) = privacy.reencrypt_dead_letter(event_id, &raw)? else {
                continue;
            };
            sqlx::query("UPDATE dead_letters SET raw = $1 WHERE id = $2")
                .bind(resealed)
                .bind(id)
                .execute(&mut *transaction)
                .await?;
            done.dead_letters_updated += 1;
        }
        transaction.commit().await?;
        if !full {
            return Ok(());
        }
    }
}

/// Appends a new random encryption key to the key file (written whole to a temporary file,
/// then renamed over it, mode 0600). Nodes use it after a SIGHUP or restart.
pub fn add_file_key(path: &Path) -> Result<NewKey, KeyError> {
    let file_error = |problem: KeyFileProblem| KeyError::File {
        path: path.to_owned(),
        problem,
    };
    if !path.exists() {
        return Err(file_error(KeyFileProblem::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no key file to add a key to",
        ))));
    }
    let loaded = keys::load(path, None)?;
    let key_id = next_key_id(loaded.keys.encryption.iter().map(|(id, _)| id.as_str()));
    let text = std::fs::read_to_string(path).map_err(|error| file_error(error.into()))?;
    let key = keys::encode(&keys::random()?);
    let appended = format!(
        "{}\n[[encryption_keys]]\nid = \"{key_id}\"\nkey = \"{key}\"\n",
        text.trim_end()
    );
    let temporary = path.with_extension("keys.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|error| file_error(error.into()))?;
    file.write_all(appended.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|error| file_error(error.into()))?;
    tracing::info!(path = %path.display(), %key_id, "new privacy encryption key in the key file");
    Ok(NewKey { key_id })
}

impl Privacy {
    /// Whether some value of `metadata` was encrypted under a key older than the newest.
    pub fn needs_reencryption(&self, metadata: &Json) -> bool {
        match metadata {
            Json::Object(object) => object.values().any(|item| self.needs_reencryption(item)),
            Json::Array(items) => items.iter().any(|item| self.needs_reencryption(item)),
            Json::String(stored) => {
                Self::key_id_of(stored).is_some_and(|key| Some(key) != self.newest_key())
            }
            _ => false,
        }
    }

    /// A dead letter's `raw` with its values re-encrypted under the newest key; None when
    /// nothing changed.
    pub fn reencrypt_dead_letter(
        &self,
        event_id: Uuid,
        raw: &[u8],
    ) -> Result<Option<Vec<u8>>, PrivacyError> {
        let Ok(mut event) = serde_json::from_slice::<Json>(raw) else {
            return Ok(None);
        };
        let Some(Json::String(text)) = event.get_mut("metadata") else {
            return Ok(None);
        };
        let Ok(mut metadata) = serde_json::from_str::<Json>(text) else {
            return Ok(None);
        };
        if self.reencrypt(event_id, &mut metadata)? == 0 {
            return Ok(None);
        }
        *text = metadata.to_string();
        Ok(Some(event.to_string().into_bytes()))
    }

    /// An archived line with its values re-encrypted under the newest key (the line itself
    /// when nothing changed); None when it cannot be read or a value does not open.
    pub fn reencrypt_line(&self, line: &str) -> Option<String> {
        let mut event: Json = serde_json::from_str(line).ok()?;
        let id: Uuid = event.get("id")?.as_str()?.parse().ok()?;
        let metadata = event.get_mut("metadata")?;
        match self.reencrypt(id, metadata) {
            Ok(0) => Some(line.to_owned()),
            Ok(_) => Some(event.to_string()),
            Err(error) => {
                tracing::error!(%error, event_id = %id, "an archived value does not open; the object is left as it is");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::PrivacyConfig;

    #[test]
    fn a_new_file_key_is_appended_and_older_keys_still_open_old_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("privacy.keys");
        let made = keys::load(&path, None).expect("new keys");
        made.persist().expect("persist");
        let config = PrivacyConfig {
            encrypt_metadata_keys: vec!["ssn".to_owned()],
            ..PrivacyConfig::default()
        };
        let before = Privacy::new(&config, &made.keys);
        let id = Uuid::now_v7();
        let mut metadata = serde_json::json!({"ssn": "123"});
        before
            .protect(id, &mut None, metadata.as_object_mut().expect("object"))
            .expect("encrypt");
        let added = add_file_key(&path).expect("added");
        assert_eq!(added.key_id, "k2");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let reloaded = keys::load(&path, None).expect("reload");
        assert_eq!(reloaded.keys.hmac, made.keys.hmac);
        let after = Privacy::new(&config, &reloaded.keys);
        assert_eq!(after.newest_key(), Some("k2"));
        assert!(after.needs_reencryption(&metadata));
        let line = serde_json::json!({"id": id, "metadata": metadata}).to_string();
        let resealed = after.reencrypt_line(&line).expect("resealed");
        let resealed: Json = serde_json::from_str(&resealed).expect("json");
        assert!(!after.needs_reencryption(&resealed["metadata"]));
        let mut shown = resealed["metadata"].clone();
        after.reveal(id, &mut shown, true).expect("opens");
        assert_eq!(shown, serde_json::json!({"ssn": "123"}));
    }
}
