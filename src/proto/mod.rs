//! Generated protobuf and gRPC code for `sluice.v1`, and the descriptor set for reflection.
//! `google.protobuf.Struct` fields (event metadata, `metadata_contains`) are a [`Metadata`]:
//! decoded straight into JSON within a size limit, never as a tree of protobuf values.

pub(crate) mod codec;
pub mod metadata;
pub mod otlp;
pub(crate) mod status;
pub mod tail;
pub(crate) mod wire;

pub use metadata::Metadata;
pub use tail::TailResponse;

/// Generated from `proto/` by `cargo run -p sluice-protogen` (checked in, so that building
/// sluice compiles no protobuf compiler; a test fails when it is stale).
#[allow(clippy::all, missing_docs)]
mod generated {
    include!("generated/sluice.v1.rs");
}

pub use generated::*;

/// OTLP's `LogsService` server ([`crate::otlp`]), generated over the opentelemetry-proto
/// crate's messages with sluice's strict codec; its request is kept encoded
/// ([`otlp::EncodedLogsRequest`]), and a malformed one is INVALID_ARGUMENT.
#[allow(clippy::all, missing_docs)]
pub mod otlp_logs {
    include!("generated/opentelemetry.proto.collector.logs.v1.rs");
}

/// The encoded `FileDescriptorSet` of every sluice proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/sluice_descriptor.bin");
