//! `[auth]`: principals, their scopes, services and limits, bearer JWTs, and the audit log's
//! retention.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

/// What a principal may do. Health and reflection need none; the RPC each scope opens is in
/// `rpc::Rpc::scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Ingest, Publish, IngestStream.
    Ingest,
    /// Query, Stats, Tail.
    Query,
    /// Export.
    Export,
    /// Delete, Anonymize, OptOut, OptIn.
    Delete,
    /// Audit, Restore, and every other scope but `pii`.
    Admin,
    /// Plaintext of encrypted metadata values in Query, Export and Tail (never implied by
    /// `admin`).
    Pii,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Ingest,
        Scope::Query,
        Scope::Export,
        Scope::Delete,
        Scope::Admin,
        Scope::Pii,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Query => "query",
            Self::Export => "export",
            Self::Delete => "delete",
            Self::Admin => "admin",
            Self::Pii => "pii",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == text)
    }
}

/// Who may do what. With no principals configured every authenticated client has every scope
/// on every service (the zero-config first run), and start-up says so loudly.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub principals: Vec<PrincipalConfig>,
    /// The default grant, for an authenticated client that is not among `principals` (once
    /// any is; with none, every client may do everything): its scopes...
    pub default_scopes: Vec<Scope>,
    /// ...the services it may use (globs)...
    #[default(vec!["*".to_owned()])]
    pub default_services: Vec<String>,
    /// ...and its rate limits, each unknown principal its own (0: no limit).
    #[default(1_000)]
    pub default_events_per_second: u32,
    pub default_burst_events: u32,
    #[default(1024 * 1024)]
    pub default_bytes_per_second: u32,
    /// ...and its weight in the buffer's fair share (each unknown principal its own).
    #[default(1)]
    pub default_weight: u32,
    pub jwt: JwtConfig,
    /// How long audit rows are kept.
    #[default(Duration::from_secs(365 * 86_400))]
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
}

impl AuthConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.audit_retention < Duration::from_secs(86_400) {
            return Err(invalid("auth.audit_retention", "must be at least 1day"));
        }
        if self.default_weight == 0 {
            return Err(invalid("auth.default_weight", "must be at least 1"));
        }
        if self
            .principals
            .iter()
            .any(|principal| principal.weight == 0)
        {
            return Err(invalid("auth.principals.weight", "must be at least 1"));
        }
        Ok(())
    }
}

/// Which credential names a principal. The two namespaces are apart: a certificate never
/// claims a token principal, nor a token a certificate one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// A verified client certificate's identity (URI SAN, else first DNS SAN, else CN).
    #[default]
    Certificate,
    /// A bearer JWT's `sub`.
    Token,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Token => "token",
        }
    }
}

/// One principal: a certificate identity or a JWT `sub`, as `kind` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    /// `certificate` (the default) or `token`.
    #[serde(default)]
    pub kind: PrincipalKind,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    /// Globs of the services it may write and read.
    #[serde(default = "all_services")]
    pub services: Vec<String>,
    /// Events per second; 0: no limit.
    #[serde(default)]
    pub events_per_second: u32,
    /// Events allowed at once above the rate (default: one second's worth).
    #[serde(default)]
    pub burst_events: u32,
    /// Event bytes per second (text fields plus metadata as JSON, as `sluice_event_bytes`
    /// counts them); 0: no limit. The burst is one second's worth.
    #[serde(default)]
    pub bytes_per_second: u32,
    /// Its weight in the buffer's fair share: under pressure, each active principal may hold
    /// the buffer's capacity times its weight over the active principals' weights.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn all_services() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Bearer JWTs, checked against keys from a JWKS file.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// JWKS file; re-read when it changes. Unset: bearer tokens are refused.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Accepted algorithms.
    #[default(vec!["RS256".to_owned(), "ES256".to_owned(), "EdDSA".to_owned()])]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[default(Duration::from_secs(30))]
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How long the last good keys stay in use when the JWKS file becomes unusable (deleted,
    /// unreadable, not a key set); past it, every token is refused.
    #[default(Duration::from_secs(300))]
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
}
