//! Every metric the gateway exposes: names, descriptions and types live here and nowhere else, together
//! with the renderer for the Prometheus text exposition format 0.0.4.
//!
//! Three sources feed one scrape: the per model-version [`ModelStats`] (the same numbers the
//! ModelStatistics RPC reports), [`GrpcMetrics`] (filled by the gRPC tower layer in `server/`) and
//! the process itself (read from /proc at scrape time).
//!
//! The Triton names (nv_*) are kept exactly as Triton spells them so existing dashboards work, even
//! though `promtool check metrics` lints them (counters without `_total`, the `_us` unit
//! abbreviation, a gauge ending in `_count`); [`TRITON_COMPAT_METRICS`] lists them so a lint check
//! can tell those known findings from new ones. Every other name follows Prometheus conventions.
use std::fmt::{self, Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::stats::{
    FailureReason, Histogram, ModelStats, BATCH_FORMED_REASONS, LATENCY_BUCKETS_SECONDS,
};

/// The Prometheus type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One metric family: its name, its `# HELP` text and its `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
}

const fn def(name: &'static str, kind: MetricKind, help: &'static str) -> MetricDef {
    MetricDef { name, help, kind }
}

use MetricKind::{Counter, Gauge, Histogram as Hist};

// --- Triton-compatible, labelled model and version (durations are cumulative microseconds) ---
pub const INFERENCE_REQUEST_SUCCESS: MetricDef = def(
    "nv_inference_request_success",
    Counter,
    "Inference requests that succeeded, all batch sizes",
);
pub const INFERENCE_REQUEST_FAILURE: MetricDef = def(
    "nv_inference_request_failure",
    Counter,
    "Inference requests that failed, all batch sizes, by reason",
);
pub const INFERENCE_COUNT: MetricDef = def(
    "nv_inference_count",
    Counter,
    "Inferences performed (one per batch row)",
);
pub const INFERENCE_EXEC_COUNT: MetricDef = def(
    "nv_inference_exec_count",
    Counter,
    "Model executions performed (one per batch run)",
);
pub const INFERENCE_PENDING_REQUEST_COUNT: MetricDef = def(
    "nv_inference_pending_request_count",
    Gauge,
    "Requests accepted and not yet answered",
);
pub const INFERENCE_REQUEST_DURATION_US: MetricDef = def(
    "nv_inference_request_duration_us",
    Counter,
    "Cumulative duration of successful inference requests, end to end, in microseconds",
);
pub const INFERENCE_QUEUE_DURATION_US: MetricDef = def(
    "nv_inference_queue_duration_us",
    Counter,
    "Cumulative time successful requests waited in the queue, in microseconds",
);
pub const INFERENCE_COMPUTE_INPUT_DURATION_US: MetricDef = def(
    "nv_inference_compute_input_duration_us",
    Counter,
    "Cumulative time spent preparing inputs of successful requests, in microseconds",
);
pub const INFERENCE_COMPUTE_INFER_DURATION_US: MetricDef = def(
    "nv_inference_compute_infer_duration_us",
    Counter,
    "Cumulative time spent running the model for successful requests, in microseconds",
);
pub const INFERENCE_COMPUTE_OUTPUT_DURATION_US: MetricDef = def(
    "nv_inference_compute_output_duration_us",
    Counter,
    "Cumulative time spent extracting outputs of successful requests, in microseconds",
);
pub const MODEL_LOAD_DURATION_SECS: MetricDef = def(
    "nv_model_load_duration_secs",
    Gauge,
    "Time it took to load the model version, in seconds",
);

// --- Histograms Triton lacks: aggregatable across replicas ---
pub const REQUEST_DURATION_SECONDS: MetricDef = def(
    "onnx_gateway_request_duration_seconds",
    Hist,
    "Duration of successful inference requests, end to end, in seconds",
);
pub const QUEUE_DURATION_SECONDS: MetricDef = def(
    "onnx_gateway_queue_duration_seconds",
    Hist,
    "Time successful inference requests waited in the queue, in seconds",
);
pub const COMPUTE_DURATION_SECONDS: MetricDef = def(
    "onnx_gateway_compute_duration_seconds",
    Hist,
    "Compute time (input, infer, output) of successful inference requests, in seconds",
);
pub const BATCH_SIZE: MetricDef = def("onnx_gateway_batch_size", Hist, "Rows per model execution");

// --- What the dynamic batcher decides (rows per batch: onnx_gateway_batch_size above) ---
pub const BATCH_FORMED_TOTAL: MetricDef = def(
    "onnx_gateway_batch_formed_total",
    Counter,
    "Batches the dynamic batcher formed, by why it dispatched them then \
     (full, window_expired, no_delay, draining, adaptive_early, adaptive_waited)",
);
pub const BATCH_FORMED_ROWS_TOTAL: MetricDef = def(
    "onnx_gateway_batch_formed_rows_total",
    Counter,
    "Rows in the batches the dynamic batcher formed, by why it dispatched them then",
);
pub const BATCH_WAIT_SECONDS: MetricDef = def(
    "onnx_gateway_batch_wait_seconds",
    Hist,
    "How long the oldest request of each formed batch had waited in the queue, in seconds",
);
pub const BATCH_ANSWERS_SPLIT_TOTAL: MetricDef = def(
    "onnx_gateway_batch_answers_split_total",
    Counter,
    "Batches whose answers were sent in two halves, one reactor turn apart, so that closed-loop \
     clients send while the server still answers (--split-answers-min-microseconds)",
);

// --- gRPC transport ---
pub const GRPC_REQUESTS_TOTAL: MetricDef = def(
    "onnx_gateway_grpc_requests_total",
    Counter,
    "gRPC requests completed, by method and status code",
);
pub const GRPC_REQUEST_DURATION_SECONDS: MetricDef = def(
    "onnx_gateway_grpc_request_duration_seconds",
    Hist,
    "Duration of gRPC requests until their status was sent, by method, in seconds",
);

// --- HTTP/REST transport (the gRPC families' counterparts for the second front door) ---
pub const HTTP_REQUESTS_TOTAL: MetricDef = def(
    "onnx_gateway_http_requests_total",
    Counter,
    "HTTP/REST requests completed, by route and status code",
);
pub const HTTP_REQUEST_DURATION_SECONDS: MetricDef = def(
    "onnx_gateway_http_request_duration_seconds",
    Hist,
    "Duration of HTTP/REST requests until their response head was sent, by route, in seconds",
);

// --- Process (standard names, as the Prometheus client libraries export them) ---
pub const PROCESS_CPU_SECONDS_TOTAL: MetricDef = def(
    "process_cpu_seconds_total",
    Counter,
    "Total user and system CPU time spent in seconds",
);
pub const PROCESS_RESIDENT_MEMORY_BYTES: MetricDef = def(
    "process_resident_memory_bytes",
    Gauge,
    "Resident memory size in bytes",
);
pub const PROCESS_VIRTUAL_MEMORY_BYTES: MetricDef = def(
    "process_virtual_memory_bytes",
    Gauge,
    "Virtual memory size in bytes",
);
pub const PROCESS_THREADS: MetricDef = def(
    "process_threads",
    Gauge,
    "Number of OS threads in the process",
);
pub const PROCESS_OPEN_FDS: MetricDef =
    def("process_open_fds", Gauge, "Number of open file descriptors");
pub const PROCESS_MAX_FDS: MetricDef = def(
    "process_max_fds",
    Gauge,
    "Maximum number of open file descriptors (soft limit)",
);
pub const PROCESS_START_TIME_SECONDS: MetricDef = def(
    "process_start_time_seconds",
    Gauge,
    "Start time of the process since the Unix epoch in seconds",
);
pub const INFLIGHT_REQUEST_BYTES: MetricDef = def(
    "onnx_gateway_inflight_request_bytes",
    Gauge,
    "Request bytes held against the memory budget (received and not yet answered)",
);
pub const INFLIGHT_REQUEST_BYTES_LIMIT: MetricDef = def(
    "onnx_gateway_inflight_request_bytes_limit",
    Gauge,
    "The memory budget --max-inflight-bytes (0: unlimited)",
);
pub const INFLIGHT_REQUEST_BYTES_PEAK: MetricDef = def(
    "onnx_gateway_inflight_request_bytes_peak",
    Gauge,
    "Highest value the request bytes in flight reached since start",
);
pub const BUDGET_REFUSED_TOTAL: MetricDef = def(
    "onnx_gateway_budget_refused_total",
    Counter,
    "Requests or messages refused because they did not fit the memory budget",
);

// --- Triton-compatible GPU metrics (from NVML, labelled gpu_uuid; absent without a GPU) ---
pub const GPU_UTILIZATION: MetricDef = def(
    "nv_gpu_utilization",
    Gauge,
    "GPU utilization rate [0.0 - 1.0)",
);
pub const GPU_MEMORY_TOTAL_BYTES: MetricDef = def(
    "nv_gpu_memory_total_bytes",
    Gauge,
    "GPU total memory, in bytes",
);
pub const GPU_MEMORY_USED_BYTES: MetricDef = def(
    "nv_gpu_memory_used_bytes",
    Gauge,
    "GPU used memory, in bytes",
);
pub const GPU_POWER_USAGE: MetricDef = def("nv_gpu_power_usage", Gauge, "GPU power usage in watts");

// --- Response cache, as Triton names them (rendered only when --cache-config is given) ---
pub const CACHE_NUM_HITS_PER_MODEL: MetricDef = def(
    "nv_cache_num_hits_per_model",
    Counter,
    "Number of cache hits per model",
);
pub const CACHE_NUM_MISSES_PER_MODEL: MetricDef = def(
    "nv_cache_num_misses_per_model",
    Counter,
    "Number of cache misses per model (successful responses only)",
);
pub const CACHE_HIT_DURATION_PER_MODEL: MetricDef = def(
    "nv_cache_hit_duration_per_model",
    Counter,
    "Total cache hit lookup duration per model, in microseconds",
);
pub const CACHE_MISS_DURATION_PER_MODEL: MetricDef = def(
    "nv_cache_miss_duration_per_model",
    Counter,
    "Total cache miss (lookup and insertion) duration per model, in microseconds",
);
pub const CACHE_NUM_ENTRIES: MetricDef = def(
    "nv_cache_num_entries",
    Gauge,
    "Number of responses stored in the response cache",
);
pub const CACHE_NUM_EVICTIONS: MetricDef = def(
    "nv_cache_num_evictions",
    Gauge,
    "Number of responses evicted from the response cache since startup",
);
pub const CACHE_UTIL: MetricDef = def(
    "nv_cache_util",
    Gauge,
    "Response cache utilization, the fraction of its size in use [0.0 - 1.0]",
);

/// The response-cache families, in rendering order.
pub const CACHE_METRICS: [MetricDef; 7] = [
    CACHE_NUM_HITS_PER_MODEL,
    CACHE_NUM_MISSES_PER_MODEL,
    CACHE_HIT_DURATION_PER_MODEL,
    CACHE_MISS_DURATION_PER_MODEL,
    CACHE_NUM_ENTRIES,
    CACHE_NUM_EVICTIONS,
    CACHE_UTIL,
];

/// Names kept as Triton spells them for dashboard compatibility; `promtool check metrics` reports
/// lint findings on these and only these.
pub const TRITON_COMPAT_METRICS: [MetricDef; 15] = [
    INFERENCE_REQUEST_SUCCESS,
    INFERENCE_REQUEST_FAILURE,
    INFERENCE_COUNT,
    INFERENCE_EXEC_COUNT,
    INFERENCE_PENDING_REQUEST_COUNT,
    INFERENCE_REQUEST_DURATION_US,
    INFERENCE_QUEUE_DURATION_US,
    INFERENCE_COMPUTE_INPUT_DURATION_US,
    INFERENCE_COMPUTE_INFER_DURATION_US,
    INFERENCE_COMPUTE_OUTPUT_DURATION_US,
    MODEL_LOAD_DURATION_SECS,
    CACHE_NUM_HITS_PER_MODEL,
    CACHE_NUM_MISSES_PER_MODEL,
    CACHE_HIT_DURATION_PER_MODEL,
    CACHE_MISS_DURATION_PER_MODEL,
];

/// Every metric family the gateway can expose.
pub const ALL_METRICS: [MetricDef; 45] = [
    INFERENCE_REQUEST_SUCCESS,
    INFERENCE_REQUEST_FAILURE,
    INFERENCE_COUNT,
    INFERENCE_EXEC_COUNT,
    INFERENCE_PENDING_REQUEST_COUNT,
    INFERENCE_REQUEST_DURATION_US,
    INFERENCE_QUEUE_DURATION_US,
    INFERENCE_COMPUTE_INPUT_DURATION_US,
    INFERENCE_COMPUTE_INFER_DURATION_US,
    INFERENCE_COMPUTE_OUTPUT_DURATION_US,
    MODEL_LOAD_DURATION_SECS,
    REQUEST_DURATION_SECONDS,
    QUEUE_DURATION_SECONDS,
    COMPUTE_DURATION_SECONDS,
    BATCH_SIZE,
    GRPC_REQUESTS_TOTAL,
    GRPC_REQUEST_DURATION_SECONDS,
    PROCESS_CPU_SECONDS_TOTAL,
    PROCESS_RESIDENT_MEMORY_BYTES,
    PROCESS_VIRTUAL_MEMORY_BYTES,
    PROCESS_THREADS,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_START_TIME_SECONDS,
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION_SECONDS,
    GPU_UTILIZATION,
    GPU_MEMORY_TOTAL_BYTES,
    GPU_MEMORY_USED_BYTES,
    GPU_POWER_USAGE,
    INFLIGHT_REQUEST_BYTES,
    INFLIGHT_REQUEST_BYTES_LIMIT,
    INFLIGHT_REQUEST_BYTES_PEAK,
    BUDGET_REFUSED_TOTAL,
    CACHE_NUM_HITS_PER_MODEL,
    CACHE_NUM_MISSES_PER_MODEL,
    CACHE_HIT_DURATION_PER_MODEL,
    CACHE_MISS_DURATION_PER_MODEL,
    CACHE_NUM_ENTRIES,
    CACHE_NUM_EVICTIONS,
    CACHE_UTIL,
    BATCH_FORMED_TOTAL,
    BATCH_FORMED_ROWS_TOTAL,
    BATCH_WAIT_SECONDS,
    BATCH_ANSWERS_SPLIT_TOTAL,
];

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders one scrape: model statistics, gRPC metrics and process metrics. `models` holds each
/// (model, version) once; a pair listed twice would be a duplicate series, which Prometheus rejects.
pub fn render(models: &[Arc<ModelStats>], grpc: &GrpcMetrics) -> String {
    let mut out = Exposition::default();
    render_models(&mut out, models);
    grpc.render_into(&mut out);
    if let Some(process) = ProcessStats::read() {
        process.render_into(&mut out);
    }
    render_gpus(&mut out, &crate::telemetry::gpu::read_gpus());
    out.finish()
}

/// Triton's `nv_gpu_*` families, one sample per GPU; nothing at all without one.
fn render_gpus(out: &mut Exposition, gpus: &[crate::telemetry::gpu::GpuStats]) {
    if gpus.is_empty() {
        return;
    }
    type Value = fn(&crate::telemetry::gpu::GpuStats) -> Num;
    let families: [(&MetricDef, Value); 4] = [
        (&GPU_UTILIZATION, |g| Num::F(g.utilization)),
        (&GPU_MEMORY_TOTAL_BYTES, |g| Num::U(g.memory_total_bytes)),
        (&GPU_MEMORY_USED_BYTES, |g| Num::U(g.memory_used_bytes)),
        (&GPU_POWER_USAGE, |g| Num::F(g.power_usage_watts)),
    ];
    for (d, value) in families {
        out.family(d);
        for gpu in gpus {
            out.sample(d.name, "", &[("gpu_uuid", gpu.uuid.clone())], value(gpu));
        }
    }
}

/// [`render_gpus`] alone, for tests.
#[cfg(test)]
pub(crate) fn render_gpu_metrics(gpus: &[crate::telemetry::gpu::GpuStats]) -> String {
    let mut out = Exposition::default();
    render_gpus(&mut out, gpus);
    out.finish()
}

/// Renders the per model-version families only (Triton's and our histograms).
pub fn render_model_metrics(models: &[Arc<ModelStats>]) -> String {
    let mut out = Exposition::default();
    render_models(&mut out, models);
    out.finish()
}

/// Picks one of a model's counters.
type CounterOf = fn(&ModelStats) -> u64;

/// Renders the response-cache families: per model-version hits and misses from the same
/// statistics ModelStatistics reads, then the cache-wide figures. Appended to [`render`]'s output
/// when a cache is configured.
pub fn render_cache(models: &[Arc<ModelStats>], entries: u64, evictions: u64, util: f64) -> String {
    let mut out = Exposition::default();
    let labels = |m: &ModelStats| [("model", m.model.clone()), ("version", m.version.clone())];
    let per_model: [(&MetricDef, CounterOf); 4] = [
        (&CACHE_NUM_HITS_PER_MODEL, |m| m.cache_hit.count()),
        (&CACHE_NUM_MISSES_PER_MODEL, |m| m.cache_miss.count()),
        (&CACHE_HIT_DURATION_PER_MODEL, |m| m.cache_hit.ns() / 1000),
        (&CACHE_MISS_DURATION_PER_MODEL, |m| m.cache_miss.ns() / 1000),
    ];
    for (d, value) in per_model {
        out.family(d);
        for m in models {
            out.sample(d.name, "", &labels(m), Num::U(value(m)));
        }
    }
    out.family(&CACHE_NUM_ENTRIES);
    out.sample(CACHE_NUM_ENTRIES.name, "", &[], Num::U(entries));
    out.family(&CACHE_NUM_EVICTIONS);
    out.sample(CACHE_NUM_EVICTIONS.name, "", &[], Num::U(evictions));
    out.family(&CACHE_UTIL);
    out.sample(CACHE_UTIL.name, "", &[], Num::F(util));
    out.finish()
}

/// Picks one of a model's histograms.
type HistogramOf = fn(&ModelStats) -> &Histogram;

fn render_models(out: &mut Exposition, models: &[Arc<ModelStats>]) {
    // A family's samples must be contiguous, so iterate families outside and models inside.
    let labels = |m: &ModelStats| [("model", m.model.clone()), ("version", m.version.clone())];
    let per_model = |out: &mut Exposition, d: &MetricDef, value: &dyn Fn(&ModelStats) -> u64| {
        out.family(d);
        for m in models {
            out.sample(d.name, "", &labels(m), Num::U(value(m)));
        }
    };
    per_model(out, &INFERENCE_REQUEST_SUCCESS, &|m| m.success.count());

    out.family(&INFERENCE_REQUEST_FAILURE);
    for m in models {
        for reason in FailureReason::ALL {
            let [model, version] = labels(m);
            let labels = [model, ("reason", reason.as_str().to_string()), version];
            let n = m.failure(reason).count();
            out.sample(INFERENCE_REQUEST_FAILURE.name, "", &labels, Num::U(n));
        }
    }

    per_model(out, &INFERENCE_COUNT, &|m| m.inference_count.load(Relaxed));
    per_model(out, &INFERENCE_EXEC_COUNT, &|m| {
        m.execution_count.load(Relaxed)
    });
    per_model(out, &INFERENCE_PENDING_REQUEST_COUNT, &|m| {
        m.pending.load(Relaxed)
    });
    per_model(out, &INFERENCE_REQUEST_DURATION_US, &|m| {
        m.success.ns() / 1000
    });
    per_model(out, &INFERENCE_QUEUE_DURATION_US, &|m| m.queue.ns() / 1000);
    per_model(out, &INFERENCE_COMPUTE_INPUT_DURATION_US, &|m| {
        m.compute_input.ns() / 1000
    });
    per_model(out, &INFERENCE_COMPUTE_INFER_DURATION_US, &|m| {
        m.compute_infer.ns() / 1000
    });
    per_model(out, &INFERENCE_COMPUTE_OUTPUT_DURATION_US, &|m| {
        m.compute_output.ns() / 1000
    });

    out.family(&MODEL_LOAD_DURATION_SECS);
    for m in models {
        if let Some(d) = m.load_duration() {
            let value = Num::F(d.as_secs_f64());
            out.sample(MODEL_LOAD_DURATION_SECS.name, "", &labels(m), value);
        }
    }

    let histograms: [(&MetricDef, HistogramOf); 4] = [
        (&REQUEST_DURATION_SECONDS, |m| &m.request_seconds),
        (&QUEUE_DURATION_SECONDS, |m| &m.queue_seconds),
        (&COMPUTE_DURATION_SECONDS, |m| &m.compute_seconds),
        (&BATCH_SIZE, |m| &m.batch_size),
    ];
    for (d, histogram) in histograms {
        out.family(d);
        for m in models {
            out.histogram(d.name, &labels(m), histogram(m));
        }
    }
    render_batches_formed(out, models);
}

/// The batcher's decisions: batches and rows per reason (every reason, zeros included, so rates
/// can be taken from the first scrape), and the oldest request's wait.
fn render_batches_formed(out: &mut Exposition, models: &[Arc<ModelStats>]) {
    type Count = fn(&crate::telemetry::stats::BatchFormed) -> &AtomicU64;
    let counters: [(&MetricDef, Count); 2] = [
        (&BATCH_FORMED_TOTAL, |f| &f.batches),
        (&BATCH_FORMED_ROWS_TOTAL, |f| &f.rows),
    ];
    for (d, count) in counters {
        out.family(d);
        for m in models {
            for (reason, formed) in BATCH_FORMED_REASONS.iter().zip(&m.batches_formed) {
                let labels = [
                    ("model", m.model.clone()),
                    ("reason", reason.to_string()),
                    ("version", m.version.clone()),
                ];
                out.sample(d.name, "", &labels, Num::U(count(formed).load(Relaxed)));
            }
        }
    }
    out.family(&BATCH_WAIT_SECONDS);
    for m in models {
        let labels = [("model", m.model.clone()), ("version", m.version.clone())];
        out.histogram(BATCH_WAIT_SECONDS.name, &labels, &m.batch_wait_seconds);
    }
    out.family(&BATCH_ANSWERS_SPLIT_TOTAL);
    for m in models {
        let labels = [("model", m.model.clone()), ("version", m.version.clone())];
        let split = Num::U(m.batches_answered_in_halves.load(Relaxed));
        out.sample(BATCH_ANSWERS_SPLIT_TOTAL.name, "", &labels, split);
    }
}

/// The gRPC methods the gateway serves, used as the bounded `method` label: the 20 RPCs of
/// `inference.GRPCInferenceService`, then health checking and server reflection. Anything else is
/// counted as [`OTHER_METHOD`], so a client probing random paths cannot grow the label set.
pub const GRPC_METHODS: [&str; 23] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// The `method` label of requests to any path not in [`GRPC_METHODS`].
pub const OTHER_METHOD: &str = "other";

/// gRPC status codes by their numeric value, as the `code` label.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The numeric value of UNKNOWN, which stands in for status values outside the gRPC spec.
const GRPC_CODE_UNKNOWN: usize = 2;

/// Requests per (method, code) and durations per method. Fixed-size tables of atomics: recording
/// never allocates or locks, and the label set is bounded by construction.
#[derive(Debug)]
pub struct GrpcMetrics {
    /// `requests[method][code]`; the last method slot is [`OTHER_METHOD`].
    requests: Vec<[AtomicU64; GRPC_CODES.len()]>,
    durations: Vec<Histogram>,
    /// The memory budget's counters (server/budget.rs keeps its state in them).
    pub budget: Arc<BudgetGauges>,
}

/// The memory budget's state, kept here so the scrape reads it directly.
#[derive(Debug, Default)]
pub struct BudgetGauges {
    pub in_flight: AtomicU64,
    pub limit: AtomicU64,
    pub peak: AtomicU64,
    pub refused: AtomicU64,
}

impl BudgetGauges {
    fn render_into(&self, out: &mut Exposition) {
        let mut single = |d: &MetricDef, value: &AtomicU64| {
            out.family(d);
            out.sample(d.name, "", &[], Num::U(value.load(Relaxed)));
        };
        single(&INFLIGHT_REQUEST_BYTES, &self.in_flight);
        single(&INFLIGHT_REQUEST_BYTES_LIMIT, &self.limit);
        single(&INFLIGHT_REQUEST_BYTES_PEAK, &self.peak);
        single(&BUDGET_REFUSED_TOTAL, &self.refused);
    }
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcMetrics {
    pub fn new() -> Self {
        let slots = GRPC_METHODS.len() + 1;
        Self {
            requests: (0..slots).map(|_| Default::default()).collect(),
            durations: (0..slots)
                .map(|_| Histogram::new(&LATENCY_BUCKETS_SECONDS))
                .collect(),
            budget: Arc::default(),
        }
    }

    /// The bounded label for a method name (the last segment of the request path).
    pub fn method_label(method: &str) -> &'static str {
        GRPC_METHODS[..]
            .get(Self::method_slot(method))
            .copied()
            .unwrap_or(OTHER_METHOD)
    }

    /// The label for a numeric grpc-status; values outside the spec count as UNKNOWN.
    pub fn code_label(code: i32) -> &'static str {
        GRPC_CODES[Self::code_slot(code)]
    }

    /// One request to `method` (last path segment) ended with status `code` after `elapsed`.
    pub fn record(&self, method: &str, code: i32, elapsed: Duration) {
        let slot = Self::method_slot(method);
        self.requests[slot][Self::code_slot(code)].fetch_add(1, Relaxed);
        self.durations[slot].observe(elapsed.as_secs_f64());
    }

    /// Requests recorded for `method` with status `code`.
    pub fn requests(&self, method: &str, code: i32) -> u64 {
        self.requests[Self::method_slot(method)][Self::code_slot(code)].load(Relaxed)
    }

    /// Renders only the gRPC families.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        self.render_into(&mut out);
        out.finish()
    }

    fn method_slot(method: &str) -> usize {
        GRPC_METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(GRPC_METHODS.len())
    }

    fn code_slot(code: i32) -> usize {
        usize::try_from(code)
            .ok()
            .filter(|c| *c < GRPC_CODES.len())
            .unwrap_or(GRPC_CODE_UNKNOWN)
    }

    fn slot_label(slot: usize) -> &'static str {
        GRPC_METHODS.get(slot).copied().unwrap_or(OTHER_METHOD)
    }

    fn render_into(&self, out: &mut Exposition) {
        // Only pairs that occurred are written: 24 methods x 17 codes of zeros would drown a scrape.
        out.family(&GRPC_REQUESTS_TOTAL);
        for (slot, codes) in self.requests.iter().enumerate() {
            for (code, count) in codes.iter().enumerate() {
                let n = count.load(Relaxed);
                if n > 0 {
                    let labels = [
                        ("method", Self::slot_label(slot).to_string()),
                        ("code", GRPC_CODES[code].to_string()),
                    ];
                    out.sample(GRPC_REQUESTS_TOTAL.name, "", &labels, Num::U(n));
                }
            }
        }
        out.family(&GRPC_REQUEST_DURATION_SECONDS);
        for (slot, histogram) in self.durations.iter().enumerate() {
            if histogram.cumulative().last().copied().unwrap_or(0) > 0 {
                let labels = [("method", Self::slot_label(slot).to_string())];
                out.histogram(GRPC_REQUEST_DURATION_SECONDS.name, &labels, histogram);
            }
        }
        self.budget.render_into(out);
    }
}

/// HTTP requests per (route, status) and durations per route. `route` is one of the door's fixed
/// route names (never a raw path), so the label set is bounded.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: parking_lot::Mutex<std::collections::BTreeMap<(&'static str, u16), u64>>,
    durations: parking_lot::Mutex<std::collections::BTreeMap<&'static str, Histogram>>,
}

impl HttpMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// One request to `route` answered `status` after `elapsed`.
    pub fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
        *self.requests.lock().entry((route, status)).or_default() += 1;
        self.durations
            .lock()
            .entry(route)
            .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS_SECONDS))
            .observe(elapsed.as_secs_f64());
    }

    /// Requests recorded for `route` with `status`.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .iter()
            .filter(|((r, s), _)| *r == route && *s == status)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Renders only the HTTP families.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        out.family(&HTTP_REQUESTS_TOTAL);
        for ((route, status), n) in self.requests.lock().iter() {
            let labels = [("route", route.to_string()), ("code", status.to_string())];
            out.sample(HTTP_REQUESTS_TOTAL.name, "", &labels, Num::U(*n));
        }
        out.family(&HTTP_REQUEST_DURATION_SECONDS);
        for (route, histogram) in self.durations.lock().iter() {
            let labels = [("route", route.to_string())];
            out.histogram(HTTP_REQUEST_DURATION_SECONDS.name, &labels, histogram);
        }
        out.finish()
    }
}

/// Process figures read from /proc/self at scrape time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads the current process's figures; `None` where /proc is not available.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields = StatFields::parse(&stat)?;
        let units = proc_units::get()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_boot_time(&s));
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| parse_max_open_files(&s));
        let ticks = units.clock_ticks_per_second as f64;
        Some(ProcessStats {
            cpu_seconds: (fields.utime_ticks + fields.stime_ticks) as f64 / ticks,
            resident_bytes: fields.rss_pages.saturating_mul(units.page_size),
            virtual_bytes: fields.vsize_bytes,
            threads: fields.threads,
            open_fds,
            max_fds,
            start_time_seconds: boot_time.map(|b| b as f64 + fields.start_ticks as f64 / ticks),
        })
    }

    fn render_into(&self, out: &mut Exposition) {
        let mut single = |d: &MetricDef, value: Num| {
            out.family(d);
            out.sample(d.name, "", &[], value);
        };
        single(&PROCESS_CPU_SECONDS_TOTAL, Num::F(self.cpu_seconds));
        single(&PROCESS_RESIDENT_MEMORY_BYTES, Num::U(self.resident_bytes));
        single(&PROCESS_VIRTUAL_MEMORY_BYTES, Num::U(self.virtual_bytes));
        single(&PROCESS_THREADS, Num::U(self.threads));
        if let Some(n) = self.open_fds {
            single(&PROCESS_OPEN_FDS, Num::U(n));
        }
        if let Some(n) = self.max_fds {
            single(&PROCESS_MAX_FDS, Num::U(n));
        }
        if let Some(t) = self.start_time_seconds {
            single(&PROCESS_START_TIME_SECONDS, Num::F(t));
        }
    }
}

/// The fields of /proc/self/stat that the process metrics need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    utime_ticks: u64,
    stime_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

impl StatFields {
    fn parse(stat: &str) -> Option<StatFields> {
        // Field 2 is the command name in parentheses and may itself hold spaces or ')', so the
        // numbered fields are counted from the last ')'. After it comes field 3 (state).
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        Some(StatFields {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize_bytes: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// Seconds since the epoch at which the machine booted (`btime` in /proc/stat).
fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of open files from /proc/self/limits; `None` when unlimited or unreadable.
fn parse_max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Page size and clock-tick rate, the units of /proc/self/stat.
#[allow(unsafe_code)]
mod proc_units {
    use std::sync::OnceLock;

    #[derive(Debug, Clone, Copy)]
    pub(super) struct ProcUnits {
        pub page_size: u64,
        pub clock_ticks_per_second: u64,
    }

    pub(super) fn get() -> Option<ProcUnits> {
        static UNITS: OnceLock<Option<ProcUnits>> = OnceLock::new();
        *UNITS.get_or_init(|| {
            Some(ProcUnits {
                page_size: sysconf(libc::_SC_PAGESIZE)?,
                clock_ticks_per_second: sysconf(libc::_SC_CLK_TCK)?,
            })
        })
    }

    fn sysconf(name: libc::c_int) -> Option<u64> {
        // SAFETY: sysconf only reads a configuration value; it takes no pointers and is thread-safe.
        let value = unsafe { libc::sysconf(name) };
        u64::try_from(value).ok().filter(|v| *v > 0)
    }
}

/// A sample value: counters and most gauges are integers, durations and times are floats.
#[derive(Debug, Clone, Copy)]
enum Num {
    U(u64),
    F(f64),
}

impl Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Num::U(v) => write!(f, "{v}"),
            Num::F(v) => write_float(f, v),
        }
    }
}

/// Floats as the text format spells them; Rust's Display never uses exponents, so it parses.
fn write_float(f: &mut impl fmt::Write, v: f64) -> fmt::Result {
    if v.is_nan() {
        f.write_str("NaN")
    } else if v == f64::INFINITY {
        f.write_str("+Inf")
    } else if v == f64::NEG_INFINITY {
        f.write_str("-Inf")
    } else {
        write!(f, "{v}")
    }
}

/// Builds a text exposition: one `# HELP` and `# TYPE` per family, followed by its samples.
#[derive(Debug, Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, d: &MetricDef) {
        let _ = writeln!(self.out, "# HELP {} {}", d.name, escape_help(d.help));
        let _ = writeln!(self.out, "# TYPE {} {}", d.name, d.kind.as_str());
    }

    fn sample(&mut self, name: &str, suffix: &str, labels: &[(&str, String)], value: Num) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    fn labels(&mut self, labels: &[(&str, String)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let extra = le.map(|v| ("le", v));
        let all = labels.iter().map(|(k, v)| (*k, v.as_str())).chain(extra);
        for (i, (key, value)) in all.enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(key);
            self.out.push_str("=\"");
            escape_label_value_into(&mut self.out, value);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, String)], h: &Histogram) {
        let cumulative = h.cumulative();
        let count = cumulative.last().copied().unwrap_or(0);
        let mut le = String::new();
        for (i, n) in cumulative.iter().enumerate() {
            le.clear();
            match h.bounds().get(i) {
                Some(bound) => {
                    let _ = write_float(&mut le, *bound);
                }
                None => le.push_str("+Inf"),
            }
            self.out.push_str(name);
            self.out.push_str("_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {n}");
        }
        self.sample(name, "_sum", labels, Num::F(h.sum()));
        self.sample(name, "_count", labels, Num::U(count));
    }

    fn finish(self) -> String {
        self.out
    }
}

/// `# HELP` text escapes backslash and line feed.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A label value escaped for the text format.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    escape_label_value_into(&mut out, value);
    out
}

#[cfg(test)]
mod tests;
