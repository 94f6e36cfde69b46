//! Compiles the node-attestation proto with a vendored `protoc`, so building needs no system
//! protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto/node_attestation.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &["proto/node_attestation.proto".into()],
            &["proto".into(), include],
        )?;
    Ok(())
}
