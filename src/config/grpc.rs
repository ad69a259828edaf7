//! `[grpc]`: message limits, HTTP/2 settings and the bounds on hostile peers.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Largest accepted gRPC message, in bytes, after decompression.
    #[default(16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Largest number of events in one IngestRequest.
    #[default(10_000)]
    pub max_events_per_request: usize,
    /// Interval of HTTP/2 keepalive pings sent to clients.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long to wait for a keepalive ack before closing the connection.
    #[default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Concurrent HTTP/2 streams allowed per connection.
    #[default(256)]
    pub max_concurrent_streams: u32,
    /// Largest QueryService request message, in bytes, after decompression: a read request
    /// has no business being as large as an ingest request.
    #[default(1024 * 1024)]
    pub max_query_message_bytes: usize,
    /// Open connections allowed (in handshake or served); one more is closed at once. 0: the
    /// open-file limit (raised to its hard limit at start) less 256.
    pub max_connections: usize,
    /// Connections in their TLS handshake at once; more are closed at once. Peers that have
    /// proved nothing can hold at most these, never the slots of served connections.
    #[default(512)]
    pub max_handshakes: usize,
    /// Time a new connection has to finish its TLS handshake and send the HTTP/2 preface.
    #[default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl GrpcConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_connections > 1 << 20 {
            return Err(invalid(
                "grpc.max_connections",
                "must be at most 1048576 (0: automatic)",
            ));
        }
        if self.max_handshakes == 0 || self.max_handshakes > 1 << 20 {
            return Err(invalid(
                "grpc.max_handshakes",
                "must be between 1 and 1048576",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid("grpc.handshake_timeout", "must be above zero"));
        }
        if self.max_query_message_bytes == 0 {
            return Err(invalid(
                "grpc.max_query_message_bytes",
                "must be at least 1",
            ));
        }
        if self.max_events_per_request == 0 {
            return Err(invalid("grpc.max_events_per_request", "must be at least 1"));
        }
        Ok(())
    }
}
