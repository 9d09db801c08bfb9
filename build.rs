//! Generates the `gradguard.v1` protobuf and gRPC code with a vendored protoc,
//! so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("gradguard_descriptor.bin"))
        .compile_with_config(config, &["proto/gradguard/v1/gradguard.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
