//! The listener: connections open, refused and failed to accept.

use metrics::{counter, gauge};

/// Why a connection was closed before it was served: the `reason` label of
/// `sluice_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionFailure {
    /// `grpc.max_connections` were open.
    Limit,
    /// No TLS handshake plus HTTP/2 preface within `grpc.handshake_timeout`.
    Timeout,
    /// The TLS handshake failed (no or an untrusted client certificate, not TLS at all).
    Tls,
    /// The peer closed before sending the HTTP/2 preface.
    Closed,
    /// The first bytes were not the HTTP/2 preface.
    BadPreface,
}

impl ConnectionFailure {
    pub const ALL: [ConnectionFailure; 5] = [
        ConnectionFailure::Limit,
        ConnectionFailure::Timeout,
        ConnectionFailure::Tls,
        ConnectionFailure::Closed,
        ConnectionFailure::BadPreface,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::Timeout => "handshake_timeout",
            Self::Tls => "tls",
            Self::Closed => "closed",
            Self::BadPreface => "bad_preface",
        }
    }
}

pub fn connection_failed(failure: ConnectionFailure) {
    counter!("sluice_connections_rejected_total", "reason" => failure.as_str()).increment(1);
}

/// `accept` failed; `kind` is `emfile`, `enfile`, `no_memory`, `aborted` or `other`.
pub fn accept_error(kind: &'static str) {
    counter!("sluice_accept_errors_total", "kind" => kind).increment(1);
}

pub fn connection_opened() {
    gauge!("sluice_connections_open").increment(1.0);
}

pub fn connection_closed() {
    gauge!("sluice_connections_open").decrement(1.0);
}
