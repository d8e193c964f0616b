//! The inference service's codec through the real server: a ModelInferRequest is walked on the wire
//! before prost decodes it, so contents that cannot match their shape are refused naming the input
//! (on ModelInfer; on a stream that message is answered so and the stream goes on), mutated wire bytes never crash the server and are served only
//! when they decode to a valid request, and compressed requests are served.
mod common;

use bytes::{BufMut, Bytes};
use common::*;
use onnx_gateway::proto::model_infer_request::InferInputTensor;
use onnx_gateway::proto::*;
use onnx_gateway::server::codec_prescan::scan_request;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

fn typed_fp32(shape: Vec<i64>, values: Vec<f32>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "identity_fp32".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape,
            contents: Some(InferTensorContents {
                fp32_contents: values,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn contents_that_miss_the_shape_are_refused_naming_the_input() {
    let server = TestServer::start(&test_models()).await;
    let mut client = server.client().await;
    let status = client
        .model_infer(typed_fp32(vec![1, 2], vec![1.0; 3]))
        .await
        .expect_err("3 values for 2");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "input 'INPUT0' has 3 elements in its typed contents but its shape needs 2"
    );
    // The parameter that carries a refusal is the gateway's: a client that sends it is refused.
    let mut forged = typed_fp32(vec![1, 2], vec![1.0, 2.0]);
    forged.parameters.insert(
        onnx_gateway::server::codec::REFUSED_PARAMETER.into(),
        InferParameter {
            parameter_choice: Some(infer_parameter::ParameterChoice::StringParam("mine".into())),
        },
    );
    let status = client.model_infer(forged).await.expect_err("reserved");
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "mine")
    );
    // More inputs than a request may name, each empty (prost would build them all).
    let many = ModelInferRequest {
        model_name: "identity_fp32".into(),
        inputs: vec![InferInputTensor::default(); 5000],
        ..Default::default()
    };
    let status = client.model_infer(many).await.expect_err("5000 inputs");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at most 4096 inputs"),
        "{status:?}"
    );
    // On a stream, as Triton: the refused message is answered with the reason under its id, and
    // the stream goes on with the next. (Answers may come in any order: they are matched by id.)
    let with_id = |id: &str, values: Vec<f32>| ModelInferRequest {
        id: id.into(),
        ..typed_fp32(vec![1, 2], values)
    };
    let messages = vec![
        with_id("first", vec![1.0, 2.0]),
        with_id("refused", vec![1.0]),
        with_id("third", vec![3.0, 4.0]),
    ];
    let mut answers = client
        .model_stream_infer(tokio_stream::iter(messages))
        .await
        .expect("stream opens")
        .into_inner();
    let mut by_id = std::collections::HashMap::new();
    while let Some(answer) = answers.message().await.expect("no stream error") {
        let response = answer
            .infer_response
            .clone()
            .expect("each answer names its request");
        assert_eq!(response.model_name, "identity_fp32");
        by_id.insert(response.id.clone(), (answer.error_message, response));
    }
    assert_eq!(by_id.len(), 3, "{by_id:?}");
    assert_eq!(
        by_id["refused"].0,
        "input 'INPUT0' has 1 elements in its typed contents but its shape needs 2"
    );
    for (id, values) in [("first", [1.0, 2.0]), ("third", [3.0, 4.0])] {
        let (error, response) = &by_id[id];
        assert_eq!(error, "", "{id}");
        assert_eq!(f32_from(&response.raw_output_contents[0]), values, "{id}");
    }
    let served = client
        .model_infer(typed_fp32(vec![1, 2], vec![1.0, 2.0]))
        .await
        .expect("still serving");
    assert_eq!(
        f32_from(&served.into_inner().raw_output_contents[0]),
        [1.0, 2.0]
    );
    server.stop().await.expect("clean stop");
}

/// Sends `messages` on one stream whose first message is good and second does not fit the memory
/// budget: the first is answered without error, then the stream ends; returns the status it ends
/// with.
async fn first_answer_then_end(client: &mut Client, messages: Vec<ModelInferRequest>) -> Status {
    let mut answers = client
        .model_stream_infer(tokio_stream::iter(messages))
        .await
        .expect("stream opens")
        .into_inner();
    let first = answers.message().await.expect("first answer").expect("one");
    assert_eq!(first.error_message, "");
    answers.message().await.expect_err("the stream ends")
}

fn typed_bytes(elements: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "identity_bytes".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "BYTES".into(),
            shape: vec![1, elements as i64],
            contents: Some(InferTensorContents {
                bytes_contents: vec![Bytes::new(); elements],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The bytes a budget refusal says were asked for: prost's 64 per element (and the input's struct),
/// not yet the engine's 128 per element that decode_request would add.
fn charged(text: &str) -> u64 {
    let asked = text
        .strip_prefix("memory budget exceeded: ")
        .and_then(|rest| rest.split(' ').next());
    asked.and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn what_prost_would_allocate_is_charged_before_it_decodes() {
    let mut config = onnx_gateway::Config::for_repository(test_models());
    config.memory.max_inflight_bytes = Some(1 << 20);
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // 100,000 empty elements are 200 KB on the wire but 6.4 MB of prost's objects.
    let status = client
        .model_infer(typed_bytes(100_000))
        .await
        .expect_err("does not fit 1 MiB");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(charged(status.message()) / 10_000, 640, "{status:?}");
    // On a stream the codec charges it too (the stream ends), before any handler saw it.
    let end = first_answer_then_end(&mut client, vec![typed_bytes(2), typed_bytes(100_000)]).await;
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert_eq!(charged(end.message()) / 10_000, 640, "{end:?}");
    client
        .model_infer(typed_bytes(3))
        .await
        .expect("small ones are served");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn compressed_requests_are_served() {
    let server = TestServer::start(&test_models()).await;
    // (tonic's deflate needs a feature this crate does not enable; the Python tests send deflate.)
    for encoding in [CompressionEncoding::Gzip] {
        let mut client = server.client().await.send_compressed(encoding);
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let answer = client
            .model_infer(typed_fp32(vec![1, 1000], values.clone()))
            .await
            .expect("served");
        assert_eq!(
            f32_from(&answer.into_inner().raw_output_contents[0]),
            values
        );
        let status = client
            .model_infer(typed_fp32(vec![1, 2], vec![1.0]))
            .await
            .expect_err("refused after decompression");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        // A stream of compressed messages: each answered, in order.
        let messages: Vec<_> = (1..=3)
            .map(|n| typed_fp32(vec![1, n], vec![n as f32; n as usize]))
            .collect();
        let mut answers = client
            .model_stream_infer(tokio_stream::iter(messages))
            .await
            .expect("stream opens")
            .into_inner();
        let mut sizes = Vec::new();
        while let Some(answer) = answers.message().await.expect("answers") {
            assert_eq!(answer.error_message, "");
            let response = answer.infer_response.expect("response");
            sizes.push(f32_from(&response.raw_output_contents[0]).len());
        }
        sizes.sort();
        assert_eq!(sizes, [1, 2, 3]);
    }
    server.stop().await.expect("clean stop");
}

/// Sends wire bytes as they are, and decodes the answer with prost.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(item);
        Ok(())
    }
}

struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = ModelInferResponse;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<ModelInferResponse>, Status> {
        ModelInferResponse::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ModelInferResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

async fn send_raw(
    channel: tonic::transport::Channel,
    wire: Bytes,
) -> Result<ModelInferResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
    grpc.unary(tonic::Request::new(wire), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

fn valid_request() -> impl Strategy<Value = ModelInferRequest> {
    (1i64..5, prop::bool::ANY).prop_map(|(n, typed)| {
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut request = typed_fp32(vec![1, n], values.clone());
        if !typed {
            request.inputs[0].contents = None;
            request.raw_input_contents = vec![f32_bytes(&values)];
        }
        request
    })
}

/// Up to three byte changes (set, insert, cut) of an encoded valid request.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        valid_request(),
        prop::collection::vec((0u8..3, any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(request, changes)| {
            let mut wire = request.encode_to_vec();
            for (kind, at, byte) in changes {
                let at = at % (wire.len() + 1);
                match kind {
                    0 if at < wire.len() => wire[at] = byte,
                    1 => wire.insert(at, byte),
                    _ => wire.truncate(at),
                }
            }
            wire
        })
}

#[test]
fn mutated_wire_bytes_are_served_only_when_they_are_a_valid_request() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime.block_on(TestServer::start(&test_models()));
    let _entered = runtime.enter();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("endpoint")
        .connect_lazy();
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig {
            cases: 256,
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let served = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&mutated(), |wire| {
        let answer = runtime.block_on(send_raw(channel.clone(), Bytes::from(wire.clone())));
        match answer {
            Ok(response) => {
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Served: prost reads it, the walk passed it, and its data came back.
                let request = ModelInferRequest::decode(&wire[..]);
                prop_assert!(request.is_ok(), "served what prost refuses");
                prop_assert!(scan_request(&wire).is_ok());
                prop_assert_eq!(response.raw_output_contents.len(), 1);
            }
            Err(status) => prop_assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::NotFound | Code::Internal
                ),
                "refused with {:?}: {}",
                status.code(),
                status.message()
            ),
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // Both sides must be exercised, or the property says nothing.
    let served = served.into_inner();
    assert!((26..230).contains(&served), "{served} of 256 served");
    runtime.block_on(async {
        let mut client = server.client().await;
        let live = client.server_live(ServerLiveRequest {}).await;
        assert!(live.expect("server still answers").into_inner().live);
        server.stop().await.expect("clean stop");
    });
}
