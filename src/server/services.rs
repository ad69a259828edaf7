//! Phase 3: every gRPC service with its codec limits, behind the one RPC envelope, and the
//! OTLP/HTTP routes over the same OTLP handler.

use std::sync::Arc;

use tonic::{
    codec::CompressionEncoding,
    service::{Routes, RoutesBuilder},
};

use super::{ServerError, background::Background, storage::Storage};
use crate::{
    auth::Authorizer,
    backup::journal::Journal,
    config::Config,
    erasure::{self, Erasure},
    ingest::{IngestHandler, service::IngestDeps},
    lifecycle::RetentionPolicy,
    otlp::{self, OtlpLogsHandler},
    proto::{
        self, ingest_service_server::IngestServiceServer,
        otlp_logs::logs_service_server::LogsServiceServer,
        query_service_server::QueryServiceServer,
    },
    query::{QueryHandler, Reader, Slots},
    rpc::Admission,
};

/// What the listeners serve: the gRPC routes, and OTLP/HTTP's.
pub struct Served {
    pub grpc: Routes,
    pub otlp_http: axum::Router,
}

/// Message size limit and compression (gzip and zstd, both ways) for a generated service. A
/// macro because the generated servers share these methods but no trait.
macro_rules! with_codec_limits {
    ($service:expr, $max_message_bytes:expr) => {
        $service
            .max_decoding_message_size($max_message_bytes)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd)
    };
}

/// The services reflection lists: those served here, not every service of the descriptor
/// sets (OTLP's set also holds the trace, metrics and profiles services, which sluice does not
/// serve).
const ADVERTISED: [&str; 6] = [
    crate::rpc::INGEST_SERVICE,
    crate::rpc::QUERY_SERVICE,
    crate::rpc::OTLP_LOGS_SERVICE,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn reflection() -> tonic_reflection::server::Builder<'static> {
    ADVERTISED.into_iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(opentelemetry_proto::DESCRIPTORS),
        |builder, service| builder.with_service_name(service),
    )
}

pub async fn build(
    config: &Arc<Config>,
    storage: &Storage,
    background: &Background,
    auth: &Arc<Authorizer>,
    retention: &Arc<RetentionPolicy>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Served, ServerError> {
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let admission = Arc::new(Admission::new(
        auth.clone(),
        background.audit.clone(),
        config.role,
    ));
    let ingest = IngestHandler::new(IngestDeps {
        buffer: background.buffer.clone(),
        config: config.clone(),
        counters: background.counters.clone(),
        admission: admission.clone(),
        retention: retention.clone(),
        privacy: storage.privacy.clone(),
        optouts: storage.optouts.clone(),
        shutdown: background.shutdown_token(),
        backlog: storage.broker.as_ref().map(|_| background.backlog.clone()),
    });
    let reader = Arc::new(Reader {
        store: storage.store.clone(),
        config: config.clone(),
        archive: storage.archive.clone(),
        privacy: storage.privacy.clone(),
        counters: background.counters.clone(),
        buffer: background.buffer.clone(),
        breaker: background.breaker.clone(),
        spool: storage.spool.clone(),
        broker: storage.broker.clone(),
        feed: background.feed.clone(),
        shutdown: background.shutdown_token(),
        queries: Slots::new(
            "queries",
            config.reads.max_queries_per_principal,
            usize::MAX,
        ),
        exports: Slots::new(
            "exports",
            config.reads.max_exports_per_principal,
            usize::MAX,
        ),
        tails: Slots::new(
            "tails",
            config.reads.max_tails_per_principal,
            config.reads.max_tails,
        ),
    });
    let erasure = Arc::new(Erasure::new(
        storage.store.clone(),
        config.clone(),
        storage.archive.clone(),
        storage.privacy.clone(),
        storage.optouts.clone(),
        storage.spool.clone(),
        background.buffer.clone(),
        storage.broker.clone(),
        Journal::open(config)?,
    ));
    // A restore leaves the erasures made since its point in time: applied again before any
    // call is served.
    erasure::reapply::pending(&erasure).await?;
    let otlp_logs = OtlpLogsHandler::new(ingest.clone(), &config.otlp.user_id_attributes);
    let otlp_http = otlp::http::router(otlp_logs.clone(), config.otlp.max_request_bytes);
    let query = QueryHandler::new(admission, reader, erasure);
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(with_codec_limits!(
            IngestServiceServer::new(ingest),
            config.grpc.max_message_bytes
        ))
        .add_service(with_codec_limits!(
            QueryServiceServer::new(query),
            config.grpc.max_query_message_bytes
        ))
        .add_service(with_codec_limits!(
            LogsServiceServer::new(otlp_logs),
            config.otlp.max_request_bytes
        ));
    Ok(Served {
        grpc: routes.routes(),
        otlp_http,
    })
}
