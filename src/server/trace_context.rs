//! W3C trace context: continues a caller's trace from the `traceparent` / `tracestate` it sent in
//! gRPC metadata (HTTP/2 headers).
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The caller's trace context, or an empty context when the request carries none (or a malformed
/// one). Use it as the request span's parent:
/// `span.set_parent(parent_context_from_headers(request.metadata().as_ref()))` with
/// `tracing_opentelemetry::OpenTelemetrySpanExt`.
pub fn parent_context_from_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    // Most requests carry no trace: skip the propagator's parsing (once per request), and the
    // thread-local lookup of the current context, which at the front door is always empty.
    if !headers.contains_key("traceparent") {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Reads propagation fields from HTTP headers; values that are not visible ASCII are ignored.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt as _, TraceId};

    use super::*;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn extracts_the_callers_trace() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", TRACEPARENT.parse().unwrap());
        headers.insert("tracestate", "vendor=abc".parse().unwrap());
        let cx = parent_context_from_headers(&headers);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid());
        assert!(sc.is_remote());
        assert!(sc.is_sampled());
        assert_eq!(
            sc.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(sc.trace_state().get("vendor"), Some("abc"));
    }

    #[test]
    fn missing_or_malformed_traceparent_gives_no_parent() {
        let none = parent_context_from_headers(&http::HeaderMap::new());
        assert!(!none.span().span_context().is_valid());

        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-zz-00f067aa0ba902b7-01".parse().unwrap());
        let bad = parent_context_from_headers(&headers);
        assert!(!bad.span().span_context().is_valid());
    }
}
