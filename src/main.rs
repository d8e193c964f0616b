//! The `onnx-gateway` binary: parse config, init telemetry, call `run`.
use clap::Parser;
use onnx_gateway::telemetry::{logging, otel::OtelTracing};
use onnx_gateway::Config;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("onnx-gateway: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
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
        let result = onnx_gateway::run(config, shutdown_signal()).await;
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
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
