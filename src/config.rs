//! Command-line configuration. Every flag is also an environment variable (ONNX_GATEWAY_<FLAG>), and
//! flags carry Triton's names where Triton has one. Groups are passed whole to the part they configure.
use std::net::IpAddr;
use std::path::PathBuf;

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
    pub shm: ShmArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub log: crate::telemetry::logging::LoggingArgs,
    #[command(flatten)]
    pub tracing: crate::telemetry::otel::TracingArgs,
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
    #[arg(long, env = "ONNX_GATEWAY_MODEL_REPOSITORY")]
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
    #[arg(long, env = "ONNX_GATEWAY_MODEL_CONTROL_MODE", value_enum, default_value_t = ModelControlMode::None)]
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
    /// Warm up every model whose config lists no model_warmup with zero data at each batch size the
    /// batcher can form (1, preferred sizes, max_batch_size) before it reports READY, so the first
    /// request at a new shape does not stall. A config parameter `auto_warmup` overrides it per model.
    #[arg(long, env = "ONNX_GATEWAY_MODEL_AUTO_WARMUP", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub model_auto_warmup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelControlMode {
    None,
    Poll,
    Explicit,
}

/// The gRPC listener.
#[derive(Debug, Clone, Args)]
pub struct GrpcArgs {
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
    /// Requests one connection may have in progress; more are shed at once with RESOURCE_EXHAUSTED
    /// instead of queueing without bound. 0 disables the limit.
    #[arg(
        long,
        env = "ONNX_GATEWAY_GRPC_CONNECTION_CONCURRENCY",
        default_value_t = 512
    )]
    pub grpc_connection_concurrency: usize,
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
    /// PEM certificate chain of the server.
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
    /// means no token is required. Read once at startup; surrounding whitespace is ignored.
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
    }
}
