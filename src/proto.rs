//! Generated protobuf and gRPC code for `sluice.v1`, and the descriptor set for reflection.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sluice.v1");

/// The encoded `FileDescriptorSet` of every sluice proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
