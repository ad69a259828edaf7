//! Who may do what. Every RPC but health and reflection starts by turning the request into a
//! [`Caller`]: a principal (a bearer JWT's `sub`, else the verified client certificate's
//! identity), its scopes, the services it may write and read, and its rate limits.
//!
//! With no principals configured (the zero-config first run) every authenticated client has
//! every scope on every service. Once any principal is configured, an unknown one gets
//! `auth.default_scopes`. The policy reloads on SIGHUP ([`Authorizer::reload`]).

pub mod identity;
pub mod jwt;
pub mod limits;

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    config::{AuthConfig, PrincipalConfig, Scope},
    glob::ServiceGlobs,
    metrics,
    proto::status::ERROR_DOMAIN,
};
use jwt::{JwtConfigError, JwtVerifier, TokenError};
use limits::{Limits, RateLimited};

/// The principal of a client with neither a token nor a certificate (plaintext mode). Names in
/// parentheses are reserved for the server's own audit rows.
pub const ANONYMOUS: &str = "anonymous";
/// Trailer honoured by gRPC retry policies (grpc-js, C-core): milliseconds to wait.
pub use crate::proto::status::RETRY_PUSHBACK_TRAILER;

/// Why a request is refused on who sent it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("the authorization header is not a bearer token")]
    NotBearer,
    #[error("{principal} lacks the {} scope", scope.as_str())]
    MissingScope { principal: String, scope: Scope },
    #[error("{principal} may not read or write service {service}")]
    ServiceDenied { principal: String, service: String },
    #[error("{principal} is over its {} limit; retry after {:?}", limited.exceeded.as_str(), limited.retry_after)]
    RateLimited {
        principal: String,
        limited: RateLimited,
    },
    #[error("the request is larger than {principal}'s whole {} burst; split it", exceeded.as_str())]
    LargerThanBurst {
        principal: String,
        exceeded: limits::Exceeded,
    },
}

impl AuthError {
    /// The `reason` label of `sluice_auth_refusals_total`, also the ErrorInfo reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Token(_) | Self::NotBearer => "INVALID_TOKEN",
            Self::MissingScope { .. } => "MISSING_SCOPE",
            Self::ServiceDenied { .. } => "SERVICE_DENIED",
            Self::RateLimited { .. } | Self::LargerThanBurst { .. } => "RATE_LIMITED",
        }
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        let message = error.to_string();
        let reason = error.reason();
        match error {
            AuthError::Token(_) | AuthError::NotBearer => {
                let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::Unauthenticated, message, details)
            }
            AuthError::MissingScope { scope, .. } => {
                let metadata = HashMap::from([("scope".to_owned(), scope.as_str().to_owned())]);
                let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
                Status::with_error_details(Code::PermissionDenied, message, details)
            }
            AuthError::ServiceDenied { service, .. } => {
                let metadata = HashMap::from([("service".to_owned(), service)]);
                let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
                Status::with_error_details(Code::PermissionDenied, message, details)
            }
            AuthError::LargerThanBurst { exceeded, .. } => crate::proto::status::bad_request(
                message,
                "events",
                format!("larger than the {} burst", exceeded.as_str()),
            ),
            AuthError::RateLimited { principal, limited } => {
                let mut details = ErrorDetails::new();
                details.set_retry_info(Some(limited.retry_after));
                details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
                details.add_quota_failure_violation(principal, limited.exceeded.as_str());
                crate::proto::status::with_pushback(
                    Status::with_error_details(Code::ResourceExhausted, message, details),
                    limited.retry_after,
                )
            }
        }
    }
}

/// A policy that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("auth.principals: {name:?} is listed twice")]
    Duplicate { name: String },
    #[error("auth.principals: a principal needs a name")]
    Unnamed,
    #[error("auth.principals {name:?}: invalid service glob {glob:?}: {reason}")]
    Glob {
        name: String,
        glob: String,
        reason: String,
    },
    #[error(transparent)]
    Jwt(#[from] JwtConfigError),
}

/// What one principal is granted.
#[derive(Debug)]
struct Grant {
    scopes: BTreeSet<Scope>,
    services: ServiceGlobs,
    limits: Option<Limits>,
}

impl Grant {
    fn everything() -> Self {
        Self {
            scopes: Scope::ALL.into_iter().collect(),
            services: ServiceGlobs::all(),
            limits: None,
        }
    }

    fn from_config(principal: &PrincipalConfig) -> Result<Self, AuthConfigError> {
        Ok(Self {
            scopes: principal.scopes.iter().copied().collect(),
            services: ServiceGlobs::new(&principal.services).map_err(|error| {
                AuthConfigError::Glob {
                    name: principal.name.clone(),
                    glob: error.glob,
                    reason: error.reason,
                }
            })?,
            limits: Limits::from_config(principal),
        })
    }
}

struct Policy {
    /// No principal configured: everyone authenticated may do everything.
    open: bool,
    principals: HashMap<String, Arc<Grant>>,
    /// For an authenticated principal that is not configured.
    default: Arc<Grant>,
    jwt: Option<JwtVerifier>,
}

impl Policy {
    fn build(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let mut principals = HashMap::new();
        for principal in &config.principals {
            if principal.name.is_empty() {
                return Err(AuthConfigError::Unnamed);
            }
            let grant = Arc::new(Grant::from_config(principal)?);
            if principals.insert(principal.name.clone(), grant).is_some() {
                return Err(AuthConfigError::Duplicate {
                    name: principal.name.clone(),
                });
            }
        }
        let open = principals.is_empty();
        let default = if open {
            Grant::everything()
        } else {
            Grant {
                scopes: config.default_scopes.iter().copied().collect(),
                services: ServiceGlobs::all(),
                limits: None,
            }
        };
        Ok(Self {
            open,
            principals,
            default: Arc::new(default),
            jwt: JwtVerifier::from_config(&config.jwt)?,
        })
    }
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Certificate,
    Token,
    /// Plaintext mode: nothing.
    Nothing,
}

/// The authenticated sender of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: String,
    pub credential: Credential,
    pub peer: Option<SocketAddr>,
    scopes: BTreeSet<Scope>,
    grant: Arc<Grant>,
    /// What the bearer token said, for [`Authorizer::refresh`].
    token: Option<jwt::Verified>,
}

impl Caller {
    /// Refuses the call without `scope` (`admin` grants every scope but `pii`).
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.has_scope(scope) {
            return Ok(());
        }
        metrics::auth_refused("MISSING_SCOPE");
        Err(AuthError::MissingScope {
            principal: self.principal.clone(),
            scope,
        })
    }

    /// Whether the caller has `scope` (or `admin`, except for `pii`), without counting a
    /// refusal.
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || (scope != Scope::Pii && self.scopes.contains(&Scope::Admin))
    }

    /// Whether the caller may write and read `service`.
    pub fn may_use(&self, service: &str) -> bool {
        self.grant.services.allows(service)
    }

    /// Refuses a read naming a service the caller may not read.
    pub fn check_services(&self, services: &[String]) -> Result<(), AuthError> {
        match services.iter().find(|service| !self.may_use(service)) {
            Some(service) => {
                metrics::auth_refused("SERVICE_DENIED");
                Err(AuthError::ServiceDenied {
                    principal: self.principal.clone(),
                    service: service.clone(),
                })
            }
            None => Ok(()),
        }
    }

    /// The services the caller may read, as SQL `LIKE` patterns; None for all.
    pub fn service_patterns(&self) -> Option<Vec<String>> {
        self.grant.services.like_patterns()
    }

    /// Takes rate-limit tokens for a request of `events` events and `bytes()` bytes (measured
    /// only when the caller has a limit: it walks the whole request).
    pub fn admit(&self, events: usize, bytes: impl FnOnce() -> usize) -> Result<(), AuthError> {
        let Some(limits) = &self.grant.limits else {
            return Ok(());
        };
        limits.admit(events, bytes()).map_err(|refusal| {
            metrics::rate_limited(&self.principal, refusal.exceeded().as_str());
            match refusal {
                limits::Refusal::Wait(limited) => AuthError::RateLimited {
                    principal: self.principal.clone(),
                    limited,
                },
                limits::Refusal::NeverFits(exceeded) => AuthError::LargerThanBurst {
                    principal: self.principal.clone(),
                    exceeded,
                },
            }
        })
    }
}

/// The policy in force, swapped whole on reload.
pub struct Authorizer {
    policy: ArcSwap<Policy>,
}

impl Authorizer {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let policy = Policy::build(config)?;
        if policy.open {
            tracing::warn!(
                "!!! NO PRINCIPALS CONFIGURED: every client with a valid certificate may ingest, query, export and DELETE any service's data. Configure [[auth.principals]] before real data arrives. !!!"
            );
        }
        Ok(Self {
            policy: ArcSwap::from_pointee(policy),
        })
    }

    /// Replaces the policy (principals, scopes, limits, JWKS) as a whole, or keeps the old one
    /// when the new one cannot be built.
    pub fn reload(&self, config: &AuthConfig) -> Result<(), AuthConfigError> {
        let policy = Policy::build(config)?;
        tracing::info!(
            principals = policy.principals.len(),
            open = policy.open,
            "auth policy reloaded"
        );
        self.policy.store(Arc::new(policy));
        Ok(())
    }

    /// Who sent `request`: a bearer token's `sub` when it carries one, else the verified
    /// client certificate's identity.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, AuthError> {
        let policy = self.policy.load();
        let peer = request.remote_addr();
        if let Some(header) = request.metadata().get("authorization") {
            let token = header
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    metrics::auth_refused("INVALID_TOKEN");
                    AuthError::NotBearer
                })?;
            let verifier = policy.jwt.as_ref().ok_or(TokenError::NotConfigured);
            let verified = verifier
                .and_then(|verifier| verifier.verify(token.trim()))
                .inspect_err(|_| metrics::auth_refused("INVALID_TOKEN"))?;
            let (grant, scopes) = token_grant(&policy, &verified);
            return Ok(Caller {
                principal: verified.subject.clone(),
                credential: Credential::Token,
                peer,
                scopes,
                grant,
                token: Some(verified),
            });
        }
        let certificate_identity = request
            .peer_certs()
            .and_then(|certificates| {
                certificates
                    .first()
                    .map(|der| identity::certificate_identity(der))
            })
            .flatten();
        let (principal, credential) = match certificate_identity {
            Some(name) => (name, Credential::Certificate),
            None => (ANONYMOUS.to_owned(), Credential::Nothing),
        };
        let grant = policy
            .principals
            .get(&principal)
            .cloned()
            .unwrap_or_else(|| policy.default.clone());
        Ok(Caller {
            scopes: grant.scopes.clone(),
            principal,
            credential,
            peer,
            grant,
            token: None,
        })
    }

    /// The same caller under the policy in force now, for long-lived streams: a reload that
    /// changed its scopes, services or limits applies from the next message, and a token that
    /// expired since the stream opened ends it.
    pub fn refresh(&self, caller: &Caller) -> Result<Caller, AuthError> {
        let policy = self.policy.load();
        let (grant, scopes) = match &caller.token {
            Some(verified) => {
                if verified.expired() {
                    metrics::auth_refused("INVALID_TOKEN");
                    return Err(AuthError::Token(TokenError::Expired));
                }
                token_grant(&policy, verified)
            }
            None => {
                let grant = policy
                    .principals
                    .get(&caller.principal)
                    .cloned()
                    .unwrap_or_else(|| policy.default.clone());
                let scopes = grant.scopes.clone();
                (grant, scopes)
            }
        };
        Ok(Caller {
            principal: caller.principal.clone(),
            credential: caller.credential,
            peer: caller.peer,
            scopes,
            grant,
            token: caller.token.clone(),
        })
    }
}

/// A token's grant: a configured `sub` gets its principal's services and limits, with the
/// token's scopes narrowed to the principal's; any other `sub` gets the default grant, with
/// the token's scopes narrowed to `auth.default_scopes` (every scope in the open mode).
fn token_grant(policy: &Policy, verified: &jwt::Verified) -> (Arc<Grant>, BTreeSet<Scope>) {
    let grant = policy
        .principals
        .get(&verified.subject)
        .cloned()
        .unwrap_or_else(|| policy.default.clone());
    let scopes = if policy.open {
        grant.scopes.clone()
    } else {
        verified
            .scopes
            .intersection(&grant.scopes)
            .copied()
            .collect()
    };
    (grant, scopes)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn principal(name: &str, scopes: &[Scope], services: &[&str]) -> PrincipalConfig {
        PrincipalConfig {
            name: name.to_owned(),
            scopes: scopes.to_vec(),
            services: services
                .iter()
                .map(|service| (*service).to_owned())
                .collect(),
            events_per_second: 0,
            burst_events: 0,
            bytes_per_second: 0,
        }
    }

    fn caller(authorizer: &Authorizer) -> Caller {
        authorizer
            .authenticate(&Request::new(()))
            .expect("authenticated")
    }

    #[test]
    fn with_no_principals_everyone_may_do_everything() {
        let authorizer = Authorizer::new(&AuthConfig::default()).expect("policy");
        let anonymous = caller(&authorizer);
        assert_eq!(anonymous.principal, ANONYMOUS);
        for scope in Scope::ALL {
            anonymous.require(scope).expect("open");
        }
        assert!(anonymous.may_use("anything"));
        assert_eq!(anonymous.service_patterns(), None);
    }

    #[test]
    fn once_principals_exist_unknown_ones_get_the_default_scopes() {
        let config = AuthConfig {
            principals: vec![principal("billing", &[Scope::Ingest], &["billing"])],
            default_scopes: vec![Scope::Query],
            ..AuthConfig::default()
        };
        let authorizer = Authorizer::new(&config).expect("policy");
        let unknown = caller(&authorizer);
        unknown.require(Scope::Query).expect("default scope");
        assert!(matches!(
            unknown.require(Scope::Delete),
            Err(AuthError::MissingScope {
                scope: Scope::Delete,
                ..
            })
        ));
    }

    #[test]
    fn duplicate_principals_are_refused() {
        let config = AuthConfig {
            principals: vec![
                principal("a", &[Scope::Ingest], &["*"]),
                principal("a", &[Scope::Query], &["*"]),
            ],
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authorizer::new(&config),
            Err(AuthConfigError::Duplicate { .. })
        ));
    }

    #[test]
    fn rate_limited_is_resource_exhausted_with_quota_failure_retry_info_and_pushback() {
        let status = Status::from(AuthError::RateLimited {
            principal: "billing".to_owned(),
            limited: RateLimited {
                exceeded: limits::Exceeded::EventsPerSecond,
                retry_after: Duration::from_millis(250),
            },
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(
            details.error_info().map(|info| info.reason.as_str()),
            Some("RATE_LIMITED")
        );
        let quota = details.quota_failure().expect("quota failure");
        assert_eq!(quota.violations[0].subject, "billing");
        assert_eq!(quota.violations[0].description, "events_per_second");
        assert_eq!(
            details.retry_info().and_then(|retry| retry.retry_delay),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            status
                .metadata()
                .get(RETRY_PUSHBACK_TRAILER)
                .and_then(|value| value.to_str().ok()),
            Some("250")
        );
    }
}
