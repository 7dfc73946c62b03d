//! Compiles the .proto contract with a vendored protoc, so a fresh machine
//! needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Data payloads are handed around without copies.
    config.bytes([".jvpn.session.v1.Data.payload"]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Messages carrying secrets get hand-written Debug impls that redact them.
        .skip_debug(["jvpn.session.v1.Hello", "jvpn.session.v1.Resume"])
        .compile_with_config(
            config,
            &[
                "proto/session.proto",
                "proto/membership.proto",
                "proto/store.proto",
                "proto/etcd.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
