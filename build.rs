//! Compile `proto/csi.proto` with a vendored protoc: nothing is downloaded
//! at build time, and a system protoc is used when `PROTOC` points at one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the
        // environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_protos(
        &[std::path::PathBuf::from("proto/csi.proto")],
        &[std::path::PathBuf::from("proto"), include],
    )?;
    Ok(())
}
