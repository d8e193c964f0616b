//! The `onnx-gateway` binary: parse config, init telemetry, call `run`.
use clap::Parser;
use onnx_gateway::security::encrypt_command;
use onnx_gateway::telemetry::{logging, otel::OtelTracing};
use onnx_gateway::Config;

/// mimalloc returns freed memory to the OS after a burst, where glibc's malloc keeps most of it
/// (figures in docs/memory.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // `onnx-gateway encrypt-model ...` is a separate command; anything else is the server's flags.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == encrypt_command::SUBCOMMAND)
    {
        let args = encrypt_command::EncryptModelArgs::parse_from(std::env::args_os().skip(1));
        return match encrypt_command::run(&args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("onnx-gateway encrypt-model: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = Config::parse();
    // As many reactor threads as CPUs the pod may use (the affinity mask bounded by the cgroup
    // quota): tokio's default counts the node's cores, 64 threads in a 1-CPU sidecar.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(onnx_gateway::runtime::cpu_budget())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("onnx-gateway: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        // Registered before anything else, so a SIGTERM at any point (even during model loading)
        // starts the drain instead of killing the process.
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("onnx-gateway: cannot install signal handlers: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        // The OTLP exporters run on tokio, so tracing starts inside the runtime, before logging.
        let tracing = match OtelTracing::init(&config.tracing) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("onnx-gateway: tracing: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        if let Err(e) = logging::init(&config.log, tracing.as_ref().map(|t| t.layer())) {
            eprintln!("onnx-gateway: logging: {e}");
            return std::process::ExitCode::FAILURE;
        }
        let result = onnx_gateway::run(config, shutdown).await;
        if let Some(tracing) = tracing {
            if let Err(e) = tracing.shutdown().await {
                tracing::warn!(error = %e, "flushing traces failed");
            }
        }
        match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    });
    // `run` has drained within --exit-timeout-secs; a session build still running on the
    // blocking pool (it cannot be interrupted) must not hold the exit.
    runtime.shutdown_background();
    code
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
