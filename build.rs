//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "ringfence/v1/ringfence.proto";
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ringfence_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Messages that carry plaintext get hand-written, redacting Debug impls (src/lib.rs).
        .skip_debug([
            "ringfence.v1.PlainField",
            "ringfence.v1.FieldOutcome",
            "ringfence.v1.FieldOutcome.outcome",
        ])
        .build_server(true)
        .build_client(true)
        .compile_fds(file_descriptors)?;
    Ok(())
}
