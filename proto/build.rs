//! Compiles `kanava/v1/*.proto` with `protox` (pure Rust), so building Kanava
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "kanava/v1/discovery.proto",
        "kanava/v1/certificates.proto",
        "kanava/v1/handoff.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    // The descriptors themselves, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("kanava_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Maps as ordered maps: a message then encodes to the same bytes
        // every time (a hash map's order is random per map), which the
        // control plane relies on when it compares resources by their
        // encoding. The wire format is the same.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
