//! The memory budget through the real server: a request larger than --max-inflight-bytes is refused
//! with RESOURCE_EXHAUSTED naming the budget, the gauge returns to zero, and the server keeps serving.
mod common;

use common::*;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::*;
use onnx_gateway::Config;
use tonic::Code;

const BUDGET: u64 = 1 << 20;

fn fp32_request(values: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "identity_fp32".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, values.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(values)],
        ..Default::default()
    }
}

/// One scrape of /metrics over plain HTTP/1.1.
async fn scrape(server: &TestServer) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.admin_addr)
        .await
        .expect("admin connects");
    let head = b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(head).await.expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_request_over_the_budget_is_refused_and_the_server_keeps_serving() {
    let mut config = Config::for_repository(test_models());
    config.memory.max_inflight_bytes = Some(BUDGET);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;

    let big = vec![0.5f32; (2 * BUDGET / 4) as usize];
    let status = client
        .model_infer(fp32_request(&big))
        .await
        .expect_err("2 MiB do not fit a 1 MiB budget");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-inflight-bytes 1048576"),
        "{}",
        status.message()
    );

    let small = [1.0f32, 2.0, 3.0];
    let answer = client
        .model_infer(fp32_request(&small))
        .await
        .expect("fits");
    assert_eq!(f32_from(&answer.into_inner().raw_output_contents[0]), small);

    // The response body gives the bytes back when it is dropped, just after the client has it.
    let mut metrics = scrape(&server).await;
    for _ in 0..200 {
        if gauge(&metrics, "onnx_gateway_inflight_request_bytes") == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        metrics = scrape(&server).await;
    }
    assert_eq!(
        gauge(&metrics, "onnx_gateway_inflight_request_bytes"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        gauge(&metrics, "onnx_gateway_inflight_request_bytes_limit"),
        Some(BUDGET as f64)
    );
    assert!(gauge(&metrics, "onnx_gateway_budget_refused_total").unwrap_or(0.0) >= 1.0);
    server.stop().await.expect("clean stop");
}
