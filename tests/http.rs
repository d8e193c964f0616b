//! The HTTP/REST listener in-process: HTTP/1.1 keep-alive (several requests on one connection),
//! cleartext HTTP/2 by prior knowledge (h2c) on the same port, and the idle bound, against the real
//! `Gateway`.
mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use onnx_gateway::config::Config;
use onnx_gateway::Gateway;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

struct Running {
    http: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start() -> Running {
    start_with(Config::for_repository(common::example_models())).await
}

async fn start_with(config: Config) -> Running {
    let gateway = Gateway::bind(config).await.expect("gateway binds");
    let http = gateway.http_addr().expect("HTTP is on by default");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.serve(async move {
        let _ = stopped.await;
    }));
    Running { http, stop, task }
}

fn infer_body() -> Bytes {
    let data: Vec<f32> = (0..16).map(|i| i as f32).collect();
    Bytes::from(
        serde_json::json!({
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": data},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0f32; 16]},
            ],
            "outputs": [{"name": "OUTPUT0"}]
        })
        .to_string(),
    )
}

fn request(method: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .header("host", "localhost")
        .body(Full::new(body))
        .expect("request")
}

/// Waits until /v2/health/ready says 200 through `send`, then infers; returns OUTPUT0.
async fn ready_then_infer<F, Fut>(mut send: F) -> Vec<f64>
where
    F: FnMut(Request<Full<Bytes>>) -> Fut,
    Fut: std::future::Future<Output = (u16, Bytes)>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while send(request("GET", "/v2/health/ready", Bytes::new()))
        .await
        .0
        != 200
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = send(request("POST", "/v2/models/add_sub/infer", infer_body())).await;
    assert_eq!(status, 200, "{body:?}");
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
    answer["outputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn expected() -> Vec<f64> {
    (0..16).map(|i| i as f64 + 1.0).collect()
}

#[tokio::test]
async fn http1_keep_alive_serves_many_requests_on_one_connection() {
    let server = start().await;
    let stream = TcpStream::connect(server.http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    let connection = tokio::spawn(conn);
    let output = ready_then_infer(|r| {
        let f = sender.send_request(r);
        async move {
            let response = f.await.expect("same connection answers");
            let status = response.status().as_u16();
            (
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    })
    .await;
    assert_eq!(output, expected());
    // The connection is still open: one more request on it.
    let response = sender
        .send_request(request("GET", "/v2", Bytes::new()))
        .await
        .expect("keep-alive");
    assert_eq!(response.status(), 200);
    drop(sender);
    let _ = connection.await;
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_same_port() {
    let server = start().await;
    let (sender, _connection) = h2c_client(&server).await;
    let output = ready_then_infer(|r| {
        let mut sender = sender.clone();
        async move {
            let response = sender.send_request(r).await.expect("h2 answer");
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let status = response.status().as_u16();
            (
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    })
    .await;
    assert_eq!(output, expected());
    // Unknown routes answer JSON over h2 as well.
    let mut sender = sender.clone();
    let response = sender
        .send_request(request("GET", "/v2/nope", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(error["error"].as_str().unwrap().contains("/v2/nope"));
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

/// An h2c client on `server`'s HTTP port, its connection driven by a task of its own that ends
/// when the server closes the connection.
async fn h2c_client(
    server: &Running,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(server.http).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_but_not_one_with_a_request_in_progress() {
    // A lone request on add_sub waits out a 2 s delay window: longer than the 1 s idle bound.
    let repo = common::repo_with(&["add_sub"]);
    let config_path = repo.path().join("add_sub/config.pbtxt");
    let text = std::fs::read_to_string(&config_path).unwrap().replace(
        "dynamic_batching {}",
        "dynamic_batching { max_queue_delay_microseconds: 2000000 }",
    );
    std::fs::write(&config_path, text).unwrap();
    let mut config = Config::for_repository(repo.path());
    config.http.http_idle_timeout_secs = 1;
    let server = start_with(config).await;

    let (sender, busy_connection) = h2c_client(&server).await;
    let output = ready_then_infer(|r| {
        let mut sender = sender.clone();
        async move {
            let response = sender
                .send_request(r)
                .await
                .expect("answered on the same connection");
            let status = response.status().as_u16();
            (
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    })
    .await;
    assert_eq!(
        output,
        expected(),
        "the 2 s request was answered on its connection"
    );
    // Then, with nothing in progress, the server closes it; bounded far above the 1 s bound.
    tokio::time::timeout(std::time::Duration::from_secs(20), busy_connection)
        .await
        .expect("the idle connection was closed")
        .unwrap();

    let (_idle_sender, never_used) = h2c_client(&server).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), never_used)
        .await
        .expect("a connection that never sent a request was closed")
        .unwrap();
    server.stop.send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The binary with OTLP export on: an HTTP infer carrying a W3C traceparent is exported as an
/// `infer` span in the caller's trace, child of the caller's span, as on gRPC.
#[tokio::test]
async fn http_infer_continues_the_callers_trace() {
    use std::io::BufRead as _;

    let mut receiver = common::otlp::start_grpc_receiver().await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-gateway"))
        .current_dir(common::project_dir())
        .arg("--model-repository")
        .arg(common::example_models())
        .args(["--grpc-address", "127.0.0.1", "--grpc-port", "0"])
        .args(["--metrics-address", "127.0.0.1", "--metrics-port", "0"])
        .args(["--http-address", "127.0.0.1", "--http-port", "0"])
        .args(["--drain-delay-secs", "0"])
        .args([
            "--trace-otlp-endpoint",
            &format!("http://{}", receiver.addr),
        ])
        .args(["--trace-protocol", "grpc"])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the gateway binary");
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("HTTP listening addr=").nth(1) {
                if !line.contains("admin HTTP") {
                    let _ = addr_tx.send(rest.trim().parse::<SocketAddr>().unwrap());
                }
            }
            lines.push(line);
        }
        lines
    });
    let http = tokio::task::spawn_blocking(move || {
        addr_rx.recv_timeout(std::time::Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("the binary logs its HTTP address");

    let stream = TcpStream::connect(http).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    let output = ready_then_infer(|mut r| {
        r.headers_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        let f = sender.send_request(r);
        async move {
            let response = f.await.expect("answer");
            let status = response.status().as_u16();
            (
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    })
    .await;
    assert_eq!(output, expected());

    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill only sends a signal to our own child process, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let logs = reader.join().unwrap();
    assert!(status.success(), "{logs:#?}");
    let mut spans = Vec::new();
    while let Ok(export) = receiver.exports.try_recv() {
        for resource in export.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let infer: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "infer" && hex(&s.trace_id) == TRACE_ID)
        .collect();
    let [infer] = infer.as_slice() else {
        panic!(
            "one infer span in the caller's trace: {:?}\n{logs:#?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
    };
    assert_eq!(hex(&infer.parent_span_id), CALLER_SPAN_ID);
    receiver.stop().await;
}
