//! Generates the gRPC server and client from `proto/afnext/v1/afnext.proto` (needs `protoc`: apt
//! `protobuf-compiler`) and the encoded descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = root.join("afnext/v1/afnext.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("afnext_v1_descriptor.bin"))
        .compile_protos(&[proto], &[root])?;
    Ok(())
}
