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
        .compile_fds(file_descriptors)?;
    let spool_descriptors =
        protox::compile([include.join("sluice/spool/v1/spool.proto")], [&include])?;
    tonic_prost_build::configure()
        .out_dir(out)
        .build_client(false)
        .build_server(false)
        .compile_fds(spool_descriptors)?;
    Ok(())
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
