//! Opening privacy at start: the keys (from the key file, or from the KMS in [`kms`]) are
//! checked against the fingerprints PostgreSQL holds of the keys its data was written under,
//! before anything is written.

use std::path::PathBuf;

use sqlx::PgPool;

pub use super::check::{PrivacyStartError, Where};
use super::{
    Privacy,
    check::{Fingerprints, check_against},
    keys,
    kms::{self, Kms},
};
use crate::config::Config;

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
    // The KMS makes and keeps the keys: they are always persistent.
    if let Some(key_id) = config.privacy.kms.key_id() {
        let kms = Kms::connect(key_id, &config.privacy.kms).await;
        return kms::open(&config.privacy, &kms, pool).await;
    }
    let recorded = fingerprints(pool).await?;
    let opted_out: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM privacy_optouts)")
        .fetch_one(pool)
        .await?;
    if !persistent && !config.privacy.enabled() && recorded.is_empty() && !opted_out {
        // Keys for a server that protects nothing: random, never written anywhere.
        return Ok(Privacy::ephemeral(&config.privacy, &keys::generate()?));
    }
    let path = key_file(config);
    let source = Where::File(path.clone());
    let loaded = keys::load(&path, config.privacy.key.as_ref().map(|key| key.0.as_str()))?;
    check_against(&source, &loaded.keys, &recorded)?;
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
    check_against(&source, &loaded.keys, &now_recorded)?;
    tracing::info!(
        key_file = %path.display(),
        encryption_keys = loaded.keys.encryption.len(),
        "privacy keys loaded and checked against the database"
    );
    Ok(Privacy::new(&config.privacy, &loaded.keys))
}
