//! `inproc_floor`: the model floor of the benchmark (bench/floors.sh). Runs a repository model's ONNX
//! file in this process through the gateway's own runtime code (`OrtExecutor::load` on the
//! `SessionPlan` the gateway would build, then `ModelExecutor::execute_batch`), batch after batch
//! for a set time, and prints rows/s and per-batch latency percentiles as one JSON line per batch
//! size. The intra-op thread count is the gateway's: the CPU budget (affinity mask and cgroup quota)
//! shared among the model's instances, unless the config sets `intra_op_thread_count`; spinning is
//! off unless the config turns it on. Run it under `taskset -c 0` to compare with a server there.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use onnx_gateway::model::{instance_plan, repository, ModelConfig};
use onnx_gateway::proto::model_instance_group::Kind as GroupKind;
use onnx_gateway::runtime::{cpu_budget, init_onnxruntime, OrtExecutor, SessionPlan};
use onnx_gateway::scheduler::ModelExecutor;
use onnx_gateway::tensor::{NamedTensor, Tensor, TensorData};

#[derive(Debug, Parser)]
#[command(
    name = "inproc_floor",
    about = "In-process ONNX Runtime through the gateway's runtime code: rows/s and latency per batch size"
)]
struct Args {
    /// Model repository holding the model.
    #[arg(long, default_value = "models")]
    model_repository: PathBuf,
    /// Model to run (its config.pbtxt decides threads and spinning, as in the gateway).
    #[arg(long)]
    model: String,
    /// Version to run; 0 = the highest present.
    #[arg(long, default_value_t = 0)]
    version: i64,
    /// Batch sizes to run, one after the other, each for --duration-secs.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batch_sizes: Vec<i64>,
    /// Rows per request handed to execute_batch: 0 = the whole batch as one request (ORT alone);
    /// 1 = batch-size requests of one row each (adds the batch assembly the gateway does).
    #[arg(long, default_value_t = 0)]
    rows_per_request: i64,
    /// Measurement time per batch size, after --warmup-secs.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Bytes of other memory read and written between two batches (outside the timing): runs ORT
    /// with caches as cold as a server's, whose network and protocol work between two runs evicts
    /// ORT's code and data. 0 = back to back, everything hot. The latencies exclude it, rows/s does
    /// not.
    #[arg(long, default_value_t = 0)]
    evict_bytes: usize,
    /// ONNX Runtime shared library (else the gateway's discovery order).
    #[arg(long)]
    onnxruntime_lib: Option<PathBuf>,
}

/// The session plan the gateway builds for this model's first CPU instance.
fn gateway_plan(args: &Args, config: &ModelConfig) -> anyhow::Result<SessionPlan> {
    let version = if args.version > 0 {
        args.version
    } else {
        *repository::available_versions(&args.model_repository, &args.model)
            .last()
            .with_context(|| format!("model '{}' has no version directory", args.model))?
    };
    let path = repository::model_file(&args.model_repository, &args.model, version, config)?;
    let instances = instance_plan::plan(&args.model, &config.instance_group)
        .map_err(anyhow::Error::msg)?
        .len();
    // As the model manager: the CPU budget shared among the model's instances.
    let intra = (cpu_budget() / instances.max(1)).max(1);
    Ok(SessionPlan::from_config(
        &path,
        config,
        GroupKind::Cpu,
        0,
        intra,
    )?)
}

/// The batch as `execute_batch` takes it: one input list per request.
fn batch_requests(
    executor: &OrtExecutor,
    batch: i64,
    rows_per_request: i64,
) -> anyhow::Result<Vec<Vec<NamedTensor>>> {
    let rows = if rows_per_request <= 0 {
        batch
    } else {
        rows_per_request
    };
    if rows <= 0 || batch % rows != 0 {
        bail!("batch size {batch} is not a multiple of --rows-per-request {rows}");
    }
    let signature = executor.signature()?;
    let one_request = signature
        .inputs
        .iter()
        .map(|input| {
            let Some(size) = input.dtype.element_size() else {
                bail!(
                    "input '{}': only fixed-size datatypes are supported",
                    input.name
                );
            };
            let mut shape: Vec<i64> = input.dims.iter().map(|&d| d.max(1)).collect();
            match shape.first_mut() {
                Some(first) => *first = rows,
                None => bail!("input '{}' has no batch dimension", input.name),
            }
            let count = shape.iter().product::<i64>() as usize;
            let data = TensorData::Fixed(Bytes::from(vec![0x3c; count * size]));
            let tensor = Tensor::new(&input.name, input.dtype, shape, data)?;
            Ok(NamedTensor {
                name: input.name.clone(),
                tensor,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(vec![one_request; (batch / rows) as usize])
}

/// CPU seconds this process has used (all threads, user + system), from /proc/self/stat; None where
/// that file is missing. The kernel reports it in USER_HZ ticks, 100 per second on Linux.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

/// Touches every cache line of `memory` (a read and a write each), pushing other data out.
fn evict_caches(memory: &mut [u8]) {
    for line in memory.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    std::hint::black_box(memory);
}

/// Runs batches of `batch` rows for the warm-up, then for the measurement; prints one JSON line.
fn run_batch_size(
    args: &Args,
    executor: &mut OrtExecutor,
    plan: &SessionPlan,
    batch: i64,
) -> anyhow::Result<()> {
    let requests = batch_requests(executor, batch, args.rows_per_request)?;
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup_secs);
    while Instant::now() < warmup_end {
        executor.execute_batch(requests.clone(), &[])?;
    }
    let measure = Duration::from_secs_f64(args.duration_secs);
    let mut eviction = vec![0u8; args.evict_bytes];
    let mut latencies = Vec::new();
    let cpu_before = process_cpu_secs();
    let start = Instant::now();
    while start.elapsed() < measure {
        let t0 = Instant::now();
        executor.execute_batch(requests.clone(), &[])?;
        latencies.push(t0.elapsed());
        evict_caches(&mut eviction);
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Cores' worth of CPU the run got: below 1 on a shared machine means other work took the core.
    let core_use = match (cpu_before, process_cpu_secs()) {
        (Some(before), Some(after)) => format!("{:.3}", (after - before) / elapsed),
        _ => "null".to_string(),
    };
    latencies.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{{\"model\":\"{}\",\"batch_size\":{batch},\"requests_per_batch\":{},\"intra_op_threads\":{},\"spinning\":{},\"evict_bytes\":{},\"batches\":{},\"rows_per_s\":{:.1},\"core_use\":{core_use},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
        args.model,
        requests.len(),
        plan.intra_op_threads,
        plan.intra_op_spinning,
        args.evict_bytes,
        latencies.len(),
        latencies.len() as f64 * batch as f64 / elapsed,
        us(percentile(&latencies, 50.0)),
        us(percentile(&latencies, 99.0)),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_onnxruntime(args.onnxruntime_lib.as_deref())?;
    let config = repository::read_config(&args.model_repository, &args.model)?;
    let plan = gateway_plan(&args, &config)?;
    let mut executor = OrtExecutor::load(&plan)?;
    for &batch in &args.batch_sizes {
        run_batch_size(&args, &mut executor, &plan, batch)?;
    }
    Ok(())
}
