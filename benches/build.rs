//! Generates the OIP gRPC client from the host's `.proto` (protox compiles
//! it, so no system `protoc`), for the OIP section's gRPC load.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = "../host/proto";
    let proto = "../host/proto/grpc_predict_v2.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], [dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
