//! Compiles the server's persisted-state proto with protox (no system protoc); the public types
//! it refers to are those `tether-wire` already generated.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/tether/internal/state.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .btree_map(".")
        .extern_path(".tether.v1", "::tether_wire::pb")
        .compile_fds(descriptors)?;
    Ok(())
}
