//! The admin HTTP server (`--metrics-port`): Prometheus scrapes and Kubernetes probes.
//!
//! `GET /metrics` answers in the Prometheus text format; `GET /v2/health/live` and
//! `GET /v2/health/ready` answer 200 when true and 400 when false with an empty body, as Triton's.
//! The server knows nothing of the engine: it asks the closures in [`AdminState`].
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::telemetry::metrics;

/// What the admin endpoints report, as closures over the engine.
#[derive(Clone)]
pub struct AdminState {
    pub live: Arc<dyn Fn() -> bool + Send + Sync>,
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// None with `--allow-metrics=false`: /metrics then answers 404 saying so.
    pub render_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The admin routes; other paths answer 404 and other methods 405.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/v2/health/live", get(live_handler))
        .route("/v2/health/ready", get(ready_handler))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` completes, then lets open requests finish.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(state): State<AdminState>) -> Response {
    let Some(render) = &state.render_metrics else {
        let reason = "metrics are off on this server (--allow-metrics=false)\n";
        return (StatusCode::NOT_FOUND, reason).into_response();
    };
    // Rendering reads atomics and a few /proc files, which never block on a disk.
    let body = render();
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn live_handler(State(state): State<AdminState>) -> StatusCode {
    health_status((state.live)())
}

async fn ready_handler(State(state): State<AdminState>) -> StatusCode {
    health_status((state.ready)())
}

/// Triton answers a failed health check with 400, not 503.
fn health_status(healthy: bool) -> StatusCode {
    if healthy {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A plain HTTP/1.1 exchange on a fresh connection: (status, headers in lower case, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, Vec<String>, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines.map(str::to_ascii_lowercase).collect();
        (status, headers, body.to_string())
    }

    #[tokio::test]
    async fn serves_metrics_and_health_until_shut_down() {
        let ready = Arc::new(AtomicBool::new(false));
        let ready_flag = ready.clone();
        let state = AdminState {
            live: Arc::new(|| true),
            ready: Arc::new(move || ready_flag.load(Ordering::SeqCst)),
            render_metrics: Some(Arc::new(|| "# TYPE up gauge\nup 1\n".to_string())),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_admin(listener, state, async {
            let _ = stopped.await;
        }));

        let (status, headers, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(body, "# TYPE up gauge\nup 1\n");
        assert!(
            headers.contains(&"content-type: text/plain; version=0.0.4; charset=utf-8".into()),
            "{headers:?}"
        );

        let (status, _, body) = request(addr, "GET", "/v2/health/live").await;
        assert_eq!((status, body.as_str()), (200, ""));

        let (status, _, body) = request(addr, "GET", "/v2/health/ready").await;
        assert_eq!((status, body.as_str()), (400, ""));
        ready.store(true, Ordering::SeqCst);
        let (status, _, _) = request(addr, "GET", "/v2/health/ready").await;
        assert_eq!(status, 200);

        assert_eq!(request(addr, "GET", "/v2/health").await.0, 404);
        assert_eq!(request(addr, "POST", "/metrics").await.0, 405);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn metrics_turned_off_answer_404_saying_so_while_health_serves() {
        let state = AdminState {
            live: Arc::new(|| true),
            ready: Arc::new(|| true),
            render_metrics: None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_admin(listener, state, std::future::pending()));
        let (status, _, body) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 404);
        assert!(body.contains("--allow-metrics=false"), "{body}");
        assert_eq!(request(addr, "GET", "/v2/health/ready").await.0, 200);
        server.abort();
    }
}
