//! Compiles `proto/` with protox (no system `protoc` needed) and writes the descriptor set that
//! server reflection serves. The spool's record format is compiled apart: it is not an API.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sluice/v1/ingest.proto",
        "proto/sluice/v1/query.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("sluice_descriptor.bin");
    fs::write(&descriptor_path, file_descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Malformed requests are INVALID_ARGUMENT (the client's fault), not INTERNAL.
        .codec_path("crate::proto::codec::StrictProstCodec")
        // Struct fields decode straight into JSON within a limit (no tree of Values).
        .extern_path(
            ".google.protobuf.Struct",
            "crate::proto::metadata::Metadata",
        )
        .compile_fds(file_descriptors)?;
    let spool_descriptors = protox::compile(["proto/sluice/spool/v1/spool.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(spool_descriptors)?;
    Ok(())
}
