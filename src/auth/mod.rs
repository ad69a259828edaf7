//! Who may do what. Every RPC but health and reflection starts by turning the request into a
//! [`Caller`]: a principal (a bearer JWT's `sub`, else the verified client certificate's
//! identity), its scopes, the services it may write and read, and its rate limits.
//!
//! Certificate identities and token subjects are two namespaces: a principal is configured
//! for one of them (`kind`), and a name of the other never claims it. Names in parentheses
//! are reserved for the server's own audit rows, from either. With no principals configured
//! (the zero-config first run) every authenticated client has every scope on every service.
//! Once any principal is configured, an unknown one gets the default grant (`auth.default_*`:
//! scopes, services, and rate limits of its own). The policy reloads on SIGHUP
//! ([`Authorizer::reload`]).

pub mod identity;
pub mod jwt;
pub mod limits;

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use arc_swap::ArcSwap;
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    config::{AuthConfig, PrincipalConfig, PrincipalKind, Scope},
    glob::ServiceGlobs,
    metrics,
    proto::status::ERROR_DOMAIN,
};
use jwt::{JwtConfigError, JwtVerifier, TokenError};
use limits::{Limits, RateLimited, Rates};

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
    #[error("the client certificate names a reserved identity")]
    ReservedIdentity,
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
    /// Every [`Self::reason`].
    pub const REASONS: [&'static str; 5] = [
        "INVALID_TOKEN",
        "RESERVED_IDENTITY",
        "MISSING_SCOPE",
        "SERVICE_DENIED",
        "RATE_LIMITED",
    ];

    /// The `reason` label of `sluice_auth_refusals_total`, also the ErrorInfo reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Token(_) | Self::NotBearer => "INVALID_TOKEN",
            Self::ReservedIdentity => "RESERVED_IDENTITY",
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
            AuthError::Token(_) | AuthError::NotBearer | AuthError::ReservedIdentity => {
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
    #[error("auth.principals: {name:?} is reserved (names in parentheses are the server's own)")]
    Reserved { name: String },
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

/// Whether a name is reserved for the server's own audit rows (`(operator)`, `(unknown)`).
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('(')
}

/// Unknown principals that get rate limiters of their own; past it, the rest share one (a
/// client cannot grow the map without bound by inventing identities).
const MAX_DEFAULT_LIMITERS: usize = 4_096;

/// How a grant limits the rate of its principals.
#[derive(Debug)]
enum GrantLimits {
    None,
    /// A configured principal's own limiters.
    Own(Limits),
    /// The default grant: each unknown principal its own limiters of these rates.
    Each {
        rates: Rates,
        limiters: Mutex<HashMap<String, Arc<Limits>>>,
        shared: Option<Arc<Limits>>,
    },
}

impl GrantLimits {
    fn each(rates: Rates) -> Self {
        match Limits::new(rates) {
            None => Self::None,
            Some(shared) => Self::Each {
                rates,
                limiters: Mutex::default(),
                shared: Some(Arc::new(shared)),
            },
        }
    }

    fn admit(&self, principal: &str, events: usize, bytes: usize) -> Result<(), limits::Refusal> {
        match self {
            Self::None => Ok(()),
            Self::Own(limits) => limits.admit(events, bytes),
            Self::Each {
                rates,
                limiters,
                shared,
            } => {
                let limits = {
                    let mut limiters = limiters.lock().unwrap_or_else(PoisonError::into_inner);
                    match limiters.get(principal) {
                        Some(limits) => Some(limits.clone()),
                        None if limiters.len() < MAX_DEFAULT_LIMITERS => {
                            let limits = Limits::new(*rates).map(Arc::new);
                            if let Some(limits) = &limits {
                                limiters.insert(principal.to_owned(), limits.clone());
                            }
                            limits
                        }
                        None => shared.clone(),
                    }
                };
                limits.map_or(Ok(()), |limits| limits.admit(events, bytes))
            }
        }
    }

    fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// The `principal` label of `sluice_rate_limited_total`: a configured principal's name,
    /// or `(default)` for every principal under the default grant (bounded: any client may
    /// name itself anything).
    fn label<'a>(&self, principal: &'a str) -> &'a str {
        match self {
            Self::Each { .. } => DEFAULT_GRANT_LABEL,
            Self::None | Self::Own(_) => principal,
        }
    }
}

/// What one principal is granted.
#[derive(Debug)]
struct Grant {
    scopes: BTreeSet<Scope>,
    services: ServiceGlobs,
    limits: GrantLimits,
    /// Its weight in the buffer's fair share.
    weight: u32,
}

impl Grant {
    fn everything() -> Self {
        Self {
            scopes: Scope::ALL.into_iter().collect(),
            services: ServiceGlobs::all(),
            limits: GrantLimits::None,
            weight: 1,
        }
    }

    fn from_config(principal: &PrincipalConfig) -> Result<Self, AuthConfigError> {
        Ok(Self {
            scopes: principal.scopes.iter().copied().collect(),
            services: services(&principal.name, &principal.services)?,
            limits: Limits::new(Rates {
                events_per_second: principal.events_per_second,
                burst_events: principal.burst_events,
                bytes_per_second: principal.bytes_per_second,
            })
            .map_or(GrantLimits::None, GrantLimits::Own),
            weight: principal.weight,
        })
    }

    /// The grant of an authenticated principal that is not configured.
    fn default_for(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        Ok(Self {
            scopes: config.default_scopes.iter().copied().collect(),
            services: services("(default)", &config.default_services)?,
            limits: GrantLimits::each(Rates {
                events_per_second: config.default_events_per_second,
                burst_events: config.default_burst_events,
                bytes_per_second: config.default_bytes_per_second,
            }),
            weight: config.default_weight,
        })
    }
}

fn services(name: &str, globs: &[String]) -> Result<ServiceGlobs, AuthConfigError> {
    ServiceGlobs::new(globs).map_err(|error| AuthConfigError::Glob {
        name: name.to_owned(),
        glob: error.glob,
        reason: error.reason,
    })
}

struct Policy {
    /// No principal configured: everyone authenticated may do everything.
    open: bool,
    /// Configured principals, by the kind of credential that names them.
    principals: HashMap<(PrincipalKind, String), Arc<Grant>>,
    /// For an authenticated principal that is not configured.
    default: Arc<Grant>,
    jwt: Option<JwtVerifier>,
}

impl Policy {
    fn build(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let mut principals = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for principal in &config.principals {
            if principal.name.is_empty() {
                return Err(AuthConfigError::Unnamed);
            }
            if is_reserved(&principal.name) {
                return Err(AuthConfigError::Reserved {
                    name: principal.name.clone(),
                });
            }
            // One name, one principal: an audit row names it without saying its kind.
            if !names.insert(principal.name.clone()) {
                return Err(AuthConfigError::Duplicate {
                    name: principal.name.clone(),
                });
            }
            let grant = Arc::new(Grant::from_config(principal)?);
            principals.insert((principal.kind, principal.name.clone()), grant);
        }
        let open = principals.is_empty();
        let default = if open {
            Grant::everything()
        } else {
            Grant::default_for(config)?
        };
        Ok(Self {
            open,
            principals,
            default: Arc::new(default),
            jwt: JwtVerifier::from_config(&config.jwt)?,
        })
    }

    /// The grant of `name`, named by a credential of `kind`.
    fn grant(&self, kind: PrincipalKind, name: &str) -> Arc<Grant> {
        self.principals
            .get(&(kind, name.to_owned()))
            .cloned()
            .unwrap_or_else(|| self.default.clone())
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
    /// The client certificate's identity when a token rides on it (the audit row names both).
    pub certificate: Option<String>,
    pub peer: Option<SocketAddr>,
    scopes: BTreeSet<Scope>,
    grant: Arc<Grant>,
    /// What the bearer token said, for [`Authorizer::refresh`].
    token: Option<jwt::Verified>,
}

impl Caller {
    /// Who holds the room this caller's events take in the buffer, with its weight.
    pub fn holder(&self) -> crate::buffer::Holder {
        crate::buffer::Holder::new(&self.principal, self.grant.weight)
    }

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

    /// The globs of the services the caller may use; None for all.
    pub fn service_globs(&self) -> Option<Vec<String>> {
        self.grant.services.globs().map(<[String]>::to_vec)
    }

    /// The services the caller may read, as SQL `LIKE` patterns; None for all.
    pub fn service_patterns(&self) -> Option<Vec<String>> {
        self.grant.services.like_patterns()
    }

    /// Takes rate-limit tokens for a request of `events` events and `bytes()` bytes (measured
    /// only when the caller has a limit: it walks the whole request).
    pub fn admit(&self, events: usize, bytes: impl FnOnce() -> usize) -> Result<(), AuthError> {
        if self.grant.limits.is_none() {
            return Ok(());
        }
        let admitted = self.grant.limits.admit(&self.principal, events, bytes());
        admitted.map_err(|refusal| {
            let label = self.grant.limits.label(&self.principal);
            metrics::rate_limited(label, refusal.exceeded().as_str());
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

/// The label of the principals under the default grant in `sluice_rate_limited_total`.
const DEFAULT_GRANT_LABEL: &str = "(default)";

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

    /// The `principal` labels `sluice_rate_limited_total` may take: the configured principals
    /// with a limit, and `(default)` when the default grant has one.
    pub fn limited_principals(&self) -> Vec<String> {
        let policy = self.policy.load();
        let mut labels: Vec<String> = policy
            .principals
            .iter()
            .filter(|(_, grant)| !grant.limits.is_none())
            .map(|((_, name), _)| name.clone())
            .collect();
        if !policy.default.limits.is_none() {
            labels.push(DEFAULT_GRANT_LABEL.to_owned());
        }
        labels.sort();
        labels
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
                certificate: certificate_identity(request),
                peer,
                scopes,
                grant,
                token: Some(verified),
            });
        }
        let (principal, credential) = match certificate_identity(request) {
            Some(name) if is_reserved(&name) => {
                metrics::auth_refused("RESERVED_IDENTITY");
                return Err(AuthError::ReservedIdentity);
            }
            Some(name) => (name, Credential::Certificate),
            None => (ANONYMOUS.to_owned(), Credential::Nothing),
        };
        let grant = policy.grant(PrincipalKind::Certificate, &principal);
        Ok(Caller {
            scopes: grant.scopes.clone(),
            principal,
            credential,
            certificate: None,
            peer,
            grant,
            token: None,
        })
    }

    /// How long the JWKS keys in hand have gone without a good read of their file (zero when
    /// fine); None without bearer tokens.
    pub fn jwks_stale(&self) -> Option<std::time::Duration> {
        self.policy.load().jwt.as_ref().map(JwtVerifier::check)
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
                let grant = policy.grant(PrincipalKind::Certificate, &caller.principal);
                let scopes = grant.scopes.clone();
                (grant, scopes)
            }
        };
        Ok(Caller {
            principal: caller.principal.clone(),
            credential: caller.credential,
            certificate: caller.certificate.clone(),
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
    let grant = policy.grant(PrincipalKind::Token, &verified.subject);
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

/// The verified client certificate's identity, when the connection has one.
fn certificate_identity<T>(request: &Request<T>) -> Option<String> {
    request
        .peer_certs()
        .and_then(|certificates| {
            certificates
                .first()
                .map(|der| identity::certificate_identity(der))
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn principal(name: &str, scopes: &[Scope], services: &[&str]) -> PrincipalConfig {
        PrincipalConfig {
            name: name.to_owned(),
            kind: PrincipalKind::Certificate,
            scopes: scopes.to_vec(),
            services: services
                .iter()
                .map(|service| (*service).to_owned())
                .collect(),
            events_per_second: 0,
            burst_events: 0,
            bytes_per_second: 0,
            weight: 1,
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
    fn reserved_names_and_a_name_of_both_kinds_are_refused() {
        let reserved = AuthConfig {
            principals: vec![principal("(operator)", &[Scope::Admin], &["*"])],
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authorizer::new(&reserved),
            Err(AuthConfigError::Reserved { .. })
        ));
        let mut token = principal("ops", &[Scope::Query], &["*"]);
        token.kind = PrincipalKind::Token;
        let both = AuthConfig {
            principals: vec![principal("ops", &[Scope::Admin], &["*"]), token],
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authorizer::new(&both),
            Err(AuthConfigError::Duplicate { .. })
        ));
    }

    #[test]
    fn each_unknown_principal_has_rate_limits_of_its_own() {
        let config = AuthConfig {
            principals: vec![principal("billing", &[Scope::Ingest], &["billing"])],
            default_scopes: vec![Scope::Ingest],
            default_events_per_second: 10,
            default_burst_events: 10,
            ..AuthConfig::default()
        };
        let policy = Policy::build(&config).expect("policy");
        let grant = &policy.default;
        grant.limits.admit("a", 10, 0).expect("a's burst");
        assert!(grant.limits.admit("a", 1, 0).is_err(), "a is over its own");
        grant
            .limits
            .admit("b", 10, 0)
            .expect("b has a burst of its own");
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
