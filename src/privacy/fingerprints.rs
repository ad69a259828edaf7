//! Opening privacy at start: the keys (from the key file, or from the KMS in [`kms`]) are
//! checked against the fingerprints PostgreSQL holds of the keys its data was written under,
//! before anything is written.

use std::path::PathBuf;

use sqlx::PgPool;

use super::{
    Privacy, PrivacyError,
    keys::{self, KeyError},
    kms::{self, Kms, KmsError},
};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum PrivacyStartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "{origin}: the {what} differs from the one stored data was written under (fingerprint {stored}); restore the original keys, or data already stored becomes unreachable"
    )]
    Changed {
        origin: Where,
        what: String,
        stored: String,
    },
    #[error(
        "{origin}: encryption key {key_id} is missing, and stored values were encrypted with it; restore the original keys"
    )]
    Missing { origin: Where, key_id: String },
    #[error("{origin}: privacy_keys holds encryption keys but no HMAC key")]
    HmacMissing { origin: Where },
    #[error(
        "kms key {kms_key}: the stored privacy keys come from a key file; move them to the KMS once with `sluice privacy kms-import` (the key file and privacy.kms.key_id both set)"
    )]
    NotWrapped { kms_key: String },
    #[error("a key {key_id} was added meanwhile by another rotation; run it again")]
    ConcurrentRotation { key_id: String },
    #[error("rotate: {0}")]
    Rotate(#[from] PrivacyError),
}

/// Where the keys come from, as messages name it (never the keys).
#[derive(Debug, Clone)]
pub enum Where {
    File(PathBuf),
    Kms(String),
}

impl std::fmt::Display for Where {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(formatter, "privacy key file {}", path.display()),
            Self::Kms(key_id) => write!(formatter, "kms key {key_id}"),
        }
    }
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

/// Refuses keys that lack or differ from any recorded fingerprint.
pub(super) fn check_against(
    source: &Where,
    loaded: &keys::Keys,
    recorded: &Fingerprints,
) -> Result<(), PrivacyStartError> {
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
                    origin: source.clone(),
                    key_id: key_id.clone(),
                });
            }
            Some(present) if &present != fingerprint => {
                return Err(PrivacyStartError::Changed {
                    origin: source.clone(),
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
