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
    pub lifecycle: LifecycleArgs,
    #[command(flatten)]
    pub log: LogArgs,
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
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Verbosity: 0 info, 1 debug, 2 trace. RUST_LOG, when set, takes precedence.
    #[arg(long, env = "ONNX_GATEWAY_LOG_VERBOSE", default_value_t = 0)]
    pub log_verbose: u8,
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
