//! `bench_body`: writes one gRPC-framed ModelInferRequest for a model of the repository, the body
//! h2load sends on every request in bench/floors.sh (`h2load -d body.bin`). The frame is what a gRPC
//! client puts on the wire: a 0 byte (not compressed), the message length as 4 bytes big-endian, then
//! the encoded request, its inputs in `raw_input_contents` (pseudo-random values, fixed seed).
use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use onnx_gateway::model::{datatype_from_config, repository};
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::ModelInferRequest;
use onnx_gateway::tensor::DataType;
use prost::Message;

#[derive(Debug, Parser)]
#[command(
    name = "bench_body",
    about = "Write a gRPC-framed ModelInferRequest (raw_input_contents) for h2load -d"
)]
struct Args {
    /// Model repository holding the model's config.pbtxt.
    #[arg(long, default_value = "models")]
    model_repository: PathBuf,
    /// Model whose config's inputs the request carries.
    #[arg(long)]
    model: String,
    /// Name put in the request's model_name (default: --model); the body can target a copy of the
    /// model served under another name.
    #[arg(long)]
    request_model_name: Option<String>,
    /// Rows in the batch dimension (models with max_batch_size > 0).
    #[arg(long, default_value_t = 1)]
    batch_size: i64,
    /// Value for variable (-1) dims.
    #[arg(long, default_value_t = 1)]
    dynamic_dim: i64,
    /// Where to write the framed request.
    #[arg(long)]
    out: PathBuf,
}

/// The request for `args.model`: every config input, shaped by the config, filled with values.
fn build_request(args: &Args) -> anyhow::Result<ModelInferRequest> {
    let config = repository::read_config(&args.model_repository, &args.model)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut inputs = Vec::with_capacity(config.input.len());
    let mut raw = Vec::with_capacity(config.input.len());
    for input in &config.input {
        let dtype = datatype_from_config(input.data_type)
            .with_context(|| format!("input '{}' has no datatype", input.name))?;
        let Some(size) = dtype.element_size() else {
            bail!(
                "input '{}' is {}: only fixed-size datatypes are supported",
                input.name,
                dtype.as_str()
            );
        };
        let mut shape: Vec<i64> = input
            .dims
            .iter()
            .map(|&d| if d < 0 { args.dynamic_dim } else { d })
            .collect();
        if config.max_batch_size > 0 {
            shape.insert(0, args.batch_size);
        }
        let count = shape.iter().product::<i64>() as usize;
        raw.push(fill(dtype, count * size, &mut state));
        inputs.push(InferInputTensor {
            name: input.name.clone(),
            datatype: dtype.as_str().to_string(),
            shape,
            ..Default::default()
        });
    }
    Ok(ModelInferRequest {
        model_name: args
            .request_model_name
            .clone()
            .unwrap_or_else(|| args.model.clone()),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    })
}

/// `len` bytes of values: FP32 in [-1, 1) for float inputs, pseudo-random bytes otherwise.
fn fill(dtype: DataType, len: usize, state: &mut u64) -> Bytes {
    let mut next = || {
        // xorshift64*: deterministic, so reruns send the same body.
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut out = Vec::with_capacity(len);
    if dtype == DataType::Fp32 {
        while out.len() < len {
            let unit = (next() >> 40) as f32 / (1u64 << 24) as f32;
            out.extend_from_slice(&(unit * 2.0 - 1.0).to_le_bytes());
        }
    } else {
        while out.len() < len {
            out.push((next() >> 56) as u8);
        }
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The gRPC length-prefixed message: flag byte, u32 big-endian length, message.
fn grpc_frame(request: &ModelInferRequest) -> anyhow::Result<Vec<u8>> {
    let message = request.encode_to_vec();
    let len = u32::try_from(message.len()).context("the request is over 4 GiB")?;
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&message);
    Ok(frame)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let request = build_request(&args)?;
    let frame = grpc_frame(&request)?;
    std::fs::write(&args.out, &frame)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "{}: {} bytes ({} inputs, batch {})",
        args.out.display(),
        frame.len(),
        request.inputs.len(),
        args.batch_size
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_flag_length_message_and_the_body_fits_the_config() {
        let args = Args {
            model_repository: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"),
            model: "add_sub".into(),
            request_model_name: Some("copy".into()),
            batch_size: 2,
            dynamic_dim: 1,
            out: PathBuf::new(),
        };
        let request = build_request(&args).unwrap();
        assert_eq!(request.model_name, "copy");
        let names: Vec<&str> = request.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["INPUT0", "INPUT1"]);
        assert!(request.inputs.iter().all(|i| i.shape == [2, 16]));
        assert!(request
            .raw_input_contents
            .iter()
            .all(|r| r.len() == 2 * 16 * 4));
        let frame = grpc_frame(&request).unwrap();
        assert_eq!(frame[0], 0, "not compressed");
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5);
        assert_eq!(ModelInferRequest::decode(&frame[5..]).unwrap(), request);
    }
}
