//! Privacy key jobs of the `sluice` command: `privacy rotate [--new-key]` (a new key, then
//! every value under an older one re-encrypted in `events`, dead letters and the archive),
//! `privacy kms-import` (a key file's keys wrapped by the KMS) and `privacy rewrap --to`
//! (the stored keys wrapped by another KMS key).

use std::sync::Arc;

use sluice::{
    archive::{Archive, ArchiveError, Removal, catalog::Selection},
    config::Config,
    privacy::{
        Privacy,
        fingerprints::{self, PrivacyStartError},
        keys::{self, KeyError},
        kms::{self, Imported, Kms, Rewrapped},
        rotate::{self, Rotated},
    },
    store::{Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum PrivacyJobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] PrivacyStartError),
    #[error(transparent)]
    KeyFile(#[from] KeyError),
    #[error("archive: {0}")]
    Archive(#[from] ArchiveError),
    #[error("privacy.kms.key_id is unset: this command moves keys to or between KMS keys")]
    NoKms,
}

/// Runs `work` against the configured database, closing it however the work ends.
async fn with_store<T>(
    config: &Config,
    work: impl AsyncFnOnce(&Store) -> Result<T, PrivacyJobError>,
) -> Result<T, PrivacyJobError> {
    let store = Store::open(config).await?;
    let outcome = work(&store).await;
    store.close().await;
    outcome
}

fn kms_key(config: &Config) -> Result<&str, PrivacyJobError> {
    config.privacy.kms.key_id().ok_or(PrivacyJobError::NoKms)
}

/// `sluice privacy rotate [--new-key]`.
pub async fn rotate(config: &Config, new_key: bool) -> Result<Rotated, PrivacyJobError> {
    let archive = Archive::open(&config.archive, &config.data_dir).await?;
    with_store(config, async |store: &Store| {
        let mut done = Rotated::default();
        if new_key {
            let added = match config.privacy.kms.key_id() {
                Some(key_id) => {
                    let kms = Kms::connect(key_id, &config.privacy.kms).await;
                    kms::add_key(&kms, &store.pool).await?
                }
                None => rotate::add_file_key(&fingerprints::key_file(config))?,
            };
            done.new_key = Some(added.key_id);
        }
        let privacy = Arc::new(fingerprints::open(config, &store.pool).await?);
        rotate::reencrypt_tables(&store.pool, &privacy, &mut done).await?;
        reencrypt_archive(&archive, store, privacy, &mut done).await?;
        Ok(done)
    })
    .await
}

/// Rewrites the archived objects holding a value under an older key (each object atomically,
/// as Anonymize does).
async fn reencrypt_archive(
    archive: &Archive,
    store: &Store,
    privacy: Arc<Privacy>,
    done: &mut Rotated,
) -> Result<(), PrivacyJobError> {
    let matcher = privacy.clone();
    let taken = archive
        .take_all(
            &store.pool,
            &Selection::default(),
            Arc::new(move |event| matcher.needs_reencryption(&event.metadata)),
            Removal::Rewrite(Arc::new(move |line| privacy.reencrypt_line(line))),
            |_| std::ops::ControlFlow::Continue(()),
        )
        .await?;
    done.archived_events_updated = taken.events;
    done.archived_objects_rewritten = taken.objects_changed;
    Ok(())
}

/// `sluice privacy kms-import`: the key file's keys (checked against the stored
/// fingerprints) wrapped by `privacy.kms.key_id` and stored beside them.
pub async fn kms_import(config: &Config) -> Result<Imported, PrivacyJobError> {
    let kms = Kms::connect(kms_key(config)?, &config.privacy.kms).await;
    let path = fingerprints::key_file(config);
    if !path.exists() {
        return Err(KeyError::File {
            path,
            problem: keys::KeyFileProblem::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no key file to import",
            )),
        }
        .into());
    }
    let loaded = keys::load(&path, config.privacy.key.as_ref().map(|key| key.0.as_str()))?;
    with_store(config, async |store: &Store| {
        Ok(kms::import(&kms, &store.pool, &loaded.keys).await?)
    })
    .await
}

/// `sluice privacy rewrap --to <key>`: the stored keys wrapped by another KMS key.
pub async fn rewrap(config: &Config, to: &str) -> Result<Rewrapped, PrivacyJobError> {
    let kms = Kms::connect(kms_key(config)?, &config.privacy.kms).await;
    with_store(config, async |store: &Store| {
        Ok(kms::rewrap(&kms, &store.pool, to).await?)
    })
    .await
}
