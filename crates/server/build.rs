//! Generates the gRPC servers and clients from `proto/afnext/v1/afnext.proto` (public) and
//! `proto/afnext/cluster/v1/cluster.proto` (between tiers) (needs `protoc`: apt `protobuf-compiler`), and the
//! encoded descriptor set of the public API that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let public = root.join("afnext/v1/afnext.proto");
    let cluster = root.join("afnext/cluster/v1/cluster.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", public.display());
    println!("cargo:rerun-if-changed={}", cluster.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("afnext_v1_descriptor.bin"))
        .compile_protos(&[public], std::slice::from_ref(&root))?;
    // Its own directory, so that the public API's generated file is not overwritten.
    let cluster_out = out.join("cluster");
    std::fs::create_dir_all(&cluster_out)?;
    tonic_prost_build::configure()
        .out_dir(&cluster_out)
        .extern_path(".afnext.v1", "crate::pb")
        .compile_protos(&[cluster], &[root])?;
    Ok(())
}
