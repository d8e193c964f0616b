use std::collections::VecDeque;
use std::convert::Infallible;

use bytes::Bytes;
use futures::future::poll_fn;
use tower::ServiceExt as _;

use super::*;

/// A response body made of prepared frames.
#[derive(Debug, Default)]
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn status_headers(code: i32) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-status", code.to_string().parse().unwrap());
    headers
}

/// A unary success as tonic sends it: one message, then trailers with status 0.
fn success_body() -> Frames {
    Frames(VecDeque::from([
        Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
        Frame::trailers(status_headers(0)),
    ]))
}

/// A trailers-only error response: the status sits in the headers, the body is empty.
fn trailers_only(code: i32) -> http::Response<Frames> {
    let mut response = http::Response::new(Frames::default());
    *response.headers_mut() = status_headers(code);
    response
}

fn request(path: &str) -> http::Request<()> {
    http::Request::builder().uri(path).body(()).unwrap()
}

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Calls a layered service that answers with `respond`'s response.
async fn call(
    metrics: &Arc<GrpcMetrics>,
    path: &str,
    respond: impl Fn() -> http::Response<Frames> + Clone + Send + 'static,
) -> http::Response<MetricsBody<Frames>> {
    let inner = tower::service_fn(move |_req: http::Request<()>| {
        let respond = respond.clone();
        async move { Ok::<_, Infallible>(respond()) }
    });
    let service = GrpcMetricsLayer::new(metrics.clone()).layer(inner);
    service.oneshot(request(path)).await.unwrap()
}

async fn drain(body: &mut MetricsBody<Frames>) {
    while poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
        .await
        .is_some()
    {}
}

#[tokio::test]
async fn status_in_the_headers_is_recorded_at_once() {
    let metrics = Arc::new(GrpcMetrics::new());
    let _response = call(&metrics, INFER, || trailers_only(3)).await;
    assert_eq!(metrics.requests("ModelInfer", 3), 1);
}

#[tokio::test]
async fn status_in_the_trailers_is_recorded_when_they_pass() {
    let metrics = Arc::new(GrpcMetrics::new());
    let response = call(&metrics, INFER, || http::Response::new(success_body())).await;
    assert_eq!(
        metrics.requests("ModelInfer", 0),
        0,
        "not before the trailers"
    );
    let mut body = response.into_body();
    drain(&mut body).await;
    assert_eq!(metrics.requests("ModelInfer", 0), 1);
    drop(body);
    assert_eq!(metrics.requests("ModelInfer", 1), 0, "recorded once");
}

#[tokio::test]
async fn error_trailers_after_a_stream_are_recorded() {
    let metrics = Arc::new(GrpcMetrics::new());
    let respond = || {
        http::Response::new(Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
            Frame::trailers(status_headers(13)),
        ])))
    };
    let path = "/inference.GRPCInferenceService/ModelStreamInfer";
    let mut body = call(&metrics, path, respond).await.into_body();
    drain(&mut body).await;
    assert_eq!(metrics.requests("ModelStreamInfer", 13), 1);
}

#[tokio::test]
async fn a_body_dropped_before_its_status_is_cancelled() {
    let metrics = Arc::new(GrpcMetrics::new());
    let response = call(&metrics, INFER, || http::Response::new(success_body())).await;
    drop(response);
    assert_eq!(metrics.requests("ModelInfer", 1), 1);
}

#[tokio::test]
async fn a_request_abandoned_before_its_response_is_cancelled() {
    let metrics = Arc::new(GrpcMetrics::new());
    let never = tower::service_fn(|_req: http::Request<()>| {
        std::future::pending::<Result<http::Response<Frames>, Infallible>>()
    });
    let mut service = GrpcMetricsLayer::new(metrics.clone()).layer(never);
    let pending = service.call(request(INFER));
    drop(pending);
    assert_eq!(metrics.requests("ModelInfer", 1), 1);
}

#[tokio::test]
async fn responses_without_any_status_are_unknown() {
    let metrics = Arc::new(GrpcMetrics::new());
    let _response = call(&metrics, INFER, || http::Response::new(Frames::default())).await;
    assert_eq!(metrics.requests("ModelInfer", 2), 1);
}

#[tokio::test]
async fn unknown_methods_share_one_label() {
    let metrics = Arc::new(GrpcMetrics::new());
    let _ = call(&metrics, "/x.Y/Zap", || trailers_only(12)).await;
    let _ = call(&metrics, "/no-slashes", || trailers_only(12)).await;
    assert_eq!(metrics.requests("other", 12), 2);
    assert_eq!(method_name("/grpc.health.v1.Health/Check"), "Check");
}

/// Against a real tonic server: tonic's own choice of headers or trailers for the status.
#[tokio::test]
async fn records_what_a_real_tonic_server_answers() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let metrics = Arc::new(GrpcMetrics::new());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(GrpcMetricsLayer::new(metrics.clone()))
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_string(),
    };
    client.check(check("")).await.unwrap();
    client.check(check("")).await.unwrap();
    let err = client.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    drop(client);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();

    assert_eq!(metrics.requests("Check", Code::Ok as i32), 2);
    assert_eq!(metrics.requests("Check", Code::NotFound as i32), 1);
    assert_eq!(metrics.requests("Check", Code::Cancelled as i32), 0);
}
