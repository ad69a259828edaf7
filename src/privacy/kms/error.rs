//! What a KMS call can come back with.

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("kms key {key_id}: the KMS cannot be reached for {operation}: {reason}")]
    Unreachable {
        key_id: String,
        operation: &'static str,
        reason: String,
    },
    #[error("kms key {key_id}: {operation} refused: {code}: {message}")]
    Refused {
        key_id: String,
        operation: &'static str,
        code: String,
        message: String,
    },
    #[error("kms key {key_id}: {operation} answered without {what}")]
    Incomplete {
        key_id: String,
        operation: &'static str,
        what: &'static str,
    },
}

impl KmsError {
    /// The KMS could not be asked (network, timeout), as against a refusal.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}
