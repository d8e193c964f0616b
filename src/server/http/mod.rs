//! The KServe v2 HTTP/REST front door with Triton's binary tensor data extension.
//!
//! Inference goes through the same protocol-neutral entry as gRPC (`server::infer::infer`): the
//! body is built into a `ModelInferRequest` (binary tensors are slices of the body, no copy) and
//! validated by the same `decode_request`. Every other endpoint calls the gRPC service's own
//! handler with the proto request and answers its proto response as JSON (proto field names,
//! 64-bit integers as numbers, as Triton's HTTP server), so no behaviour exists twice.
pub mod compression;
pub mod error;
pub mod listener;
pub mod request;
pub mod response;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::state::ServerState;
use error::error_body;

/// What every HTTP handler reads.
pub struct HttpState {
    pub server: Arc<ServerState>,
    /// Let health routes through without a token (`--auth-exempt-health`).
    pub exempt_health: bool,
    /// Largest request body, compressed or inflated.
    pub max_body_bytes: usize,
}

/// Who called, as the authentication middleware found them (None when nothing is protected).
#[derive(Clone)]
pub struct HttpCaller(pub Option<super::auth::Caller>);

impl HttpCaller {
    /// `message` as the gRPC handlers receive it, carrying this caller for their per-model checks.
    pub fn grpc_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(caller) = &self.0 {
            request.extensions_mut().insert(caller.clone());
        }
        request
    }
}

/// Health routes, which Kubernetes probes call without a token (with --auth-exempt-health).
const HEALTH_ROUTES: [&str; 2] = ["/v2/health/live", "/v2/health/ready"];

/// The door's routes with their layers: metrics outermost (so refused requests count), then
/// authentication (so an unauthenticated body is never read), then the body limit.
pub fn router(state: Arc<HttpState>) -> Router {
    routes::routes()
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            record_metrics,
        ))
        .with_state(state)
}

async fn not_found(request: Request) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        &format!("no such endpoint: {}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn authenticate(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: Next,
) -> Response {
    let mut request = request;
    let exempt = state.exempt_health && HEALTH_ROUTES.contains(&request.uri().path());
    let caller = if exempt {
        Ok(None)
    } else {
        // The route's template, not the path: model names in paths are chosen by clients.
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("(no route)", MatchedPath::as_str);
        let describe = || {
            let rpc = Arc::from(format!("HTTP {} {route}", request.method()));
            let peer = request
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| Arc::from(info.0.to_string()));
            (rpc, peer)
        };
        super::auth::resolve_caller(&state.server.access, request.headers(), describe)
    };
    match caller {
        Ok(caller) => {
            request.extensions_mut().insert(HttpCaller(caller));
            next.run(request).await
        }
        Err(refusal) => {
            let mut response = error_body(StatusCode::UNAUTHORIZED, &refusal.to_string());
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

async fn record_metrics(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = route_label(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let response = next.run(request).await;
    state
        .server
        .http_metrics
        .record(route, response.status().as_u16(), started.elapsed());
    response.into_response()
}

/// A bounded label for a matched route template (never the raw path, whose model names are
/// chosen by clients).
fn route_label(template: Option<&str>) -> &'static str {
    let Some(t) = template else { return "other" };
    let known = [
        "infer",
        "ready",
        "config",
        "stats",
        "load",
        "unload",
        "index",
        "status",
        "register",
        "unregister",
        "live",
    ];
    match t.rsplit('/').next() {
        Some(last) => known
            .iter()
            .copied()
            .find(|k| *k == last)
            .unwrap_or(match t {
                "/v2" => "server_metadata",
                _ if t.starts_with("/v2/models/") => "model_metadata",
                _ => "other",
            }),
        None => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label(Some("/v2/models/{model}/infer")), "infer");
        assert_eq!(
            route_label(Some("/v2/models/{model}/versions/{version}")),
            "model_metadata"
        );
        assert_eq!(route_label(Some("/v2")), "server_metadata");
        assert_eq!(route_label(Some("/v2/health/ready")), "ready");
        assert_eq!(route_label(None), "other");
    }

    #[test]
    fn http_metrics_count_by_route_and_code() {
        let metrics = crate::telemetry::metrics::HttpMetrics::new();
        let text = metrics.render();
        assert!(
            text.contains("# TYPE onnx_gateway_http_requests_total counter"),
            "{text}"
        );
        metrics.record("infer", 200, std::time::Duration::from_millis(3));
        metrics.record("infer", 200, std::time::Duration::from_millis(5));
        metrics.record("infer", 503, std::time::Duration::from_millis(1));
        assert_eq!(metrics.requests("infer", 200), 2);
        let text = metrics.render();
        assert!(
            text.contains("onnx_gateway_http_requests_total{route=\"infer\",code=\"503\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("onnx_gateway_http_request_duration_seconds_count{route=\"infer\"} 3"),
            "{text}"
        );
    }
}
