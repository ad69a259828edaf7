//! Bearer JWTs: keys from a JWKS file (re-read when it changes, so keys rotate without a
//! restart), `iss`/`aud`/`exp`/`nbf` checks with a leeway, and an algorithm allowlist. A
//! configured issuer or audience is required: a token that omits the claim is refused like
//! one that names another. Every refusal names what was wrong, never key material.
//!
//! Revocation fails closed: a JWKS file that is deleted, unreadable or not a key set keeps the
//! last good keys in use for at most `auth.jwt.max_stale` (a file caught mid-rewrite must not
//! lock everyone out), counted in `sluice_jwks_stale_seconds` and warned of; past it, every
//! token is refused until the file is good again.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header, errors::ErrorKind, jwk::JwkSet,
};

use crate::config::{JwtConfig, Scope};

/// How often the JWKS file's modification time is looked at.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Why a token was refused (UNAUTHENTICATED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("bearer tokens are not accepted by this server")]
    NotConfigured,
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm \"none\" is not accepted")]
    AlgorithmNone,
    #[error("token algorithm is not accepted")]
    AlgorithmNotAccepted,
    #[error("token key id (kid) is unknown")]
    UnknownKey,
    #[error("token algorithm does not match its key")]
    KeyMismatch,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token has no issuer (iss), and this server requires one")]
    MissingIssuer,
    #[error("token has no audience (aud), and this server requires one")]
    MissingAudience,
    #[error("token has no usable subject (sub)")]
    MissingSubject,
    #[error("token keys are unavailable")]
    KeysUnavailable,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub subject: String,
    pub scopes: BTreeSet<Scope>,
    /// `exp`, in seconds since the epoch.
    pub expires_at: u64,
}

impl Verified {
    pub fn expired(&self) -> bool {
        jsonwebtoken::get_current_timestamp() > self.expires_at
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    /// Space-separated scopes (RFC 8693).
    scope: Option<String>,
    /// Scopes as an array (common in other issuers).
    scp: Option<Vec<String>>,
}

struct KeyCache {
    keys: Arc<JwkSet>,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
    /// When the file was last read, or seen unchanged: the keys in hand are that fresh.
    good: Instant,
}

/// Why the JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a JWK set: {0}")]
    Json(#[from] serde_json::Error),
}

/// Verifies tokens against the configured JWKS file.
pub struct JwtVerifier {
    file: PathBuf,
    issuer: Option<String>,
    audience: Option<String>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    max_stale: Duration,
    cache: Mutex<KeyCache>,
}

/// A configuration the verifier cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("auth.jwt.algorithms: unknown algorithm {0:?}")]
    UnknownAlgorithm(String),
    #[error("auth.jwt.algorithms: {0} is a shared-secret algorithm; use a public-key one")]
    SharedSecret(String),
    #[error(
        "auth.jwt.audience is required with a jwks_file: tokens issued for other services must not pass"
    )]
    NoAudience,
    #[error("cannot read the JWKS file {path}: {source}")]
    Jwks { path: PathBuf, source: JwksError },
}

impl JwtVerifier {
    /// None when no JWKS file is configured (bearer tokens are then refused).
    pub fn from_config(config: &JwtConfig) -> Result<Option<Self>, JwtConfigError> {
        let Some(file) = &config.jwks_file else {
            return Ok(None);
        };
        if config.audience.as_deref().is_none_or(str::is_empty) {
            return Err(JwtConfigError::NoAudience);
        }
        let mut algorithms = Vec::new();
        for name in &config.algorithms {
            let algorithm = Algorithm::from_str(name)
                .map_err(|_| JwtConfigError::UnknownAlgorithm(name.clone()))?;
            if matches!(
                algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            ) {
                return Err(JwtConfigError::SharedSecret(name.clone()));
            }
            algorithms.push(algorithm);
        }
        let verifier = Self {
            file: file.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            algorithms,
            leeway: config.leeway,
            max_stale: config.max_stale,
            cache: Mutex::new(KeyCache {
                keys: Arc::new(JwkSet { keys: Vec::new() }),
                modified: None,
                checked: None,
                good: Instant::now(),
            }),
        };
        // Fail at start (or reload) on an unreadable file, rather than on the first token.
        verifier.load().map_err(|source| JwtConfigError::Jwks {
            path: file.clone(),
            source,
        })?;
        Ok(Some(verifier))
    }

    /// Checks a compact JWT.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        if header_says_none(token) {
            return Err(TokenError::AlgorithmNone);
        }
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAccepted);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let keys = self.keys()?;
        let jwk = keys.find(&kid).ok_or(TokenError::UnknownKey)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| TokenError::UnknownKey)?;
        if key.family() != header.alg.family() {
            return Err(TokenError::KeyMismatch);
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not only checked when present.
        let mut required = vec!["exp", "sub"];
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        required.extend(self.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &self.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = decode::<Claims>(token, &key, &validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm => TokenError::AlgorithmNotAccepted,
                ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                    "sub" => TokenError::MissingSubject,
                    "iss" => TokenError::MissingIssuer,
                    "aud" => TokenError::MissingAudience,
                    _ => TokenError::Malformed,
                },
                _ => TokenError::Malformed,
            })?
            .claims;
        let subject = claims
            .sub
            // Names in parentheses are reserved for the server's own audit rows.
            .filter(|subject| !subject.is_empty() && !subject.starts_with('('))
            .ok_or(TokenError::MissingSubject)?;
        let names: Vec<String> = match (claims.scope, claims.scp) {
            (Some(scope), _) => scope.split_whitespace().map(str::to_owned).collect(),
            (None, Some(scp)) => scp,
            (None, None) => Vec::new(),
        };
        Ok(Verified {
            subject,
            scopes: names.iter().filter_map(|name| Scope::parse(name)).collect(),
            expires_at: claims.exp,
        })
    }

    /// The keys, re-read when the file changed (looked at most once per second); none once
    /// the file has been unusable for longer than `max_stale`.
    fn keys(&self) -> Result<Arc<JwkSet>, TokenError> {
        self.check();
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.keys.keys.is_empty() || cache.good.elapsed() > self.max_stale {
            return Err(TokenError::KeysUnavailable);
        }
        Ok(cache.keys.clone())
    }

    /// Looks at the file when a second has passed since the last look; returns how long the
    /// keys in hand have gone without a good read (zero when the file is fine).
    pub fn check(&self) -> Duration {
        let due = {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            let due = cache
                .checked
                .is_none_or(|checked| checked.elapsed() >= RECHECK_INTERVAL);
            if due {
                cache.checked = Some(Instant::now());
            }
            due
        };
        if due && let Err(error) = self.load() {
            let stale = self.stale_for();
            if stale > self.max_stale {
                tracing::error!(file = %self.file.display(), %error, ?stale, "the JWKS file is unusable past auth.jwt.max_stale; bearer tokens are refused until it is good again");
            } else {
                tracing::warn!(file = %self.file.display(), %error, ?stale, "cannot re-read the JWKS file; the keys in hand stay in use up to auth.jwt.max_stale");
            }
        }
        let stale = self.stale_for();
        crate::metrics::jwks_stale(stale);
        stale
    }

    /// How long the keys in hand have gone without a good read.
    fn stale_for(&self) -> Duration {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.good.elapsed().saturating_sub(RECHECK_INTERVAL)
    }

    /// Re-reads the file if its modification time changed.
    fn load(&self) -> Result<(), JwksError> {
        let modified = std::fs::metadata(&self.file).and_then(|metadata| metadata.modified())?;
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.modified == Some(modified) {
                cache.good = Instant::now();
                return Ok(());
            }
        }
        let text = std::fs::read_to_string(&self.file)?;
        let keys: JwkSet = serde_json::from_str(&text)?;
        tracing::info!(file = %self.file.display(), keys = keys.keys.len(), "loaded JWKS keys");
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.keys = Arc::new(keys);
        cache.modified = Some(modified);
        cache.good = Instant::now();
        Ok(())
    }
}

/// True when the token's header names the `none` algorithm (which the JWT library cannot even
/// parse, so it is caught first to say exactly that).
fn header_says_none(token: &str) -> bool {
    let Some(encoded) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|header| header.get("alg")?.as_str().map(str::to_owned))
        .is_some_and(|alg| alg.eq_ignore_ascii_case("none"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsigned_token_is_told_apart() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        assert!(header_says_none(&format!("{header}.{claims}.")));
        let signed = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
        assert!(!header_says_none(&format!("{signed}.{claims}.sig")));
        assert!(!header_says_none("garbage"));
    }

    #[test]
    fn shared_secret_algorithms_cannot_be_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, r#"{"keys":[]}"#).expect("write");
        let config = JwtConfig {
            jwks_file: Some(file),
            audience: Some("sluice".to_owned()),
            algorithms: vec!["HS256".to_owned()],
            ..JwtConfig::default()
        };
        assert!(matches!(
            JwtVerifier::from_config(&config),
            Err(JwtConfigError::SharedSecret(_))
        ));
    }
}
