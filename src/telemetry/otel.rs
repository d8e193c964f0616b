//! OpenTelemetry traces over OTLP (gRPC or HTTP/protobuf), fed by the gateway's tracing spans.
//!
//! Off unless an endpoint is configured, by `--trace-otlp-endpoint` or by the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` variables; when off there is
//! no exporter, no layer and no cost. The SDK itself reads the rest of the standard variables:
//! `OTEL_EXPORTER_OTLP_HEADERS` (and `_TRACES_HEADERS`), `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`
//! and `OTEL_BSP_*`. Flags win over variables.
//!
//! Spans are batched by a task on the Tokio runtime (both exporters are async clients), so
//! [`OtelTracing::init`] must run inside the runtime, and [`OtelTracing::shutdown`] flushes what is
//! still queued.
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::{runtime, Resource};
use tracing::level_filters::LevelFilter;
use tracing::Level;
use tracing_subscriber::filter::{filter_fn, FilterExt as _, Targets};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// `service.name` when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names the service.
pub const DEFAULT_SERVICE_NAME: &str = "onnx-gateway";

/// Spans of this target (the gateway's own) are exported. Spans of dependencies are not: the
/// exporter's own HTTP/2 client would otherwise trace its exports, forever.
pub const TRACED_TARGET: &str = "onnx_gateway";

/// The path an OTLP/HTTP collector receives traces on.
const HTTP_TRACES_PATH: &str = "/v1/traces";

const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const ENV_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENV_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const ENV_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const ENV_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
const ENV_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
const ENV_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceProtocol {
    /// OTLP/gRPC (collector port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (collector port 4318), the OpenTelemetry default.
    #[value(alias = "http/protobuf")]
    Http,
}

/// Tracing flags, flattened into the gateway's configuration.
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct TracingArgs {
    /// OTLP collector endpoint for traces, e.g. http://collector:4317 (gRPC) or
    /// http://collector:4318 (HTTP; /v1/traces is appended). Tracing is on when this or
    /// OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set.
    #[arg(long, env = "ONNX_GATEWAY_TRACE_OTLP_ENDPOINT")]
    pub trace_otlp_endpoint: Option<String>,

    /// OTLP transport [default: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else http].
    #[arg(long, env = "ONNX_GATEWAY_TRACE_PROTOCOL", value_enum)]
    pub trace_protocol: Option<TraceProtocol>,

    /// Fraction of new traces to sample, 0 to 1; a sampled caller's trace is always continued
    /// [default: OTEL_TRACES_SAMPLER, else parent-based always-on].
    #[arg(long, env = "ONNX_GATEWAY_TRACE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: Option<f64>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let ratio: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!("{ratio} is not between 0 and 1"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("{variable}={value:?} is not a supported OTLP protocol (use grpc or http/protobuf)")]
    UnsupportedProtocol {
        variable: &'static str,
        value: String,
    },
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("flushing spans at shutdown failed: {0}")]
    Shutdown(String),
}

/// What tracing will do, decided from flags and environment with no side effects.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelPlan {
    pub protocol: TraceProtocol,
    /// The exact URL to export to; `None` leaves it to the SDK, which reads the OTEL_* variables.
    pub endpoint: Option<String>,
    /// A parent-based trace-id-ratio sampler; `None` leaves it to the SDK (OTEL_TRACES_SAMPLER).
    pub sample_ratio: Option<f64>,
    /// Set when the environment does not name the service.
    pub service_name: Option<String>,
}

impl OtelPlan {
    /// `Ok(None)` when tracing is off: no endpoint anywhere, or OTEL_SDK_DISABLED=true, or
    /// OTEL_TRACES_EXPORTER=none. `env` looks up an environment variable.
    pub fn resolve(
        args: &TracingArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtelPlan>, OtelError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let disabled = env(ENV_SDK_DISABLED).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env(ENV_TRACES_EXPORTER).is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
        let flag_endpoint = args
            .trace_otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty());
        let env_endpoint = env(ENV_TRACES_ENDPOINT).or_else(|| env(ENV_ENDPOINT));
        if disabled || (flag_endpoint.is_none() && env_endpoint.is_none()) {
            return Ok(None);
        }
        let protocol = match args.trace_protocol {
            Some(p) => p,
            None => protocol_from_env(&env)?,
        };
        // The flag is a base URL like the generic variable: HTTP gets the signal path appended.
        let endpoint = flag_endpoint.map(|e| match protocol {
            TraceProtocol::Grpc => e.to_string(),
            TraceProtocol::Http if e.ends_with(HTTP_TRACES_PATH) => e.to_string(),
            TraceProtocol::Http => format!("{}{HTTP_TRACES_PATH}", e.trim_end_matches('/')),
        });
        let names_service = env(ENV_SERVICE_NAME).is_some()
            || env(ENV_RESOURCE_ATTRIBUTES).is_some_and(|a| {
                a.split(',')
                    .any(|kv| kv.trim_start().starts_with("service.name="))
            });
        Ok(Some(OtelPlan {
            protocol,
            endpoint,
            sample_ratio: args.trace_sample_ratio,
            service_name: (!names_service).then(|| DEFAULT_SERVICE_NAME.to_string()),
        }))
    }
}

fn protocol_from_env(env: &impl Fn(&str) -> Option<String>) -> Result<TraceProtocol, OtelError> {
    for variable in [ENV_TRACES_PROTOCOL, ENV_PROTOCOL] {
        if let Some(value) = env(variable) {
            return match value.trim().to_ascii_lowercase().as_str() {
                "grpc" => Ok(TraceProtocol::Grpc),
                "http/protobuf" => Ok(TraceProtocol::Http),
                _ => Err(OtelError::UnsupportedProtocol { variable, value }),
            };
        }
    }
    Ok(TraceProtocol::Http)
}

/// A running trace pipeline: the provider with its batch exporter, and the tracer the tracing layer
/// feeds.
#[derive(Debug)]
pub struct OtelTracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl OtelTracing {
    /// Starts tracing when flags or the process environment configure an endpoint; `Ok(None)` when
    /// tracing is off. Must be called inside the Tokio runtime.
    pub fn init(args: &TracingArgs) -> Result<Option<OtelTracing>, OtelError> {
        match OtelPlan::resolve(args, |name| std::env::var(name).ok())? {
            Some(plan) => Self::start(&plan).map(Some),
            None => Ok(None),
        }
    }

    /// Builds the exporter and the batch processor for `plan`. Must be called inside the Tokio
    /// runtime, which runs the batching task.
    pub fn start(plan: &OtelPlan) -> Result<OtelTracing, OtelError> {
        let exporter = build_exporter(plan)?;
        let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
        let mut resource = Resource::builder()
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(name) = &plan.service_name {
            resource = resource.with_service_name(name.clone());
        }
        let mut builder = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.build());
        if let Some(ratio) = plan.sample_ratio {
            let ratio = Sampler::TraceIdRatioBased(ratio);
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(ratio)));
        }
        let provider = builder.build();
        let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
        Ok(OtelTracing { provider, tracer })
    }

    /// The tracing layer that turns the gateway's spans into OpenTelemetry spans, with its own filter
    /// so the log level does not decide what is traced: the gateway's spans at debug and above (the
    /// per-request `queue` and `compute` children and the `execute_batch` span are debug spans, so
    /// they cost nothing while tracing and debug logs are off), and its events at info and above,
    /// which become span events.
    pub fn layer<S>(&self) -> Box<dyn Layer<S> + Send + Sync + 'static>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_filter(export_filter())
            .boxed()
    }

    /// The tracer, for code that creates OpenTelemetry spans directly.
    pub fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// Exports every finished span still queued and stops the exporter. The SDK's shutdown blocks
    /// its thread until the batching task is done, so it runs off the async workers.
    pub async fn shutdown(self) -> Result<(), OtelError> {
        let provider = self.provider;
        tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .map_err(|e| OtelError::Shutdown(e.to_string()))?
            .map_err(|e| OtelError::Shutdown(e.to_string()))
    }
}

/// What the OpenTelemetry layer sees: see [`OtelTracing::layer`]. Decided per callsite from static
/// metadata, so the answer is cached and a disabled callsite costs one load.
fn export_filter<S: 'static>() -> impl tracing_subscriber::layer::Filter<S> + Send + Sync + 'static
{
    let spans_and_events = Targets::new().with_target(TRACED_TARGET, LevelFilter::DEBUG);
    let events_from_info = filter_fn(|meta| meta.is_span() || *meta.level() <= Level::INFO);
    spans_and_events.and(events_from_info)
}

fn build_exporter(plan: &OtelPlan) -> Result<SpanExporter, OtelError> {
    let builder = SpanExporter::builder();
    let exporter = match (plan.protocol, &plan.endpoint) {
        (TraceProtocol::Grpc, Some(endpoint)) => {
            builder.with_tonic().with_endpoint(endpoint).build()?
        }
        (TraceProtocol::Grpc, None) => builder.with_tonic().build()?,
        (TraceProtocol::Http, Some(endpoint)) => builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()?,
        (TraceProtocol::Http, None) => builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
    };
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(args: &TracingArgs, env: &[(&str, &str)]) -> Option<OtelPlan> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtelPlan::resolve(args, |k| env.get(k).cloned()).expect("valid configuration")
    }

    fn with_endpoint(endpoint: &str) -> TracingArgs {
        TracingArgs {
            trace_otlp_endpoint: Some(endpoint.to_string()),
            ..TracingArgs::default()
        }
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(resolve(&TracingArgs::default(), &[]), None);
        let only_protocol = TracingArgs {
            trace_protocol: Some(TraceProtocol::Grpc),
            trace_sample_ratio: Some(0.5),
            ..TracingArgs::default()
        };
        assert_eq!(resolve(&only_protocol, &[(ENV_SERVICE_NAME, "svc")]), None);
        assert_eq!(resolve(&with_endpoint("  "), &[]), None);
    }

    #[test]
    fn off_when_the_sdk_is_disabled() {
        let args = with_endpoint("http://c:4318");
        assert_eq!(resolve(&args, &[(ENV_SDK_DISABLED, "true")]), None);
        assert_eq!(resolve(&args, &[(ENV_TRACES_EXPORTER, "none")]), None);
        assert!(resolve(&args, &[(ENV_SDK_DISABLED, "false")]).is_some());
    }

    #[test]
    fn env_endpoint_turns_tracing_on_and_is_left_to_the_sdk() {
        let plan = resolve(&TracingArgs::default(), &[(ENV_ENDPOINT, "http://c:4317")]).unwrap();
        assert_eq!(plan.endpoint, None);
        assert_eq!(
            plan.protocol,
            TraceProtocol::Http,
            "the OpenTelemetry default"
        );
        assert_eq!(plan.service_name.as_deref(), Some(DEFAULT_SERVICE_NAME));
        assert_eq!(plan.sample_ratio, None);

        let env = [
            (ENV_TRACES_ENDPOINT, "http://c:4317"),
            (ENV_PROTOCOL, "grpc"),
        ];
        let plan = resolve(&TracingArgs::default(), &env).unwrap();
        assert_eq!(plan.protocol, TraceProtocol::Grpc);

        let env = [
            (ENV_ENDPOINT, "http://c:4317"),
            (ENV_PROTOCOL, "grpc"),
            (ENV_TRACES_PROTOCOL, "http/protobuf"),
        ];
        let plan = resolve(&TracingArgs::default(), &env).unwrap();
        assert_eq!(
            plan.protocol,
            TraceProtocol::Http,
            "per-signal variable wins"
        );
    }

    #[test]
    fn flags_win_and_http_gets_the_signal_path() {
        let args = TracingArgs {
            trace_otlp_endpoint: Some("http://c:4318/".to_string()),
            trace_protocol: Some(TraceProtocol::Http),
            trace_sample_ratio: Some(0.25),
        };
        let env = [(ENV_PROTOCOL, "grpc"), (ENV_ENDPOINT, "http://elsewhere:1")];
        let plan = resolve(&args, &env).unwrap();
        assert_eq!(plan.endpoint.as_deref(), Some("http://c:4318/v1/traces"));
        assert_eq!(plan.protocol, TraceProtocol::Http);
        assert_eq!(plan.sample_ratio, Some(0.25));

        let plan = resolve(&with_endpoint("http://c:4318/v1/traces"), &[]).unwrap();
        assert_eq!(plan.endpoint.as_deref(), Some("http://c:4318/v1/traces"));

        let grpc = TracingArgs {
            trace_protocol: Some(TraceProtocol::Grpc),
            ..with_endpoint("http://c:4317")
        };
        let plan = resolve(&grpc, &[]).unwrap();
        assert_eq!(plan.endpoint.as_deref(), Some("http://c:4317"));
    }

    #[test]
    fn service_name_from_the_environment_is_kept() {
        let args = with_endpoint("http://c:4318");
        let plan = resolve(&args, &[(ENV_SERVICE_NAME, "edge")]).unwrap();
        assert_eq!(plan.service_name, None);
        let attrs = [(ENV_RESOURCE_ATTRIBUTES, "team=ml, service.name=edge")];
        assert_eq!(resolve(&args, &attrs).unwrap().service_name, None);
        let attrs = [(ENV_RESOURCE_ATTRIBUTES, "team=ml")];
        let plan = resolve(&args, &attrs).unwrap();
        assert_eq!(plan.service_name.as_deref(), Some(DEFAULT_SERVICE_NAME));
    }

    #[test]
    fn unsupported_protocols_are_refused() {
        let err = OtelPlan::resolve(&with_endpoint("http://c:4318"), |k| {
            (k == ENV_PROTOCOL).then(|| "http/json".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains("http/json"), "{err}");
    }

    /// Names of the spans and messages of the events a layer behind `export_filter` sees.
    #[derive(Clone, Default)]
    struct Seen(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> Layer<S> for Seen {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0
                .lock()
                .unwrap()
                .push(attrs.metadata().name().to_string());
        }
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let target = event.metadata().target();
            let level = event.metadata().level();
            self.0
                .lock()
                .unwrap()
                .push(format!("{level} event of {target}"));
        }
    }

    #[test]
    fn exports_our_debug_spans_and_info_events_only() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let seen = Seen::default();
        let subscriber =
            tracing_subscriber::registry().with(seen.clone().with_filter(export_filter()));
        tracing::subscriber::with_default(subscriber, || {
            let infer = tracing::info_span!(target: "onnx_gateway::server::grpc", "infer");
            tracing::debug_span!(target: "onnx_gateway::scheduler::actor", parent: &infer, "queue")
                .in_scope(|| {});
            tracing::trace_span!(target: "onnx_gateway::scheduler", "too_fine").in_scope(|| {});
            tracing::info_span!(target: "h2::proto", "frame").in_scope(|| {});
            let _entered = infer.enter();
            tracing::info!(target: "onnx_gateway::server", "kept");
            tracing::warn!(target: "onnx_gateway::server", "kept");
            tracing::debug!(target: "onnx_gateway::server", "dropped");
            tracing::error!(target: "hyper", "dropped");
        });
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "infer",
                "queue",
                "INFO event of onnx_gateway::server",
                "WARN event of onnx_gateway::server"
            ]
        );
    }

    #[test]
    fn sample_ratio_must_be_a_fraction() {
        assert_eq!(parse_ratio("0.1"), Ok(0.1));
        assert_eq!(parse_ratio("1"), Ok(1.0));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("half").is_err());
    }

    #[test]
    fn flags_parse_with_clap() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            tracing: TracingArgs,
        }
        let cli = Cli::try_parse_from([
            "gw",
            "--trace-otlp-endpoint",
            "http://c:4317",
            "--trace-protocol",
            "http/protobuf",
            "--trace-sample-ratio",
            "0.5",
        ])
        .unwrap();
        assert_eq!(cli.tracing.trace_protocol, Some(TraceProtocol::Http));
        assert_eq!(cli.tracing.trace_sample_ratio, Some(0.5));
        assert!(Cli::try_parse_from(["gw", "--trace-sample-ratio", "2"]).is_err());
    }
}
