//! `echo_floor`: the bare tonic floor of the benchmark (bench/floors.sh). It serves
//! `inference.GRPCInferenceService` with the project's generated types and answers ModelInfer by
//! echoing the inputs as outputs (raw contents passed through): no model, no validation, no queue.
//! What the gateway spends per request beyond this server is the gateway's own cost.
//!
//! With `--model-file`, the floor of a server that runs the model: each ModelInfer runs that ONNX
//! file once on the request's raw inputs, on the handler's own task, through the gateway's runtime
//! code (`OrtExecutor`, one session, the CPU budget's intra-op threads), and answers its outputs.
//! Still no validation, no queue, no statistics: what it costs beyond the echo is the model's run,
//! which no gateway can avoid, and what the gateway costs beyond it is the gateway's own.
//!
//! Same process shape as the gateway, so the comparison is fair: mimalloc, a multi-thread tokio
//! runtime with the default worker count (the affinity mask: one worker under `taskset -c 0`), and
//! TCP_NODELAY on each connection. h2load only sees HTTP status (200 even for a gRPC error), so the
//! server counts its own answers: SIGUSR1 prints `successes=N` to stdout, SIGTERM/SIGINT print it
//! and exit (and write it to `--count-file` when given).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use onnx_gateway::model::ModelConfig;
use onnx_gateway::proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use onnx_gateway::proto::model_infer_response::InferOutputTensor;
use onnx_gateway::proto::model_instance_group::Kind as GroupKind;
use onnx_gateway::proto::*;
use onnx_gateway::runtime::{cpu_budget, init_onnxruntime, OrtExecutor, SessionPlan};
use onnx_gateway::scheduler::ModelExecutor;
use onnx_gateway::tensor::{DataType, NamedTensor, Tensor, TensorData};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "echo_floor",
    about = "Bare tonic ModelInfer echo server: the per-request floor the gateway is measured against"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed as `listening addr=...` on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also write the final success count to this file on SIGTERM/SIGINT.
    #[arg(long)]
    count_file: Option<PathBuf>,
    /// Largest request or response message, as the gateway's --max-message-bytes default.
    #[arg(long, default_value_t = 64 << 20)]
    max_message_bytes: usize,
    /// Run on tokio's current-thread runtime (what the gateway runs with one reactor thread)
    /// instead of the default multi-threaded one, to see how much of a ratio the runtime alone
    /// makes. The floor of bench/floors.sh is the default.
    #[arg(long)]
    current_thread: bool,
    /// Serve the service directly instead of through tonic's router (an axum router), as the
    /// gateway serves its inference calls (server/inference_first.rs): a floor without the
    /// router's per-call cost. The floor of bench/floors.sh keeps the router, as a tonic server
    /// built with `add_service` has.
    #[arg(long)]
    without_router: bool,
    /// Run this ONNX file on every ModelInfer's raw inputs and answer its outputs (the floor of a
    /// server that runs the model) instead of echoing the inputs.
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// ONNX Runtime shared library for --model-file (else the gateway's discovery order).
    #[arg(long)]
    onnxruntime_lib: Option<PathBuf>,
}

/// Answers ModelInfer with its own inputs, or with the model's outputs on them; every other RPC is
/// UNIMPLEMENTED.
struct EchoService {
    successes: Arc<AtomicU64>,
    /// The session for --model-file. Uncontended: one request runs at a time on one core.
    model: Option<Mutex<OrtExecutor>>,
}

/// The inputs as outputs: names, datatypes and shapes copied, raw contents moved (no byte copy).
fn echo(request: ModelInferRequest) -> ModelInferResponse {
    let outputs = request
        .inputs
        .into_iter()
        .map(|input| InferOutputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            ..Default::default()
        })
        .collect();
    ModelInferResponse {
        model_name: request.model_name,
        model_version: request.model_version,
        id: request.id,
        outputs,
        raw_output_contents: request.raw_input_contents,
        ..Default::default()
    }
}

/// The request's raw inputs as the runtime takes them: no checks beyond what `Tensor::new` makes.
fn raw_inputs(request: &ModelInferRequest) -> Result<Vec<NamedTensor>, Status> {
    let invalid = |e: String| Status::invalid_argument(e);
    if request.inputs.len() != request.raw_input_contents.len() {
        return Err(invalid("every input needs raw contents".to_string()));
    }
    request
        .inputs
        .iter()
        .zip(&request.raw_input_contents)
        .map(|(input, raw)| {
            let dtype = DataType::parse(&input.datatype)
                .ok_or_else(|| invalid(format!("unknown datatype '{}'", input.datatype)))?;
            let data = TensorData::Fixed(raw.clone());
            let tensor = Tensor::new(&input.name, dtype, input.shape.clone(), data)
                .map_err(|e| invalid(e.to_string()))?;
            Ok(NamedTensor {
                name: input.name.clone(),
                tensor,
            })
        })
        .collect()
}

/// One run of the model on the request's inputs, its outputs as raw contents.
fn run_model(
    model: &Mutex<OrtExecutor>,
    request: ModelInferRequest,
) -> Result<ModelInferResponse, Status> {
    let inputs = raw_inputs(&request)?;
    let run = model
        .lock()
        .map_err(|_| Status::internal("the model's session was poisoned"))?
        .execute_batch(vec![inputs], &[])
        .map_err(|e| Status::internal(e.to_string()))?;
    let mut outputs = Vec::with_capacity(run.outputs.len());
    let mut raw_output_contents = Vec::with_capacity(run.outputs.len());
    for output in run.outputs {
        let TensorData::Fixed(bytes) = output.tensor.data else {
            return Err(Status::unimplemented(
                "echo_floor answers fixed-size outputs only",
            ));
        };
        outputs.push(InferOutputTensor {
            name: output.name,
            datatype: output.tensor.dtype.as_str().to_string(),
            shape: output.tensor.shape,
            ..Default::default()
        });
        raw_output_contents.push(bytes);
    }
    Ok(ModelInferResponse {
        model_name: request.model_name,
        model_version: request.model_version,
        id: request.id,
        outputs,
        raw_output_contents,
        ..Default::default()
    })
}

/// Status for the RPCs this floor does not serve.
fn not_served(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not served by echo_floor: it answers ModelInfer only"
    ))
}

/// The service impl with ModelInfer and ModelStreamInfer written out and the rest generated as
/// UNIMPLEMENTED. The whole impl is one macro expansion so `async_trait` sees every method.
macro_rules! echo_service_impl {
    ($($method:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl GrpcInferenceService for EchoService {
            async fn model_infer(
                &self,
                request: Request<ModelInferRequest>,
            ) -> Result<Response<ModelInferResponse>, Status> {
                let request = request.into_inner();
                let response = match &self.model {
                    Some(model) => run_model(model, request)?,
                    None => echo(request),
                };
                self.successes.fetch_add(1, Ordering::Relaxed);
                Ok(Response::new(response))
            }

            type ModelStreamInferStream = futures::stream::Empty<Result<ModelStreamInferResponse, Status>>;

            async fn model_stream_infer(
                &self,
                _: Request<tonic::Streaming<ModelInferRequest>>,
            ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
                Err(not_served("ModelStreamInfer"))
            }

            $(
                async fn $method(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(not_served(stringify!($resp).trim_end_matches("Response")))
                }
            )*
        }
    };
}

echo_service_impl! {
    server_live(ServerLiveRequest) -> ServerLiveResponse;
    server_ready(ServerReadyRequest) -> ServerReadyResponse;
    model_ready(ModelReadyRequest) -> ModelReadyResponse;
    server_metadata(ServerMetadataRequest) -> ServerMetadataResponse;
    model_metadata(ModelMetadataRequest) -> ModelMetadataResponse;
    model_config(ModelConfigRequest) -> ModelConfigResponse;
    model_statistics(ModelStatisticsRequest) -> ModelStatisticsResponse;
    repository_index(RepositoryIndexRequest) -> RepositoryIndexResponse;
    repository_model_load(RepositoryModelLoadRequest) -> RepositoryModelLoadResponse;
    repository_model_unload(RepositoryModelUnloadRequest) -> RepositoryModelUnloadResponse;
    system_shared_memory_status(SystemSharedMemoryStatusRequest) -> SystemSharedMemoryStatusResponse;
    system_shared_memory_register(SystemSharedMemoryRegisterRequest) -> SystemSharedMemoryRegisterResponse;
    system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest) -> SystemSharedMemoryUnregisterResponse;
    cuda_shared_memory_status(CudaSharedMemoryStatusRequest) -> CudaSharedMemoryStatusResponse;
    cuda_shared_memory_register(CudaSharedMemoryRegisterRequest) -> CudaSharedMemoryRegisterResponse;
    cuda_shared_memory_unregister(CudaSharedMemoryUnregisterRequest) -> CudaSharedMemoryUnregisterResponse;
    trace_setting(TraceSettingRequest) -> TraceSettingResponse;
    log_settings(LogSettingsRequest) -> LogSettingsResponse;
}

fn print_count(successes: &AtomicU64) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "successes={}", successes.load(Ordering::Relaxed));
    let _ = out.flush();
}

/// Prints the count on every SIGUSR1 until SIGTERM or SIGINT arrives.
async fn report_until_stopped(successes: Arc<AtomicU64>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = usr1.recv() => print_count(&successes),
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

/// The session for --model-file, planned as the gateway plans a one-instance CPU model.
fn load_model(args: &Args) -> anyhow::Result<Option<Mutex<OrtExecutor>>> {
    let Some(path) = &args.model_file else {
        return Ok(None);
    };
    init_onnxruntime(args.onnxruntime_lib.as_deref())?;
    let config = ModelConfig::default();
    let plan = SessionPlan::from_config(path, &config, GroupKind::Cpu, 0, cpu_budget())?;
    Ok(Some(Mutex::new(OrtExecutor::load(&plan)?)))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let successes = Arc::new(AtomicU64::new(0));
    let service = GrpcInferenceServiceServer::new(EchoService {
        successes: Arc::clone(&successes),
        model: load_model(&args)?,
    })
    .max_decoding_message_size(args.max_message_bytes)
    .max_encoding_message_size(args.max_message_bytes);
    let incoming = TcpIncoming::bind(args.listen)?.with_nodelay(Some(true));
    println!("listening addr={}", incoming.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stop_rx.await;
    };
    let server = if args.without_router {
        tokio::spawn(Server::builder().serve_with_incoming_shutdown(service, incoming, stopped))
    } else {
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped),
        )
    };
    report_until_stopped(Arc::clone(&successes)).await?;
    let _ = stop_tx.send(());
    server.await??;
    print_count(&successes);
    if let Some(path) = &args.count_file {
        std::fs::write(path, format!("{}\n", successes.load(Ordering::Relaxed)))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all().build()?.block_on(serve(args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use onnx_gateway::proto::model_infer_request::InferInputTensor;

    #[test]
    fn echo_returns_the_inputs_as_outputs() {
        let raw = Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let request = ModelInferRequest {
            model_name: "m".into(),
            id: "42".into(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        };
        let response = echo(request);
        assert_eq!(
            (response.model_name.as_str(), response.id.as_str()),
            ("m", "42")
        );
        assert_eq!(response.outputs.len(), 1);
        let output = &response.outputs[0];
        assert_eq!(
            (output.name.as_str(), output.datatype.as_str()),
            ("INPUT0", "FP32")
        );
        assert_eq!(output.shape, vec![1, 2]);
        assert_eq!(response.raw_output_contents, vec![raw]);
    }

    fn fp32_input(name: &str, values: &[f32]) -> (InferInputTensor, Bytes) {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: vec![1, values.len() as i64],
            ..Default::default()
        };
        (input, Bytes::from(raw))
    }

    fn fp32_values(raw: &Bytes) -> Vec<f32> {
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn model_file_answers_the_models_outputs() {
        let args = Args::parse_from([
            "echo_floor",
            "--model-file",
            concat!(env!("CARGO_MANIFEST_DIR"), "/models/add_sub/1/model.onnx"),
        ]);
        let model = load_model(&args)
            .expect("ONNX Runtime (run scripts/setup)")
            .expect("a session");
        let a: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let b = vec![0.5f32; 16];
        let (in0, raw0) = fp32_input("INPUT0", &a);
        let (in1, raw1) = fp32_input("INPUT1", &b);
        let request = ModelInferRequest {
            model_name: "add_sub".into(),
            inputs: vec![in0, in1],
            raw_input_contents: vec![raw0, raw1],
            ..Default::default()
        };
        let response = run_model(&model, request).expect("the model runs");
        let names: Vec<&str> = response.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["OUTPUT0", "OUTPUT1"]);
        assert_eq!(response.outputs[0].shape, vec![1, 16]);
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let difference: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        assert_eq!(fp32_values(&response.raw_output_contents[0]), sum);
        assert_eq!(fp32_values(&response.raw_output_contents[1]), difference);
    }

    #[test]
    fn model_file_refuses_inputs_without_raw_contents() {
        let (input, _) = fp32_input("INPUT0", &[1.0; 16]);
        let request = ModelInferRequest {
            inputs: vec![input],
            ..Default::default()
        };
        let status = raw_inputs(&request).expect_err("no raw contents");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
