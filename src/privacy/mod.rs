//! Personal data by configuration, applied between validation and the buffer (so the plain
//! values never reach the buffer, the spool, PostgreSQL or the archive) and undone, where it
//! can be, on the way out:
//!
//! - `pseudonymize_user_id`: `user_id` is stored as `h1:` + hex(HMAC-SHA256(key, user_id));
//!   filters by `user_id` hash the value they are given ([`Privacy::user_id`]);
//! - `redact_metadata_keys` / `hash_metadata_keys`: those metadata keys (any depth, any case)
//!   are dropped, or replaced by the same keyed hash;
//! - `encrypt_metadata_keys`: those values are stored as `enc:v1:<key id>:<nonce>:<ciphertext>`
//!   (AES-256-GCM, the AAD binding the event id and the exact path) and shown in plaintext only to
//!   callers with scope `pii` ([`Privacy::reveal`]).
//!
//! Keys live in the key file ([`keys`]); [`store`] makes sure the database's data was written
//! under the keys at hand before anything is written.

pub mod check;
pub mod fingerprints;
pub mod keys;
pub mod kms;
pub mod optouts;
mod reveal;
pub mod rotate;

use std::collections::{HashMap, HashSet};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use crate::{config::PrivacyConfig, event::ValidEvent};
use keys::Keys;
pub use reveal::holds_encrypted;

/// The privacy settings in force, swapped whole on a reload (SIGHUP).
pub type SharedPrivacy = std::sync::Arc<arc_swap::ArcSwap<Privacy>>;

/// Prefix of pseudonymized user ids and hashed metadata values.
pub const HASH_PREFIX: &str = "h1:";
/// Prefix of encrypted metadata values.
pub const ENCRYPTED_PREFIX: &str = "enc:v1:";

/// What callers without scope `pii` see in place of an encrypted value.
pub const REDACTED_MARKER: &str = "[encrypted]";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivacyError {
    #[error(
        "an encrypted metadata value failed authentication (tampered, or moved to another event or key)"
    )]
    Tampered,
    #[error("an encrypted metadata value names key {key_id}, which the key file does not hold")]
    UnknownKey { key_id: String },
    #[error("an encrypted metadata value is malformed")]
    Malformed,
    #[error("cannot draw a random nonce")]
    Random,
    #[error(
        "metadata value at {path} starts with {ENCRYPTED_PREFIX}, which is reserved for encrypted values"
    )]
    ReservedPrefix { path: String },
}

/// Fails closed: a value that does not open is never shown, and said loudly.
impl From<PrivacyError> for tonic::Status {
    fn from(error: PrivacyError) -> Self {
        tracing::error!(%error, "an encrypted metadata value cannot be opened");
        tonic::Status::data_loss(error.to_string())
    }
}

/// A metadata key a search cannot name: it is dropped or encrypted before storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} is redacted or encrypted (privacy.*) and cannot be searched")]
pub struct Unsearchable {
    pub key: String,
}

/// What happens to a redacted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redaction {
    Drop,
    Hash,
}

/// The privacy settings with their keys.
pub struct Privacy {
    pseudonymize: bool,
    hmac: hmac::Key,
    redact: HashMap<String, Redaction>,
    encrypt: HashSet<String>,
    /// Encryption keys by id, and the id new values use (the newest).
    ciphers: HashMap<String, LessSafeKey>,
    newest: Option<String>,
    random: SystemRandom,
    /// Built from keys that are written nowhere (privacy off, nothing protected yet).
    ephemeral: bool,
    /// The settings it was built from, to build it again with more keys.
    settings: PrivacyConfig,
}

impl std::fmt::Debug for Privacy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Privacy")
            .field("pseudonymize", &self.pseudonymize)
            .field("redact", &self.redact)
            .field("encrypt", &self.encrypt)
            .field("newest", &self.newest)
            .finish_non_exhaustive()
    }
}

impl Privacy {
    pub fn new(config: &PrivacyConfig, keys: &Keys) -> Self {
        let mut redact: HashMap<String, Redaction> = config
            .redact_metadata_keys
            .iter()
            .map(|key| (key.to_lowercase(), Redaction::Drop))
            .collect();
        redact.extend(
            config
                .hash_metadata_keys
                .iter()
                .map(|key| (key.to_lowercase(), Redaction::Hash)),
        );
        let ciphers = keys
            .encryption
            .iter()
            .filter_map(|(id, key)| {
                UnboundKey::new(&AES_256_GCM, key)
                    .ok()
                    .map(|key| (id.clone(), LessSafeKey::new(key)))
            })
            .collect();
        Self {
            pseudonymize: config.pseudonymize_user_id,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, &keys.hmac),
            redact,
            encrypt: config
                .encrypt_metadata_keys
                .iter()
                .map(|key| key.to_lowercase())
                .collect(),
            ciphers,
            newest: keys.encryption.last().map(|(id, _)| id.clone()),
            random: SystemRandom::new(),
            ephemeral: false,
            settings: config.clone(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &PrivacyConfig {
        &self.settings
    }

    /// The ids of the encryption keys held.
    pub fn key_ids(&self) -> Vec<String> {
        self.ciphers.keys().cloned().collect()
    }

    /// The id of the key new values are encrypted with.
    pub fn newest_key(&self) -> Option<&str> {
        self.newest.as_deref()
    }

    /// Privacy over keys that are written nowhere: nothing may be stored under them.
    pub fn ephemeral(config: &PrivacyConfig, keys: &Keys) -> Self {
        Self {
            ephemeral: true,
            ..Self::new(config, keys)
        }
    }

    /// Whether the keys are written nowhere: OptOut must make them persistent first.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// The keyed hash of a value: `h1:` + hex(HMAC-SHA256).
    pub fn hash(&self, value: &str) -> String {
        let tag = hmac::sign(&self.hmac, value.as_bytes());
        format!("{HASH_PREFIX}{}", hex::encode(tag.as_ref()))
    }

    /// The stored form of a user id: its hash when pseudonymizing, else itself.
    pub fn user_id(&self, plain: &str) -> String {
        if self.pseudonymize {
            self.hash(plain)
        } else {
            plain.to_owned()
        }
    }

    /// [`Privacy::protect`] on a validated event, whose metadata is JSON text: parsed and
    /// written again only when a metadata setting applies or a value mimics an encrypted one.
    pub fn protect_event(&self, event: &mut ValidEvent) -> Result<(), PrivacyError> {
        if let Some(user) = event.user_id.as_mut() {
            *user = self.user_id(user);
        }
        let transforms = !self.redact.is_empty() || !self.encrypt.is_empty();
        // `metadata.userId` may be where the user id came from: it is pseudonymized too.
        let user_in_metadata = self.pseudonymize && event.metadata_json.contains("\"userId\"");
        if !transforms && !user_in_metadata && !event.metadata_json.contains(ENCRYPTED_PREFIX) {
            return Ok(());
        }
        let mut metadata: Map<String, Json> =
            serde_json::from_str(&event.metadata_json).map_err(|_| PrivacyError::Malformed)?;
        if self.pseudonymize
            && let Some(user) = metadata.get_mut("userId")
            && let Some(id) = crate::event::user_id_of(user)
        {
            // Whatever its type: a number is as much a user id as a string.
            *user = Json::String(self.hash(&id));
        }
        self.protect(event.id, &mut None, &mut metadata)?;
        event.metadata_json =
            serde_json::to_string(&metadata).map_err(|_| PrivacyError::Malformed)?;
        Ok(())
    }

    /// Pseudonymizes the user id and redacts and encrypts metadata, before storage.
    pub fn protect(
        &self,
        event_id: Uuid,
        user_id: &mut Option<String>,
        metadata: &mut Map<String, Json>,
    ) -> Result<(), PrivacyError> {
        if let Some(user) = user_id.as_mut() {
            *user = self.user_id(user);
        }
        let mut path = Vec::new();
        self.protect_object(event_id, metadata, &mut path)
    }

    fn protect_object(
        &self,
        event_id: Uuid,
        object: &mut Map<String, Json>,
        path: &mut Vec<Json>,
    ) -> Result<(), PrivacyError> {
        let keys: Vec<String> = object.keys().cloned().collect();
        for key in keys {
            let lower = key.to_lowercase();
            match self.redact.get(&lower) {
                Some(Redaction::Drop) => {
                    object.remove(&key);
                    continue;
                }
                Some(Redaction::Hash) => {
                    if let Some(value) = object.get_mut(&key) {
                        *value = Json::String(self.hash(&canonical(value)));
                    }
                    continue;
                }
                None => {}
            }
            path.push(Json::String(key.clone()));
            if let Some(value) = object.get_mut(&key) {
                if self.encrypt.contains(&lower) {
                    *value = Json::String(self.seal(event_id, &aad_path(path), value)?);
                } else {
                    self.protect_value(event_id, value, path)?;
                }
            }
            path.pop();
        }
        Ok(())
    }

    fn protect_value(
        &self,
        event_id: Uuid,
        value: &mut Json,
        path: &mut Vec<Json>,
    ) -> Result<(), PrivacyError> {
        match value {
            // Only sluice writes encrypted values: a client's look-alike would fail to open.
            Json::String(text) if text.starts_with(ENCRYPTED_PREFIX) => {
                Err(PrivacyError::ReservedPrefix {
                    path: display_path(path),
                })
            }
            Json::Object(object) => self.protect_object(event_id, object, path),
            Json::Array(items) => items.iter_mut().enumerate().try_for_each(|(index, item)| {
                path.push(Json::from(index));
                let result = self.protect_value(event_id, item, path);
                path.pop();
                result
            }),
            _ => Ok(()),
        }
    }

    /// Encrypts one value with the newest key.
    fn seal(&self, event_id: Uuid, path: &str, value: &Json) -> Result<String, PrivacyError> {
        let (Some(id), Some(cipher)) = (
            self.newest.as_ref(),
            self.newest.as_ref().and_then(|id| self.ciphers.get(id)),
        ) else {
            return Err(PrivacyError::UnknownKey {
                key_id: "(none)".to_owned(),
            });
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| PrivacyError::Random)?;
        // The value as JSON, so that opening gives back its type too.
        let mut sealed = value.to_string().into_bytes();
        cipher
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(event_id, path).as_bytes()),
                &mut sealed,
            )
            .map_err(|_| PrivacyError::Malformed)?;
        Ok(format!(
            "{ENCRYPTED_PREFIX}{id}:{}:{}",
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(sealed)
        ))
    }

    /// Decrypts one stored value; fails closed on any mismatch.
    fn open(&self, event_id: Uuid, path: &str, stored: &str) -> Result<Json, PrivacyError> {
        let rest = stored
            .strip_prefix(ENCRYPTED_PREFIX)
            .ok_or(PrivacyError::Malformed)?;
        let mut parts = rest.splitn(3, ':');
        let (Some(id), Some(nonce), Some(sealed)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(PrivacyError::Malformed);
        };
        let cipher = self
            .ciphers
            .get(id)
            .ok_or_else(|| PrivacyError::UnknownKey {
                key_id: id.to_owned(),
            })?;
        let nonce: [u8; NONCE_LEN] = URL_SAFE_NO_PAD
            .decode(nonce)
            .ok()
            .and_then(|nonce| nonce.try_into().ok())
            .ok_or(PrivacyError::Malformed)?;
        let mut sealed = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| PrivacyError::Malformed)?;
        let plain = cipher
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(event_id, path).as_bytes()),
                &mut sealed,
            )
            .map_err(|_| PrivacyError::Tampered)?;
        serde_json::from_slice(plain).map_err(|_| PrivacyError::Malformed)
    }

    /// A `metadata_contains` filter in the form values are stored in: hashed keys and a
    /// pseudonymized `userId` hashed, at any depth. A key that is dropped or encrypted is
    /// refused: nothing stored can match it.
    pub fn search_form(&self, filter: &mut Map<String, Json>) -> Result<(), Unsearchable> {
        if self.pseudonymize
            && let Some(user) = filter.get_mut("userId")
            && let Some(id) = crate::event::user_id_of(user)
        {
            *user = Json::String(self.hash(&id));
        }
        self.search_object(filter)
    }

    fn search_object(&self, object: &mut Map<String, Json>) -> Result<(), Unsearchable> {
        for (key, value) in object.iter_mut() {
            let lower = key.to_lowercase();
            let unsearchable = || Unsearchable { key: key.clone() };
            match self.redact.get(&lower) {
                Some(Redaction::Drop) => return Err(unsearchable()),
                Some(Redaction::Hash) => *value = Json::String(self.hash(&canonical(value))),
                None if self.encrypt.contains(&lower) => return Err(unsearchable()),
                None => match value {
                    Json::Object(inner) => self.search_object(inner)?,
                    Json::Array(items) => {
                        for item in items {
                            if let Json::Object(inner) = item {
                                self.search_object(inner)?;
                            }
                        }
                    }
                    _ => {}
                },
            }
        }
        Ok(())
    }

    /// Anonymize: the link to the person goes. `userId` becomes `pseudonym`, and hashed and
    /// encrypted keys (and any encrypted value) are dropped, at any depth; redacted keys were
    /// never stored.
    pub fn anonymize_metadata(&self, metadata: &mut Json, pseudonym: &str) {
        if let Some(user) = metadata.get_mut("userId")
            && !user.is_null()
        {
            *user = Json::String(pseudonym.to_owned());
        }
        self.strip(metadata);
    }

    /// Anonymize on a spooled event.
    pub fn anonymize_event(&self, event: &mut ValidEvent, pseudonym: &str) {
        event.user_id = Some(pseudonym.to_owned());
        if let Ok(mut metadata) = serde_json::from_str::<Json>(&event.metadata_json) {
            self.anonymize_metadata(&mut metadata, pseudonym);
            event.metadata_json = metadata.to_string();
        }
    }

    /// Anonymize on an NDJSON line (Export format: archived objects); None when it is not one.
    pub fn anonymize_line(&self, line: &str, pseudonym: &str) -> Option<String> {
        let mut event: Json = serde_json::from_str(line).ok()?;
        let object = event.as_object_mut()?;
        object.insert("user_id".to_owned(), Json::String(pseudonym.to_owned()));
        if let Some(metadata) = object.get_mut("metadata") {
            self.anonymize_metadata(metadata, pseudonym);
        }
        Some(event.to_string())
    }

    /// Anonymize on a dead letter's `raw` (the event as JSON, its metadata as JSON text).
    pub fn anonymize_dead_letter(&self, raw: &[u8], pseudonym: &str) -> Option<Vec<u8>> {
        let mut event: Json = serde_json::from_slice(raw).ok()?;
        let object = event.as_object_mut()?;
        object.insert("user_id".to_owned(), Json::String(pseudonym.to_owned()));
        if let Some(Json::String(text)) = object.get_mut("metadata")
            && let Ok(mut metadata) = serde_json::from_str::<Json>(text)
        {
            self.anonymize_metadata(&mut metadata, pseudonym);
            *text = metadata.to_string();
        }
        Some(event.to_string().into_bytes())
    }

    fn strip(&self, value: &mut Json) {
        match value {
            Json::Object(object) => {
                object.retain(|key, item| {
                    let lower = key.to_lowercase();
                    let linked = self.redact.contains_key(&lower)
                        || self.encrypt.contains(&lower)
                        || item
                            .as_str()
                            .is_some_and(|text| text.starts_with(ENCRYPTED_PREFIX));
                    !linked
                });
                object.values_mut().for_each(|item| self.strip(item));
            }
            Json::Array(items) => items.iter_mut().for_each(|item| self.strip(item)),
            _ => {}
        }
    }

    /// Re-encrypts, under the newest key, the values written under older ones (the rotate
    /// job); returns how many it re-encrypted.
    pub fn reencrypt(&self, event_id: Uuid, metadata: &mut Json) -> Result<usize, PrivacyError> {
        let mut changed = 0;
        self.walk(
            event_id,
            metadata,
            &mut Vec::new(),
            Walk::Reseal,
            &mut changed,
        )?;
        Ok(changed)
    }

    fn walk(
        &self,
        event_id: Uuid,
        value: &mut Json,
        path: &mut Vec<Json>,
        mode: Walk,
        changed: &mut usize,
    ) -> Result<(), PrivacyError> {
        match value {
            Json::Object(object) => object.iter_mut().try_for_each(|(key, item)| {
                path.push(Json::String(key.clone()));
                let result = self.walk(event_id, item, path, mode, changed);
                path.pop();
                result
            }),
            Json::Array(items) => items.iter_mut().enumerate().try_for_each(|(index, item)| {
                path.push(Json::from(index));
                let result = self.walk(event_id, item, path, mode, changed);
                path.pop();
                result
            }),
            Json::String(stored) if stored.starts_with(ENCRYPTED_PREFIX) => {
                let joined = aad_path(path);
                let plain = self.open(event_id, &joined, stored)?;
                match mode {
                    Walk::Show => *value = plain,
                    Walk::Hide => *value = Json::String(REDACTED_MARKER.to_owned()),
                    Walk::Reseal => {
                        if Self::key_id_of(stored) != self.newest.as_deref() {
                            *value = Json::String(self.seal(event_id, &joined, &plain)?);
                            *changed += 1;
                        }
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// What a walk over stored metadata does with each encrypted value.
#[derive(Debug, Clone, Copy)]
enum Walk {
    Show,
    Hide,
    Reseal,
}

/// The AAD of a value: the event it belongs to and where in its metadata.
fn aad(event_id: Uuid, path: &str) -> String {
    format!("sluice:v1:{event_id}:{path}")
}

/// A value's place in the metadata, unambiguous: the exact keys and array indices from the
/// top, as a JSON array (`{"a.b": x}` and `{"a": {"b": x}}` differ, and so do `SSN` and `ssn`).
fn aad_path(path: &[Json]) -> String {
    Json::Array(path.to_vec()).to_string()
}

/// A place in the metadata for people: `a.b[2].c`.
fn display_path(path: &[Json]) -> String {
    let mut text = String::new();
    for segment in path {
        match segment {
            Json::String(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            other => text.push_str(&format!("[{other}]")),
        }
    }
    text
}

/// A value as the text that is hashed: strings as themselves (so `h1:` of an e-mail is the same
/// whichever event carries it), others as JSON.
fn canonical(value: &Json) -> String {
    match value {
        Json::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::privacy::keys::KEY_BYTES;

    fn keys(ids: &[&str]) -> Keys {
        Keys {
            hmac: [7; KEY_BYTES],
            encryption: ids
                .iter()
                .enumerate()
                .map(|(n, id)| ((*id).to_owned(), [n as u8 + 1; KEY_BYTES]))
                .collect(),
        }
    }

    fn config() -> PrivacyConfig {
        PrivacyConfig {
            pseudonymize_user_id: true,
            redact_metadata_keys: vec!["email".to_owned(), "Phone".to_owned()],
            hash_metadata_keys: vec!["ip".to_owned()],
            encrypt_metadata_keys: vec!["ssn".to_owned()],
            ..PrivacyConfig::default()
        }
    }

    fn protected(privacy: &Privacy, id: Uuid) -> (Option<String>, Map<String, Json>) {
        let mut user = Some("alice".to_owned());
        let mut metadata = json!({
            "EMAIL": "a@example.com",
            "nested": {"phone": "555", "ssn": "123-45-6789", "keep": 1},
            "list": [{"ip": "10.0.0.1"}],
            "ssn": {"number": 1}
        })
        .as_object()
        .cloned()
        .expect("object");
        privacy
            .protect(id, &mut user, &mut metadata)
            .expect("protect");
        (user, metadata)
    }

    #[test]
    fn user_ids_are_keyed_hashes_and_redacted_keys_go_at_any_depth_and_case() {
        let privacy = Privacy::new(&config(), &keys(&["k1"]));
        let (user, metadata) = protected(&privacy, Uuid::nil());
        let user = user.expect("user");
        assert!(user.starts_with(HASH_PREFIX) && user.len() == 3 + 64);
        assert_eq!(user, privacy.user_id("alice"));
        let text = Json::Object(metadata.clone()).to_string();
        assert!(
            !text.contains("a@example.com") && !text.contains("555"),
            "{text}"
        );
        assert!(
            !text.contains("10.0.0.1") && !text.contains("123-45"),
            "{text}"
        );
        assert_eq!(metadata["list"][0]["ip"], json!(privacy.hash("10.0.0.1")));
        assert_eq!(metadata["nested"]["keep"], json!(1));
    }

    #[test]
    fn encrypted_values_open_only_for_pii_and_only_at_their_event_and_path() {
        let privacy = Privacy::new(&config(), &keys(&["k1"]));
        let id = Uuid::new_v4();
        let (_, metadata) = protected(&privacy, id);
        let stored = Json::Object(metadata);
        let mut shown = stored.clone();
        privacy.reveal(id, &mut shown, true).expect("reveal");
        assert_eq!(shown["nested"]["ssn"], json!("123-45-6789"));
        assert_eq!(shown["ssn"], json!({"number": 1}));
        let mut hidden = stored.clone();
        privacy.reveal(id, &mut hidden, false).expect("hide");
        assert_eq!(hidden["nested"]["ssn"], json!(REDACTED_MARKER));
        // Another event id (the AAD) fails closed.
        let mut moved = stored.clone();
        assert!(matches!(
            privacy.reveal(Uuid::new_v4(), &mut moved, true),
            Err(PrivacyError::Tampered)
        ));
        // Another path fails closed too.
        let mut swapped = stored.clone();
        swapped["nested"]["other"] = stored["nested"]["ssn"].clone();
        swapped["nested"]["ssn"] = json!("plain");
        assert!(privacy.reveal(id, &mut swapped, true).is_err());
        // A flipped ciphertext byte fails closed.
        let mut tampered = stored.clone();
        let text = tampered["nested"]["ssn"]
            .as_str()
            .expect("sealed")
            .to_owned();
        // A character inside the ciphertext: every bit of it counts (the last one of base64
        // may carry bits that decoding drops, which made this test flaky).
        let at = text.len() - 8;
        let replacement = if text[at..].starts_with('A') {
            "B"
        } else {
            "A"
        };
        let flipped = format!("{}{replacement}{}", &text[..at], &text[at + 1..]);
        tampered["nested"]["ssn"] = json!(flipped);
        assert!(matches!(
            privacy.reveal(id, &mut tampered, true),
            Err(PrivacyError::Tampered)
        ));
    }

    #[test]
    fn anonymized_metadata_keeps_statistics_and_loses_the_person() {
        let privacy = Privacy::new(&config(), &keys(&["k1"]));
        let id = Uuid::new_v4();
        let (_, metadata) = protected(&privacy, id);
        let mut metadata = Json::Object(metadata);
        metadata["userId"] = json!("alice");
        privacy.anonymize_metadata(&mut metadata, "anon:1");
        assert_eq!(metadata["userId"], "anon:1");
        let text = metadata.to_string();
        assert!(!text.contains("enc:v1:") && !text.contains("h1:"), "{text}");
        assert_eq!(metadata["nested"], json!({"keep": 1}));
    }

    #[test]
    fn searches_take_the_stored_form_and_refuse_what_is_not_stored() {
        let privacy = Privacy::new(&config(), &keys(&["k1"]));
        let mut filter = json!({"ip": "10.0.0.1", "userId": "alice", "nested": {"plan": "pro"}})
            .as_object()
            .cloned()
            .expect("object");
        privacy.search_form(&mut filter).expect("searchable");
        assert_eq!(filter["ip"], json!(privacy.hash("10.0.0.1")));
        assert_eq!(filter["userId"], json!(privacy.hash("alice")));
        assert_eq!(filter["nested"], json!({"plan": "pro"}));
        for key in ["email", "SSN", "phone"] {
            let mut filter = json!({"deep": {key: "x"}})
                .as_object()
                .cloned()
                .expect("object");
            assert_eq!(
                privacy.search_form(&mut filter),
                Err(Unsearchable {
                    key: key.to_owned()
                })
            );
        }
    }

    #[test]
    fn a_ciphertext_moved_to_a_look_alike_key_fails_to_open() {
        let privacy = Privacy::new(&config(), &keys(&["k1"]));
        let id = Uuid::new_v4();
        let mut metadata = json!({"a": {"ssn": "1"}})
            .as_object()
            .cloned()
            .expect("object");
        privacy
            .protect(id, &mut None, &mut metadata)
            .expect("protect");
        // The same value under "a.ssn" (one key with a dot) or "A": other places, other AAD.
        for moved in [
            json!({"a.ssn": metadata["a"]["ssn"]}),
            json!({"A": {"ssn": metadata["a"]["ssn"]}}),
        ] {
            let mut moved = moved;
            assert!(matches!(
                privacy.reveal(id, &mut moved, true),
                Err(PrivacyError::Tampered)
            ));
        }
    }

    #[test]
    fn client_values_that_look_encrypted_are_refused_at_ingest() {
        let privacy = Privacy::new(&PrivacyConfig::default(), &keys(&["k1"]));
        let mut metadata = json!({"a": {"b": "enc:v1:k1:AAAA:BBBB"}})
            .as_object()
            .cloned()
            .expect("object");
        let refused = privacy.protect(Uuid::nil(), &mut None, &mut metadata);
        assert!(matches!(refused, Err(PrivacyError::ReservedPrefix { path }) if path == "a.b"));
    }

    #[test]
    fn a_new_key_encrypts_while_old_values_still_open_and_rotate_moves_them() {
        let old = Privacy::new(&config(), &keys(&["k1"]));
        let id = Uuid::new_v4();
        let (_, metadata) = protected(&old, id);
        let mut stored = Json::Object(metadata);
        let rotated = Privacy::new(&config(), &keys(&["k1", "k2"]));
        let mut shown = stored.clone();
        rotated
            .reveal(id, &mut shown, true)
            .expect("old values open");
        assert_eq!(shown["nested"]["ssn"], json!("123-45-6789"));
        assert_eq!(rotated.reencrypt(id, &mut stored).expect("rotate"), 2);
        let ids: Vec<&str> = [&stored["nested"]["ssn"], &stored["ssn"]]
            .iter()
            .filter_map(|value| value.as_str().and_then(Privacy::key_id_of))
            .collect();
        assert_eq!(ids, ["k2", "k2"]);
        assert_eq!(rotated.reencrypt(id, &mut stored).expect("again"), 0);
        let mut shown = stored.clone();
        rotated.reveal(id, &mut shown, true).expect("reveal");
        assert_eq!(shown["nested"]["ssn"], json!("123-45-6789"));
    }
}
