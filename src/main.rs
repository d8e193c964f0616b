//! The `onnx-gateway` binary: parse config, init telemetry, call `run`.
use clap::Parser;
use onnx_gateway::security::encrypt_command;
use onnx_gateway::telemetry::{logging, otel::OtelTracing};
use onnx_gateway::Config;

/// mimalloc returns freed memory to the OS after a burst, where glibc's malloc keeps most of it
/// (figures in docs/memory.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line, less a leading `tritonserver`: manifests written for Triton's image (KServe's
/// stock Triton runtime among them) start their arguments with the command, which that image's
/// entrypoint runs; here the image's entrypoint is the server itself.
fn server_args() -> impl Iterator<Item = std::ffi::OsString> {
    let mut args = std::env::args_os().peekable();
    let program = args.next();
    if args.peek().is_some_and(|a| a == "tritonserver") {
        args.next();
    }
    program.into_iter().chain(args)
}

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
    let config = Config::parse_from(server_args());
    let reactor_threads = config.reactor.threads(onnx_gateway::runtime::cpu_budget());
    let runtime = match async_runtime(reactor_threads) {
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
            // Not dropped: the SDK's drop waits for its batching task, which on a one-thread
            // runtime could never run while this thread waits.
            if let Some(tracing) = tracing {
                let _ = tracing.shutdown().await;
            }
            return std::process::ExitCode::FAILURE;
        }
        tracing::info!(reactor_threads, "async runtime started");
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

/// The async runtime with `threads` threads (by default as many as CPUs the pod may use: tokio's own
/// default counts the node's cores, 64 threads in a 1-CPU sidecar). One thread is tokio's
/// current-thread runtime on the main thread: it has no "LIFO slot", which in the multi-threaded
/// runtime makes the connection task run right after each request task that answered and write
/// that answer alone. In FIFO order every answer of a batch is queued before the connection task
/// runs, and they leave in one `writev` (add_sub at 16 in flight: 0.85 writes per request became
/// 0.06, and 24 µs of CPU per request 17).
fn async_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
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
