//! `[otlp]`: OpenTelemetry logs in (`LogsService/Export` on the gRPC listener, and
//! `POST /v1/logs` on a listener of its own when `http_listen` is set).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Attribute keys whose first present value (a string, or an integer as text) is a record's
    /// user id: the record's attributes first, then its resource's.
    #[default(vec!["enduser.id".to_owned(), "user.id".to_owned()])]
    pub user_id_attributes: Vec<String>,
    /// Largest OTLP request, in bytes, after decompression: a larger one (or a compression
    /// bomb) is refused before it is held in memory.
    #[default(16 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Address of the OTLP/HTTP listener (`POST /v1/logs`), with the gRPC port's TLS and
    /// client certificates; unset (the default) serves OTLP over gRPC only.
    pub http_listen: Option<SocketAddr>,
}

impl OtlpConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_request_bytes < 1024 {
            return Err(invalid("otlp.max_request_bytes", "must be at least 1024"));
        }
        if self.user_id_attributes.iter().any(String::is_empty) {
            return Err(invalid(
                "otlp.user_id_attributes",
                "attribute keys must not be empty",
            ));
        }
        Ok(())
    }
}
