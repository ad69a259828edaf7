//! Opening privacy at start: the keys are checked against the fingerprints PostgreSQL holds of
//! the keys its data was written under, before anything is written, and the rotate job.

use std::path::PathBuf;

use sqlx::PgPool;
use uuid::Uuid;

use super::{
    ENCRYPTED_PREFIX, Privacy, PrivacyError,
    keys::{self, KeyError},
};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PrivacyStartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "privacy key file {path}: the {what} differs from the one stored data was written under (fingerprint {stored}); restore the original key file, or data already stored becomes unreachable"
    )]
    Changed {
        path: PathBuf,
        what: String,
        stored: String,
    },
    #[error(
        "privacy key file {path}: encryption key {key_id} is missing, and stored values were encrypted with it; restore the original key file"
    )]
    Missing { path: PathBuf, key_id: String },
    #[error("rotate: {0}")]
    Rotate(#[from] PrivacyError),
}

/// Keys that cannot be made persistent during a call (the first opt-out of a server whose
/// privacy settings are all off): the operator's problem, not the caller's.
impl From<PrivacyStartError> for tonic::Status {
    fn from(error: PrivacyStartError) -> Self {
        tracing::error!(%error, "privacy keys cannot be made persistent");
        tonic::Status::failed_precondition("the privacy key file cannot be used; see server logs")
    }
}

/// The key file in use.
pub fn key_file(config: &Config) -> PathBuf {
    config
        .privacy
        .key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("privacy.keys"))
}

/// Loads the keys (creating the key file on first use), refuses keys that differ from those
/// stored data was written under, records the new ones, and builds [`Privacy`]. With privacy
/// off, nothing ever protected and nobody opted out, no key file is read or made.
pub async fn open(config: &Config, pool: &PgPool) -> Result<Privacy, PrivacyStartError> {
    open_with(config, pool, false).await
}

/// [`open`], with persistent keys even when no setting needs them yet (`OptOut` records keyed
/// hashes that must still match after a restart and on every node).
pub async fn open_persistent(config: &Config, pool: &PgPool) -> Result<Privacy, PrivacyStartError> {
    open_with(config, pool, true).await
}

type Fingerprints = Vec<(String, String, String)>;

async fn fingerprints(pool: &PgPool) -> Result<Fingerprints, sqlx::Error> {
    sqlx::query_as("SELECT kind, key_id, fingerprint FROM privacy_keys ORDER BY 1, 2")
        .fetch_all(pool)
        .await
}

async fn open_with(
    config: &Config,
    pool: &PgPool,
    persistent: bool,
) -> Result<Privacy, PrivacyStartError> {
    let recorded = fingerprints(pool).await?;
    let opted_out: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM privacy_optouts)")
        .fetch_one(pool)
        .await?;
    if !persistent && !config.privacy.enabled() && recorded.is_empty() && !opted_out {
        // Keys for a server that protects nothing: random, never written anywhere.
        return Ok(Privacy::ephemeral(&config.privacy, &keys::generate()?));
    }
    let path = key_file(config);
    let loaded = keys::load(&path, config.privacy.key.as_ref().map(|key| key.0.as_str()))?;
    check_against(&path, &loaded.keys, &recorded)?;
    if recorded.iter().any(|(kind, _, _)| kind == "hmac") && !config.privacy.pseudonymize_user_id {
        tracing::warn!(
            "privacy.pseudonymize_user_id is off but stored user ids were pseudonymized: filters by user_id no longer find those events"
        );
    }
    loaded.persist()?;
    let mut transaction = pool.begin().await?;
    sqlx::query(
        "INSERT INTO privacy_keys (kind, key_id, fingerprint) VALUES ('hmac', '', $1) \
         ON CONFLICT DO NOTHING",
    )
    .bind(keys::fingerprint(&loaded.keys.hmac))
    .execute(&mut *transaction)
    .await?;
    for (id, key) in &loaded.keys.encryption {
        sqlx::query(
            "INSERT INTO privacy_keys (kind, key_id, fingerprint) VALUES ('encryption', $1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(keys::fingerprint(key))
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await?;
    // Two nodes starting fresh at once may each have made keys: only the first recorded set
    // counts, and the other node must refuse rather than write under its own.
    let now_recorded = fingerprints(pool).await?;
    check_against(&path, &loaded.keys, &now_recorded)?;
    tracing::info!(
        key_file = %path.display(),
        encryption_keys = loaded.keys.encryption.len(),
        "privacy keys loaded and checked against the database"
    );
    Ok(Privacy::new(&config.privacy, &loaded.keys))
}

/// Refuses keys that lack or differ from any recorded fingerprint.
fn check_against(
    path: &std::path::Path,
    loaded: &keys::Keys,
    recorded: &Fingerprints,
) -> Result<(), PrivacyStartError> {
    let path = path.to_owned();
    for (kind, key_id, fingerprint) in recorded {
        let present = match kind.as_str() {
            "hmac" => Some(keys::fingerprint(&loaded.hmac)),
            _ => loaded
                .encryption
                .iter()
                .find(|(id, _)| id == key_id)
                .map(|(_, key)| keys::fingerprint(key)),
        };
        match present {
            None => {
                return Err(PrivacyStartError::Missing {
                    path: path.clone(),
                    key_id: key_id.clone(),
                });
            }
            Some(present) if &present != fingerprint => {
                return Err(PrivacyStartError::Changed {
                    path: path.clone(),
                    what: if kind == "hmac" {
                        "HMAC key (pseudonymized user ids, hashed values)".to_owned()
                    } else {
                        format!("encryption key {key_id}")
                    },
                    stored: fingerprint.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// What the rotate job did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Rotated {
    pub rows_scanned: u64,
    pub rows_updated: u64,
    pub values_reencrypted: u64,
}

/// Rows per batch of the rotate job.
const ROTATE_BATCH: i64 = 1_000;

/// Re-encrypts, under the newest key, every encrypted metadata value of `events` written under
/// an older one, in batches (keyset on `(ts, id)`), each its own transaction.
pub async fn rotate(pool: &PgPool, privacy: &Privacy) -> Result<Rotated, PrivacyStartError> {
    let mut done = Rotated::default();
    let mut cursor: Option<(chrono::DateTime<chrono::Utc>, Uuid)> = None;
    let pattern = format!("%{ENCRYPTED_PREFIX}%");
    loop {
        let mut transaction = pool.begin().await?;
        let rows: Vec<(
            Uuid,
            chrono::DateTime<chrono::Utc>,
            sqlx::types::Json<serde_json::Value>,
        )> = sqlx::query_as(
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
            return Ok(done);
        }
    }
}
