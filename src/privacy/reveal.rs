//! The way out: encrypted metadata values opened for callers with scope `pii`, masked (the
//! redacted marker) for everyone else, on a parsed tree or on stored JSON text.

use serde_json::Value as Json;
use uuid::Uuid;

use super::{ENCRYPTED_PREFIX, Privacy, PrivacyError, Walk};

/// Whether JSON text holds an encrypted value, or a string that starts like one: a substring
/// search, no parsing.
pub fn holds_encrypted(text: &[u8]) -> bool {
    memchr::memmem::find(text, ENCRYPTED_PREFIX.as_bytes()).is_some()
}

impl Privacy {
    /// The id of the key a stored value was encrypted with, when it is one.
    pub fn key_id_of(stored: &str) -> Option<&str> {
        stored.strip_prefix(ENCRYPTED_PREFIX)?.split(':').next()
    }

    /// On the way out: encrypted values become plaintext for callers with scope `pii`
    /// (`show`), else the redacted marker. Fails closed: a value that does not authenticate
    /// is an error, never garbage.
    pub fn reveal(
        &self,
        event_id: Uuid,
        metadata: &mut Json,
        show: bool,
    ) -> Result<(), PrivacyError> {
        let mode = if show { Walk::Show } else { Walk::Hide };
        let mut changed = 0;
        self.walk(event_id, metadata, &mut Vec::new(), mode, &mut changed)
    }

    /// [`Privacy::reveal`] on metadata held as JSON text: the text itself when it holds no
    /// encrypted value (a substring search, the common case), else parsed, revealed and
    /// written again.
    pub fn revealed_text(
        &self,
        event_id: Uuid,
        text: Vec<u8>,
        show: bool,
    ) -> Result<Vec<u8>, PrivacyError> {
        if !holds_encrypted(&text) {
            return Ok(text);
        }
        let mut metadata: Json =
            serde_json::from_slice(&text).map_err(|_| PrivacyError::Malformed)?;
        self.reveal(event_id, &mut metadata, show)?;
        serde_json::to_vec(&metadata).map_err(|_| PrivacyError::Malformed)
    }
}
