//! Regenerates `src/proto/generated/` from `proto/`: the gRPC services and messages of
//! `sluice.v1` (with the descriptor set that server reflection serves) and the spool's record
//! format, compiled apart because it is not an API. protox parses the protos, so no system
//! `protoc` is needed. Run it after editing a proto:
//!
//! ```sh
//! cargo run -p sluice-protogen
//! ```
//!
//! The generated files are checked in so that building sluice compiles no protobuf compiler;
//! `scripts/test` runs this crate's test, which fails when they are stale.

use std::{
    error::Error,
    fs,
    path::{Path, PathBuf},
};

use prost::Message;

/// The sluice checkout this tool belongs to.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The checked-in output.
fn generated_dir() -> PathBuf {
    root().join("src/proto/generated")
}

/// Writes every generated file of `root`'s protos into `out`.
fn generate(root: &Path, out: &Path) -> Result<(), Box<dyn Error>> {
    let include = root.join("proto");
    let protos = [
        include.join("sluice/v1/ingest.proto"),
        include.join("sluice/v1/query.proto"),
    ];
    let file_descriptors = protox::compile(protos, [&include])?;
    fs::create_dir_all(out)?;
    fs::write(
        out.join("sluice_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .out_dir(out)
        .build_client(true)
        .build_server(true)
        // Malformed requests are INVALID_ARGUMENT (the client's fault), not INTERNAL.
        .codec_path("crate::proto::codec::StrictProstCodec")
        // Struct fields decode straight into JSON within a limit (no tree of Values).
        .extern_path(
            ".google.protobuf.Struct",
            "crate::proto::metadata::Metadata",
        )
        // Written by hand so that Tail can send events encoded once for all subscribers.
        .extern_path(
            ".sluice.v1.TailResponse",
            "crate::proto::tail::TailResponse",
        )
        .compile_fds(file_descriptors)?;
    // OTLP's LogsService: only the server, over the opentelemetry-proto crate's messages,
    // with the same strict codec (a malformed export is INVALID_ARGUMENT, as OTLP asks).
    tonic_prost_build::configure()
        .out_dir(out)
        .build_client(false)
        .build_server(true)
        .codec_path("crate::proto::codec::StrictProstCodec")
        // The request stays encoded: the records are mapped from its bytes in place.
        .extern_path(
            ".opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest",
            "crate::proto::otlp::EncodedLogsRequest",
        )
        .extern_path(".opentelemetry.proto", "::opentelemetry_proto::tonic")
        .compile_fds(otlp_logs_descriptors()?)?;
    let spool_descriptors =
        protox::compile([include.join("sluice/spool/v1/spool.proto")], [&include])?;
    tonic_prost_build::configure()
        .out_dir(out)
        .build_client(false)
        .build_server(false)
        .compile_fds(spool_descriptors)?;
    Ok(())
}

/// The files of OTLP's logs service and what they import, from the descriptors the
/// opentelemetry-proto crate ships (the protos sluice's messages are generated from).
fn otlp_logs_descriptors() -> Result<prost_types::FileDescriptorSet, Box<dyn Error>> {
    const FILES: [&str; 4] = [
        "opentelemetry/proto/common/v1/common.proto",
        "opentelemetry/proto/resource/v1/resource.proto",
        "opentelemetry/proto/logs/v1/logs.proto",
        "opentelemetry/proto/collector/logs/v1/logs_service.proto",
    ];
    let all = prost_types::FileDescriptorSet::decode(opentelemetry_proto::DESCRIPTORS)?;
    let file = FILES
        .iter()
        .map(|name| {
            all.file
                .iter()
                .find(|file| file.name() == *name)
                .cloned()
                .ok_or_else(|| format!("{name} is not in opentelemetry-proto's descriptors"))
        })
        .collect::<Result<_, _>>()?;
    Ok(prost_types::FileDescriptorSet { file })
}

fn main() -> Result<(), Box<dyn Error>> {
    let out = generated_dir();
    generate(&root(), &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_code_is_what_the_protos_generate() {
        let fresh = tempfile::tempdir().expect("tempdir");
        generate(&root(), fresh.path()).expect("generate");
        let mut names: Vec<_> = fs::read_dir(fresh.path())
            .expect("read")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        names.sort();
        let mut checked_in: Vec<_> = fs::read_dir(generated_dir())
            .expect("src/proto/generated")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        checked_in.sort();
        assert_eq!(names, checked_in, "the generated files");
        for name in names {
            let expected = fs::read(fresh.path().join(&name)).expect("fresh");
            let actual = fs::read(generated_dir().join(&name)).expect("checked in");
            assert!(
                expected == actual,
                "src/proto/generated/{} is stale: run `cargo run -p sluice-protogen`",
                name.to_string_lossy()
            );
        }
    }
}
