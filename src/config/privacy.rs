//! `[privacy]`: pseudonymized user ids, redacted, hashed and encrypted metadata keys, and the
//! opt-out list's refresh.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, Secret, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Store `user_id` as `h1:` + hex(HMAC-SHA256(key, user_id)).
    pub pseudonymize_user_id: bool,
    /// Metadata keys (any depth, any case) dropped before storage.
    pub redact_metadata_keys: Vec<String>,
    /// Metadata keys (any depth, any case) whose values are replaced by their keyed hash.
    pub hash_metadata_keys: Vec<String>,
    /// Metadata keys (any depth, any case) whose values are stored AES-256-GCM encrypted.
    pub encrypt_metadata_keys: Vec<String>,
    /// The key file. Default: `<data_dir>/privacy.keys`, created (mode 0600) when missing.
    pub key_file: Option<PathBuf>,
    /// The HMAC key (base64 of 32 bytes), instead of the key file's: `SLUICE_PRIVACY__KEY`.
    pub key: Option<Secret>,
    /// How often each node reloads the opt-out list (the serving node applies one at once).
    #[default(Duration::from_secs(2))]
    #[serde(with = "humantime_serde")]
    pub optout_refresh: Duration,
    /// Keys from AWS KMS (envelope encryption) instead of the key file.
    pub kms: KmsConfig,
}

/// `[privacy.kms]`: the data keys are made by a KMS key and stored only wrapped by it, in
/// PostgreSQL. Region, endpoint and credentials come from the usual `AWS_*` variables.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct KmsConfig {
    /// The KMS key (id, ARN or `alias/...`) that wraps the data keys. Unset: the key file.
    pub key_id: Option<String>,
    /// How often each node checks that the KMS still unwraps its keys, and picks up keys
    /// added by `sluice privacy rotate --new-key`.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// The longest one KMS call may take, retries included.
    #[default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl KmsConfig {
    /// The KMS key in use, when keys come from the KMS.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref().filter(|id| !id.is_empty())
    }
}

impl PrivacyConfig {
    /// Whether the keys come from a KMS (else from the key file).
    pub fn uses_kms(&self) -> bool {
        self.kms.key_id().is_some()
    }

    /// Whether any setting transforms events.
    pub fn enabled(&self) -> bool {
        self.pseudonymize_user_id
            || !self.redact_metadata_keys.is_empty()
            || !self.hash_metadata_keys.is_empty()
            || !self.encrypt_metadata_keys.is_empty()
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        if self.optout_refresh.is_zero() {
            return Err(invalid("privacy.optout_refresh", "must be above zero"));
        }
        if self.kms.key_id().is_some() {
            if self.key.is_some() {
                return Err(invalid(
                    "privacy.key",
                    "cannot be set with privacy.kms.key_id: the KMS makes the HMAC key",
                ));
            }
            if self.kms.check_interval.is_zero() || self.kms.timeout.is_zero() {
                return Err(invalid(
                    "privacy.kms",
                    "check_interval and timeout must be above zero",
                ));
            }
        }
        Ok(())
    }
}
