//! The core protocol over real gRPC: health, metadata, inference on every datatype, bad input,
//! streaming, and startup behaviour with a broken model.
mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::*;
use onnx_gateway::proto::infer_parameter::ParameterChoice;
use onnx_gateway::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use onnx_gateway::proto::*;
use onnx_gateway::Config;
use tonic::Code;

fn add_sub_request(a: &[f32], b: &[f32], batch: i64) -> ModelInferRequest {
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![batch, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "add_sub".into(),
        id: "req-42".into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        raw_input_contents: vec![f32_bytes(a), f32_bytes(b)],
        ..Default::default()
    }
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * scale).collect()
}

#[tokio::test]
async fn health_and_metadata() {
    let server = TestServer::start(&example_models()).await;
    let mut client = server.client().await;
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "onnx-gateway");
    assert!(meta.extensions.contains(&"model_configuration".to_string()));

    let ready = client
        .model_ready(ModelReadyRequest {
            name: "add_sub".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(ready.into_inner().ready);
    let unknown = client
        .model_ready(ModelReadyRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(!unknown.into_inner().ready);

    let md = client
        .model_metadata(ModelMetadataRequest {
            name: "add_sub".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.name, "add_sub");
    assert_eq!(md.versions, vec!["1".to_string()]);
    assert_eq!(md.inputs.len(), 2);
    assert_eq!(md.inputs[0].datatype, "FP32");
    assert_eq!(md.inputs[0].shape, vec![-1, 16]);

    let cfg = client
        .model_config(ModelConfigRequest {
            name: "digits_classifier".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert!(
        cfg.max_batch_size > 0,
        "auto-completed config should batch: {cfg:?}"
    );
    assert!(!cfg.input.is_empty() && !cfg.output.is_empty());

    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.state.as_str()))
        .collect();
    assert!(names.contains(&("add_sub", "READY")), "{names:?}");

    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .connect_lazy(),
    );
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    server.stop().await.unwrap();
}

/// Calls `path` with an empty message on a plain tonic channel: a method the gateway may not have.
async fn call_path(
    server: &TestServer,
    path: &'static str,
) -> Result<ServerLiveResponse, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<ServerLiveRequest, ServerLiveResponse>::default();
    grpc.unary(
        tonic::Request::new(ServerLiveRequest {}),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Inference calls bypass tonic's router (`server/inference_first.rs`); both sides of the split
/// still answer what they did: the inference service its methods and UNIMPLEMENTED for others,
/// the router the other services and UNIMPLEMENTED for services it does not have.
#[tokio::test]
async fn calls_reach_their_service_on_either_side_of_the_inference_shortcut() {
    let server = TestServer::start(&example_models()).await;
    let live = call_path(&server, "/inference.GRPCInferenceService/ServerLive").await;
    assert!(live.expect("ServerLive").live);
    for path in [
        "/inference.GRPCInferenceService/NoSuchMethod",
        "/inference.GRPCInferenceServiceX/ServerLive",
        "/no.such.Service/ServerLive",
    ] {
        let status = call_path(&server, path).await.expect_err(path);
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
            .expect("endpoint")
            .connect_lazy(),
    );
    let checked = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health through the router");
    assert_eq!(
        checked.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// The `grpc-encoding` of add_sub's answer to a client that accepts gzip or not.
async fn response_encoding(server: &TestServer, client_accepts_gzip: bool) -> Option<String> {
    let mut client = server.client().await;
    if client_accepts_gzip {
        client = client.accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    let (a, b) = (ramp(16, 1.0), ramp(16, 2.0));
    let response = client
        .model_infer(add_sub_request(&a, &b, 1))
        .await
        .unwrap();
    let encoding = response.metadata().get("grpc-encoding");
    let encoding = encoding.map(|v| v.to_str().unwrap().to_string());
    let sum = f32_from(&response.into_inner().raw_output_contents[0]);
    assert_eq!(
        sum[3],
        a[3] + b[3],
        "the answer decompresses to the right outputs"
    );
    encoding
}

#[tokio::test]
async fn responses_are_compressed_only_when_asked_and_accepted() {
    let mut config = Config::for_repository(example_models());
    config.grpc.grpc_infer_response_compression_level =
        onnx_gateway::config::ResponseCompression::High;
    let server = TestServer::start_with(config).await;
    assert_eq!(
        response_encoding(&server, true).await.as_deref(),
        Some("gzip")
    );
    assert_eq!(response_encoding(&server, false).await, None);
    server.stop().await.unwrap();

    let plain = TestServer::start(&example_models()).await;
    assert_eq!(
        response_encoding(&plain, true).await,
        None,
        "off by default, as in Triton"
    );
    plain.stop().await.unwrap();
}

#[tokio::test]
async fn add_sub_raw_and_typed() {
    let server = TestServer::start(&example_models()).await;
    let mut client = server.client().await;
    let (a, b) = (ramp(32, 1.0), ramp(32, 0.5));
    let response = client
        .model_infer(add_sub_request(&a, &b, 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_name, "add_sub");
    assert_eq!(response.model_version, "1");
    assert_eq!(response.id, "req-42");
    assert_eq!(response.outputs.len(), 2);
    let sum = f32_from(&response.raw_output_contents[0]);
    let diff = f32_from(&response.raw_output_contents[1]);
    for i in 0..32 {
        assert_eq!(sum[i], a[i] + b[i]);
        assert_eq!(diff[i], a[i] - b[i]);
    }
    assert_eq!(response.outputs[0].shape, vec![2, 16]);

    // Typed contents and a requested-output subset.
    let mut request = add_sub_request(&a[..16], &b[..16], 1);
    request.raw_input_contents.clear();
    request.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: a[..16].to_vec(),
        ..Default::default()
    });
    request.inputs[1].contents = Some(InferTensorContents {
        fp32_contents: b[..16].to_vec(),
        ..Default::default()
    });
    request.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT1".into(),
        ..Default::default()
    }];
    let response = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(response.outputs.len(), 1);
    assert_eq!(response.outputs[0].name, "OUTPUT1");
    assert_eq!(
        f32_from(&response.raw_output_contents[0]),
        (0..16).map(|i| a[i] - b[i]).collect::<Vec<_>>()
    );
    server.stop().await.unwrap();
}

/// Raw bytes for `count` elements of `datatype` with a recognisable pattern.
fn pattern(datatype: &str, count: usize) -> Bytes {
    let size = match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        _ => 8,
    };
    let mut out = Vec::with_capacity(count * size);
    for i in 0..count {
        match datatype {
            "BOOL" => out.push((i % 2) as u8),
            "FP32" => out.extend_from_slice(&(i as f32 * 1.5).to_le_bytes()),
            "FP64" => out.extend_from_slice(&(i as f64 * -2.25).to_le_bytes()),
            // 0x3C00 is 1.0 in FP16; 0x3F80 is 1.0 in BF16: keep values finite and exact.
            "FP16" => out.extend_from_slice(&(0x3C00u16 + i as u16).to_le_bytes()),
            "BF16" => out.extend_from_slice(&(0x3F80u16 + i as u16).to_le_bytes()),
            _ => out.extend((0..size).map(|b| (i * 7 + b * 13) as u8)),
        }
    }
    out.into()
}

#[tokio::test]
async fn every_datatype_round_trips() {
    let server = TestServer::start(&test_models()).await;
    let mut client = server.client().await;
    let types = [
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
        "BF16", "FP32", "FP64",
    ];
    for datatype in types {
        let model = format!("identity_{}", datatype.to_lowercase());
        let raw = pattern(datatype, 6);
        let request = ModelInferRequest {
            model_name: model.clone(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: datatype.into(),
                shape: vec![2, 3],
                ..Default::default()
            }],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        };
        let response = client
            .model_infer(request)
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}"))
            .into_inner();
        assert_eq!(response.outputs[0].datatype, datatype, "{model}");
        assert_eq!(response.outputs[0].shape, vec![2, 3], "{model}");
        assert_eq!(response.raw_output_contents[0], raw, "{model}");
    }
    // BYTES, including an empty element.
    let items: Vec<Bytes> = vec![
        "hello".into(),
        "".into(),
        "wörld".into(),
        "x".repeat(1000).into(),
    ];
    let request = ModelInferRequest {
        model_name: "identity_bytes".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "BYTES".into(),
            shape: vec![2, 2],
            ..Default::default()
        }],
        raw_input_contents: vec![onnx_gateway::tensor::encode_length_prefixed(&items)],
        ..Default::default()
    };
    let response = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(response.outputs[0].datatype, "BYTES");
    let back =
        onnx_gateway::tensor::decode_length_prefixed(&response.raw_output_contents[0]).unwrap();
    assert_eq!(back, items);
    server.stop().await.unwrap();
}

async fn expect_invalid(client: &mut Client, request: ModelInferRequest, needle: &str) {
    let status = client
        .model_infer(request)
        .await
        .expect_err("request must fail");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn bad_inputs_are_refused_and_the_server_keeps_serving() {
    let server = TestServer::start(&example_models()).await;
    let mut client = server.client().await;
    let good = || add_sub_request(&ramp(16, 1.0), &ramp(16, 2.0), 1);

    let mut r = good();
    r.inputs[0].datatype = "INT32".into();
    expect_invalid(&mut client, r, "INPUT0").await;

    let mut r = good();
    r.inputs[0].shape = vec![1, 8];
    expect_invalid(&mut client, r, "INPUT0").await;

    let mut r = good();
    r.inputs[0].shape = vec![16];
    expect_invalid(&mut client, r, "INPUT0").await;

    let r = add_sub_request(&ramp(16 * 9, 1.0), &ramp(16 * 9, 1.0), 9);
    expect_invalid(&mut client, r, "batch-size must be <= 8").await;

    let mut r = good();
    r.raw_input_contents[1] = f32_bytes(&ramp(8, 1.0));
    expect_invalid(&mut client, r, "INPUT1").await;

    let mut r = good();
    r.inputs.pop();
    r.raw_input_contents.pop();
    expect_invalid(&mut client, r, "INPUT1").await;

    let mut r = good();
    r.inputs.push(InferInputTensor {
        name: "EXTRA".into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        ..Default::default()
    });
    r.raw_input_contents.push(f32_bytes(&ramp(16, 1.0)));
    expect_invalid(&mut client, r, "EXTRA").await;

    let mut r = good();
    r.outputs = vec![InferRequestedOutputTensor {
        name: "NOPE".into(),
        ..Default::default()
    }];
    expect_invalid(&mut client, r, "NOPE").await;

    // 2^40 elements: refused from the arithmetic, nothing is allocated.
    let mut r = good();
    r.inputs[0].shape = vec![1, 1 << 40];
    expect_invalid(&mut client, r, "INPUT0").await;

    // Raw and typed both set.
    let mut r = good();
    r.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: ramp(16, 1.0),
        ..Default::default()
    });
    expect_invalid(&mut client, r, "INPUT0").await;

    // Typed count mismatch.
    let mut r = good();
    r.raw_input_contents.clear();
    r.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: ramp(3, 1.0),
        ..Default::default()
    });
    r.inputs[1].contents = Some(InferTensorContents {
        fp32_contents: ramp(16, 1.0),
        ..Default::default()
    });
    expect_invalid(&mut client, r, "INPUT0").await;

    // Bad priority parameter type.
    let mut r = good();
    r.parameters = HashMap::from([(
        "priority".to_string(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam("high".into())),
        },
    )]);
    expect_invalid(&mut client, r, "priority").await;

    let mut r = good();
    r.model_name = "missing_model".into();
    let status = client.model_infer(r).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("missing_model"));

    let mut r = good();
    r.model_version = "7".into();
    let status = client.model_infer(r).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("version 7"));

    // Still serving.
    let response = client.model_infer(good()).await.unwrap().into_inner();
    assert_eq!(f32_from(&response.raw_output_contents[0])[15], 15.0 + 30.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bytes_with_broken_length_prefix_is_refused() {
    let server = TestServer::start(&test_models()).await;
    let mut client = server.client().await;
    let request = ModelInferRequest {
        model_name: "identity_bytes".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "BYTES".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from_static(&[200, 0, 0, 0, b'a', b'b'])],
        ..Default::default()
    };
    expect_invalid(&mut client, request, "INPUT0").await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn sixteen_mib_request_works_with_defaults() {
    let server = TestServer::start(&test_models()).await;
    let mut client = server.client().await;
    let n = 16 << 20;
    let raw: Bytes = (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let request = ModelInferRequest {
        model_name: "identity_uint8".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "UINT8".into(),
            shape: vec![1, n as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.clone()],
        ..Default::default()
    };
    let response = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(response.raw_output_contents[0], raw);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn stream_reports_errors_in_band_and_continues() {
    let server = TestServer::start(&example_models()).await;
    let mut client = server.client().await;
    let mut requests = Vec::new();
    for i in 0..5 {
        let mut r = add_sub_request(&ramp(16, i as f32), &ramp(16, 1.0), 1);
        r.id = format!("s{i}");
        if i == 2 {
            r.inputs[0].datatype = "INT64".into();
        }
        requests.push(r);
    }
    let response = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap();
    let mut stream = response.into_inner();
    let mut seen = HashMap::new();
    while let Some(message) = tokio_stream::StreamExt::next(&mut stream).await {
        let message = message.unwrap();
        let id = message
            .infer_response
            .as_ref()
            .map(|r| r.id.clone())
            .unwrap_or_default();
        seen.insert(id, message);
    }
    assert_eq!(seen.len(), 5);
    for i in 0..5 {
        let m = &seen[&format!("s{i}")];
        if i == 2 {
            assert!(m.error_message.contains("INPUT0"), "{:?}", m.error_message);
        } else {
            assert!(m.error_message.is_empty(), "{:?}", m.error_message);
            let out = f32_from(&m.infer_response.as_ref().unwrap().raw_output_contents[0]);
            assert_eq!(out[1], i as f32 + 1.0);
        }
    }
    server.stop().await.unwrap();
}

fn repo_with_broken_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    };
    copy(
        &example_models().join("add_sub"),
        &dir.path().join("add_sub"),
    );
    copy(
        &example_models().join("add_sub/1"),
        &dir.path().join("add_sub/1"),
    );
    std::fs::create_dir_all(dir.path().join("broken/1")).unwrap();
    std::fs::write(
        dir.path().join("broken/1/model.onnx"),
        b"this is not an onnx file",
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn broken_model_fails_startup_by_default() {
    let repo = repo_with_broken_model();
    let server = TestServer::spawn(Config::for_repository(repo.path())).await;
    let error = server.join().await.expect_err("startup must fail");
    assert!(format!("{error:#}").contains("broken"), "{error:#}");
}

#[tokio::test]
async fn broken_model_is_unavailable_when_exit_on_error_is_off() {
    let repo = repo_with_broken_model();
    let mut config = Config::for_repository(repo.path());
    config.models.exit_on_error = false;
    config.models.strict_readiness = false;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let broken = index_row(&mut client, "broken").await;
    assert_eq!(broken.state, "UNAVAILABLE");
    assert!(!broken.reason.is_empty());
    let response = client
        .model_infer(add_sub_request(&ramp(16, 1.0), &ramp(16, 1.0), 1))
        .await
        .unwrap();
    assert_eq!(response.into_inner().outputs.len(), 2);
    server.stop().await.unwrap();

    // With strict readiness (the default) the server is live but never ready.
    let mut config = Config::for_repository(repo.path());
    config.models.exit_on_error = false;
    let server = TestServer::spawn(config).await;
    let mut client = server.client().await;
    let mut loaded = false;
    for _ in 0..500 {
        let index = client
            .repository_index(RepositoryIndexRequest::default())
            .await;
        if let Ok(index) = index {
            if index
                .into_inner()
                .models
                .iter()
                .any(|m| m.name == "broken" && m.state == "UNAVAILABLE")
            {
                loaded = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(loaded);
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        !client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    server.stop().await.unwrap();
}
