//! Log output: one tracing subscriber writing to stderr, as text for people or as one JSON object per
//! line for log pipelines. Filtered by RUST_LOG when set, else by `--log-verbose`. Span fields are
//! part of every line, so the lines of one request carry its request id, model and version.
//!
//! The OpenTelemetry layer (see `otel.rs`) joins the same subscriber with its own filter, so the log
//! level never decides which spans reach the trace backend.
use std::io::IsTerminal as _;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::{
    filter_fn, EnvFilter, FilterExt as _, FilterFn, LevelFilter, ParseError,
};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::{SubscriberInitExt as _, TryInitError};
use tracing_subscriber::{Layer, Registry};

/// The crate's own target, which `--log-verbose` raises.
const OWN_TARGET: &str = "onnx_gateway";

/// ONNX Runtime's own log, forwarded by `ort`. At info it writes dozens of lines per session
/// (every graph transformer it ran), so below `--log-verbose 2` only its warnings and errors show.
const ORT_TARGET: &str = "ort";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the enclosing spans.
    Json,
}

/// Logging flags, flattened into the gateway's configuration.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LoggingArgs {
    /// Verbosity of the gateway's own logs: 0 info, 1 debug, 2 or more trace (and ONNX Runtime's
    /// own info lines, which lower levels keep to warnings). RUST_LOG, when set, replaces this with
    /// its own directives.
    #[arg(long, env = "ONNX_GATEWAY_LOG_VERBOSE", default_value_t = 0)]
    pub log_verbose: u8,

    /// Log info lines (as Triton's flag); false leaves warnings and errors.
    #[arg(long, env = "ONNX_GATEWAY_LOG_INFO", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub log_info: bool,

    /// Log warnings (as Triton's flag).
    #[arg(long, env = "ONNX_GATEWAY_LOG_WARNING", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub log_warning: bool,

    /// Log errors (as Triton's flag).
    #[arg(long, env = "ONNX_GATEWAY_LOG_ERROR", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub log_error: bool,

    /// Format of log lines on stderr.
    #[arg(long, env = "ONNX_GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("RUST_LOG={directives:?} is not a valid filter: {source}")]
    InvalidFilter {
        directives: String,
        #[source]
        source: ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[source] TryInitError),
}

/// A layer boxed for the global subscriber, e.g. the OpenTelemetry layer.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync + 'static>;

/// Installs the global subscriber: the log layer on stderr, plus `extra` (the OpenTelemetry layer,
/// carrying its own filter) when tracing is on. Reads RUST_LOG; call once, early in `main`.
pub fn init(args: &LoggingArgs, extra: Option<BoxedLayer>) -> Result<(), LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = env_filter(rust_log.as_deref(), args.log_verbose)?;
    let ansi = args.log_format == LogFormat::Text && std::io::stderr().is_terminal();
    let log_layer: BoxedLayer = log_layer(args.log_format, std::io::stderr, ansi)
        .with_filter(filter.and(severities(args)))
        .boxed();
    // Each layer carries its own filter, so they stack as a list over the registry.
    let layers: Vec<BoxedLayer> = std::iter::once(log_layer).chain(extra).collect();
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(LoggingError::AlreadyInstalled)
}

/// The filter for log lines: RUST_LOG's directives when set and not blank, else the verbosity
/// applied to the gateway's own target with everything else at info.
pub fn env_filter(rust_log: Option<&str>, verbose: u8) -> Result<EnvFilter, LoggingError> {
    let directives = filter_directives(rust_log, verbose);
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| LoggingError::InvalidFilter { directives, source })
}

/// Triton's `--log-info`, `--log-warning` and `--log-error`: each turns its severity's lines off.
/// Spans are kept whatever their level, so the lines left still carry their request's fields.
pub fn severities(args: &LoggingArgs) -> FilterFn<impl Fn(&Metadata<'_>) -> bool> {
    let (info, warning, error) = (args.log_info, args.log_warning, args.log_error);
    let filter = filter_fn(move |meta| {
        !meta.is_event()
            || match *meta.level() {
                Level::INFO => info,
                Level::WARN => warning,
                Level::ERROR => error,
                _ => true,
            }
    });
    // Without a hint, the level filter it is joined to would lose its own (info by default), and
    // every trace! in the libraries (h2, hyper) would be looked at instead of skipped by level.
    filter.with_max_level_hint(LevelFilter::TRACE)
}

/// The directives `env_filter` parses.
pub fn filter_directives(rust_log: Option<&str>, verbose: u8) -> String {
    match rust_log.map(str::trim).filter(|d| !d.is_empty()) {
        Some(directives) => directives.to_string(),
        None => match verbose {
            0 => format!("info,{ORT_TARGET}=warn"),
            1 => format!("info,{ORT_TARGET}=warn,{OWN_TARGET}=debug"),
            _ => format!("info,{OWN_TARGET}=trace"),
        },
    }
}

/// The formatting layer for `format`, writing through `writer`. Unfiltered: the caller adds the
/// filter so that tests can capture the exact output.
pub fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer
            .json()
            // Event fields at the top level; the current span and the whole span stack as
            // objects, so a line can be joined to its request without parsing the message.
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Captures what a layer writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Capture {
        type Writer = Capture;
        fn make_writer(&'w self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What the gateway logs around one failing request, run under a subscriber writing to a capture.
    fn log_a_request(format: LogFormat, verbose: u8) -> String {
        let capture = Capture::default();
        let filter = env_filter(None, verbose).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(log_layer(format, capture.clone(), false).with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                target: "onnx_gateway::server",
                "request",
                request_id = "req-7",
                model = "simple",
                version = "3"
            );
            let _entered = span.enter();
            tracing::debug!(target: "onnx_gateway::scheduler", rows = 4, "queued");
            tracing::warn!(target: "onnx_gateway::server", reason = "BACKEND", "inference failed");
        });
        capture.text()
    }

    #[test]
    fn json_lines_parse_and_carry_the_request_span() {
        let out = log_a_request(LogFormat::Json, 0);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        // At the default level the debug line is filtered out.
        assert_eq!(lines.len(), 1, "{out}");
        let line = &lines[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "inference failed");
        assert_eq!(line["reason"], "BACKEND");
        assert_eq!(line["span"]["name"], "request");
        assert_eq!(line["span"]["request_id"], "req-7");
        assert_eq!(line["span"]["model"], "simple");
        assert_eq!(line["span"]["version"], "3");
        assert_eq!(line["spans"][0]["request_id"], "req-7");
    }

    #[test]
    fn verbosity_one_shows_debug_lines_of_our_crate() {
        let out = log_a_request(LogFormat::Json, 1);
        assert_eq!(out.lines().count(), 2, "{out}");
        let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(first["message"], "queued");
        assert_eq!(first["rows"], 4);
    }

    #[test]
    fn text_lines_carry_the_request_span() {
        let out = log_a_request(LogFormat::Text, 0);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("request{request_id=\"req-7\" model=\"simple\" version=\"3\"}"),
            "{out}"
        );
        assert!(out.contains("inference failed reason=\"BACKEND\""), "{out}");
        assert!(!out.contains('\x1b'), "no colour codes when ansi is off");
    }

    #[test]
    fn rust_log_replaces_the_verbosity() {
        assert_eq!(filter_directives(None, 0), "info,ort=warn");
        assert_eq!(
            filter_directives(None, 1),
            "info,ort=warn,onnx_gateway=debug"
        );
        assert_eq!(filter_directives(None, 2), "info,onnx_gateway=trace");
        assert_eq!(filter_directives(None, 9), "info,onnx_gateway=trace");
        assert_eq!(filter_directives(Some("warn,h2=off"), 2), "warn,h2=off");
        assert_eq!(
            filter_directives(Some("  "), 1),
            "info,ort=warn,onnx_gateway=debug"
        );
        assert!(env_filter(Some("warn,onnx_gateway=debug"), 0).is_ok());
        let err = env_filter(Some("onnx_gateway=loud"), 0).unwrap_err();
        assert!(err.to_string().contains("onnx_gateway=loud"), "{err}");
    }

    fn switches(info: bool, warning: bool) -> LoggingArgs {
        LoggingArgs {
            log_verbose: 0,
            log_info: info,
            log_warning: warning,
            log_error: true,
            log_format: LogFormat::Text,
        }
    }

    #[test]
    fn a_severity_switched_off_drops_its_lines_and_keeps_the_spans() {
        let capture = Capture::default();
        let filter = env_filter(None, 0)
            .unwrap()
            .and(severities(&switches(false, true)));
        let subscriber = tracing_subscriber::registry()
            .with(log_layer(LogFormat::Text, capture.clone(), false).with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!(target: "onnx_gateway::server", "request", model = "simple");
            let _entered = span.enter();
            tracing::info!(target: "onnx_gateway::server", "model loaded");
            tracing::warn!(target: "onnx_gateway::server", "inference failed");
        });
        let out = capture.text();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("request{model=\"simple\"}"),
            "the info span still frames it: {out}"
        );
        assert!(out.contains("inference failed"), "{out}");
    }

    #[test]
    fn the_switches_keep_the_level_filters_hint() {
        use tracing_subscriber::layer::Filter;
        let joined = env_filter(None, 0)
            .unwrap()
            .and(severities(&switches(true, true)));
        let hint = <_ as Filter<Registry>>::max_level_hint(&joined);
        assert_eq!(
            hint,
            Some(LevelFilter::INFO),
            "trace! calls must stay skipped by level"
        );
    }
}
