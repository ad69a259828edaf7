//! The admission step every handler goes through: authenticate, check the RPC's scope and the
//! services the request names, audit a refusal, and name the principal in the RPC's span.
//! After the call, [`Admission::audited`] writes its audit row the way its RPC says.

use std::{net::SocketAddr, sync::Arc};

use serde_json::Value as Json;
use tonic::{Code, Request, Status};

use super::{Audited, Rpc};
use crate::{
    audit::{self, Audit, Entry, NotRecorded},
    auth::{AuthError, Authorizer, Caller},
    config::Role,
};

/// The principal audit rows name when the caller could not be authenticated.
pub const UNKNOWN_PRINCIPAL: &str = "(unknown)";

/// One admitted call: the RPC, who sent it, and what its audit row names.
#[derive(Debug, Clone)]
pub struct Call {
    pub rpc: Rpc,
    pub caller: Caller,
    pub peer: Option<SocketAddr>,
    pub request_id: String,
    /// Earlier attempts of this call that its client reports (`grpc-previous-rpc-attempts`,
    /// gRFC A6): 0 for a first attempt, or when the client says nothing.
    pub previous_attempts: u32,
}

/// The envelope's shared state: the policy, the audit log, and what this node serves.
pub struct Admission {
    auth: Arc<Authorizer>,
    audit: Arc<Audit>,
    role: Role,
}

impl Admission {
    pub fn new(auth: Arc<Authorizer>, audit: Arc<Audit>, role: Role) -> Self {
        Self { auth, audit, role }
    }

    /// Admits `request` to `rpc`, or refuses it (audited, grouped with its like) unless its
    /// sender is authenticated, has the RPC's scope and may use every service in `services`.
    pub fn admit<T>(
        &self,
        request: &Request<T>,
        rpc: Rpc,
        services: &[String],
    ) -> Result<Call, Status> {
        if rpc.ingests() && !self.role.ingests() {
            return Err(Status::unavailable(
                "this node only writes (role = writer): send events to an ingest node",
            ));
        }
        let peer = request.remote_addr();
        let caller = match self.auth.authenticate(request) {
            Ok(caller) => caller,
            Err(error) => return Err(self.refuse(UNKNOWN_PRINCIPAL, rpc, peer, error)),
        };
        tracing::Span::current().record("principal", caller.principal.as_str());
        let allowed = caller
            .require(rpc.scope())
            .and_then(|()| caller.check_services(services));
        if let Err(error) = allowed {
            return Err(self.refuse(&caller.principal, rpc, peer, error));
        }
        Ok(Call {
            rpc,
            caller,
            peer,
            request_id: audit::request_id(request.metadata()),
            previous_attempts: previous_attempts(request.metadata()),
        })
    }

    fn refuse(
        &self,
        principal: &str,
        rpc: Rpc,
        peer: Option<SocketAddr>,
        error: AuthError,
    ) -> Status {
        let status = Status::from(error);
        self.audit.refused(principal, rpc.name(), peer, &status);
        status
    }

    /// The caller of a long-lived stream under the policy in force now, still allowed its
    /// RPC: a reload that took a scope away, or a token that expired, ends the stream.
    pub fn refresh(&self, call: &Call) -> Result<Caller, AuthError> {
        let caller = self.auth.refresh(&call.caller)?;
        caller.require(call.rpc.scope())?;
        Ok(caller)
    }

    /// Writes the audit row of an admitted call with `details`, and passes its result on. A
    /// read of personal data whose row cannot be written fails closed: UNAVAILABLE, with
    /// RetryInfo, and nothing of what it read.
    pub async fn audited<T, E: Into<Status>>(
        &self,
        call: &Call,
        details: Json,
        result: Result<T, E>,
    ) -> Result<T, Status> {
        match result {
            Ok(value) => match self.record(call, details, Code::Ok).await {
                Err(not_recorded) if call.rpc.reads_personal_data() => Err(not_recorded.into()),
                _ => Ok(value),
            },
            Err(error) => Err(self.refused(call, details, error).await),
        }
    }

    /// Writes the audit row of an admitted call refused with `error`; gives its status.
    pub async fn refused(&self, call: &Call, details: Json, error: impl Into<Status>) -> Status {
        let status = error.into();
        // A refusal reads nothing: it stands whether or not its row was written.
        let _ = self.record(call, details, status.code()).await;
        status
    }

    /// The audit row of `call` ended with `code`. A token that rides on a client certificate
    /// names the principal; the row keeps the certificate's identity beside it.
    pub fn entry(&self, call: &Call, mut details: Json, code: Code) -> Entry {
        if let (Some(certificate), Json::Object(object)) = (&call.caller.certificate, &mut details)
        {
            object.insert("certificate".to_owned(), Json::String(certificate.clone()));
        }
        Entry::new(
            &call.caller.principal,
            call.rpc.name(),
            code,
            call.peer,
            &call.request_id,
            details,
        )
    }

    async fn record(&self, call: &Call, details: Json, code: Code) -> Result<(), NotRecorded> {
        let entry = self.entry(call, details, code);
        match call.rpc.audited() {
            Audited::RefusalsOnly => Ok(()),
            Audited::Read => self.audit.record_read(entry).await,
            Audited::Durable => {
                self.audit.record(entry).await;
                Ok(())
            }
        }
    }

    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }

    pub fn authorizer(&self) -> &Arc<Authorizer> {
        &self.auth
    }
}

/// The header a retrying gRPC client sets on every attempt after the first (gRFC A6).
const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// How many attempts of this call came before, as its client reports them; 0 when absent or
/// malformed.
fn previous_attempts(metadata: &tonic::metadata::MetadataMap) -> u32 {
    metadata
        .get(PREVIOUS_ATTEMPTS)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_attempts_are_read_from_the_retry_header_and_default_to_none() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(previous_attempts(&metadata), 0);
        metadata.insert(PREVIOUS_ATTEMPTS, "3".parse().expect("ascii"));
        assert_eq!(previous_attempts(&metadata), 3);
        metadata.insert(PREVIOUS_ATTEMPTS, "many".parse().expect("ascii"));
        assert_eq!(previous_attempts(&metadata), 0);
    }
}
