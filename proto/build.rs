//! Compiles the wire-compatible protos with `protox` (a protobuf compiler in Rust), so that
//! building needs no system `protoc`, then generates prost messages and the tonic service.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["cms.proto", "llumlet_server.proto", "migration.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
