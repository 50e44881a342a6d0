//! Compiles the protos with protox (pure Rust), so a fresh machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tether/v1/tether.proto",
        "proto/tether/internal/state.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
