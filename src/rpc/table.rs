//! The typed list of sluice's RPCs: each one's name, service, scope, whether it changes
//! anything, and how its audit row is written. Everything that differs between RPCs in the
//! envelope is read from here, never from a match on a name.

use crate::config::Scope;

/// Every sluice RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    Ingest,
    Publish,
    IngestStream,
    Query,
    Export,
    Delete,
    Stats,
    Audit,
    Restore,
    OptOut,
    OptIn,
    Anonymize,
    Tail,
    /// OTLP's `LogsService/Export` ([`crate::otlp`]).
    OtlpLogs,
}

/// How a call's audit row is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audited {
    /// Only refusals, grouped and written once a minute: ingest calls read nothing, and a row
    /// per call would double the database's work.
    RefusalsOnly,
    /// A read of events or of the log: the row commits without waiting for its WAL flush
    /// (`synchronous_commit = off`), so a stalled flush never lands in the answer.
    Read,
    /// A change: the row is durable before the answer.
    Durable,
}

/// The generated services' names.
pub const INGEST_SERVICE: &str = "sluice.v1.IngestService";
pub const QUERY_SERVICE: &str = "sluice.v1.QueryService";
pub const OTLP_LOGS_SERVICE: &str = "opentelemetry.proto.collector.logs.v1.LogsService";

impl Rpc {
    pub const ALL: [Rpc; 14] = [
        Rpc::Ingest,
        Rpc::Publish,
        Rpc::IngestStream,
        Rpc::Query,
        Rpc::Export,
        Rpc::Delete,
        Rpc::Stats,
        Rpc::Audit,
        Rpc::Restore,
        Rpc::OptOut,
        Rpc::OptIn,
        Rpc::Anonymize,
        Rpc::Tail,
        Rpc::OtlpLogs,
    ];

    /// The call's name, as the audit log and `sluice_rpc_duration_seconds` say it: the
    /// method's, except OTLP's `Export`, which is `OtlpLogs` (Query's `Export` is another).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingest => "Ingest",
            Self::Publish => "Publish",
            Self::IngestStream => "IngestStream",
            Self::Query => "Query",
            Self::Export => "Export",
            Self::Delete => "Delete",
            Self::Stats => "Stats",
            Self::Audit => "Audit",
            Self::Restore => "Restore",
            Self::OptOut => "OptOut",
            Self::OptIn => "OptIn",
            Self::Anonymize => "Anonymize",
            Self::Tail => "Tail",
            Self::OtlpLogs => "OtlpLogs",
        }
    }

    /// The method's name in its proto.
    pub const fn method(self) -> &'static str {
        match self {
            Self::OtlpLogs => "Export",
            other => other.name(),
        }
    }

    /// The gRPC service that serves it.
    pub const fn service(self) -> &'static str {
        match self {
            Self::Ingest | Self::Publish | Self::IngestStream => INGEST_SERVICE,
            Self::OtlpLogs => OTLP_LOGS_SERVICE,
            _ => QUERY_SERVICE,
        }
    }

    /// The scope a caller needs.
    pub const fn scope(self) -> Scope {
        match self {
            Self::Ingest | Self::Publish | Self::IngestStream | Self::OtlpLogs => Scope::Ingest,
            Self::Query | Self::Stats | Self::Tail => Scope::Query,
            Self::Export => Scope::Export,
            Self::Delete | Self::OptOut | Self::OptIn | Self::Anonymize => Scope::Delete,
            Self::Audit | Self::Restore => Scope::Admin,
        }
    }

    /// Whether a call changes stored data (or the opt-out list). Reads change nothing.
    pub const fn writes(self) -> bool {
        matches!(
            self,
            Self::Ingest
                | Self::Publish
                | Self::IngestStream
                | Self::OtlpLogs
                | Self::Delete
                | Self::Restore
                | Self::OptOut
                | Self::OptIn
                | Self::Anonymize
        )
    }

    /// Whether it takes events in: served only by nodes whose role ingests.
    pub const fn ingests(self) -> bool {
        matches!(
            self,
            Self::Ingest | Self::Publish | Self::IngestStream | Self::OtlpLogs
        )
    }

    /// Whether it answers with events (personal data): its audit row must be written before
    /// it answers, or it is refused.
    pub const fn reads_personal_data(self) -> bool {
        matches!(self, Self::Query | Self::Export | Self::Tail)
    }

    /// How its audit row is written.
    pub const fn audited(self) -> Audited {
        match self {
            Self::Ingest | Self::Publish | Self::IngestStream | Self::OtlpLogs => {
                Audited::RefusalsOnly
            }
            Self::Query | Self::Export | Self::Stats | Self::Audit | Self::Tail => Audited::Read,
            Self::Delete | Self::Restore | Self::OptOut | Self::OptIn | Self::Anonymize => {
                Audited::Durable
            }
        }
    }

    /// The RPC of a request path (`/sluice.v1.QueryService/Query`); None for other services
    /// (health, reflection) and unknown methods.
    pub fn from_path(path: &str) -> Option<Rpc> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        Self::ALL
            .into_iter()
            .find(|rpc| rpc.service() == service && rpc.method() == method)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// `/package.Service/Method` of every method of the services in `descriptors` whose
    /// names `keep` accepts.
    fn method_paths(descriptors: &[u8], keep: impl Fn(&str) -> bool) -> Vec<String> {
        let descriptors =
            prost_types::FileDescriptorSet::decode(descriptors).expect("descriptor set");
        let mut methods = Vec::new();
        for file in descriptors.file {
            let package = file.package.clone().unwrap_or_default();
            for service in &file.service {
                let service_name = format!("{package}.{}", service.name());
                if !keep(&service_name) {
                    continue;
                }
                for method in &service.method {
                    methods.push(format!("/{service_name}/{}", method.name()));
                }
            }
        }
        methods
    }

    #[test]
    fn every_method_served_is_in_the_table_once_and_found_by_its_path() {
        let mut methods = method_paths(crate::proto::FILE_DESCRIPTOR_SET, |_| true);
        methods.extend(method_paths(opentelemetry_proto::DESCRIPTORS, |service| {
            service == OTLP_LOGS_SERVICE
        }));
        assert_eq!(methods.len(), Rpc::ALL.len(), "{methods:?}");
        for path in &methods {
            let rpc = Rpc::from_path(path).unwrap_or_else(|| panic!("{path} is not in the table"));
            assert_eq!(format!("/{}/{}", rpc.service(), rpc.method()), *path);
        }
        let names: std::collections::HashSet<_> = Rpc::ALL.iter().map(|rpc| rpc.name()).collect();
        assert_eq!(
            names.len(),
            Rpc::ALL.len(),
            "every call has a name of its own"
        );
        assert_eq!(Rpc::from_path("/grpc.health.v1.Health/Check"), None);
        assert_eq!(Rpc::from_path("/sluice.v1.QueryService/Nope"), None);
        assert_eq!(
            Rpc::from_path("/opentelemetry.proto.collector.trace.v1.TraceService/Export"),
            None
        );
        assert_eq!(Rpc::from_path("nonsense"), None);
    }

    #[test]
    fn reads_are_audited_without_waiting_and_changes_durably() {
        for rpc in Rpc::ALL {
            match rpc.audited() {
                Audited::Read => assert!(!rpc.writes(), "{rpc:?}"),
                Audited::Durable => assert!(rpc.writes() && !rpc.ingests(), "{rpc:?}"),
                Audited::RefusalsOnly => assert!(rpc.ingests(), "{rpc:?}"),
            }
        }
    }

    #[test]
    fn scopes_follow_what_a_call_touches() {
        assert_eq!(Rpc::Publish.scope(), Scope::Ingest);
        assert_eq!(Rpc::Tail.scope(), Scope::Query);
        assert_eq!(Rpc::Anonymize.scope(), Scope::Delete);
        assert_eq!(Rpc::Restore.scope(), Scope::Admin);
        assert!(Rpc::ALL.iter().all(|rpc| rpc.scope() != Scope::Pii));
    }
}
