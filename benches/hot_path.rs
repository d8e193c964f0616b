//! The hot functions of the request path, one at a time, so a regression in any of them shows:
//! decode (ModelInferRequest -> engine tensors, with all the checks), concat (a batch's inputs along
//! dim 0), split (a batch's outputs back per request) and encode (engine outputs ->
//! ModelInferResponse), each also with the protobuf wire step tonic adds around it.
//!
//! `cargo bench --bench hot_path` (criterion's flags after `--`, e.g. `-- decode`). The models are
//! the repository's add_sub and mlp_bench, loaded by the real model manager (so the ONNX Runtime
//! library must be found: scripts/setup); only decode and encode read them.
use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use onnx_gateway::model::manager::{LoadedModel, ManagerSettings, ModelManager};
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::ModelInferRequest;
use onnx_gateway::scheduler::{InferResponse, RequestTimings};
use onnx_gateway::server::{decode, encode};
use onnx_gateway::shm::ShmRegistry;
use onnx_gateway::tensor::batch::{concat_rows, split_rows};
use onnx_gateway::tensor::{DataType, NamedTensor, Tensor, TensorData};
use prost::Message;

/// Batch sizes of the concat and split benches (the MLP floor's batch sizes).
const BATCHES: [usize; 2] = [16, 64];

/// A batch-1 request for `model` with FP32 inputs of `row` elements each.
fn request(model: &str, inputs: &[(&str, i64)]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.to_string(),
        inputs: inputs
            .iter()
            .map(|(name, row)| InferInputTensor {
                name: name.to_string(),
                datatype: "FP32".into(),
                shape: vec![1, *row],
                ..Default::default()
            })
            .collect(),
        raw_input_contents: inputs
            .iter()
            .map(|(_, row)| fp32_bytes(*row as usize))
            .collect(),
        ..Default::default()
    }
}

fn fp32_bytes(count: usize) -> Bytes {
    (0..count)
        .flat_map(|i| (i as f32 * 0.001).to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn fp32_tensor(name: &str, rows: i64, row: i64) -> NamedTensor {
    let data = TensorData::Fixed(fp32_bytes((rows * row) as usize));
    NamedTensor {
        name: name.to_string(),
        tensor: Tensor::new(name, DataType::Fp32, vec![rows, row], data)
            .expect("shape and data agree"),
    }
}

/// The repository's models, loaded as the gateway loads them; the runtime keeps their schedulers.
fn load_models(names: &[&str]) -> (tokio::runtime::Runtime, Vec<Arc<LoadedModel>>) {
    onnx_gateway::runtime::init_onnxruntime(None)
        .expect("the ONNX Runtime library (run scripts/setup)");
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let manager = Arc::new(ModelManager::new(ManagerSettings {
        repository: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"),
        ..Default::default()
    }));
    let models = names
        .iter()
        .map(|name| {
            runtime
                .block_on(manager.load(name, None))
                .unwrap_or_else(|e| panic!("loading {name}: {e}"));
            manager.get(name, "").expect("just loaded")
        })
        .collect();
    (runtime, models)
}

fn bench_decode(c: &mut Criterion, model: &LoadedModel, req: &ModelInferRequest) {
    let shm = ShmRegistry::new();
    let name = &model.name;
    c.bench_function(&format!("decode/{name}"), |b| {
        b.iter_batched(
            || req.clone(),
            |r| {
                black_box(
                    decode::decode_request(r, model, &shm, tracing::Span::none()).expect("valid"),
                )
            },
            BatchSize::SmallInput,
        )
    });
    let wire = Bytes::from(req.encode_to_vec());
    c.bench_function(&format!("decode/{name}/from_wire"), |b| {
        b.iter(|| {
            let r = ModelInferRequest::decode(wire.clone()).expect("decodes");
            black_box(decode::decode_request(r, model, &shm, tracing::Span::none()).expect("valid"))
        })
    });
}

fn bench_encode(c: &mut Criterion, model: &LoadedModel, outputs: &[(&str, i64)]) {
    let response = || InferResponse {
        outputs: outputs
            .iter()
            .map(|(name, row)| fp32_tensor(name, 1, *row))
            .collect(),
        timings: RequestTimings::default(),
    };
    let no_shm = HashMap::new();
    let name = &model.name;
    c.bench_function(&format!("encode/{name}"), |b| {
        b.iter_batched(
            response,
            |r| black_box(encode::infer_response(model, "id".into(), r, &no_shm).expect("encodes")),
            BatchSize::SmallInput,
        )
    });
    c.bench_function(&format!("encode/{name}/to_wire"), |b| {
        b.iter_batched(
            response,
            |r| {
                let message =
                    encode::infer_response(model, "id".into(), r, &no_shm).expect("encodes");
                black_box(message.encode_to_vec())
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_concat_split(c: &mut Criterion) {
    for batch in BATCHES {
        let requests: Vec<Vec<NamedTensor>> = vec![vec![fp32_tensor("input", 1, 256)]; batch];
        c.bench_function(&format!("concat/mlp_bench/{batch}x[1,256]"), |b| {
            b.iter_batched(
                || requests.clone(),
                |r| black_box(concat_rows(r).expect("same shapes")),
                BatchSize::SmallInput,
            )
        });
        let outputs = vec![fp32_tensor("output", batch as i64, 10)];
        let rows = vec![1usize; batch];
        c.bench_function(&format!("split/mlp_bench/[{batch},10]"), |b| {
            b.iter_batched(
                || outputs.clone(),
                |o| black_box(split_rows(o, &rows).expect("rows add up")),
                BatchSize::SmallInput,
            )
        });
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let (_runtime, models) = load_models(&["add_sub", "mlp_bench"]);
    let (add_sub, mlp) = (&models[0], &models[1]);
    bench_decode(
        &mut c,
        add_sub,
        &request("add_sub", &[("INPUT0", 16), ("INPUT1", 16)]),
    );
    bench_decode(&mut c, mlp, &request("mlp_bench", &[("input", 256)]));
    bench_concat_split(&mut c);
    bench_encode(&mut c, add_sub, &[("OUTPUT0", 16), ("OUTPUT1", 16)]);
    bench_encode(&mut c, mlp, &[("output", 10)]);
    c.final_summary();
}
