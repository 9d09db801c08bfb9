//! Generates the `gradguard.v1` protobuf and gRPC code with a vendored protoc,
//! so no system protoc is needed.
//!
//! `gradguard serve` answers `gradguard.v1.Ingest` with a second, hand-declared
//! server for the same route (`gradguard.v1.Ingest/Stream`): it takes each
//! worker message still encoded, so a stream can decode every summary into the
//! vectors of the one before (see `proto::frames`). The wire contract is the
//! proto's; only the server-side Rust types differ.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("gradguard_descriptor.bin"))
        .compile_with_config(config, &["proto/gradguard/v1/gradguard.proto"], &["proto"])?;

    let ingest_frames = tonic_build::manual::Service::builder()
        .name("Ingest")
        .package("gradguard.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("stream")
                .route_name("Stream")
                .input_type("crate::proto::frames::Frame")
                .output_type("crate::proto::ServerMessage")
                .codec_path("crate::proto::frames::FrameCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[ingest_frames]);
    println!("cargo:rerun-if-changed=proto");
    revision();
    Ok(())
}

/// Sets `GRADGUARD_REVISION` for `gradguard_build_info`: the environment's
/// (a container build without `.git` passes it), else the checkout's commit
/// (with `-dirty` when it has uncommitted changes to tracked files), else
/// `unknown`. Rebuilt when the commit moves.
fn revision() {
    println!("cargo:rerun-if-env-changed=GRADGUARD_REVISION");
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let revision = std::env::var("GRADGUARD_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
            // The files that change when HEAD moves: HEAD, the branch it is on, packed refs.
            let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])?];
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watched.extend(git(&["rev-parse", "--git-path", &branch]));
            }
            watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]));
            for path in watched {
                println!("cargo:rerun-if-changed={path}");
            }
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
            Some(if dirty { format!("{commit}-dirty") } else { commit })
        });
    println!(
        "cargo:rustc-env=GRADGUARD_REVISION={}",
        revision.unwrap_or_else(|| "unknown".to_owned())
    );
}
