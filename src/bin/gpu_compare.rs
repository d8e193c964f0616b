//! `gpu_compare`: sends the same seeded FP32 inputs to two gateways (one serving a model on the GPU,
//! one on the CPU) and checks that every output agrees within a tolerance. Part of the device check
//! (scripts/gpu/device_check.sh); prints one JSON line and exits 1 when an output differs.
use clap::Parser;
use onnx_gateway::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::{ModelInferRequest, ModelInferResponse, ModelMetadataRequest};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(
    name = "gpu_compare",
    about = "Compare a model's outputs on two gateways"
)]
struct Args {
    /// The gateway under test (host:port).
    #[arg(long)]
    gpu_url: String,
    /// The reference gateway (host:port).
    #[arg(long)]
    cpu_url: String,
    #[arg(long)]
    model: String,
    /// Rows per request (the batch dimension).
    #[arg(long, default_value_t = 4)]
    rows: i64,
    /// Largest allowed |gpu - cpu| relative to max(1, |cpu|).
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
}

async fn connect(url: &str) -> anyhow::Result<GrpcInferenceServiceClient<Channel>> {
    let client = GrpcInferenceServiceClient::connect(format!("http://{url}")).await?;
    Ok(client.max_decoding_message_size(256 << 20))
}

/// One request with seeded uniform FP32 values for every input (batch dim = rows).
async fn seeded_request(
    client: &mut GrpcInferenceServiceClient<Channel>,
    args: &Args,
) -> anyhow::Result<ModelInferRequest> {
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: args.model.clone(),
            version: String::new(),
        })
        .await?
        .into_inner();
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut request = ModelInferRequest {
        model_name: args.model.clone(),
        ..Default::default()
    };
    for input in metadata.inputs {
        anyhow::ensure!(
            input.datatype == "FP32",
            "input {} is {}, only FP32 is compared",
            input.name,
            input.datatype
        );
        let shape: Vec<i64> = input
            .shape
            .iter()
            .map(|&d| if d < 0 { args.rows } else { d })
            .collect();
        let count: i64 = shape.iter().product();
        let raw: Vec<u8> = (0..count)
            .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
            .collect();
        request.inputs.push(InferInputTensor {
            name: input.name,
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        });
        request.raw_input_contents.push(raw.into());
    }
    Ok(request)
}

fn floats(response: &ModelInferResponse, index: usize) -> Vec<f32> {
    response.raw_output_contents[index]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cpu = connect(&args.cpu_url).await?;
    let mut gpu = connect(&args.gpu_url).await?;
    let request = seeded_request(&mut cpu, &args).await?;
    let expected = cpu.model_infer(request.clone()).await?.into_inner();
    let actual = gpu.model_infer(request).await?.into_inner();
    let mut worst = 0.0f32;
    for (index, output) in expected.outputs.iter().enumerate() {
        let (want, got) = (floats(&expected, index), floats(&actual, index));
        anyhow::ensure!(
            want.len() == got.len(),
            "output {} has {} values on the CPU, {} on the GPU",
            output.name,
            want.len(),
            got.len()
        );
        for (w, g) in want.iter().zip(&got) {
            worst = worst.max((w - g).abs() / w.abs().max(1.0));
        }
    }
    let ok = worst <= args.tolerance;
    println!(
        "{{\"model\":\"{}\",\"rows\":{},\"outputs\":{},\"max_relative_difference\":{worst:e},\"tolerance\":{:e},\"ok\":{ok}}}",
        args.model, args.rows, expected.outputs.len(), args.tolerance
    );
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
