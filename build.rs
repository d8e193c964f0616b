//! Compiles the wire contract in proto/ at build time. protox parses the .proto files in pure Rust, so
//! no protoc install is needed; the file descriptor set is kept for server reflection and for
//! config.pbtxt parsing (text format over the ModelConfig descriptor).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/grpc_service.proto", "proto/model_config.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("inference_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        // Typed BYTES elements point into the request's buffer: no heap block per element, and
        // they move into the tensor as they are.
        .bytes(".inference.InferTensorContents.bytes_contents")
        // Walks a ModelInferRequest on the wire before prost decodes it (src/server/codec.rs).
        .codec_path("crate::server::codec::InferenceCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
