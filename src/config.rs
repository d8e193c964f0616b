//! Command-line configuration. Every flag is also an environment variable (ONNX_GATEWAY_<FLAG>), and
//! flags carry Triton's names where Triton has one. Groups are passed whole to the part they configure.
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// Serve ONNX models through ONNX Runtime over the KServe v2 / Triton gRPC protocol.
#[derive(Debug, Clone, Parser)]
#[command(name = "onnx-gateway", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub grpc: GrpcArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub reactor: ReactorArgs,
    #[command(flatten)]
    pub shm: ShmArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub log: crate::telemetry::logging::LoggingArgs,
    #[command(flatten)]
    pub tracing: crate::telemetry::otel::TracingArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// The response cache, as Triton's flags.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Response cache settings as Triton's: `local,size=BYTES` enables the in-memory LRU cache of
    /// that many bytes, shared by the models whose config sets `response_cache { enable: true }`.
    #[arg(long = "cache-config", env = "ONNX_GATEWAY_CACHE_CONFIG")]
    pub cache_config: Vec<String>,
}

/// How models are loaded and when the server counts as ready.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model repository in Triton's layout: <dir>/<model>/config.pbtxt and <dir>/<model>/<version>/model.onnx.
    /// `--model-store` is Triton's other name for it.
    #[arg(
        long,
        visible_alias = "model-store",
        env = "ONNX_GATEWAY_MODEL_REPOSITORY"
    )]
    pub model_repository: PathBuf,
    /// Exit at startup when any model fails to load (as Triton). With false, the other models serve and
    /// RepositoryIndex shows the failed one UNAVAILABLE with its reason.
    #[arg(long, env = "ONNX_GATEWAY_EXIT_ON_ERROR", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub exit_on_error: bool,
    /// ServerReady is true only when every model is ready (as Triton). With false, the server is ready
    /// once startup loading has finished.
    #[arg(long, env = "ONNX_GATEWAY_STRICT_READINESS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub strict_readiness: bool,
    /// Model control mode: none (load everything at startup), poll (also apply repository changes),
    /// explicit (load only --load-model names; RepositoryModelLoad/Unload RPCs enabled).
    /// In any case (Triton's documents write POLL and EXPLICIT).
    #[arg(long, env = "ONNX_GATEWAY_MODEL_CONTROL_MODE", value_enum, ignore_case = true, default_value_t = ModelControlMode::None)]
    pub model_control_mode: ModelControlMode,
    /// Seconds between repository scans in poll mode.
    #[arg(long, env = "ONNX_GATEWAY_REPOSITORY_POLL_SECS", default_value_t = 15)]
    pub repository_poll_secs: u64,
    /// Models to load at startup in explicit mode; repeatable; `*` loads all.
    #[arg(
        long = "load-model",
        env = "ONNX_GATEWAY_LOAD_MODEL",
        value_delimiter = ','
    )]
    pub load_models: Vec<String>,
    /// Requests that may wait in one model's queue when its config sets no max_queue_size, so memory
    /// stays bounded under any load.
    #[arg(
        long,
        env = "ONNX_GATEWAY_DEFAULT_MAX_QUEUE_SIZE",
        default_value_t = 4096
    )]
    pub default_max_queue_size: usize,
    /// Most instances (ONNX Runtime sessions) one model version may build over all its instance
    /// groups; a config asking for more fails to load with INVALID_ARGUMENT. Default: 4 per core of
    /// the CPU budget (cgroup quota or available cores).
    #[arg(long, env = "ONNX_GATEWAY_MAX_INSTANCES_PER_MODEL", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_instances_per_model: Option<u64>,
    /// Seconds a model load may take; a load still building then fails (DEADLINE_EXCEEDED for a
    /// RepositoryModelLoad), stops building instances, and the previous version keeps serving.
    #[arg(long, env = "ONNX_GATEWAY_MODEL_LOAD_TIMEOUT_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub model_load_timeout_secs: u64,
    /// Warm up every model whose config lists no model_warmup with zero data at each batch size the
    /// batcher can form (1, preferred sizes, max_batch_size) before it reports READY, so the first
    /// request at a new shape does not stall. A config parameter `auto_warmup` overrides it per model.
    #[arg(long, env = "ONNX_GATEWAY_MODEL_AUTO_WARMUP", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub model_auto_warmup: bool,
    /// How dynamic batchers use `max_queue_delay_microseconds` in models whose config sets no
    /// `batching_strategy` parameter: triton (wait for the whole window unless the batch fills, as
    /// Triton) or adaptive (the window is a cap: dispatch at once unless waiting is expected to
    /// raise throughput, learned from arrivals and execution costs).
    #[arg(long, env = "ONNX_GATEWAY_DEFAULT_BATCHING_STRATEGY", value_enum, default_value_t = crate::scheduler::BatchingStrategy::Triton)]
    pub default_batching_strategy: crate::scheduler::BatchingStrategy,
    /// A batch of a model whose recent batches took at most this many microseconds runs on the
    /// task of the request that formed it, not on an instance thread: the two context switches of
    /// that hand-off cost more than a cheap model's run. Longer batches always run on the model's
    /// instance threads. What queued behind an inline batch runs next on a task of its own, once
    /// the first batch's answers were written, while each batch takes less than this and for at
    /// most this per turn of the reactor, so the reactor is held at most about twice this.
    /// 0 turns it off. Default: 100, or 2000 where the CPU budget is one CPU (there the instance
    /// thread has no core of its own: the hand-off buys no parallelism, only context switches).
    #[arg(long, env = "ONNX_GATEWAY_INLINE_EXECUTION_MAX_MICROSECONDS", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub inline_execution_max_microseconds: Option<u64>,
    /// A batch run inline (above) of 8 or more requests, of a model whose recent batches took at
    /// least this many microseconds, answers its first half one reactor turn before the second,
    /// so that closed-loop clients send their next requests while the server still answers
    /// instead of taking turns with it. Only while the model's learned cost is mostly per row:
    /// the batches then formed are about half as large. 0 turns it off.
    #[arg(long, env = "ONNX_GATEWAY_SPLIT_ANSWERS_MIN_MICROSECONDS", default_value_t = 150, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub split_answers_min_microseconds: u64,
    /// Load a model only from a complete config.pbtxt, as Triton's flag: nothing is filled in from
    /// the ONNX graph (inputs, outputs, max_batch_size, the batcher), and a model without
    /// config.pbtxt fails to load. Defaults (version policy, instance groups) still apply.
    #[arg(long, env = "ONNX_GATEWAY_DISABLE_AUTO_COMPLETE_CONFIG", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub disable_auto_complete_config: bool,
    /// Triton's older name for --disable-auto-complete-config: true means the same.
    #[arg(long, env = "ONNX_GATEWAY_STRICT_MODEL_CONFIG", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub strict_model_config: bool,
    /// Triton's backend settings, `[BACKEND,]SETTING=VALUE`, repeatable. Honoured:
    /// `default-max-batch-size=N` (the max_batch_size auto-complete gives a model that can batch,
    /// 4 by default), globally or for `onnxruntime`. Settings for other backends are ignored with a
    /// warning (only ONNX models are served); any other onnxruntime setting stops startup.
    #[arg(long = "backend-config", env = "ONNX_GATEWAY_BACKEND_CONFIG", value_delimiter = ';', value_parser = parse_backend_setting)]
    pub backend_config: Vec<BackendSetting>,
}

/// One `--backend-config` value: `BACKEND,SETTING=VALUE`, or `SETTING=VALUE` for every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSetting {
    /// None: the global form.
    pub backend: Option<String>,
    pub setting: String,
    pub value: String,
}

fn parse_backend_setting(text: &str) -> Result<BackendSetting, String> {
    let (backend, pair) = match text.split_once(',') {
        Some((backend, pair)) => (Some(backend.trim().to_string()), pair),
        None => (None, text),
    };
    let (setting, value) = pair
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not [BACKEND,]SETTING=VALUE"))?;
    Ok(BackendSetting {
        backend,
        setting: setting.trim().to_string(),
        value: value.trim().to_string(),
    })
}

impl ModelArgs {
    /// Whether configs are completed from the ONNX graph (neither Triton flag turned it off).
    pub fn auto_complete(&self) -> bool {
        !(self.disable_auto_complete_config || self.strict_model_config)
    }

    /// The max_batch_size auto-complete gives a model that can batch: the last
    /// `default-max-batch-size` given globally or for onnxruntime. Settings for other backends are
    /// logged and skipped; another onnxruntime setting, or a value that is not a positive
    /// integer, is an error naming it.
    pub fn default_max_batch_size(&self) -> Result<i32, String> {
        let mut size = crate::model::autocomplete::DEFAULT_MAX_BATCH_SIZE;
        for entry in &self.backend_config {
            match entry.backend.as_deref() {
                None | Some("onnxruntime") => {}
                Some(other) => {
                    tracing::warn!(backend = other, setting = %entry.setting, "--backend-config ignored: this server serves ONNX models only");
                    continue;
                }
            }
            if entry.setting != "default-max-batch-size" {
                return Err(format!(
                    "--backend-config {}: not supported here (only default-max-batch-size; thread counts are per model, config parameters intra_op_thread_count and inter_op_thread_count)",
                    entry.setting
                ));
            }
            size = entry.value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                format!(
                    "--backend-config default-max-batch-size={}: not a positive integer",
                    entry.value
                )
            })?;
        }
        Ok(size)
    }

    /// The inline bound `--inline-execution-max-microseconds` gives on `cpu_budget` CPUs; None
    /// when inline execution is off.
    pub fn inline_execution_max(&self, cpu_budget: usize) -> Option<Duration> {
        let micros = self
            .inline_execution_max_microseconds
            .unwrap_or(if cpu_budget <= 1 { 2000 } else { 100 });
        (micros > 0).then(|| Duration::from_micros(micros))
    }

    /// The shortest recent batch whose answers may be split (`--split-answers-min-microseconds`);
    /// None when splitting is off.
    pub fn split_answers_from(&self) -> Option<Duration> {
        let micros = self.split_answers_min_microseconds;
        (micros > 0).then(|| Duration::from_micros(micros))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelControlMode {
    None,
    Poll,
    Explicit,
}

/// Triton's `--grpc-infer-response-compression-level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResponseCompression {
    None,
    Low,
    Medium,
    High,
}

/// The gRPC listener.
#[derive(Debug, Clone, Args)]
pub struct GrpcArgs {
    /// Serve gRPC (as Triton's flag). With false there is no gRPC listener at all, on TCP or the
    /// Unix socket.
    #[arg(long, env = "ONNX_GATEWAY_ALLOW_GRPC", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_grpc: bool,
    /// Address the gRPC server binds (IPv4 or IPv6).
    #[arg(long, env = "ONNX_GATEWAY_GRPC_ADDRESS", default_value = "0.0.0.0")]
    pub grpc_address: IpAddr,
    /// gRPC port; 0 picks a free port (the chosen one is logged).
    #[arg(long, env = "ONNX_GATEWAY_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "ONNX_GATEWAY_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Also serve gRPC on this Unix domain socket (for clients in the same pod), without TLS; a stale
    /// socket file is replaced, any other file there stops startup.
    #[arg(long, env = "ONNX_GATEWAY_GRPC_UDS")]
    pub grpc_uds: Option<PathBuf>,
    /// Seconds between HTTP/2 keepalive pings to idle clients; 0 disables them.
    #[arg(long, env = "ONNX_GATEWAY_GRPC_KEEPALIVE_SECS", default_value_t = 60)]
    pub grpc_keepalive_secs: u64,
    /// Seconds to wait for a keepalive ping's answer before closing the connection.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_KEEPALIVE_TIMEOUT_SECS",
        default_value_t = 20
    )]
    pub grpc_keepalive_timeout_secs: u64,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub grpc_max_concurrent_streams: u32,
    /// Compress the inference service's responses for clients that accept gzip (their
    /// grpc-accept-encoding), as Triton's flag: none, or low, medium or high, which all mean gzip
    /// at its default level here (tonic offers no levels). Clients that accept no compression get
    /// plain responses.
    #[arg(long, env = "ONNX_GATEWAY_GRPC_INFER_RESPONSE_COMPRESSION_LEVEL", value_enum, ignore_case = true, default_value_t = ResponseCompression::None)]
    pub grpc_infer_response_compression_level: ResponseCompression,
    /// Requests one connection may have in progress; more are shed at once with RESOURCE_EXHAUSTED
    /// instead of queueing without bound. 0 disables the limit.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_CONNECTION_CONCURRENCY",
        default_value_t = 512
    )]
    pub grpc_connection_concurrency: usize,
    /// Seconds a new gRPC connection has to send the HTTP/2 preface (under TLS: to finish the TLS
    /// handshake) before it is closed; 0 disables the bound.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_HANDSHAKE_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub grpc_handshake_timeout_secs: u64,
    /// Seconds a gRPC connection may stay open with no RPC in flight before it is closed (gRPC's
    /// MAX_CONNECTION_IDLE; keepalive pings do not count as use); 0 disables the bound.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_IDLE_TIMEOUT_SECS",
        default_value_t = 300
    )]
    pub grpc_idle_timeout_secs: u64,
    /// gRPC connections open at once, TCP and Unix socket together; one more is closed before any
    /// HTTP/2 byte, which a client reports as UNAVAILABLE and retries after its backoff. 0 disables
    /// the limit.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub grpc_max_connections: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// TLS for the gRPC listener (Triton's flag names).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Serve gRPC over TLS (needs --grpc-server-cert and --grpc-server-key).
    #[arg(long, env = "ONNX_GATEWAY_GRPC_USE_SSL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub grpc_use_ssl: bool,
    /// Require client certificates signed by --grpc-root-cert (mutual TLS).
    #[arg(long, env = "ONNX_GATEWAY_GRPC_USE_SSL_MUTUAL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub grpc_use_ssl_mutual: bool,
    /// PEM certificate chain of the server. It, the key and the root cert are read again on SIGHUP
    /// for new connections; a set that does not load keeps the one in force.
    #[arg(long, env = "ONNX_GATEWAY_GRPC_SERVER_CERT")]
    pub grpc_server_cert: Option<PathBuf>,
    /// PEM private key of the server.
    #[arg(long, env = "ONNX_GATEWAY_GRPC_SERVER_KEY")]
    pub grpc_server_key: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to (mutual TLS).
    #[arg(long, env = "ONNX_GATEWAY_GRPC_ROOT_CERT")]
    pub grpc_root_cert: Option<PathBuf>,
}

/// Bearer-token authentication of gRPC calls.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// File holding the bearer token clients must send as `authorization: Bearer <token>`; unset
    /// means no token is required. Read at startup and again on SIGHUP (a file that cannot be read
    /// or is empty keeps the token in force); surrounding whitespace is ignored.
    #[arg(long, env = "ONNX_GATEWAY_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Let grpc.health.v1 calls through without a token (for Kubernetes probes).
    #[arg(long, env = "ONNX_GATEWAY_AUTH_EXEMPT_HEALTH", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub auth_exempt_health: bool,
}

/// The admin HTTP listener (metrics and HTTP health).
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Address the admin HTTP server binds.
    #[arg(long, env = "ONNX_GATEWAY_METRICS_ADDRESS", default_value = "0.0.0.0")]
    pub metrics_address: IpAddr,
    /// Admin HTTP port serving /metrics and /v2/health/{live,ready}; 0 picks a free port.
    #[arg(long, env = "ONNX_GATEWAY_METRICS_PORT", default_value_t = 8002)]
    pub metrics_port: u16,
    /// Serve Prometheus metrics on the admin port (as Triton's flag). With false, /metrics answers
    /// 404 saying so; health stays on the port for probes.
    #[arg(long, env = "ONNX_GATEWAY_ALLOW_METRICS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_metrics: bool,
}

/// Client system shared memory (Triton's system_shared_memory extension).
#[derive(Debug, Clone, Args)]
pub struct ShmArgs {
    /// Let clients register POSIX shared-memory regions for tensor data. Off by default: a client that
    /// can reach the port could otherwise make the server map any /dev/shm object it can open. Turn it
    /// on where clients share the pod (sidecar), ideally with a loopback/Unix-socket listener or a token.
    #[arg(long, env = "ONNX_GATEWAY_ALLOW_CLIENT_SHM", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_client_shm: bool,
}

/// ONNX Runtime.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Path of libonnxruntime.so. Otherwise ORT_DYLIB_PATH, then .onnxruntime/lib/ (made by
    /// scripts/setup), then the system library path.
    #[arg(long, env = "ONNX_GATEWAY_ONNXRUNTIME_LIB")]
    pub onnxruntime_lib: Option<PathBuf>,
}

/// The async runtime that serves every connection (gRPC, HTTP, metrics).
#[derive(Debug, Clone, Args)]
pub struct ReactorArgs {
    /// Threads of the async runtime; default: the CPU budget (the affinity mask bounded by the
    /// cgroup quota). With 1 the runtime runs on the main thread alone and runs woken tasks in the
    /// order they were woken, so the answers of one batch leave the connection in one write (a
    /// multi-threaded runtime polls the connection right after each answer: one write apiece).
    #[arg(long, env = "ONNX_GATEWAY_REACTOR_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub reactor_threads: Option<u16>,
}

impl ReactorArgs {
    /// The reactor's thread count on `cpu_budget` CPUs.
    pub fn threads(&self, cpu_budget: usize) -> usize {
        self.reactor_threads.map_or(cpu_budget.max(1), usize::from)
    }
}

/// Shutdown behaviour.
#[derive(Debug, Clone, Args)]
pub struct LifecycleArgs {
    /// Seconds to finish accepted and queued requests after SIGTERM before exiting anyway (as Triton).
    #[arg(long, env = "ONNX_GATEWAY_EXIT_TIMEOUT_SECS", default_value_t = 30)]
    pub exit_timeout_secs: u64,
    /// Seconds to keep serving after SIGTERM with readiness already off, so load balancers and
    /// Kubernetes endpoints stop sending traffic before the listener closes.
    #[arg(long, env = "ONNX_GATEWAY_DRAIN_DELAY_SECS", default_value_t = 5)]
    pub drain_delay_secs: u64,
}

/// The KServe v2 HTTP/REST listener (Triton's flag names, plus TLS which Triton lacks).
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Serve the KServe v2 HTTP/REST protocol (as Triton's --allow-http).
    #[arg(long, env = "ONNX_GATEWAY_ALLOW_HTTP", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_http: bool,
    /// Address the HTTP server binds (IPv4 or IPv6).
    #[arg(long, env = "ONNX_GATEWAY_HTTP_ADDRESS", default_value = "0.0.0.0")]
    pub http_address: IpAddr,
    /// HTTP port (HTTP/1.1 and cleartext HTTP/2); 0 picks a free port (the chosen one is logged).
    #[arg(long, env = "ONNX_GATEWAY_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// HTTP/REST connections open at once; one more is answered 503 with Retry-After and closed
    /// (closed without an answer under TLS). 0 disables the limit.
    #[arg(
        long,
        env = "ONNX_GATEWAY_HTTP_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub http_max_connections: usize,
    /// Seconds an HTTP connection may stay open with no request in progress before it is closed
    /// (as --grpc-idle-timeout-secs; an idle HTTP/1.1 keep-alive connection is closed sooner, 30 s
    /// after it starts waiting for its next request head). 0 disables the bound.
    #[arg(
        long,
        env = "ONNX_GATEWAY_HTTP_IDLE_TIMEOUT_SECS",
        default_value_t = 300
    )]
    pub http_idle_timeout_secs: u64,
    /// Largest HTTP request body accepted, in bytes, after decompression.
    #[arg(long, env = "ONNX_GATEWAY_HTTP_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub http_max_body_bytes: usize,
    /// Serve HTTP over TLS (needs --http-server-cert and --http-server-key).
    #[arg(long, env = "ONNX_GATEWAY_HTTP_USE_SSL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub http_use_ssl: bool,
    /// Require HTTP client certificates signed by --http-root-cert (mutual TLS).
    #[arg(long, env = "ONNX_GATEWAY_HTTP_USE_SSL_MUTUAL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub http_use_ssl_mutual: bool,
    /// PEM certificate chain of the HTTP server; read again on SIGHUP, as gRPC's.
    #[arg(long, env = "ONNX_GATEWAY_HTTP_SERVER_CERT")]
    pub http_server_cert: Option<PathBuf>,
    /// PEM private key of the HTTP server.
    #[arg(long, env = "ONNX_GATEWAY_HTTP_SERVER_KEY")]
    pub http_server_key: Option<PathBuf>,
    /// PEM CA certificate(s) that HTTP client certificates must chain to (mutual TLS).
    #[arg(long, env = "ONNX_GATEWAY_HTTP_ROOT_CERT")]
    pub http_root_cert: Option<PathBuf>,
    /// Another name that answers for the repository's only model, on both protocols (KServe: the
    /// InferenceService name, while the model directory under /mnt/models has its own name). A model
    /// really named so wins; with more than one model loaded the alias resolves to nothing.
    #[arg(long, env = "ONNX_GATEWAY_MODEL_ALIAS")]
    pub model_alias: Option<String>,
}

/// The memory budget for requests in flight.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Request bytes the whole server holds at once (received, queued or running, until answered);
    /// a request that would go past it is refused at once with RESOURCE_EXHAUSTED naming the budget.
    /// Default: half the cgroup memory limit where one is set, else 2 GiB. 0 disables the limit.
    #[arg(long, env = "ONNX_GATEWAY_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<u64>,
}

impl MemoryArgs {
    /// The budget in bytes (0: unlimited), the default resolved against the cgroup limit.
    pub fn inflight_bytes(&self) -> u64 {
        self.max_inflight_bytes
            .unwrap_or_else(crate::server::budget::default_budget_bytes)
    }
}

/// Encrypted model files, per-model authorization and the audit log (security/).
#[derive(Debug, Clone, Args)]
pub struct SecurityArgs {
    /// Key for encrypted model files (`model.onnx.enc`): 32 raw bytes or 64 hex characters.
    /// Repeatable (comma-separated in the variable) so old and new keys work during a rotation.
    #[arg(
        long = "model-key-file",
        env = "ONNX_GATEWAY_MODEL_KEY_FILE",
        value_delimiter = ','
    )]
    pub model_key_files: Vec<PathBuf>,
    /// JSON policy of tokens (by SHA-256), the models each may use and whether it is an admin.
    /// Reloaded on SIGHUP; a file that does not parse keeps the last good policy.
    #[arg(long, env = "ONNX_GATEWAY_AUTH_POLICY_FILE")]
    pub auth_policy_file: Option<PathBuf>,
    /// Append JSON lines for denied calls, model loads/unloads, policy reloads and shared-memory
    /// registrations to this file.
    #[arg(long, env = "ONNX_GATEWAY_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Bytes the audit log may hold before it is moved to PATH.1 (replacing the previous one) and
    /// a new file is started: at most twice this on disk. 0: unbounded.
    #[arg(
        long,
        env = "ONNX_GATEWAY_AUDIT_LOG_MAX_BYTES",
        default_value_t = 100 * 1024 * 1024
    )]
    pub audit_log_max_bytes: u64,
    /// Seconds between looks at the files SIGHUP re-reads (TLS certificates, keys and CAs, the
    /// policy, the token file): once one changed, all are reloaded as on SIGHUP, so a Secret
    /// rotated under the pod takes effect with no signal sent. Only while such a file is
    /// configured. 0: on SIGHUP only.
    #[arg(long, env = "ONNX_GATEWAY_RELOAD_POLL_SECS", default_value_t = 30)]
    pub reload_poll_secs: u64,
}

/// How the server presents itself to clients.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// Name ServerMetadata reports; clients written for Triton may check for `triton`.
    /// `--id` is Triton's name for it.
    #[arg(
        long,
        visible_alias = "id",
        env = "ONNX_GATEWAY_SERVER_NAME",
        default_value = "onnx-gateway"
    )]
    pub server_name: String,
}

impl Config {
    /// A config for tests and embedding: the repository, everything else default, ports 0 on loopback.
    pub fn for_repository(repo: impl Into<PathBuf>) -> Self {
        let mut config = Config::parse_from(["onnx-gateway", "--model-repository", "."]);
        config.models.model_repository = repo.into();
        config.grpc.grpc_address = IpAddr::from([127, 0, 0, 1]);
        config.grpc.grpc_port = 0;
        config.admin.metrics_address = IpAddr::from([127, 0, 0, 1]);
        config.admin.metrics_port = 0;
        config.lifecycle.drain_delay_secs = 0;
        config.http.http_address = IpAddr::from([127, 0, 0, 1]);
        config.http.http_port = 0;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Config::command().debug_assert();
    }

    /// The config of `g --model-repository m EXTRA...`.
    fn parse_with(extra: &[&str]) -> Config {
        let mut argv = vec!["g", "--model-repository", "m"];
        argv.extend_from_slice(extra);
        Config::parse_from(argv)
    }

    #[test]
    fn the_triton_command_line_kserve_and_helm_charts_pass_is_accepted() {
        let c = Config::parse_from([
            "tritonserver",
            "--model-store=/mnt/models",
            "--grpc-port=9000",
            "--http-port=8080",
            "--allow-grpc=true",
            "--allow-http=true",
            "--model-control-mode=POLL",
            "--strict-model-config=false",
            "--allow-metrics=true",
            "--log-info=true",
            "--id=triton",
            "--backend-config=onnxruntime,default-max-batch-size=512",
        ]);
        assert_eq!(c.models.model_repository, PathBuf::from("/mnt/models"));
        assert_eq!(c.models.model_control_mode, ModelControlMode::Poll);
        assert!(c.grpc.allow_grpc && c.admin.allow_metrics && c.log.log_info);
        assert_eq!(c.identity.server_name, "triton");
        assert!(c.models.auto_complete());
        assert_eq!(c.models.default_max_batch_size(), Ok(512));
    }

    #[test]
    fn either_triton_flag_turns_auto_complete_off() {
        assert!(parse_with(&[]).models.auto_complete());
        assert!(!parse_with(&["--disable-auto-complete-config"])
            .models
            .auto_complete());
        assert!(!parse_with(&["--strict-model-config=true"])
            .models
            .auto_complete());
    }

    #[test]
    fn backend_settings_apply_to_onnxruntime_or_are_refused_by_name() {
        let size = |extra: &[&str]| parse_with(extra).models.default_max_batch_size();
        assert_eq!(size(&[]), Ok(4));
        assert_eq!(
            size(&["--backend-config=default-max-batch-size=16"]),
            Ok(16)
        );
        // Another backend's settings cannot matter to ONNX models: skipped.
        let other = [
            "--backend-config=tensorflow,version=2",
            "--backend-config=default-max-batch-size=8",
        ];
        assert_eq!(size(&other), Ok(8));
        let refused =
            size(&["--backend-config=onnxruntime,enable-global-threadpool=1"]).unwrap_err();
        assert!(refused.contains("enable-global-threadpool"), "{refused}");
        let bad = size(&["--backend-config=default-max-batch-size=0"]).unwrap_err();
        assert!(bad.contains("not a positive integer"), "{bad}");
        let syntax = Config::try_parse_from([
            "g",
            "--model-repository",
            "m",
            "--backend-config",
            "onnxruntime",
        ]);
        assert!(syntax
            .unwrap_err()
            .to_string()
            .contains("[BACKEND,]SETTING=VALUE"));
    }

    #[test]
    fn the_inline_bound_follows_the_cpu_budget_unless_set() {
        let set: &[&str] = &["--inline-execution-max-microseconds", "250"];
        let off: &[&str] = &["--inline-execution-max-microseconds=0"];
        let cases: [(&[&str], usize, Option<u64>); 5] = [
            (&[], 1, Some(2000)),
            (&[], 4, Some(100)),
            (set, 1, Some(250)),
            (set, 4, Some(250)),
            (off, 1, None),
        ];
        for (extra, cpus, micros) in cases {
            let bound = parse_with(extra).models.inline_execution_max(cpus);
            assert_eq!(
                bound,
                micros.map(Duration::from_micros),
                "{extra:?} on {cpus}"
            );
        }
        assert!(
            Config::try_parse_from(["g", "--inline-execution-max-microseconds", "10001"]).is_err()
        );
    }

    #[test]
    fn reactor_threads_default_to_the_cpu_budget() {
        let parse = |extra: &[&str]| parse_with(extra).reactor;
        assert_eq!(parse(&[]).threads(1), 1);
        assert_eq!(parse(&[]).threads(6), 6);
        assert_eq!(parse(&["--reactor-threads", "1"]).threads(6), 1);
        assert_eq!(parse(&["--reactor-threads=3"]).threads(1), 3);
        assert!(Config::try_parse_from(["g", "--reactor-threads", "0"]).is_err());
    }

    #[test]
    fn triton_style_booleans() {
        let c = Config::parse_from([
            "g",
            "--model-repository",
            "m",
            "--exit-on-error=false",
            "--strict-readiness",
            "false",
        ]);
        assert!(!c.models.exit_on_error);
        assert!(!c.models.strict_readiness);
        let c = Config::parse_from(["g", "--model-repository", "m", "--exit-on-error"]);
        assert!(c.models.exit_on_error);
        assert_eq!(c.grpc.grpc_port, 8001);
        assert_eq!(c.admin.metrics_port, 8002);
        assert_eq!(c.http.http_port, 8000);
        assert!(c.http.allow_http);
    }

    #[test]
    fn security_flags_leave_the_others_as_they_were() {
        let c = Config::parse_from([
            "g",
            "--model-repository",
            "m",
            "--model-control-mode=explicit",
            "--model-key-file",
            "old.key",
            "--model-key-file=new.key",
            "--auth-policy-file",
            "policy.json",
            "--audit-log",
            "audit.jsonl",
        ]);
        assert_eq!(c.models.model_control_mode, ModelControlMode::Explicit);
        let keys: Vec<&str> = c
            .security
            .model_key_files
            .iter()
            .filter_map(|p| p.to_str())
            .collect();
        assert_eq!(keys, ["old.key", "new.key"]);
        assert_eq!(
            c.security.auth_policy_file.as_deref(),
            Some(std::path::Path::new("policy.json"))
        );
        assert!(c.security.audit_log.is_some());
        let plain = Config::parse_from(["g", "--model-repository", "m"]);
        assert!(
            plain.security.model_key_files.is_empty() && plain.security.auth_policy_file.is_none()
        );
    }

    #[test]
    fn default_batching_strategy_is_triton_unless_asked() {
        use crate::scheduler::BatchingStrategy;
        let plain = Config::parse_from(["g", "--model-repository", "m"]);
        assert_eq!(
            plain.models.default_batching_strategy,
            BatchingStrategy::Triton
        );
        let adaptive = Config::parse_from([
            "g",
            "--model-repository",
            "m",
            "--default-batching-strategy",
            "adaptive",
        ]);
        assert_eq!(
            adaptive.models.default_batching_strategy,
            BatchingStrategy::Adaptive
        );
        let refused = Config::try_parse_from([
            "g",
            "--model-repository",
            "m",
            "--default-batching-strategy=eager",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("triton") && refused.contains("adaptive"),
            "{refused}"
        );
    }
}
