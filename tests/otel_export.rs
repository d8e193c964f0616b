//! OTLP export end to end: an OTLP trace receiver runs inside the test (gRPC: a tonic server
//! implementing the collector's TraceService; HTTP: an axum route on /v1/traces), the gateway's
//! tracing pipeline exports a request span whose parent came in a W3C `traceparent`, and the
//! receiver must see the caller's trace id and parent span id.
mod common;

use std::net::SocketAddr;

use common::otlp::{start_grpc_receiver, start_http_receiver, Exports};

use onnx_gateway::server::trace_context::parent_context_from_headers;
use onnx_gateway::telemetry::otel::{OtelPlan, OtelTracing, TraceProtocol, TracingArgs};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// What the server does for one request: a span per request whose parent is the caller's
/// traceparent, with a queue child; plus a dependency's span that must not be exported.
fn emit_request(tracing: &OtelTracing) {
    let subscriber = tracing_subscriber::registry().with(tracing.layer());
    tracing::subscriber::with_default(subscriber, || {
        let mut headers = http::HeaderMap::new();
        let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
        headers.insert("traceparent", traceparent.parse().unwrap());

        let request = tracing::info_span!(
            target: "onnx_gateway::server",
            "ModelInfer",
            model = "simple",
            version = "1"
        );
        request
            .set_parent(parent_context_from_headers(&headers))
            .expect("parent set before the span starts");
        let _entered = request.enter();
        tracing::info_span!(target: "onnx_gateway::scheduler", "queue").in_scope(|| {});
        tracing::info_span!(target: "h2::proto", "frame").in_scope(|| {});
    });
}

fn plan(protocol: TraceProtocol, addr: SocketAddr) -> OtelPlan {
    let args = TracingArgs {
        trace_otlp_endpoint: Some(format!("http://{addr}")),
        trace_protocol: Some(protocol),
        trace_sample_ratio: None,
    };
    OtelPlan::resolve(&args, |_| None)
        .expect("valid configuration")
        .expect("tracing on")
}

/// Everything exported before the exporter shut down, flattened to spans, plus the service names.
/// Shutdown returns only after the receiver answered the last export, so all of it is queued.
fn received(exports: &mut Exports) -> (Vec<Span>, Vec<String>) {
    let mut spans = Vec::new();
    let mut services = Vec::new();
    while let Ok(export) = exports.try_recv() {
        for resource_spans in export.resource_spans {
            if let Some(resource) = resource_spans.resource {
                for attribute in resource.attributes {
                    if attribute.key == "service.name" {
                        if let Some(Value::StringValue(name)) =
                            attribute.value.and_then(|v| v.value)
                        {
                            services.push(name);
                        }
                    }
                }
            }
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans);
            }
        }
    }
    (spans, services)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_spans(spans: &[Span], services: &[String]) {
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(spans.len(), 2, "request and queue spans only: {names:?}");
    let request = spans
        .iter()
        .find(|s| s.name == "ModelInfer")
        .expect("request span");
    let queue = spans
        .iter()
        .find(|s| s.name == "queue")
        .expect("queue span");
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(hex(&request.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(hex(&queue.trace_id), TRACE_ID);
    assert_eq!(queue.parent_span_id, request.span_id);
    assert!(services.iter().all(|s| s == "onnx-gateway"), "{services:?}");
    assert!(!services.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_continues_the_callers_trace() {
    let mut receiver = start_grpc_receiver().await;
    let tracing = OtelTracing::start(&plan(TraceProtocol::Grpc, receiver.addr)).unwrap();
    emit_request(&tracing);
    tracing.shutdown().await.expect("spans flushed");
    let (spans, services) = received(&mut receiver.exports);
    check_spans(&spans, &services);
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_export_continues_the_callers_trace() {
    let mut receiver = start_http_receiver().await;
    let tracing = OtelTracing::start(&plan(TraceProtocol::Http, receiver.addr)).unwrap();
    emit_request(&tracing);
    tracing.shutdown().await.expect("spans flushed");
    let (spans, services) = received(&mut receiver.exports);
    check_spans(&spans, &services);
    receiver.stop().await;
}

/// Nothing configured: no pipeline at all.
#[tokio::test]
async fn off_by_default() {
    let plan = OtelPlan::resolve(&TracingArgs::default(), |_| None).unwrap();
    assert!(plan.is_none());
}
