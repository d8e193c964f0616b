//! `loadgen`: a small perf_analyzer-like load generator. Drives ModelInfer or ModelStreamInfer at a
//! fixed concurrency (or request rate) for a set time with random inputs shaped from ModelMetadata,
//! and prints throughput and latency percentiles. `--in-process` measures ONNX Runtime directly on
//! the same model file for comparison. The client runs on one thread so it leaves CPU to the server.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use onnx_gateway::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::{ModelConfigRequest, ModelInferRequest, ModelMetadataRequest};
use onnx_gateway::tensor::{encode_length_prefixed, DataType};
use rand::Rng;
use tokio::sync::Mutex;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Unary,
    Stream,
}

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for the KServe v2 / Triton gRPC protocol"
)]
struct Args {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:8001")]
    url: String,
    /// Model to drive (required unless --in-process).
    #[arg(long, default_value = "", required_unless_present = "in_process")]
    model: String,
    /// Rows per request (the batch dimension) for batching models.
    #[arg(long, default_value_t = 1)]
    batch_size: i64,
    /// Concurrent outstanding requests.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Target requests per second across all workers; 0 = as fast as the concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    request_rate: f64,
    /// Measurement time in seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// ModelInfer (unary) or ModelStreamInfer (one stream per worker).
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    mode: Mode,
    /// Value for variable (-1) non-batch dims.
    #[arg(long, default_value_t = 1)]
    dynamic_dim: i64,
    /// Instead of the server, run ONNX Runtime in this process on this model file at --batch-size.
    #[arg(long)]
    in_process: Option<PathBuf>,
    /// Intra-op threads for --in-process; 0 = the CPU budget, as the gateway gives one instance.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Whether --in-process intra-op threads spin while idle (ONNX Runtime's default: on). The
    /// gateway turns it off unless a model's config asks for it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    intra_op_spinning: bool,
    /// Print one machine-readable JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

/// Latencies of one run and its wall time.
struct Report {
    label: String,
    latencies: Vec<Duration>,
    rows_per_request: i64,
    errors: u64,
    elapsed: Duration,
}

impl Report {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[idx]
    }

    fn print(&self, json: bool) {
        let secs = self.elapsed.as_secs_f64();
        let rps = self.latencies.len() as f64 / secs;
        let rows = rps * self.rows_per_request as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if json {
            println!(
                "{{\"label\":\"{}\",\"requests\":{},\"errors\":{},\"req_per_s\":{:.1},\"rows_per_s\":{:.1},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3}}}",
                self.label, self.latencies.len(), self.errors, rps, rows,
                ms(self.percentile(50.0)), ms(self.percentile(90.0)), ms(self.percentile(99.0))
            );
        } else {
            println!(
                "{:<40} {:>9} req {:>6} err {:>10.1} req/s {:>10.1} rows/s  p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms",
                self.label, self.latencies.len(), self.errors, rps, rows,
                ms(self.percentile(50.0)), ms(self.percentile(90.0)), ms(self.percentile(99.0))
            );
        }
    }
}

fn random_raw(dtype: DataType, count: usize, rng: &mut impl Rng) -> Bytes {
    match dtype {
        DataType::Bytes => encode_length_prefixed(
            &(0..count)
                .map(|i| Bytes::from(format!("item{i}")))
                .collect::<Vec<_>>(),
        ),
        DataType::Fp32 => (0..count)
            .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        DataType::Fp64 => (0..count)
            .flat_map(|_| rng.random_range(-1.0f64..1.0).to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        DataType::Bool => (0..count)
            .map(|_| rng.random_range(0..2u8))
            .collect::<Vec<u8>>()
            .into(),
        // Small non-negative values keep index-like integer inputs in range.
        other => {
            let size = other.element_size().unwrap_or(1);
            (0..count)
                .flat_map(|_| {
                    let mut v = vec![0u8; size];
                    v[0] = rng.random_range(0..8u8);
                    v
                })
                .collect::<Vec<u8>>()
                .into()
        }
    }
}

async fn build_request(
    client: &mut GrpcInferenceServiceClient<Channel>,
    args: &Args,
) -> anyhow::Result<ModelInferRequest> {
    let md = client
        .model_metadata(ModelMetadataRequest {
            name: args.model.clone(),
            version: String::new(),
        })
        .await?
        .into_inner();
    let cfg = client
        .model_config(ModelConfigRequest {
            name: args.model.clone(),
            version: String::new(),
        })
        .await?
        .into_inner();
    let batching = cfg.config.map(|c| c.max_batch_size > 0).unwrap_or(false);
    let mut rng = rand::rng();
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for input in md.inputs {
        let dtype = DataType::parse(&input.datatype)
            .ok_or_else(|| anyhow::anyhow!("unknown datatype {}", input.datatype))?;
        let shape: Vec<i64> = input
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if i == 0 && batching {
                    args.batch_size
                } else if d < 0 {
                    args.dynamic_dim
                } else {
                    d
                }
            })
            .collect();
        let count: i64 = shape.iter().product();
        raw.push(random_raw(dtype, count as usize, &mut rng));
        inputs.push(InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape,
            ..Default::default()
        });
    }
    Ok(ModelInferRequest {
        model_name: args.model.clone(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    })
}

/// Paces workers to a shared request rate, if one is set.
struct Pacer {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + interval;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

async fn drive(args: &Args) -> anyhow::Result<Report> {
    let channel = Channel::from_shared(format!("http://{}", args.url))?
        .connect()
        .await?;
    let mut client = GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    let request = build_request(&mut client, args).await?;
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs_f64(args.duration_secs);
    let start = Instant::now();
    let pacer = Arc::new(Pacer {
        interval: (args.request_rate > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / args.request_rate)),
        next: Mutex::new(start),
    });
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (mut client, request, pacer, mode) = (
            client.clone(),
            request.clone(),
            Arc::clone(&pacer),
            args.mode,
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let end = start + warmup + measure;
            match mode {
                Mode::Unary => {
                    while Instant::now() < end {
                        pacer.wait().await;
                        let t0 = Instant::now();
                        let ok = client.model_infer(request.clone()).await.is_ok();
                        if t0 >= start + warmup {
                            if ok { latencies.push(t0.elapsed()) } else { errors += 1 }
                        }
                    }
                }
                Mode::Stream => {
                    let (tx, rx) = tokio::sync::mpsc::channel::<ModelInferRequest>(1);
                    let mut responses = client.model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
                    while Instant::now() < end {
                        pacer.wait().await;
                        let t0 = Instant::now();
                        tx.send(request.clone()).await?;
                        let ok = matches!(responses.message().await, Ok(Some(m)) if m.error_message.is_empty());
                        if t0 >= start + warmup {
                            if ok { latencies.push(t0.elapsed()) } else { errors += 1 }
                        }
                    }
                }
            }
            anyhow::Ok((latencies, errors))
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (l, e) = worker.await??;
        latencies.extend(l);
        errors += e;
    }
    let label = format!(
        "gateway {} {:?} c={} b={}",
        args.model, args.mode, args.concurrency, args.batch_size
    );
    Ok(Report {
        label,
        latencies,
        rows_per_request: args.batch_size,
        errors,
        elapsed: measure,
    })
}

fn in_process(args: &Args, model_path: &std::path::Path) -> anyhow::Result<Report> {
    use onnx_gateway::runtime::{
        init_onnxruntime, OptimizationLevel, OrtExecutor, ProviderPlan, SessionPlan,
    };
    use onnx_gateway::scheduler::ModelExecutor;
    use onnx_gateway::tensor::{NamedTensor, Tensor, TensorData};
    init_onnxruntime(None)?;
    let threads = if args.threads == 0 {
        onnx_gateway::runtime::cpu_budget()
    } else {
        args.threads
    };
    let plan = SessionPlan {
        model_path: model_path.to_path_buf(),
        intra_op_threads: threads,
        inter_op_threads: 1,
        intra_op_spinning: args.intra_op_spinning,
        parallel_execution: false,
        optimization: OptimizationLevel::All,
        providers: vec![ProviderPlan::Cpu],
        in_memory_graph: None,
    };
    let mut executor = OrtExecutor::load(&plan)?;
    let signature = executor.signature()?;
    let mut rng = rand::rng();
    let inputs: Vec<NamedTensor> = signature
        .inputs
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t
                .dims
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if i == 0 {
                        args.batch_size
                    } else if d < 0 {
                        args.dynamic_dim
                    } else {
                        d
                    }
                })
                .collect();
            let count = shape.iter().product::<i64>() as usize;
            let raw = random_raw(t.dtype, count, &mut rng);
            let data = if t.dtype == DataType::Bytes {
                TensorData::Strings(
                    onnx_gateway::tensor::decode_length_prefixed(&raw).unwrap_or_default(),
                )
            } else {
                TensorData::Fixed(raw)
            };
            Tensor::new(&t.name, t.dtype, shape, data).map(|tensor| NamedTensor {
                name: t.name.clone(),
                tensor,
            })
        })
        .collect::<Result<_, _>>()?;
    let warmup_end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warmup_end {
        executor.execute(inputs.clone(), &[])?;
    }
    let measure = Duration::from_secs_f64(args.duration_secs);
    let start = Instant::now();
    let mut latencies = Vec::new();
    while start.elapsed() < measure {
        let t0 = Instant::now();
        executor.execute(inputs.clone(), &[])?;
        latencies.push(t0.elapsed());
    }
    let label = format!(
        "in-process ORT b={} threads={threads} spinning={}",
        args.batch_size, args.intra_op_spinning
    );
    Ok(Report {
        label,
        latencies,
        rows_per_request: args.batch_size,
        errors: 0,
        elapsed: start.elapsed(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = match &args.in_process {
        Some(path) => in_process(&args, path)?,
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(drive(&args))?,
    };
    report.print(args.json);
    Ok(())
}
