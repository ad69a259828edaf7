//! Keys from AWS KMS (envelope encryption). The HMAC key and the AES-256 keys are data keys
//! the KMS generates (`GenerateDataKey`); PostgreSQL keeps them only wrapped by the KMS key
//! (`privacy_keys.wrapped`, beside their fingerprints), each bound by its encryption context
//! to its role, and every node unwraps them at start (`Decrypt`). Their plaintext exists only
//! in memory. A watcher checks every `privacy.kms.check_interval` that the KMS still unwraps
//! them (keys already unwrapped stay in use when it does not: logged, counted, and the
//! `kms` health check says so) and picks up keys added by `sluice privacy rotate --new-key`.

use std::{sync::Arc, time::Duration};

use aws_sdk_kms::{
    Client,
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::DataKeySpec,
};
use sqlx::PgPool;

use super::{
    Privacy, SharedPrivacy,
    check::{PrivacyStartError, Where, check_against},
    keys::{self, KEY_BYTES, Keys},
};
use crate::{
    config::{KmsConfig, PrivacyConfig},
    metrics,
};

pub(super) mod error;

pub use error::KmsError;

/// The encryption-context key that binds a wrapped key to its role (`hmac`, or
/// `encryption:<id>`): a wrapped key copied to another row does not unwrap.
const CONTEXT_KEY: &str = "sluice:privacy-key";

/// A KMS key and the client that reaches it.
#[derive(Clone)]
pub struct Kms {
    client: Client,
    key_id: String,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Kms")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The role of a key, as its encryption context says it.
fn role(kind: &str, key_id: &str) -> String {
    if kind == "hmac" {
        "hmac".to_owned()
    } else {
        format!("encryption:{key_id}")
    }
}

/// A key as messages name it.
fn describe(key: &StoredKey) -> String {
    if key.kind == "hmac" {
        "HMAC key".to_owned()
    } else {
        format!("encryption key {}", key.key_id)
    }
}

fn to_key(bytes: &[u8]) -> Option<[u8; KEY_BYTES]> {
    bytes.try_into().ok()
}

impl Kms {
    /// A client for `key_id` with the usual `AWS_*` configuration (region, credentials,
    /// `AWS_ENDPOINT_URL`), over rustls with ring; each call is bounded by `timeout`,
    /// retries included.
    pub async fn connect(key_id: &str, config: &KmsConfig) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(config.timeout.min(Duration::from_secs(3)))
            .operation_attempt_timeout(config.timeout)
            .operation_timeout(config.timeout)
            .build();
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3))
            .load()
            .await;
        Self {
            client: Client::new(&shared),
            key_id: key_id.to_owned(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn failed<E, R>(&self, operation: &'static str, error: SdkError<E, R>) -> KmsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        metrics::kms_failure(operation);
        match &error {
            SdkError::ServiceError(service) => KmsError::Refused {
                key_id: self.key_id.clone(),
                operation,
                code: service.err().code().unwrap_or("unknown").to_owned(),
                message: service.err().message().unwrap_or_default().to_owned(),
            },
            _ => KmsError::Unreachable {
                key_id: self.key_id.clone(),
                operation,
                reason: DisplayErrorContext(&error).to_string(),
            },
        }
    }

    fn incomplete(&self, operation: &'static str, what: &'static str) -> KmsError {
        KmsError::Incomplete {
            key_id: self.key_id.clone(),
            operation,
            what,
        }
    }

    /// A new data key for `role`: its plaintext and its wrapped form.
    async fn generate(&self, role: &str) -> Result<([u8; KEY_BYTES], Vec<u8>), KmsError> {
        const OPERATION: &str = "GenerateDataKey";
        let answer = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .encryption_context(CONTEXT_KEY, role)
            .send()
            .await
            .map_err(|error| self.failed(OPERATION, error))?;
        let plain = answer
            .plaintext()
            .and_then(|blob| to_key(blob.as_ref()))
            .ok_or_else(|| self.incomplete(OPERATION, "a 32-byte plaintext"))?;
        let wrapped = answer
            .ciphertext_blob()
            .ok_or_else(|| self.incomplete(OPERATION, "a ciphertext"))?;
        Ok((plain, wrapped.as_ref().to_vec()))
    }

    /// The plaintext of a key wrapped for `role`; only this KMS key may have wrapped it.
    async fn unwrap(&self, role: &str, wrapped: &[u8]) -> Result<[u8; KEY_BYTES], KmsError> {
        const OPERATION: &str = "Decrypt";
        let answer = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context(CONTEXT_KEY, role)
            .send()
            .await
            .map_err(|error| self.failed(OPERATION, error))?;
        answer
            .plaintext()
            .and_then(|blob| to_key(blob.as_ref()))
            .ok_or_else(|| self.incomplete(OPERATION, "a 32-byte plaintext"))
    }

    /// `plain` wrapped for `role` (a key-file key moved to the KMS).
    async fn wrap(&self, role: &str, plain: &[u8; KEY_BYTES]) -> Result<Vec<u8>, KmsError> {
        const OPERATION: &str = "Encrypt";
        let answer = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(plain.as_slice()))
            .encryption_context(CONTEXT_KEY, role)
            .send()
            .await
            .map_err(|error| self.failed(OPERATION, error))?;
        answer
            .ciphertext_blob()
            .map(|blob| blob.as_ref().to_vec())
            .ok_or_else(|| self.incomplete(OPERATION, "a ciphertext"))
    }

    /// A key wrapped by this KMS key, wrapped by `to` instead, without its plaintext
    /// leaving the KMS.
    async fn rewrap(&self, role: &str, wrapped: &[u8], to: &str) -> Result<Vec<u8>, KmsError> {
        const OPERATION: &str = "ReEncrypt";
        let answer = self
            .client
            .re_encrypt()
            .source_key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped))
            .source_encryption_context(CONTEXT_KEY, role)
            .destination_key_id(to)
            .destination_encryption_context(CONTEXT_KEY, role)
            .send()
            .await
            .map_err(|error| self.failed(OPERATION, error))?;
        answer
            .ciphertext_blob()
            .map(|blob| blob.as_ref().to_vec())
            .ok_or_else(|| self.incomplete(OPERATION, "a ciphertext"))
    }
}

/// One row of `privacy_keys`.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub kind: String,
    pub key_id: String,
    pub fingerprint: String,
    pub wrapped: Option<Vec<u8>>,
}

/// Every recorded key, oldest first (the last encryption key encrypts new values).
pub async fn stored_keys(pool: &PgPool) -> Result<Vec<StoredKey>, sqlx::Error> {
    let rows: Vec<(String, String, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT kind, key_id, fingerprint, wrapped FROM privacy_keys \
         ORDER BY ordinal NULLS LAST, first_used, key_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, key_id, fingerprint, wrapped)| StoredKey {
            kind,
            key_id,
            fingerprint,
            wrapped,
        })
        .collect())
}

/// The keys PostgreSQL holds wrapped, unwrapped and checked against their fingerprints.
async fn unwrap_all(kms: &Kms, stored: &[StoredKey]) -> Result<Keys, PrivacyStartError> {
    let mut hmac = None;
    let mut encryption = Vec::new();
    for key in stored {
        let Some(wrapped) = &key.wrapped else {
            return Err(PrivacyStartError::NotWrapped {
                kms_key: kms.key_id.clone(),
            });
        };
        let plain = kms.unwrap(&role(&key.kind, &key.key_id), wrapped).await?;
        if keys::fingerprint(&plain) != key.fingerprint {
            return Err(PrivacyStartError::Changed {
                origin: Where::Kms(kms.key_id.clone()),
                what: describe(key),
                stored: key.fingerprint.clone(),
            });
        }
        match key.kind.as_str() {
            "hmac" => hmac = Some(plain),
            _ => encryption.push((key.key_id.clone(), plain)),
        }
    }
    let hmac = hmac.ok_or_else(|| PrivacyStartError::HmacMissing {
        origin: Where::Kms(kms.key_id.clone()),
    })?;
    Ok(Keys { hmac, encryption })
}

/// Inserts a key wrapped by the KMS; false when a row for it is already there.
async fn record(
    executor: impl sqlx::PgExecutor<'_>,
    kms: &Kms,
    kind: &str,
    key_id: &str,
    plain: &[u8; KEY_BYTES],
    wrapped: &[u8],
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO privacy_keys (kind, key_id, fingerprint, wrapped, wrapped_by, ordinal) \
         SELECT $1, $2, $3, $4, $5, coalesce(max(ordinal), 0) + 1 FROM privacy_keys \
         ON CONFLICT DO NOTHING",
    )
    .bind(kind)
    .bind(key_id)
    .bind(keys::fingerprint(plain))
    .bind(wrapped)
    .bind(&kms.key_id)
    .execute(executor)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The keys of a KMS-mode node: unwrapped from PostgreSQL, or, on first use, generated by
/// the KMS and recorded wrapped. Two nodes starting fresh at once each generate keys; only
/// the first recorded set counts, and both use it.
pub async fn open(
    settings: &PrivacyConfig,
    kms: &Kms,
    pool: &PgPool,
) -> Result<Privacy, PrivacyStartError> {
    let mut stored = stored_keys(pool).await?;
    if stored.is_empty() {
        let (hmac, hmac_wrapped) = kms.generate(&role("hmac", "")).await?;
        let (first, first_wrapped) = kms.generate(&role("encryption", "k1")).await?;
        let mut transaction = pool.begin().await?;
        record(&mut *transaction, kms, "hmac", "", &hmac, &hmac_wrapped).await?;
        record(
            &mut *transaction,
            kms,
            "encryption",
            "k1",
            &first,
            &first_wrapped,
        )
        .await?;
        transaction.commit().await?;
        tracing::info!(kms_key = %kms.key_id, "privacy keys generated by the KMS and stored wrapped");
        stored = stored_keys(pool).await?;
    }
    let keys = unwrap_all(kms, &stored).await?;
    tracing::info!(
        kms_key = %kms.key_id,
        encryption_keys = keys.encryption.len(),
        "privacy keys unwrapped through the KMS"
    );
    Ok(Privacy::new(settings, &keys))
}

/// What `sluice privacy rotate --new-key` added.
#[derive(Debug, serde::Serialize)]
pub struct NewKey {
    pub key_id: String,
}

/// The id after the newest `k<n>`.
pub fn next_key_id<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let highest = ids
        .into_iter()
        .filter_map(|id| id.strip_prefix('k')?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("k{}", highest + 1)
}

/// A new encryption key generated by the KMS and recorded wrapped: from then on it
/// encrypts new values (on each node once its watcher sees it, within
/// `privacy.kms.check_interval`).
pub async fn add_key(kms: &Kms, pool: &PgPool) -> Result<NewKey, PrivacyStartError> {
    let stored = stored_keys(pool).await?;
    // The new key encrypts only if every older one still opens.
    unwrap_all(kms, &stored).await?;
    let key_id = next_key_id(
        stored
            .iter()
            .filter(|key| key.kind == "encryption")
            .map(|key| key.key_id.as_str()),
    );
    let (plain, wrapped) = kms.generate(&role("encryption", &key_id)).await?;
    if !record(pool, kms, "encryption", &key_id, &plain, &wrapped).await? {
        return Err(PrivacyStartError::ConcurrentRotation { key_id });
    }
    tracing::info!(kms_key = %kms.key_id, %key_id, "new privacy encryption key");
    Ok(NewKey { key_id })
}

/// What `sluice privacy kms-import` moved.
#[derive(Debug, Default, serde::Serialize)]
pub struct Imported {
    pub keys_wrapped: u64,
}

/// Moves a key file's keys to the KMS: each is checked against its fingerprint, wrapped by
/// the KMS key and stored beside it, in one transaction. The keys do not change, so every
/// stored value stays readable and the key file is no longer needed.
pub async fn import(kms: &Kms, pool: &PgPool, file: &Keys) -> Result<Imported, PrivacyStartError> {
    let stored = stored_keys(pool).await?;
    let recorded: Vec<(String, String, String)> = stored
        .iter()
        .map(|key| {
            (
                key.kind.clone(),
                key.key_id.clone(),
                key.fingerprint.clone(),
            )
        })
        .collect();
    check_against(&Where::Kms(kms.key_id.clone()), file, &recorded)?;
    let mut all = vec![("hmac", String::new(), file.hmac)];
    all.extend(
        file.encryption
            .iter()
            .map(|(id, key)| ("encryption", id.clone(), *key)),
    );
    let mut wrapped = Vec::with_capacity(all.len());
    for (kind, key_id, plain) in &all {
        wrapped.push(kms.wrap(&role(kind, key_id), plain).await?);
    }
    let mut transaction = pool.begin().await?;
    let mut done = Imported::default();
    // The file's order is the keys' order: its last key encrypts new values.
    for (ordinal, ((kind, key_id, plain), wrapped)) in all.iter().zip(&wrapped).enumerate() {
        sqlx::query(
            "INSERT INTO privacy_keys (kind, key_id, fingerprint, wrapped, wrapped_by, ordinal) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kind, key_id) DO UPDATE \
             SET wrapped = EXCLUDED.wrapped, wrapped_by = EXCLUDED.wrapped_by, \
             ordinal = EXCLUDED.ordinal",
        )
        .bind(kind)
        .bind(key_id)
        .bind(keys::fingerprint(plain))
        .bind(wrapped)
        .bind(&kms.key_id)
        .bind(ordinal as i32)
        .execute(&mut *transaction)
        .await?;
        done.keys_wrapped += 1;
    }
    transaction.commit().await?;
    Ok(done)
}

/// What `sluice privacy rewrap` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Rewrapped {
    pub keys_rewrapped: u64,
    pub kms_key: String,
}

/// Every stored key wrapped by `to` instead (the KMS key changes; the data keys do not, so
/// no value is rewritten). Nodes then need `privacy.kms.key_id = to`.
pub async fn rewrap(kms: &Kms, pool: &PgPool, to: &str) -> Result<Rewrapped, PrivacyStartError> {
    let stored = stored_keys(pool).await?;
    let mut rewrapped = Vec::with_capacity(stored.len());
    for key in &stored {
        let Some(wrapped) = &key.wrapped else {
            return Err(PrivacyStartError::NotWrapped {
                kms_key: kms.key_id.clone(),
            });
        };
        rewrapped.push(
            kms.rewrap(&role(&key.kind, &key.key_id), wrapped, to)
                .await?,
        );
    }
    // Each rewrapped key must open under its new KMS key before the old form is replaced.
    let destination = Kms {
        client: kms.client.clone(),
        key_id: to.to_owned(),
    };
    for (key, wrapped) in stored.iter().zip(&rewrapped) {
        let plain = destination
            .unwrap(&role(&key.kind, &key.key_id), wrapped)
            .await?;
        if keys::fingerprint(&plain) != key.fingerprint {
            return Err(PrivacyStartError::Changed {
                origin: Where::Kms(to.to_owned()),
                what: describe(key),
                stored: key.fingerprint.clone(),
            });
        }
    }
    let mut transaction = pool.begin().await?;
    for (key, wrapped) in stored.iter().zip(&rewrapped) {
        sqlx::query(
            "UPDATE privacy_keys SET wrapped = $1, wrapped_by = $2 WHERE kind = $3 AND key_id = $4",
        )
        .bind(wrapped)
        .bind(to)
        .bind(&key.kind)
        .bind(&key.key_id)
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await?;
    Ok(Rewrapped {
        keys_rewrapped: stored.len() as u64,
        kms_key: to.to_owned(),
    })
}

/// Whether the KMS unwrapped this node's keys at the last check; read by health.
#[derive(Debug)]
pub struct KmsStatus(std::sync::atomic::AtomicBool);

impl Default for KmsStatus {
    fn default() -> Self {
        Self(std::sync::atomic::AtomicBool::new(true))
    }
}

impl KmsStatus {
    pub fn reachable(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, reachable: bool) {
        self.0
            .store(reachable, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Checks, every `check_interval`, that the KMS still unwraps the keys, and swaps in the
/// keys a rotation added. A failure keeps the keys in use: they are in memory.
pub async fn keep_checked(
    config: KmsConfig,
    privacy: SharedPrivacy,
    pool: PgPool,
    status: Arc<KmsStatus>,
) {
    let Some(key_id) = config.key_id() else {
        return;
    };
    let kms = Kms::connect(key_id, &config).await;
    loop {
        tokio::time::sleep(config.check_interval).await;
        let stored = match stored_keys(&pool).await {
            Ok(stored) => stored,
            // The database's own checks say so; the KMS is checked next time.
            Err(_) => continue,
        };
        let outcome = check_once(&kms, &stored, &privacy).await;
        let was = status.reachable();
        status.set(outcome.is_ok());
        match outcome {
            Ok(()) if !was => {
                tracing::info!(kms_key = %kms.key_id, "the KMS unwraps the privacy keys again");
            }
            Err(error) if was => {
                tracing::error!(%error, "the KMS does not unwrap the privacy keys; the keys in memory stay in use");
            }
            _ => {}
        }
    }
}

/// One check: unwraps the HMAC key (a real round trip with this node's rights), and every
/// key not seen yet; new encryption keys are swapped in.
async fn check_once(
    kms: &Kms,
    stored: &[StoredKey],
    privacy: &SharedPrivacy,
) -> Result<(), PrivacyStartError> {
    let current = privacy.load();
    let held = current.key_ids();
    let new_keys = stored
        .iter()
        .any(|key| key.kind == "encryption" && !held.contains(&key.key_id));
    if new_keys {
        let keys = unwrap_all(kms, stored).await?;
        let ids: Vec<String> = keys.encryption.iter().map(|(id, _)| id.clone()).collect();
        privacy.store(Arc::new(Privacy::new(current.settings(), &keys)));
        tracing::info!(kms_key = %kms.key_id, encryption_keys = ?ids, "new privacy keys picked up");
        return Ok(());
    }
    let Some(hmac) = stored.iter().find(|key| key.kind == "hmac") else {
        return Ok(());
    };
    let Some(wrapped) = &hmac.wrapped else {
        return Ok(());
    };
    let plain = kms.unwrap(&role("hmac", ""), wrapped).await?;
    if keys::fingerprint(&plain) != hmac.fingerprint {
        return Err(PrivacyStartError::Changed {
            origin: Where::Kms(kms.key_id.clone()),
            what: describe(hmac),
            stored: hmac.fingerprint.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_key_id_follows_the_highest_numbered_one() {
        assert_eq!(next_key_id([]), "k1");
        assert_eq!(next_key_id(["k1"]), "k2");
        assert_eq!(next_key_id(["k1", "k10", "k2", "custom"]), "k11");
    }

    #[test]
    fn each_key_is_bound_to_its_own_role() {
        assert_eq!(role("hmac", ""), "hmac");
        assert_eq!(role("encryption", "k2"), "encryption:k2");
        assert_ne!(role("encryption", "k1"), role("encryption", "k2"));
    }
}
