//! Generates the liandan/v1 gRPC code with a vendored `protoc` (no system protoc needed) and
//! writes the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY (of the environment): build scripts run single-threaded before any other code.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("liandan_v1_descriptor.bin")).compile_protos(&["liandan/v1/liandan.proto"], &["."])?;
    println!("cargo:rerun-if-changed=liandan/v1/liandan.proto");
    Ok(())
}
