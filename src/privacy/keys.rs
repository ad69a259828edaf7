//! The privacy key file: one HMAC key (pseudonymized user ids, hashed metadata values) and
//! named AES-256-GCM keys, newest last. Created with mode 0600 on first use; the HMAC key may
//! come from `SLUICE_PRIVACY__KEY` instead. Key bytes never reach logs, errors or metrics: only
//! fingerprints do.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

/// Bytes of every key.
pub const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("privacy key file {path}: {problem}")]
    File {
        path: PathBuf,
        problem: KeyFileProblem,
    },
    #[error("privacy.key (SLUICE_PRIVACY__KEY): {0}")]
    EnvKey(KeyProblem),
    #[error("cannot draw random key bytes")]
    Random,
}

/// What is wrong with one key's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("a key is not base64")]
    NotBase64,
    #[error("a key must be {KEY_BYTES} bytes")]
    WrongLength,
}

/// What is wrong with the key file. Never quotes the file: it holds the keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileProblem {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("readable by others (mode {mode:o}); chmod 600 it")]
    ReadableByOthers { mode: u32 },
    #[error(
        "not a valid key file{at}: expected hmac_key = \"<base64>\" and [[encryption_keys]] entries with id and key"
    )]
    Malformed { at: String },
    #[error("key id {id:?} must be non-empty and without ':'")]
    BadId { id: String },
    #[error("key id {id} appears twice")]
    DuplicateId { id: String },
    #[error(transparent)]
    Key(#[from] KeyProblem),
}

/// A key as stored: base64 of 32 bytes.
#[derive(Clone, Serialize, Deserialize)]
pub struct NamedKey {
    pub id: String,
    pub key: String,
}

/// The file's contents.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    hmac_key: String,
    #[serde(default)]
    encryption_keys: Vec<NamedKey>,
}

/// Decoded keys.
#[derive(Clone)]
pub struct Keys {
    pub hmac: [u8; KEY_BYTES],
    /// Oldest first: new values are encrypted with the last.
    pub encryption: Vec<(String, [u8; KEY_BYTES])>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Keys")
            .field("hmac", &"<redacted>")
            .field(
                "encryption",
                &self.encryption.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A new random key.
pub fn random() -> Result<[u8; KEY_BYTES], KeyError> {
    let mut key = [0u8; KEY_BYTES];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| KeyError::Random)?;
    Ok(key)
}

/// Fresh random keys (one encryption key, `k1`), in memory.
pub fn generate() -> Result<Keys, KeyError> {
    Ok(Keys {
        hmac: random()?,
        encryption: vec![("k1".to_owned(), random()?)],
    })
}

/// A key as the key file stores it.
pub fn encode(key: &[u8; KEY_BYTES]) -> String {
    STANDARD.encode(key)
}

fn decode(text: &str) -> Result<[u8; KEY_BYTES], KeyProblem> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyProblem::NotBase64)?;
    bytes.try_into().map_err(|_| KeyProblem::WrongLength)
}

/// The keys of `path`, or new ones when it does not exist (written only by [`Loaded::persist`],
/// once the database agreed). `env_hmac` (base64) replaces the file's HMAC key.
pub fn load(path: &Path, env_hmac: Option<&str>) -> Result<Loaded, KeyError> {
    let file_error = |problem: KeyFileProblem| KeyError::File {
        path: path.to_owned(),
        problem,
    };
    let (file, created) = match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map_err(|error| file_error(error.into()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(file_error(KeyFileProblem::ReadableByOthers {
                    mode: mode & 0o777,
                }));
            }
            let file: KeyFile = toml_from_str(&text).map_err(file_error)?;
            (file, false)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let file = KeyFile {
                hmac_key: STANDARD.encode(random()?),
                encryption_keys: vec![NamedKey {
                    id: "k1".to_owned(),
                    key: STANDARD.encode(random()?),
                }],
            };
            (file, true)
        }
        Err(error) => return Err(file_error(error.into())),
    };
    let hmac = match env_hmac {
        Some(text) => decode(text).map_err(KeyError::EnvKey)?,
        None => decode(&file.hmac_key).map_err(|problem| file_error(problem.into()))?,
    };
    let mut encryption = Vec::with_capacity(file.encryption_keys.len());
    for named in &file.encryption_keys {
        if named.id.is_empty() || named.id.contains(':') {
            return Err(file_error(KeyFileProblem::BadId {
                id: named.id.clone(),
            }));
        }
        if encryption.iter().any(|(id, _)| id == &named.id) {
            return Err(file_error(KeyFileProblem::DuplicateId {
                id: named.id.clone(),
            }));
        }
        let key = decode(&named.key).map_err(|problem| file_error(problem.into()))?;
        encryption.push((named.id.clone(), key));
    }
    Ok(Loaded {
        keys: Keys { hmac, encryption },
        file,
        created: created.then(|| path.to_owned()),
    })
}

/// Parses the key file (TOML) through figment's TOML provider, already in the tree. The
/// parser's own messages can quote the file, keys included: only the kind of problem is told.
fn toml_from_str(text: &str) -> Result<KeyFile, KeyFileProblem> {
    use figment::providers::Format;
    figment::Figment::from(figment::providers::Toml::string(text))
        .extract()
        .map_err(|error| KeyFileProblem::Malformed {
            at: error
                .path
                .last()
                .map_or_else(String::new, |field| format!(" (at {field})")),
        })
}

/// Keys read from (or made for) the key file.
pub struct Loaded {
    pub keys: Keys,
    file: KeyFile,
    /// Set when the file did not exist: where to write it.
    created: Option<PathBuf>,
}

impl Loaded {
    /// Writes a newly made key file with mode 0600 (nothing when it existed).
    pub fn persist(&self) -> Result<(), KeyError> {
        let Some(path) = &self.created else {
            return Ok(());
        };
        let file_error = |error: std::io::Error| KeyError::File {
            path: path.clone(),
            problem: error.into(),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(file_error)?;
        }
        let mut text = String::from(
            "# sluice privacy keys: keep secret, back up with the database, never edit a key.\n\
             # Rotate by appending a new [[encryption_keys]] entry (the last one encrypts) and\n\
             # reloading (SIGHUP); then run `sluice privacy rotate`.\n",
        );
        text.push_str(&format!("hmac_key = \"{}\"\n", self.file.hmac_key));
        for named in &self.file.encryption_keys {
            text.push_str(&format!(
                "\n[[encryption_keys]]\nid = \"{}\"\nkey = \"{}\"\n",
                named.id, named.key
            ));
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(file_error)?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(file_error)?;
        tracing::warn!(path = %path.display(), "created the privacy key file; back it up: data written under it is unreadable without it");
        Ok(())
    }

    pub fn created(&self) -> bool {
        self.created.is_some()
    }
}

/// A key's fingerprint: reveals nothing of the key, tells whether two keys are the same.
pub fn fingerprint(key: &[u8; KEY_BYTES]) -> String {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        b"sluice privacy key fingerprint v1",
    );
    hex::encode(&tag.as_ref()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_made_with_mode_0600_and_reads_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("privacy.keys");
        let made = load(&path, None).expect("new keys");
        assert!(made.created());
        made.persist().expect("persist");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = load(&path, None).expect("read");
        assert!(!read.created());
        assert_eq!(read.keys.hmac, made.keys.hmac);
        assert_eq!(read.keys.encryption, made.keys.encryption);
        // Debug output never shows key bytes.
        let debug = format!("{:?}", read.keys);
        assert!(!debug.contains(&STANDARD.encode(read.keys.hmac)), "{debug}");
    }

    #[test]
    fn unparseable_files_are_refused_without_quoting_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("privacy.keys");
        let secret = STANDARD.encode([9u8; KEY_BYTES]);
        std::fs::write(
            &path,
            format!("hmac_key = \"{secret}\"\nencryption_keys = [\"{secret}\"]\n"),
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let error = load(&path, None).err().expect("refused").to_string();
        assert!(!error.contains(&secret), "{error}");
        std::fs::write(&path, format!("hmac_key = \"{secret}\nbroken")).expect("write");
        let error = load(&path, None).err().expect("refused").to_string();
        assert!(!error.contains(&secret), "{error}");
    }

    #[test]
    fn bad_files_are_refused_without_echoing_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("privacy.keys");
        std::fs::write(&path, "hmac_key = \"c2hvcnQ=\"\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let error = load(&path, None)
            .err()
            .expect("short key refused")
            .to_string();
        assert!(
            error.contains("32 bytes") && !error.contains("c2hvcnQ"),
            "{error}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = load(&path, None)
            .err()
            .expect("open file refused")
            .to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }
}
