//! What stops privacy from opening: keys that lack or differ from the fingerprints PostgreSQL
//! holds of the keys its data was written under, wherever the keys come from.

use std::path::PathBuf;

use super::{
    PrivacyError,
    keys::{self, KeyError},
    kms::error::KmsError,
};

/// Recorded fingerprints: (kind, key id, fingerprint).
pub type Fingerprints = Vec<(String, String, String)>;

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

/// Refuses keys that lack or differ from any recorded fingerprint.
pub fn check_against(
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
